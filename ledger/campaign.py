"""The invariant campaign: random operations against the real contracts, checked against ``campaign_model.Model``.

``Harness`` deploys the GridMint contracts on a dev chain, hands tokens to a cast of customers, providers and
verifiers, and exposes one method per operation (stake, unbond, withdraw, lock, fund, release, release to the pool,
cancel, close, claim, post root, void root, claim payout, batched payout push, set the dispute window, slash, accuse,
resolve, dismiss, finalize and void a delayed slash, set the slash delay, pause, unpause, advance time).
Each method sends the transaction(s), compares the outcome (success, or the exact custom error) with the model's
prediction, then ``check()`` reads the whole system in one call (GridLens; GridStaking's pending slashes besides)
and verifies:

- token totals are conserved (every token sits with a known holder; the sum is the fixed supply);
- every token a contract holds is accounted for: staking == totalStaked + totalPendingSlashes, totalStaked ==
  sum(staked + unbonding), totalPendingSlashes == the sum of every slashOf; escrow == sum over open jobs of
  (funded - released) + per-unit claimables; distributor == deposited - sum(claimed);
- no account ever claimed more from the pool than its cumulative entitlement in the off-chain ledger;
- nothing moves while paused (every token-moving operation must revert EnforcedPause, and balances stand still);
- a slashed account never gets the slashed part back, unless the guardian voids the slash within the slash delay:
  stake in + restored == withdrawn + slashed + staked + unbonding, and slashed == paid out + pending + restored;
- and every on-chain figure equals the model's.

The Hypothesis state machine in ``tests/ledger/test_invariants.py`` drives these methods for the test suite (a few
hundred operations on py-evm); ``run_campaign`` drives them with a seeded RNG for ``gridmint bench settlement``
(hundreds of thousands of operations, fastest on a Hardhat node through ``RpcDriver``).
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Protocol

from eth_abi import encode as abi_encode
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_tester.exceptions import TransactionFailed
from eth_utils import keccak
from web3.exceptions import Web3Exception

from ledger.campaign_model import Model, Params
from ledger.chain import Chain
from ledger.client import GridMintContracts
from ledger.contracts import ErrorDecoder, gridmint_error_decoder
from ledger.deploy import deploy
from ledger.errors import revert_payload
from ledger.jsonrpc import JsonRpcSocket
from ledger.payout_tree import PayoutTree, build_payout_tree
from ledger.staking_ops import redo_evidence
from protocol.errors import ChainError, GridMintError
from protocol.jobs import RANDOM_BYTES, job_id_bytes

TX_GAS = 1_000_000
SUPPLY = 10**30
START_BALANCE = 10**6
N_JOBS = 4  # job i is customer i % 2's (Harness.jobs): the other customer's first funding of it must revert
SLASH_DELAY = 60  # the default Params' slash delay: between the unbonding delay (50) and the dispute window (100)
ZERO_ADDRESS = "0x" + "00" * 20
UNITS = tuple(keccak(text=f"campaign-unit-{i}") for i in range(6))


@lru_cache(maxsize=None)
def _selector(signature: str) -> tuple[bytes, list[str]]:
    inner = signature[signature.index("(") + 1 : -1]
    return keccak(text=signature)[:4], [t for t in inner.split(",") if t]


def calldata(signature: str, *args: Any) -> bytes:
    """ABI calldata for ``signature`` (e.g. ``"stake(uint256)"``; no tuple types)."""
    selector, types = _selector(signature)
    return selector + abi_encode(types, list(args))


# ---------------------------------------------------------------- drivers


class Driver(Protocol):
    """The few chain operations the campaign needs, as cheap as each backend allows."""

    def send(self, sender: LocalAccount, to: str, data: bytes, timestamp: int) -> str | None:
        """Mine one transaction in a block stamped ``timestamp``; None if it succeeded, else the decoded custom
        error name (``"?"`` if unknown)."""

    def read(self, to: str, data: bytes) -> bytes: ...

    def snapshot(self) -> str: ...

    def revert(self, snapshot_id: str) -> None: ...


class InProcessDriver:
    """py-evm (``Chain.in_process()``): locally signed raw transactions with a fixed gas limit, no estimates.

    A reverted transaction is mined with status 0 and no revert data, so its error is read by re-running it as an
    ``eth_call`` on the pending block with the same pinned timestamp (a reverted transaction changes no contract
    state, so that is exactly the state and time it ran in)."""

    def __init__(self, chain: Chain) -> None:
        if chain._tester is None:  # noqa: SLF001
            raise GridMintError("InProcessDriver needs Chain.in_process()")
        self.chain = chain
        self.tester = chain._tester  # noqa: SLF001 - dev-chain clock control
        self.errors = gridmint_error_decoder()
        self._nonces: dict[str, int] = {}

    def send(self, sender: LocalAccount, to: str, data: bytes, timestamp: int) -> str | None:
        self._pin(timestamp)
        w3 = self.chain.w3
        nonce = self._nonces.get(sender.address)
        if nonce is None:
            nonce = int(w3.eth.get_transaction_count(sender.address))
        tx = {"to": to, "data": data, "gas": TX_GAS, "chainId": self.chain.chain_id, "nonce": nonce, "value": 0,
              "maxFeePerGas": 10**11, "maxPriorityFeePerGas": 10**9}
        tx_hash = w3.eth.send_raw_transaction(sender.sign_transaction(tx).raw_transaction)
        self._nonces[sender.address] = nonce + 1
        if w3.eth.get_transaction_receipt(tx_hash)["status"] == 1:
            return None
        self._pin(timestamp)
        try:
            w3.eth.call({"from": sender.address, "to": to, "data": data, "gas": TX_GAS}, "pending")  # type: ignore[typeddict-item]
        except (TransactionFailed, Web3Exception) as exc:
            payload = revert_payload(exc)
            if isinstance(payload, bytes):
                return self.errors.decode(payload).name or "?"
        return "?"

    def read(self, to: str, data: bytes) -> bytes:
        return bytes(self.chain.w3.eth.call({"to": to, "data": data}))  # type: ignore[typeddict-item]

    def _pin(self, timestamp: int) -> None:
        # eth-tester executes a transaction in the pending block: pinning that block's timestamp is what its
        # time_travel does, minus the empty block it mines.
        backend = self.tester.backend
        backend.chain.header = backend.chain.header.copy(timestamp=timestamp)

    def snapshot(self) -> str:
        return self.chain.snapshot()

    def revert(self, snapshot_id: str) -> None:
        self.chain.revert(snapshot_id)
        self._nonces.clear()


class RpcDriver:
    """Raw JSON-RPC to a Hardhat node with its unlocked dev accounts, for long campaigns: ``eth_sendTransaction``
    (no local signing) batched with ``evm_setNextBlockTimestamp`` in one HTTP request over a kept-alive socket
    (``ledger.jsonrpc``), no web3 middleware: ~2.5 ms per transaction."""

    def __init__(self, chain: Chain) -> None:
        self.chain = chain
        self.errors = gridmint_error_decoder()
        url = str(getattr(chain.w3.provider, "endpoint_uri", ""))
        if chain.backend != "http" or not url:
            raise GridMintError(f"RpcDriver needs an http chain, got {chain.backend}")
        self.rpc = JsonRpcSocket(url)

    def send(self, sender: LocalAccount, to: str, data: bytes, timestamp: int) -> str | None:
        tx = {"from": sender.address, "to": to, "data": "0x" + data.hex(), "gas": hex(TX_GAS)}
        stamp, reply = self.rpc.batch([("evm_setNextBlockTimestamp", [timestamp]), ("eth_sendTransaction", [tx])])
        if "error" in stamp:
            raise ChainError(f"evm_setNextBlockTimestamp({timestamp}) failed: {stamp['error']}")
        error = reply.get("error")
        if error is None:
            return None
        payload = error.get("data")
        if isinstance(payload, dict):
            payload = payload.get("data")
        if isinstance(payload, str) and payload.startswith("0x"):
            return self.errors.decode(bytes.fromhex(payload[2:])).name or "?"
        return "?"

    def read(self, to: str, data: bytes) -> bytes:
        return bytes.fromhex(str(self.rpc.call("eth_call", [{"to": to, "data": "0x" + data.hex()}, "latest"]))[2:])

    def snapshot(self) -> str:
        return self.chain.snapshot()

    def revert(self, snapshot_id: str) -> None:
        self.chain.revert(snapshot_id)


def make_driver(chain: Chain) -> Driver:
    """``InProcessDriver`` on py-evm, ``RpcDriver`` on a Hardhat node (whose dev accounts are unlocked)."""
    return InProcessDriver(chain) if chain.backend == "in_process" else RpcDriver(chain)


# ---------------------------------------------------------------- the harness

@dataclass
class Cast:
    operator: LocalAccount
    customers: list[LocalAccount]
    providers: list[LocalAccount]
    verifiers: list[LocalAccount]
    treasury: str

    @property
    def stakers(self) -> list[LocalAccount]:
        return [*self.providers, *self.verifiers]

    @property
    def people(self) -> list[LocalAccount]:
        return [self.operator, *self.customers, *self.providers, *self.verifiers]


@dataclass
class Stats:
    ops: int = 0
    transactions: int = 0
    reverts_expected: int = 0
    checks: int = 0
    violations: list[str] = field(default_factory=list)
    #: operations attempted, by kind (``post_root_honest``, ``claim_payout_tampered``...)
    by_op: dict[str, int] = field(default_factory=dict)
    #: transactions that succeeded (as the model predicted), by kind: shows which flows really ran
    succeeded: dict[str, int] = field(default_factory=dict)
    #: transactions the model predicted to revert, by the custom error it predicted: shows which refusals ran
    refused: dict[str, int] = field(default_factory=dict)


class Harness:
    """The real contracts and the model, side by side. See the module docstring."""

    def __init__(
        self,
        chain: Chain,
        *,
        params: Params | None = None,
        raise_on_violation: bool = False,
    ) -> None:
        self.chain = chain
        self.driver = make_driver(chain)
        # A slash delay by default, as in production: a slash is then paid out or voided later, and each episode of
        # ``run_campaign`` (each Hypothesis example) may switch it off through governance to cover the immediate path.
        self.params = params or Params(
            bounty_bps=5000, unbonding_delay=50, verifier_bond=100, dispute_window=100, cancel_grace=30,
            slash_delay=SLASH_DELAY,
        )
        self.raise_on_violation = raise_on_violation
        self.stats = Stats()
        self.decoder: ErrorDecoder = gridmint_error_decoder()
        accounts = chain.dev_accounts(8)
        self.cast = Cast(accounts[0], accounts[1:3], accounts[3:6], accounts[6:8], Account.create().address)
        #: the job ids, each bound to a customer (protocol.jobs): job i to customer i % 2
        self.jobs = tuple(job_id_bytes(self.cast.customers[i % 2].address,
                                       keccak(text=f"campaign-job-{i}")[:RANDOM_BYTES]) for i in range(N_JOBS))
        self._setup()

    # ------------------------------------------------------------ setup and reset

    def _setup(self) -> None:
        cast, p = self.cast, self.params
        op = cast.operator
        self.deployment = deploy(
            self.chain, op, supply=SUPPLY, treasury=cast.treasury, bounty_bps=p.bounty_bps,
            unbonding_delay_s=p.unbonding_delay, verifier_bond=p.verifier_bond, dispute_window_s=p.dispute_window,
            cancel_grace_s=p.cancel_grace, slash_delay_s=p.slash_delay,
        )
        self.client = GridMintContracts(self.chain, self.deployment, op)
        d = self.deployment
        assert d.distributor is not None and d.kill_switch is not None and d.timelock is not None
        self.token, self.staking, self.escrow, self.distributor = d.token, d.staking, d.escrow, d.distributor
        self.kill_switch, self.timelock = d.kill_switch, d.timelock
        self.lens = self.chain.deploy_contract(op, "GridLens").address
        for person in cast.people[1:]:
            self.client.transfer(person.address, START_BALANCE)
            mine = self.client.as_account(person)
            for spender in (self.staking, self.escrow):
                mine._send(mine.token, "approve", spender, 2**256 - 1)  # noqa: SLF001
        self.watched = [person.address for person in cast.people] + [cast.treasury]
        self._lens_call = calldata(
            "read(address,address,address,address,address[],bytes32[])",
            self.token, self.staking, self.escrow, self.distributor, self.watched, list(self.jobs),
        )
        self._pending_call = calldata("totalPendingSlashes()")
        balances = {a: 0 for a in self.watched}
        balances[op.address] = SUPPLY - START_BALANCE * (len(cast.people) - 1)
        for person in cast.people[1:]:
            balances[person.address] = START_BALANCE
        self.base_model = Model(op.address, cast.treasury, p, now=self.chain.timestamp(), balances=balances)
        self.model = self.base_model.copy()
        self.trees: dict[int, PayoutTree] = {}
        #: slash evidence ``check()`` found settled on chain and in the model (it reads their slashOf no more)
        self._settled_slashes: set[bytes] = set()
        self._evidence = 0
        self._signers: dict[str, GridMintContracts] = {}
        self._dirty = True
        self._base = self.driver.snapshot()
        self.check()

    def reset(self) -> None:
        """Back to the freshly set-up state (chain and model), e.g. between Hypothesis examples."""
        self.driver.revert(self._base)
        self._base = self.driver.snapshot()  # a Hardhat snapshot is used up by revert
        self.model = self.base_model.copy()
        self.model.now = self.chain.timestamp()
        self.trees = {}
        self._settled_slashes = set()
        self._dirty = True

    # ------------------------------------------------------------ running one operation

    def _tx(self, name: str, sender: LocalAccount, to: str, data: bytes, predict: Callable[[], str | None]) -> None:
        """One transaction at the next second: the model predicts (and applies) it at that timestamp, the chain runs
        it at that very timestamp, and the outcomes must agree."""
        self.model.now += 1
        expected = predict()
        actual = self.driver.send(sender, to, data, self.model.now)
        self.stats.transactions += 1
        if expected is not None:
            self.stats.reverts_expected += 1
            self.stats.refused[expected] = self.stats.refused.get(expected, 0) + 1
        elif actual is None:
            self.stats.succeeded[name] = self.stats.succeeded.get(name, 0) + 1
        if actual is None or actual != expected:
            self._dirty = True
        if actual != expected:
            self._violation(f"{name}: expected {expected or 'success'}, got {actual or 'success'}")

    def _op(self, name: str) -> None:
        self.stats.ops += 1
        if self.stats.ops == 1:
            self._dirty = True
        self.stats.by_op[name] = self.stats.by_op.get(name, 0) + 1

    def _violation(self, text: str) -> None:
        self.stats.violations.append(f"op {self.stats.ops}: {text}")
        if self.raise_on_violation:
            raise AssertionError(self.stats.violations[-1])

    # ------------------------------------------------------------ operations (one per flow)

    def stake(self, who: int, amount: int) -> None:
        a = self.cast.stakers[who].address
        self._op("stake")
        self._tx("stake", self.cast.stakers[who], self.staking, calldata("stake(uint256)", amount),
                 lambda: self.model.stake(a, amount))

    def request_unbond(self, who: int, amount: int) -> None:
        a = self.cast.stakers[who].address
        self._op("request_unbond")
        self._tx("request_unbond", self.cast.stakers[who], self.staking, calldata("requestUnbond(uint256)", amount),
                 lambda: self.model.request_unbond(a, amount))

    def withdraw(self, who: int) -> None:
        a = self.cast.stakers[who].address
        self._op("withdraw")
        self._tx("withdraw", self.cast.stakers[who], self.staking, calldata("withdraw()"),
                 lambda: self.model.withdraw(a))

    def lock(self, who: int, amount: int, unlock: bool = False) -> None:
        """The LOCKER (operator) locks, or unlocks, ``amount`` of a staker's stake."""
        p = self.cast.stakers[who].address
        name = "unlock" if unlock else "lock"
        self._op(name)
        predict = self.model.unlock if unlock else self.model.lock
        self._tx(name, self.cast.operator, self.staking, calldata(f"{name}(address,uint256)", p, amount),
                 lambda: predict(p, amount))

    def fund(self, who: int, job: int, amount: int) -> None:
        c = self.cast.customers[who]
        self._op("fund")
        self._tx("fund", c, self.escrow, calldata("fund(bytes32,uint256)", self.jobs[job], amount),
                 lambda: self.model.fund(c.address, self.jobs[job], amount))

    def release(self, job: int, unit: int, provider: int, amount: int) -> None:
        p = self.cast.providers[provider].address
        self._op("release")
        data = calldata("release(bytes32,bytes32,address,uint256)", self.jobs[job], UNITS[unit], p, amount)
        self._tx("release", self.cast.operator, self.escrow, data,
                 lambda: self.model.release(self.jobs[job], UNITS[unit], p, amount))

    def release_to_pool(self, job: int, batch: int, shares: Sequence[int]) -> None:
        """Move a batch paying ``shares[i]`` to provider i into the pool; the ledger credits each provider."""
        self._op("release_to_pool")
        split = [(p.address, v) for p, v in zip(self.cast.providers, shares) if v > 0]
        data = calldata("releaseToPool(bytes32,bytes32,uint256)", self.jobs[job], UNITS[batch], sum(shares))
        self._tx("release_to_pool", self.cast.operator, self.escrow, data,
                 lambda: self.model.release_to_pool(self.jobs[job], UNITS[batch], split))

    def cancel(self, who: int, job: int) -> None:
        c = self.cast.customers[who]
        self._op("cancel")
        self._tx("cancel", c, self.escrow, calldata("cancel(bytes32)", self.jobs[job]),
                 lambda: self.model.cancel(c.address, self.jobs[job]))

    def close(self, who: int | None, job: int) -> None:
        """Close as customer ``who``, or as the settler (operator) when ``who`` is None."""
        sender = self.cast.operator if who is None else self.cast.customers[who]
        self._op("close")
        self._tx("close", sender, self.escrow, calldata("close(bytes32)", self.jobs[job]),
                 lambda: self.model.close(sender.address, self.jobs[job]))

    def claim_escrow(self, provider: int) -> None:
        p = self.cast.providers[provider]
        self._op("claim_escrow")
        self._tx("claim_escrow", p, self.escrow, calldata("claim()"), lambda: self.model.claim_escrow(p.address))

    def post_root(self, mode: str = "honest") -> None:
        """Post the ledger's cumulative tree as the next epoch. ``mode``: ``"honest"``; ``"skip"`` (wrong epoch
        number); ``"inflated"`` (a total above the deposits: must revert); ``"bad_then_void"`` (an over-promising
        root: the first account's leaf inflated by 1 under the honest total, which the contract cannot check
        against the leaves; the guardian then voids it inside the dispute window)."""
        m = self.model
        entries = {a: v for a, v in m.ledger.items() if v > 0}
        if not entries or (mode == "bad_then_void" and m.params.dispute_window < 5):
            return
        self._op(f"post_root_{mode}")
        epoch = m.latest + (2 if mode == "skip" else 1)
        honest_total = sum(entries.values())
        if mode == "bad_then_void":
            victim = sorted(entries)[0]
            entries[victim] += 1
        tree = build_payout_tree(entries)
        total = m.deposited + 1 if mode == "inflated" else honest_total
        data = calldata("postRoot(uint256,bytes32,uint256)", epoch, tree.root, total)
        latest = m.latest
        self._tx("post_root", self.cast.operator, self.distributor, data, lambda: m.post_root(epoch, entries, total))
        if m.latest != latest:
            self.trees[epoch] = tree
            if mode == "bad_then_void":
                self.void_root(epoch)

    def void_root(self, epoch: int | None = None) -> None:
        m = self.model
        target = m.latest if epoch is None else epoch
        self._op("void_root")
        latest = m.latest
        self._tx("void_root", self.cast.operator, self.distributor, calldata("voidRoot(uint256)", target),
                 lambda: m.void_root(target))
        if m.latest != latest:
            self.trees.pop(target, None)

    def claim_payout(self, who: int, mode: str = "latest") -> None:
        """A staker claims from the pool. ``mode``: ``"latest"`` (newest root, claimable or not), ``"claimable"``
        (newest past its window), ``"oldest"`` (epoch 1), ``"tampered"`` (cumulative + 1 with the real proof),
        ``"foreign"`` (another account's proof)."""
        a = self.cast.stakers[who]
        m = self.model
        epoch = 1 if mode == "oldest" else m.latest
        if mode == "claimable" and m.latest and m.now + 1 < m.claimable_at:
            epoch = m.latest - 1
        tree = self.trees.get(epoch)
        self._op(f"claim_payout_{mode}")
        cumulative, proof, honest = 0, [], True
        if tree is not None:
            if mode == "foreign" or tree.cumulative(a.address) == 0:
                other = next(iter(tree.entries))
                cumulative, proof, honest = tree.cumulative(a.address) or 1, tree.proof(other), other == a.address
            else:
                cumulative, proof = tree.cumulative(a.address), tree.proof(a.address)
                if mode == "tampered":
                    cumulative, honest = cumulative + 1, False
        data = calldata("claim(uint256,uint256,bytes32[])", epoch, cumulative, proof)
        self._tx("claim_payout", a, self.distributor, data, lambda: m.claim_payout(a.address, epoch, cumulative, honest))

    def claim_payout_batch(self, mode: str = "claimable") -> None:
        """The operator pushes pay with one ``claimMany`` to every account with a leaf in a root, listing the first
        account twice and a stranger with cumulative 0 (both must be skipped). ``mode``: ``"claimable"`` (the newest
        root past its window), ``"latest"`` (the newest, maybe still in dispute), ``"tampered"`` (the last account's
        cumulative + 1 with its real proof: reverts the batch unless that account is already paid past it),
        ``"mismatch"`` (one proof short: SettlementLengthMismatch)."""
        m = self.model
        epoch = m.latest
        if mode != "latest" and m.latest and m.now + 1 < m.claimable_at:
            epoch = m.latest - 1
        tree = self.trees.get(epoch)
        self._op(f"claim_payout_batch_{mode}")
        rows: list[tuple[str, int, list[bytes], bool]] = []
        if tree is not None:
            rows = [(a, tree.cumulative(a), tree.proof(a), True) for a in sorted(tree.entries)]
            if mode == "tampered":
                a, cumulative, proof, _ = rows[-1]
                rows[-1] = (a, cumulative + 1, proof, False)
            rows = [*rows, rows[0]]
        rows.append((self.cast.customers[0].address, 0, [], True))
        accounts = [r[0] for r in rows]
        cumulatives = [r[1] for r in rows]
        proofs = [r[2] for r in rows]
        if mode == "mismatch":
            proofs = proofs[:-1]
        data = calldata("claimMany(uint256,address[],uint256[],bytes32[][])", epoch, accounts, cumulatives, proofs)
        entries = [(a, c, ok) for a, c, _, ok in rows]
        self._tx("claim_payout_batch", self.cast.operator, self.distributor, data,
                 lambda: m.claim_payout_batch(epoch, entries, lengths_match=mode != "mismatch"))

    def set_dispute_window(self, window: int) -> None:
        """Governance changes the dispute window. It applies to roots posted afterwards; the latest root keeps the
        claimable time it was posted with."""
        self._op("set_dispute_window")
        self._govern("dispute_window", self.distributor, calldata("setDisputeWindow(uint32)", window),
                     lambda: self.model.set_dispute_window(window))

    def set_slash_delay(self, delay: int) -> None:
        """Governance changes the slash delay. It applies to slashes made afterwards; pending ones keep their
        deadline."""
        self._op("set_slash_delay")
        self._govern("slash_delay", self.staking, calldata("setSlashDelay(uint32)", delay),
                     lambda: self.model.set_slash_delay(delay))

    def _govern(self, name: str, target: str, data: bytes, predict: Callable[[], str | None]) -> None:
        """One governance call through the timelock (delay 0 here): schedule, then execute (``set_<name>``)."""
        salt = keccak(text=f"{name}-{self.stats.transactions}")
        args = (target, 0, data, b"\x00" * 32, salt)
        schedule = calldata("schedule(address,uint256,bytes,bytes32,bytes32,uint256)", *args, 0)
        self._tx(f"schedule_{name}", self.cast.operator, self.timelock, schedule, lambda: None)
        execute = calldata("execute(address,uint256,bytes,bytes32,bytes32)", *args)
        self._tx(f"set_{name}", self.cast.operator, self.timelock, execute, predict)

    def slash(self, provider: int, amount: int, verifier: int, reuse: bool = False, redo: int | None = None) -> None:
        """Governance slash (SLASHER: operator) of a staker, bounty to a verifier; ``redo``: under the redo evidence
        of the ``redo``-th pending slash (the marketplace's redo; voided with it), when one is pending."""
        p, v = self.cast.stakers[provider].address, self.cast.verifiers[verifier].address
        self._op("slash")
        pending = sorted(self.model.pending_slashes)
        evidence = (redo_evidence(pending[redo % len(pending)]) if redo is not None and pending
                    else self._new_evidence(reuse))
        data = calldata("slash(address,uint256,address,bytes32)", p, amount, v, evidence)
        self._tx("slash", self.cast.operator, self.staking, data, lambda: self.model.slash(p, amount, v, evidence))

    def accuse(self, verifier: int, provider: int, amount: int, reuse: bool = False) -> None:
        """Verifier signs an accusation; the operator relays it."""
        v, p = self.cast.verifiers[verifier], self.cast.stakers[provider].address
        self._op("accuse")
        evidence = self._new_evidence(reuse)
        signature = self._signer(v).sign_accusation(p, evidence, amount)
        data = calldata("accuse(address,bytes32,uint256,bytes)", p, evidence, amount, signature)
        self._tx("accuse", self.cast.operator, self.staking, data,
                 lambda: self.model.accuse(v.address, p, evidence, amount))

    def resolve(self, pick: int, fraud: bool) -> None:
        """Referee resolves the ``pick``-th open dispute (or an unknown one when none is open)."""
        m = self.model
        self._op("resolve")
        open_ = sorted(m.disputes)
        evidence = open_[pick % len(open_)] if open_ else keccak(text="no-such-dispute")
        self._tx("resolve", self.cast.operator, self.staking, calldata("resolve(bytes32,bool)", evidence, fraud),
                 lambda: m.resolve(evidence, fraud))

    def dismiss(self, pick: int) -> None:
        """Referee dismisses the ``pick``-th open dispute as made in good faith (or an unknown one when none is open)."""
        m = self.model
        self._op("dismiss")
        open_ = sorted(m.disputes)
        evidence = open_[pick % len(open_)] if open_ else keccak(text="no-such-dispute")
        self._tx("dismiss", self.cast.operator, self.staking, calldata("dismiss(bytes32)", evidence),
                 lambda: m.dismiss(evidence))

    def finalize_slash(self, pick: int, sender: int = 0, stale: bool = False, timing: str = "now") -> None:
        """Anyone (``sender``: an index into the whole cast) pays out the ``pick``-th pending slash; ``stale``: a slash
        that is no longer pending (paid, voided, paid at once) or never was. ``timing`` (see ``_wait_for_slash``):
        ``"now"``, ``"before"`` (a second before its deadline: StakingSlashNotReady) or ``"deadline"`` (at it)."""
        m = self.model
        self._op("finalize_slash")
        evidence = self._slash_evidence(pick, stale)
        self._wait_for_slash(evidence, timing)
        self._tx("finalize_slash", self.cast.people[sender], self.staking, calldata("finalizeSlash(bytes32)", evidence),
                 lambda: m.finalize_slash(evidence))

    def void_slash(self, pick: int, sender: int | None = None, stale: bool = False, timing: str = "now") -> None:
        """The guardian (operator), or staker ``sender`` who is not one, voids the ``pick``-th pending slash; ``stale``
        and ``timing`` as in ``finalize_slash`` (at the deadline: StakingSlashFinal)."""
        m = self.model
        who = self.cast.operator if sender is None else self.cast.stakers[sender]
        self._op("void_slash")
        evidence = self._slash_evidence(pick, stale)
        self._wait_for_slash(evidence, timing)
        self._tx("void_slash", who, self.staking, calldata("voidSlash(bytes32)", evidence),
                 lambda: m.void_slash(who.address, evidence))

    def _slash_evidence(self, pick: int, stale: bool) -> bytes:
        """The ``pick``-th pending slash's evidence; with ``stale``, or when none is pending, a settled slash's (paid,
        voided or paid at once), or one never slashed for when there is none."""
        m = self.model
        pending = sorted(m.pending_slashes)
        if pending and not stale:
            return pending[pick % len(pending)]
        settled = sorted(m.slash_evidence.keys() - set(pending))
        return settled[pick % len(settled)] if settled else keccak(text="no-such-slash")

    def _wait_for_slash(self, evidence: bytes, timing: str) -> None:
        """Let time pass so that the next transaction runs at the pending slash's deadline in force (``"deadline"``)
        or a second before it (``"before"``); nothing for ``"now"``, a slash that is not pending, a deadline already
        behind, or while paused (the deadline then moves on with the clock)."""
        m = self.model
        ps = m.pending_slashes.get(evidence)
        if timing == "now" or ps is None or m.paused:
            return
        target = m.slash_ready_at(ps) - (1 if timing == "before" else 0)
        m.now = max(m.now, target - 1)  # _tx moves on one second

    def pause(self) -> None:
        """Guardian hits the kill switch: one transaction pauses staking, escrow and distributor."""
        self._op("pause")
        self._tx("pause", self.cast.operator, self.kill_switch, calldata("pauseAll()"), self.model.pause)

    def unpause(self) -> None:
        """Through the timelock (delay 0 here): schedule the batch of unpause calls, then execute it."""
        if not self.model.paused:
            return
        self._op("unpause")
        targets = [self.staking, self.escrow, self.distributor]
        salt = keccak(text=f"unpause-{self.stats.transactions}")
        args = (targets, [0, 0, 0], [calldata("unpause()")] * 3, b"\x00" * 32, salt)
        schedule = calldata("scheduleBatch(address[],uint256[],bytes[],bytes32,bytes32,uint256)", *args, 0)
        self._tx("schedule_unpause", self.cast.operator, self.timelock, schedule, lambda: None)
        execute = calldata("executeBatch(address[],uint256[],bytes[],bytes32,bytes32)", *args)
        self._tx("execute_unpause", self.cast.operator, self.timelock, execute, self.model.unpause)

    def advance_time(self, seconds: int) -> None:
        """Let ``seconds`` pass before the next transaction (no transaction is sent)."""
        self._op("advance_time")
        self.model.now += seconds

    def _signer(self, account: LocalAccount) -> GridMintContracts:
        if account.address not in self._signers:
            self._signers[account.address] = self.client.as_account(account)
        return self._signers[account.address]

    def _new_evidence(self, reuse: bool) -> bytes:
        if not reuse or self._evidence == 0:
            self._evidence += 1
        return keccak(text=f"evidence-{self._evidence}")

    # ------------------------------------------------------------ the invariants

    def read_state(self) -> tuple[list[int], list[list[int]], list[list[int]]]:
        """(system fields, per watched account fields, per job fields) from one GridLens call."""
        raw = self.driver.read(self.lens, self._lens_call)
        # abi: offset, length, then the words (decoded by hand: this runs after every operation)
        flat = [int.from_bytes(raw[i : i + 32], "big") for i in range(64, len(raw), 32)]
        n = len(self.watched)
        accounts = [list(flat[12 + 9 * i : 21 + 9 * i]) for i in range(n)]
        base = 12 + 9 * n
        jobs = [list(flat[base + 4 * i : base + 4 * i + 4]) for i in range(N_JOBS)]
        return list(flat[:12]), accounts, jobs

    def check_if_changed(self) -> list[str]:
        """``check()`` unless every transaction since the last check reverted as predicted: a reverted transaction
        changes no contract state (EVM semantics), so the last check still holds. Saves most of the reads while
        the system is paused."""
        if not self._dirty:
            return []
        return self.check()

    def check(self) -> list[str]:
        """Read everything in one call and verify the invariants and the model; returns (and records) violations."""
        self._dirty = False
        self.stats.checks += 1
        m = self.model
        sys_, accounts, jobs = self.read_state()
        (supply, staking_bal, escrow_bal, dist_bal, total_staked, total_claimable, deposited, latest, claimable_at,
         p_staking, p_escrow, p_dist) = sys_
        bad: list[str] = []

        def expect(cond: bool, text: str) -> None:
            if not cond:
                bad.append(text)

        by = dict(zip(self.watched, accounts))
        held = sum(acc[0] for acc in accounts) + staking_bal + escrow_bal + dist_bal
        expect(held == supply == SUPPLY, f"tokens not conserved: held {held}, supply {supply}")
        stakes = sum(acc[1] + acc[4] for acc in accounts)
        pending = int.from_bytes(self.driver.read(self.staking, self._pending_call), "big")
        expect(staking_bal == total_staked + pending and total_staked == stakes,
               f"staking holds {staking_bal}, totalStaked {total_staked} + pending slashes {pending}, "
               f"sum of stakes {stakes}")
        # GridLens reads at the latest block: an unbonding's, a cancelled job's or a pending slash's deadline moves
        # on with that block's time while paused
        read_at = self.chain.timestamp() if m.paused else m.now
        # every slash the model knows of, figure by figure; the chain's pending ones must add up to its total. One
        # found settled (paid, voided or paid at once) is read no more: were it to come back, the total would tell.
        chain_pending: dict[int, int] = {}
        unsettled = sorted(m.slash_evidence.keys() - self._settled_slashes)
        for evidence in unsettled:
            raw = self.driver.read(self.staking, calldata("slashOf(bytes32)", evidence))
            got = [int.from_bytes(raw[i : i + 32], "big") for i in range(0, 160, 32)]
            ps = m.pending_slashes.get(evidence)
            want = [0] * 5 if ps is None else [int(ps.account, 16), int(ps.verifier or ZERO_ADDRESS, 16), ps.amount,
                                               ps.bounty, m.slash_ready_at(ps, read_at)]
            expect(got == want, f"slash {evidence.hex()[:8]}: chain {got} != model {want}")
            chain_pending[got[0]] = chain_pending.get(got[0], 0) + got[2]
            if got == want == [0] * 5:
                self._settled_slashes.add(evidence)
        listed = sum(chain_pending.values())
        expect(pending == listed == m.total_pending_slashes(),
               f"totalPendingSlashes {pending}, sum of slashOf {listed}, model {m.total_pending_slashes()}")
        # pendingSlashesOf, for each account whose slashes the loop above read (only a slash, a finalize or a void of
        # one of its slashes changes an account's figure)
        for a in sorted({m.slash_evidence[e] for e in unsettled}):
            held = int.from_bytes(self.driver.read(self.staking, calldata("pendingSlashesOf(address)", a)), "big")
            want_held = m.pending_slashes_of(a)
            expect(held == want_held == chain_pending.get(int(a, 16), 0),
                   f"{a}: pendingSlashesOf {held}, sum of its slashOf {chain_pending.get(int(a, 16), 0)}, "
                   f"model {want_held}")
        open_jobs = sum(j[0] - j[1] for j in jobs if not j[2])
        claimables = sum(acc[7] for acc in accounts)
        expect(total_claimable == claimables, f"totalClaimable {total_claimable} != sum {claimables}")
        expect(escrow_bal == open_jobs + total_claimable,
               f"escrow holds {escrow_bal}, open jobs {open_jobs} + claimable {total_claimable}")
        claimed = sum(acc[8] for acc in accounts)
        expect(dist_bal == deposited - claimed, f"distributor holds {dist_bal}, deposited {deposited} - claimed {claimed}")
        for a, acc in by.items():
            entitled = m.ledger.get(a, 0)
            expect(acc[8] <= entitled, f"{a} claimed {acc[8]} > entitlement {entitled}")
            # a void's stake comes back as ``restored``: it counts as coming in again, ``slashed`` stays as it was
            slashed, restored = m.slashed.get(a, 0), m.restored.get(a, 0)
            flows = m.withdrawn.get(a, 0) + slashed + acc[1] + acc[4]
            came_in = m.stake_in.get(a, 0) + restored
            expect(came_in == flows, f"{a} stake flows: in + restored {came_in} != out+held {flows}")
            paid, held = m.slash_paid.get(a, 0), chain_pending.get(int(a, 16), 0)
            expect(slashed == paid + held + restored,
                   f"{a} slashed {slashed} != paid {paid} + pending {held} + restored {restored}")
        paused = (p_staking, p_escrow, p_dist)
        expect(paused == (int(m.paused),) * 3, f"paused {paused}, model {m.paused}")
        # the model, figure by figure
        model_open = sum(j.funded - j.released for j in m.jobs.values() if not j.closed)
        chain_totals = (total_staked, escrow_bal - total_claimable, deposited, latest, claimable_at)
        model_totals = (m.total_staked, model_open, m.deposited, m.latest, m.claimable_at)
        expect(chain_totals == model_totals,
               f"system totals (staked, open escrow, deposited, latest epoch, its claimableAt) differ from the model: "
               f"chain {chain_totals}, model {model_totals}")
        for a, acc in by.items():
            ms = m.stakes.get(a)
            want_stake = [0] * 6 if ms is None else [
                ms.staked, ms.locked, ms.bonded, ms.unbonding, m.ready_at(ms, read_at), ms.open_disputes]
            want = [m.balances.get(a, 0), *want_stake, m.claimable.get(a, 0), m.claimed.get(a, 0)]
            expect(acc == want, f"{a}: chain {acc} != model {want}")
        for job_id, j in zip(self.jobs, jobs):
            mj = m.jobs.get(job_id)
            want_job = [0, 0, 0, 0] if mj is None else [mj.funded, mj.released, int(mj.closed), m.deadline(mj, read_at)]
            expect(j == want_job, f"job {job_id.hex()[:8]}: chain {j} != model {want_job}")
        for text in bad:
            self._violation(text)
        return bad


# ---------------------------------------------------------------- the random campaign


AMOUNTS = (0, 1, 7, 50, 100, 250, 1000, 5000)


def _amount(rng: random.Random, fits: int) -> int:
    """Half the time an amount the operation can take (1..``fits``, per the model), else one from ``AMOUNTS``
    (0, small, and far too large): the success paths and the refusals both get exercised."""
    if fits > 0 and rng.random() < 0.5:
        return rng.randint(1, fits)
    return rng.choice(AMOUNTS)


def random_op(h: Harness, rng: random.Random) -> None:
    """One random operation with random arguments, weighted toward the money flows. While paused, the guardian's
    timelocked unpause comes soon (every other operation is then a must-revert probe); while a slash waits out its
    delay, its finalize or void comes soon (drawn at random, most would find nothing pending)."""
    m = h.model
    stakers = [a.address for a in h.cast.stakers]
    n_stakers, n_prov, n_jobs = len(stakers), len(h.cast.providers), N_JOBS
    if m.paused and rng.random() < 0.2:
        h.unpause()
        return
    if m.pending_slashes and rng.random() < 0.1:
        _settle_slash(h, rng, rng.random() < 0.5)
        return
    who, job = rng.randrange(n_stakers), rng.randrange(n_jobs)
    s = m.stakes.get(stakers[who])
    j = m.jobs.get(h.jobs[job])
    roll = rng.random()
    if roll < 0.10:
        h.stake(who, rng.choice([0, 10, 100, 300, 1000, 2_000_000]))
    elif roll < 0.16:
        h.request_unbond(who, _amount(rng, s.free() if s and not s.open_disputes else 0))
    elif roll < 0.21:
        h.withdraw(who)
    elif roll < 0.25:
        unlock = rng.random() < 0.5
        h.lock(who, _amount(rng, (s.locked if unlock else s.free()) if s else 0), unlock=unlock)
    elif roll < 0.34:
        h.fund(rng.randrange(2), job, rng.choice([0, 100, 1000, 10_000, 5_000_000]))
    elif roll < 0.40:
        available = j.funded - j.released if j and not j.closed else 0
        h.release(job, rng.randrange(len(UNITS)), rng.randrange(n_prov), _amount(rng, available))
    elif roll < 0.485:
        h.release_to_pool(job, rng.randrange(len(UNITS)), [rng.choice([0, 0, 5, 40, 300]) for _ in range(n_prov)])
    elif roll < 0.515:
        h.cancel(rng.randrange(2), job)
    elif roll < 0.555:
        h.close(None if rng.random() < 0.5 else rng.randrange(2), job)
    elif roll < 0.595:
        h.claim_escrow(rng.randrange(n_prov))
    elif roll < 0.665:
        h.post_root(rng.choice(["honest", "honest", "honest", "skip", "inflated", "bad_then_void"]))
    elif roll < 0.675:
        h.void_root()
    elif roll < 0.74:
        claimer = rng.randrange(n_prov) if rng.random() < 0.8 else who  # mostly providers: they have leaves
        h.claim_payout(claimer, rng.choice(["latest", "claimable", "claimable", "oldest", "tampered", "foreign"]))
    elif roll < 0.78:
        h.claim_payout_batch(rng.choice(["claimable", "claimable", "claimable", "latest", "tampered", "mismatch"]))
    elif roll < 0.81:
        redo = rng.randrange(4) if rng.random() < 0.25 else None
        h.slash(who, _amount(rng, s.staked + s.unbonding if s else 0), rng.randrange(2), reuse=rng.random() < 0.2,
                redo=redo)
    elif roll < 0.85:
        h.accuse(rng.randrange(2), who, _amount(rng, s.staked + s.unbonding if s else 0), reuse=rng.random() < 0.2)
    elif roll < 0.87:
        h.resolve(rng.randrange(4), fraud=rng.random() < 0.5)
    elif roll < 0.88:
        h.dismiss(rng.randrange(4))
    elif roll < 0.905:
        _settle_slash(h, rng, finalize=True)
    elif roll < 0.92:
        _settle_slash(h, rng, finalize=False)
    elif roll < 0.925:
        h.set_slash_delay(rng.choice([0, 20, SLASH_DELAY, 300]))
    elif roll < 0.93:
        h.pause()
    elif roll < 0.94:
        h.set_dispute_window(rng.choice([0, 10, 100, 400]))
    else:
        h.advance_time(rng.choice([5, 30, 60, 120, 400]))


def _settle_slash(h: Harness, rng: random.Random, finalize: bool) -> None:
    """Anyone finalizes, or the guardian (sometimes a staker who is not one) voids, a pending slash (sometimes one no
    longer pending), as the sequence has it or a second before / at its deadline in force."""
    pick, stale = rng.randrange(4), rng.random() < 0.15
    timing = rng.choice(["now", "now", "before", "deadline"])
    if finalize:
        h.finalize_slash(pick, rng.randrange(len(h.cast.people)), stale=stale, timing=timing)
    else:
        h.void_slash(pick, None if rng.random() < 0.8 else rng.randrange(len(h.cast.stakers)), stale=stale,
                     timing=timing)


def start_episode(h: Harness, immediate_slashes: bool) -> None:
    """With ``immediate_slashes``, governance first sets the slash delay to 0, so that the episode's slashes pay out
    at once (a development deployment's path); else they wait out the deployed delay (production's path). Costs one
    operation, and nothing when the deployment has no delay."""
    if immediate_slashes and h.model.params.slash_delay:
        h.set_slash_delay(0)


def run_campaign(
    h: Harness,
    ops: int,
    *,
    seed: int = 0,
    episode: int = 200,
    on_progress: Callable[[int], None] | None = None,
) -> Stats:
    """``ops`` random operations in episodes of ``episode`` (each from the freshly set-up state), checking every
    invariant after every operation. Returns the stats; ``stats.violations`` lists what broke (empty is the goal).
    Each episode starts with the deployed slash delay or, half the time, none (``start_episode``)."""
    rng = random.Random(seed)
    start = h.stats.ops
    done_in_episode = 0
    start_episode(h, rng.random() < 0.5)
    while h.stats.ops - start < ops:
        if done_in_episode >= episode:
            h.reset()
            start_episode(h, rng.random() < 0.5)
            done_in_episode = 0
        before = h.stats.ops
        random_op(h, rng)
        if h.stats.ops == before:
            continue
        done_in_episode += 1
        if h.check_if_changed() and not h.raise_on_violation:
            h.reset()  # the model diverged: start a fresh episode so later figures stay meaningful
            start_episode(h, rng.random() < 0.5)
            done_in_episode = 0
        if on_progress is not None:
            on_progress(h.stats.ops - start)
    return h.stats
