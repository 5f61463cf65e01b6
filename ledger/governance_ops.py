"""Kill switch and timelocked governance of the typed client (mixed into ``GridMintContracts``).

Pausing is instant and one transaction (GridKillSwitch, GUARDIAN_ROLE). Everything else a governor does (unpause,
parameter changes) is a TimelockController operation: ``schedule`` it, wait ``min_delay`` seconds, ``execute`` it.
``govern`` does both when the delay is zero (development deployments).
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from web3.types import TxReceipt

from ledger.client_base import PAUSABLE
from ledger.settlement_ops import SettlementOps
from ledger.staking_ops import gpu_class_id
from ledger.values import to_uint
from protocol.errors import GridMintValueError


@dataclass(frozen=True)
class TimelockOp:
    """A scheduled timelock batch: what ``execute`` needs, and when it becomes executable."""

    id: bytes
    targets: tuple[str, ...]
    payloads: tuple[bytes, ...]
    salt: bytes
    ready_at: int
    description: str


#: (contract key, function, args): one call a timelock operation makes.
Call = tuple[str, str, tuple[Any, ...]]
_NO_PREDECESSOR = b"\x00" * 32


class GovernanceOps(SettlementOps):
    # kill switch

    def pause_all(self) -> None:
        """Guardian kill switch: pause staking, escrow and distributor in one transaction (those not yet paused).

        Needs GUARDIAN_ROLE on the kill switch (or, without one in the deployment, on each contract)."""
        if "kill_switch" in self._bound:
            if not all(self.paused().values()):
                self._send(self._bound["kill_switch"], "pauseAll")
            return
        for name in PAUSABLE:
            if not self._call(self._contract(name), "paused"):
                self._send(self._contract(name), "pause")

    def paused(self) -> dict[str, bool]:
        """``{"staking": bool, "escrow": bool, "distributor": bool}``; the token itself cannot be paused."""
        return {name: bool(self._call(self._contract(name), "paused")) for name in PAUSABLE}

    def unpause_all(self) -> TimelockOp | None:
        """Schedule unpausing every paused contract through the timelock, and execute it at once if the timelock's
        delay is zero. Returns the operation (``execute`` it once ``ready_at`` passed), or None if nothing is paused.
        Needs the timelock's PROPOSER_ROLE (and EXECUTOR_ROLE to execute)."""
        calls: list[Call] = [(name, "unpause", ()) for name, is_paused in self.paused().items() if is_paused]
        return self.govern(calls, "unpause all") if calls else None

    # timelock

    def min_delay(self) -> int:
        return int(self._call(self._optional("timelock"), "getMinDelay"))

    def schedule(self, calls: list[Call], description: str = "") -> TimelockOp:
        """Schedule ``calls`` as one timelock batch with the minimum delay (needs PROPOSER_ROLE)."""
        if not calls:
            raise GridMintValueError("a timelock operation needs at least one call")
        timelock = self._optional("timelock")
        targets = tuple(self._contract(name).address for name, _, _ in calls)
        payloads = tuple(bytes.fromhex(self._contract(n).encode_abi(fn, args=list(a))[2:]) for n, fn, a in calls)
        salt = secrets.token_bytes(32)
        delay = self.min_delay()
        values = [0] * len(calls)
        self._send(timelock, "scheduleBatch", list(targets), values, list(payloads), _NO_PREDECESSOR, salt, delay)
        op_id = bytes(self._call(timelock, "hashOperationBatch", list(targets), values, list(payloads), _NO_PREDECESSOR, salt))
        ready_at = int(self._call(timelock, "getTimestamp", op_id))
        return TimelockOp(op_id, targets, payloads, salt, ready_at, description)

    def execute(self, op: TimelockOp) -> TxReceipt:
        """Execute a scheduled operation once ready (needs EXECUTOR_ROLE). Too early: GovernanceError
        ``TimelockUnexpectedOperationState``."""
        values = [0] * len(op.targets)
        return self._send(
            self._optional("timelock"), "executeBatch", list(op.targets), values, list(op.payloads), _NO_PREDECESSOR, op.salt
        )

    def cancel(self, op: TimelockOp) -> TxReceipt:
        """Cancel a pending (scheduled, not yet executed) operation (needs CANCELLER_ROLE: in a production deployment
        the governor and the guardian hold it). Already done or unknown: GovernanceError
        ``TimelockUnexpectedOperationState``."""
        return self._send(self._optional("timelock"), "cancel", op.id)

    def govern(self, calls: list[Call], description: str = "") -> TimelockOp:
        """``schedule`` and, when the timelock's delay is zero, ``execute`` at once."""
        op = self.schedule(calls, description)
        if op.ready_at <= self.chain.timestamp():
            self.execute(op)
        return op

    def operation_done(self, op: TimelockOp) -> bool:
        return bool(self._call(self._optional("timelock"), "isOperationDone", op.id))

    # parameters (all through the timelock)

    def set_min_stake(self, gpu_class: str | bytes, amount: int) -> TimelockOp:
        return self.govern([("staking", "setMinStake", (gpu_class_id(gpu_class), to_uint(amount)))], "set min stake")

    def set_unbonding_delay(self, seconds: int) -> TimelockOp:
        return self.set_delays(unbonding_delay_s=seconds)

    def set_bounty_bps(self, bps: int) -> TimelockOp:
        return self.govern([("staking", "setBountyBps", (to_uint(bps, "bps", 16),))], "set bounty bps")

    def set_slash_delay(self, seconds: int) -> TimelockOp:
        return self.set_delays(slash_delay_s=seconds)

    def set_delays(self, *, unbonding_delay_s: int | None = None, slash_delay_s: int | None = None) -> TimelockOp:
        """Change the unbonding delay, the slash delay or both, in one timelock operation.

        Under a timelock with a delay (every production deployment has one) and a slash delay, the pair they leave
        must keep the rule the production deploy checks (``ledger.deploy.unbonding_outlasts_slash_delay``): else
        GridMintValueError, and nothing is proposed. To raise the slash delay past it, change both in one call.
        A development deployment (no timelock delay) takes any pair."""
        from ledger.deploy import REDO_MARGIN_S, UNBONDING_OVER_SLASH_DELAY, unbonding_outlasts_slash_delay

        calls: list[Call] = []
        said = []
        if unbonding_delay_s is not None:
            calls.append(("staking", "setUnbondingDelay", (to_uint(unbonding_delay_s, "unbonding_delay_s", 32),)))
            said.append("set unbonding delay")
        if slash_delay_s is not None:
            calls.append(("staking", "setSlashDelay", (to_uint(slash_delay_s, "slash_delay_s", 32),)))
            said.append("set slash delay")
        if not calls:
            raise GridMintValueError("set_delays needs unbonding_delay_s, slash_delay_s or both")
        unbonding = self.unbonding_delay() if unbonding_delay_s is None else unbonding_delay_s
        slash = self.slash_delay() if slash_delay_s is None else slash_delay_s
        if slash and self.min_delay() and not unbonding_outlasts_slash_delay(unbonding, slash):
            raise GridMintValueError(
                f"an unbonding delay of {unbonding} s beside a slash delay of {slash} s: it must be at least the slash "
                f"delay + {REDO_MARGIN_S} s, or {UNBONDING_OVER_SLASH_DELAY}")
        return self.govern(calls, " and ".join(said))

    def set_verifier_bond(self, amount: int) -> TimelockOp:
        return self.govern([("staking", "setVerifierBond", (to_uint(amount),))], "set verifier bond")

    def set_dispute_window(self, seconds: int) -> TimelockOp:
        return self.govern([("distributor", "setDisputeWindow", (to_uint(seconds, "seconds", 32),))], "set dispute window")

    def set_cancel_grace(self, seconds: int) -> TimelockOp:
        return self.govern([("escrow", "setCancelGrace", (to_uint(seconds, "seconds", 32),))], "set cancel grace")

    def unbonding_delay(self) -> int:
        return int(self._call(self.staking, "unbondingDelay"))

    def verifier_bond(self) -> int:
        return int(self._call(self.staking, "verifierBond"))

    def bounty_bps(self) -> int:
        return int(self._call(self.staking, "bountyBps"))
