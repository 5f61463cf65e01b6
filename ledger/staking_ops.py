"""Token and staking operations of the typed client (mixed into ``GridMintContracts``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from eth_utils import keccak
from web3.types import TxReceipt

from ledger.client_base import ContractsBase
from ledger.values import to_address, to_bytes32, to_uint
from protocol.errors import ChainError
from protocol.signing import sign_accusation as sign_accusation_message


def redo_evidence(evidence: bytes | str) -> bytes:
    """The evidence a slash's redo is sent under (GridStaking.redoEvidenceOf: one per first evidence, exactly once;
    the guardian's void of the first slash voids it too)."""
    return keccak(b"GridMint/slash-redo/v1" + to_bytes32(evidence))


@dataclass(frozen=True)
class StakeState:
    """One account's stake. ``staked`` backs work (what ``stake_of`` reports); ``locked`` (work in flight) and
    ``bonded`` (verifier bonds of open accusations) are parts of it that cannot be unbonded; ``unbonding`` is on its
    way out (still slashable) and can be withdrawn from ``unbonding_ready_at``: the deadline in force, i.e. the
    request's time + the delay + every second the staking contract has been paused since (time paused does not count
    toward the delay; while paused, the deadline moves on with the clock)."""

    staked: int
    locked: int
    bonded: int
    unbonding: int
    unbonding_ready_at: int
    open_disputes: int


@dataclass(frozen=True)
class Dispute:
    """An open accusation on GridStaking: ``provider`` accused by ``verifier`` (who bonded ``bond``) of ``amount``
    unearned pay (as signed; a fraud verdict slashes the provider's whole stake regardless). ``provider`` is the zero
    address when no dispute is open for the evidence."""

    provider: str
    verifier: str
    amount: int
    bond: int

    @property
    def is_open(self) -> bool:
        return int(self.provider, 16) != 0


@dataclass(frozen=True)
class SlashEvent:
    """A slash of an account (``kind`` "slashed": what it took) or the guardian's void of one ("voided": what went
    back), at ``position`` (block, log index) on chain."""

    position: tuple[int, int]
    evidence: str  # 0x hex
    kind: str
    amount: int


@dataclass(frozen=True)
class PendingSlash:
    """A slash waiting out GridStaking's ``slashDelay``: ``amount`` taken from ``account``, ``bounty`` of it for
    ``verifier`` and the rest for the treasury, payable (``finalize_slash``) from ``ready_at``, the deadline in force
    (time paused does not count); the guardian may void it before. ``amount`` is 0 when none is pending."""

    account: str
    verifier: str
    amount: int
    bounty: int
    ready_at: int


def _evidence_of(log: Any) -> str:
    """A GridStaking event log's ``evidence``, as 0x hex."""
    return "0x" + bytes(log["args"]["evidence"]).hex()


def _position(log: Any) -> tuple[int, int]:
    """Where an event log sits on chain: (block, log index), in the order the chain applied them."""
    return int(log["blockNumber"]), int(log["logIndex"])


def gpu_class_id(gpu_class: str | bytes) -> bytes:
    """bytes32 key of a GPU class: ``keccak256(name)`` for a name such as ``"H100-80GB"``, or a raw 32-byte id."""
    if isinstance(gpu_class, str) and not gpu_class.startswith(("0x", "0X")):
        return keccak(text=gpu_class)
    return to_bytes32(gpu_class, "gpu_class")


class TokenStakingOps(ContractsBase):
    # token

    def total_supply(self) -> int:
        return int(self._call(self.token, "totalSupply"))

    def balance_of(self, address: str) -> int:
        return int(self._call(self.token, "balanceOf", to_address(address)))

    def transfer(self, to: str, amount: int) -> TxReceipt:
        return self._send(self.token, "transfer", to_address(to), to_uint(amount))

    def contract_balances(self) -> dict[str, int]:
        """GMT held by each GridMint contract that holds tokens: staking, escrow and the payout distributor."""
        return {
            "staking": self.balance_of(self.staking.address),
            "escrow": self.balance_of(self.escrow.address),
            "distributor": self.balance_of(self.distributor.address),
        }

    # staking: bonding

    def stake(self, amount: int) -> TxReceipt:
        """Approve (if the allowance is short) and stake ``amount``; returns the stake receipt."""
        amount = to_uint(amount)
        with self._account_op():
            self._ensure_allowance(self.staking.address, amount)
            return self._send(self.staking, "stake", amount)

    def request_unbond(self, amount: int) -> int:
        """Start unbonding ``amount`` of this account's free stake; returns the timestamp it can be withdrawn at if the
        staking contract is not paused before then (each second paused pushes it back: :meth:`stake_state` reports the
        deadline in force)."""
        receipt = self._send(self.staking, "requestUnbond", to_uint(amount))
        return int(self._event_arg(self.staking, "UnbondRequested", receipt, "readyAt"))

    def withdraw(self) -> int:
        """Withdraw everything that finished unbonding; returns the amount (0, sending nothing, if none is pending).

        Raises StakeFrozenError while still unbonding or under dispute."""
        if self.stake_state(self.address).unbonding == 0:
            return 0
        receipt = self._send(self.staking, "withdraw")
        return int(self._event_arg(self.staking, "Withdrawn", receipt, "amount"))

    def unstake(self, amount: int) -> TxReceipt:
        """Compatibility: ``request_unbond(amount)``, then ``withdraw()`` at once if the unbonding delay allows
        (it does with a zero delay, as on a development deployment). Returns the last receipt."""
        receipt = self._send(self.staking, "requestUnbond", to_uint(amount))
        ready_at = int(self._event_arg(self.staking, "UnbondRequested", receipt, "readyAt"))
        if ready_at <= self.chain.timestamp():
            receipt = self._send(self.staking, "withdraw")
        return receipt

    def stake_of(self, address: str) -> int:
        """Bonded stake backing work (excludes what is unbonding)."""
        return int(self._call(self.staking, "stakeOf", to_address(address)))

    def free_stake_of(self, address: str) -> int:
        """What ``address`` may unbond now: its stake beyond locks and bonds, or 0 while any accusation of its is
        open (GridStaking.freeStakeOf). Not what it can bond: see :meth:`bondable_stake_of`."""
        return int(self._call(self.staking, "freeStakeOf", to_address(address)))

    def bondable_stake_of(self, address: str) -> int:
        """What a verifier can still bond on a new accusation: its stake beyond locks and bonds (what
        GridStaking.accuse bonds from), whatever accusations of its are open."""
        st = self.stake_state(address)
        return max(0, st.staked - st.locked - st.bonded)

    def stake_state(self, address: str) -> StakeState:
        raw = self._call(self.staking, "accountOf", to_address(address))
        return StakeState(*(int(x) for x in raw))

    def total_staked(self) -> int:
        """Every token the staking contract holds for stakers (staked + unbonding over all accounts)."""
        return int(self._call(self.staking, "totalStaked"))

    def min_stake(self, gpu_class: str | bytes) -> int:
        return int(self._call(self.staking, "minStake", gpu_class_id(gpu_class)))

    def meets_min_stake(self, provider: str, gpu_class: str | bytes) -> bool:
        return bool(self._call(self.staking, "meetsMinStake", to_address(provider), gpu_class_id(gpu_class)))

    def lock_stake(self, provider: str, amount: int) -> TxReceipt:
        """Lock ``amount`` of ``provider``'s free stake behind work in flight (needs LOCKER_ROLE)."""
        return self._send(self.staking, "lock", to_address(provider), to_uint(amount))

    def unlock_stake(self, provider: str, amount: int) -> TxReceipt:
        return self._send(self.staking, "unlock", to_address(provider), to_uint(amount))

    # staking: slashing

    def evidence_used(self, evidence: bytes | str) -> bool:
        return bool(self._call(self.staking, "evidenceUsed", to_bytes32(evidence, "evidence")))

    def dispute_of(self, evidence: bytes | str) -> Dispute:
        """The open dispute for ``evidence``; all zero if none is open (never opened, or already resolved)."""
        provider, verifier, amount, bond = self._call(self.staking, "disputeOf", to_bytes32(evidence, "evidence"))
        return Dispute(str(provider), str(verifier), int(amount), int(bond))

    def slash(self, provider: str, amount: int, verifier: str, evidence: bytes | str) -> bool:
        """Governance slash of up to ``amount`` of ``provider``'s stake for ``evidence`` (needs SLASHER_ROLE).

        Exactly-once per evidence: returns False, sending nothing, if the evidence was already used.
        """
        ev = to_bytes32(evidence, "evidence")
        if self.evidence_used(ev):
            return False
        return self._send_once(self.staking, "slash", to_address(provider), to_uint(amount), to_address(verifier), ev,
                               done="StakingEvidenceUsed") is not None

    def sign_accusation(self, provider: str, evidence: bytes | str, amount: int) -> bytes:
        """This account (a staked verifier) signs that ``provider``'s commitment ``evidence`` does not replay, and
        that ``amount`` of its pay was unearned (recorded with the dispute; it does not cap the slash).

        Returns the 65-byte EIP-712 signature anyone can submit with ``accuse``. The encoding is
        ``protocol.signing.sign_accusation``'s (the one the node's verifier uses), under this deployment's chain id
        and staking address."""
        signature = sign_accusation_message(
            self.account, self.chain.chain_id, self.staking.address, to_address(provider),
            to_bytes32(evidence, "evidence"), to_uint(amount),
        )
        return bytes.fromhex(signature.removeprefix("0x"))

    def accuse(self, provider: str, evidence: bytes | str, amount: int, signature: bytes) -> TxReceipt:
        """Submit a verifier's signed accusation (opens a dispute; bonds the verifier's ``verifierBond``)."""
        return self._send(
            self.staking, "accuse", to_address(provider), to_bytes32(evidence, "evidence"), to_uint(amount), signature
        )

    def resolve_dispute(self, evidence: bytes | str, fraud: bool) -> int:
        """Referee verdict (needs REFEREE_ROLE); returns the amount slashed: with ``fraud``, the provider's whole
        stake (staked + unbonding, whatever amount was accused); otherwise the verifier's bond, or what is left of it
        where a slash of the verifier's stake has since taken part of it (0 after a whole-stake slash: stake added
        later never pays for it)."""
        receipt = self._send(self.staking, "resolve", to_bytes32(evidence, "evidence"), bool(fraud))
        return int(self._event_arg(self.staking, "DisputeResolved", receipt, "slashed"))

    def dismiss_dispute(self, evidence: bytes | str) -> bool:
        """Referee verdict that an accusation was made in good faith and the provider is innocent (needs
        REFEREE_ROLE): the dispute closes and the verifier's bond is released; no token moves. Exactly-once: returns
        False, sending nothing, if no dispute is open for ``evidence`` (already resolved or dismissed)."""
        ev = to_bytes32(evidence, "evidence")
        if int(self.dispute_of(ev).provider, 16) == 0:
            return False
        self._send(self.staking, "dismiss", ev)
        return True

    # staking: the slash delay

    def slash_delay(self) -> int:
        """Seconds a slash waits (not counting time paused) before it is paid out; 0: paid at once."""
        return int(self._call(self.staking, "slashDelay"))

    def slash_of(self, evidence: bytes | str) -> PendingSlash:
        """The slash for ``evidence`` waiting out the delay; amount 0 if none (paid, voided, or never delayed)."""
        account, verifier, amount, bounty, ready_at = self._call(self.staking, "slashOf",
                                                                  to_bytes32(evidence, "evidence"))
        return PendingSlash(str(account), str(verifier), int(amount), int(bounty), int(ready_at))

    def total_pending_slashes(self) -> int:
        return int(self._call(self.staking, "totalPendingSlashes"))

    def pending_slashes_of(self, account: str) -> int:
        """What ``account``'s slashes waiting out the delay hold of its former stake (a void gives it back)."""
        return int(self._call(self.staking, "pendingSlashesOf", to_address(account)))

    def _staking_logs(self, event: str, from_block: int = 0, **filters: object) -> list[Any]:
        return self._logs(self.staking, event, to_uint(from_block, "from_block"), **filters)

    def pending_slashes_listed(self, account: str) -> dict[str, int]:
        """``account``'s slashes waiting out the delay now: evidence (0x hex) -> amount."""
        out: dict[str, int] = {}
        for log in self._staking_logs("SlashPending", account=to_address(account)):
            ev = _evidence_of(log)
            if ev not in out:
                amount = self.slash_of(ev).amount
                if amount > 0:
                    out[ev] = amount
        return out

    def slash_position(self, evidence: bytes | str) -> tuple[int, int] | None:
        """Where on chain (block, log index) the slash under ``evidence`` took its stake: its Slashed event (None:
        never slashed)."""
        logs = self._staking_logs("Slashed", evidence=to_bytes32(evidence, "evidence"))
        return _position(logs[0]) if logs else None

    def slash_voided(self, evidence: bytes | str) -> bool:
        """Whether the guardian voided the slash under ``evidence`` (its SlashVoided event)."""
        return bool(self._staking_logs("SlashVoided", evidence=to_bytes32(evidence, "evidence")))

    def slashes_pending_at(self, account: str, at: tuple[int, int]) -> dict[str, int]:
        """``account``'s slashes that were waiting out the delay at chain position ``at`` (block, log index): sent
        before it, neither paid out nor voided before it, whatever became of them since: evidence (0x hex) ->
        amount."""
        acct = to_address(account)
        ended = {_evidence_of(log) for event in ("SlashFinalized", "SlashVoided")
                 for log in self._staking_logs(event, account=acct) if _position(log) < at}
        return {_evidence_of(log): int(log["args"]["amount"]) for log in self._staking_logs("SlashPending", account=acct)
                if _position(log) < at and _evidence_of(log) not in ended}

    def slash_events_after(self, account: str, after: tuple[int, int]) -> list[SlashEvent]:
        """``account``'s slashes (Slashed events naming it) and the guardian's voids of them (SlashVoided) after chain
        position ``after`` (block, log index; :meth:`slash_position`), in the order the chain applied them."""
        acct = to_address(account)
        out = [SlashEvent(_position(log), _evidence_of(log), kind, int(log["args"][field]))
               for event, kind, field, filters in (("Slashed", "slashed", "slashed", {"provider": acct}),
                                                   ("SlashVoided", "voided", "amount", {"account": acct}))
               for log in self._staking_logs(event, max(after[0], 0), **filters) if _position(log) > after]
        return sorted(out, key=lambda e: e.position)

    def dispute_terms(self, evidence: bytes | str) -> tuple[int, int | None]:
        """The bond an accusation under ``evidence`` bonded and what its false verdict took (None: not resolved
        false, or not yet), from its Accused and DisputeResolved events (0, None: never accused)."""
        ev = to_bytes32(evidence, "evidence")
        accused = self._staking_logs("Accused", evidence=ev)
        resolved = [log for log in self._staking_logs("DisputeResolved", evidence=ev) if not log["args"]["fraud"]]
        bond = int(accused[-1]["args"]["bond"]) if accused else 0
        return bond, (int(resolved[-1]["args"]["slashed"]) if resolved else None)

    def finalize_slash(self, evidence: bytes | str) -> bool:
        """Pay out the slash for ``evidence`` once its delay has passed (anyone may send it). Exactly-once: returns
        False, sending nothing, if none is pending (paid already, voided, or paid at once); ChainError
        (StakingSlashNotReady) before its time."""
        ev = to_bytes32(evidence, "evidence")
        if self.slash_of(ev).amount == 0:
            return False
        return self._send_once(self.staking, "finalizeSlash", ev, done="StakingUnknownSlash") is not None

    def void_slash(self, evidence: bytes | str) -> bool:
        """Guardian (GUARDIAN_ROLE): undo the slash for ``evidence`` before its delay has passed, and its redo
        (:func:`redo_evidence`) if pending and not final; their stake goes back to the account. Returns False,
        sending nothing, if the slash is not pending and its redo is not pending or final; ChainError
        (StakingSlashFinal) once the slash's delay has passed."""
        ev = to_bytes32(evidence, "evidence")

        def nothing_to_void() -> bool:  # (neither the slash nor its redo pending and voidable by the latest block)
            redo = self.slash_of(redo_evidence(ev))
            return self.slash_of(ev).amount == 0 and (redo.amount == 0 or redo.ready_at <= self.chain.timestamp())

        if self.slash_of(ev).amount > 0:
            self._send(self.staking, "voidSlash", ev)
            return True
        if nothing_to_void():
            return False
        # (the redo alone, final by the next block's time if that is its deadline: refused then, nothing voided;
        # a node that estimated against the latest block sends it and it fails undecoded)
        try:
            return self._send_once(self.staking, "voidSlash", ev, done="StakingUnknownSlash") is not None
        except ChainError as exc:
            if exc.error_name is None and nothing_to_void():
                return False
            raise

    # helpers

    def _ensure_allowance(self, spender: str, amount: int) -> None:
        if int(self._call(self.token, "allowance", self.address, spender)) < amount:
            self._send(self.token, "approve", spender, amount)

    def _sign_permit(self, spender: str, value: int, deadline: int) -> tuple[int, bytes, bytes]:
        domain = {
            "name": self._call(self.token, "name"),
            "version": "1",
            "chainId": self.chain.chain_id,
            "verifyingContract": self.token.address,
        }
        types = {
            "Permit": [
                {"name": "owner", "type": "address"},
                {"name": "spender", "type": "address"},
                {"name": "value", "type": "uint256"},
                {"name": "nonce", "type": "uint256"},
                {"name": "deadline", "type": "uint256"},
            ]
        }
        message = {
            "owner": self.address,
            "spender": spender,
            "value": value,
            "nonce": int(self._call(self.token, "nonces", self.address)),
            "deadline": deadline,
        }
        signed = self.account.sign_typed_data(domain, types, message)
        return int(signed.v), int(signed.r).to_bytes(32, "big"), int(signed.s).to_bytes(32, "big")
