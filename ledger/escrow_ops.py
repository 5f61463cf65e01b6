"""Job escrow operations of the typed client (mixed into ``GridMintContracts``)."""
from __future__ import annotations

from dataclasses import dataclass

from eth_utils import to_checksum_address
from web3.types import TxReceipt

from ledger.staking_ops import TokenStakingOps
from ledger.values import to_address, to_bytes32, to_uint


@dataclass(frozen=True)
class JobState:
    """An escrowed job. ``remaining`` is what the escrow still holds for it: funded - released, or 0 once closed.
    ``closable_at`` is 0 unless the customer cancelled; then it is the deadline in force (unix seconds): releases
    work until then, the customer may close from then on. It is the cancel's time + the grace, pushed back by every
    second the escrow has spent paused since the cancel (while paused it moves on with the clock)."""

    customer: str
    funded: int
    released: int
    closed: bool
    remaining: int
    closable_at: int = 0


#: Jobs per GridLens call in :meth:`EscrowOps.escrow_states` (4 storage reads each: ~1,000 jobs is ~9M gas of a
#: node's eth_call allowance, usually 30-50M).
LENS_JOBS_PER_CALL = 1000


class EscrowOps(TokenStakingOps):
    def escrow_states(self, job_ids: list[str]) -> dict[str, tuple[bool, int]]:
        """Each job's ``(closed, closable_at)`` (``closable_at`` as in :class:`JobState`): a thousand jobs per
        GridLens call where the deployment names a lens, else one ``getJob`` each (a deployment written before it)."""
        out: dict[str, tuple[bool, int]] = {}
        if self.deployment.lens is None:
            for job_id in job_ids:
                st = self.get_job(job_id)
                out[job_id] = (st.closed, st.closable_at)
            return out
        lens, head, per_job = self._bound["lens"], 12, 4  # GridLens.SYSTEM_FIELDS, JOB_FIELDS
        for i in range(0, len(job_ids), LENS_JOBS_PER_CALL):
            chunk = job_ids[i:i + LENS_JOBS_PER_CALL]
            raw = self._call(lens, "read", self.token.address, self.staking.address, self.escrow.address,
                             self.distributor.address, [], [to_bytes32(j, "job_id") for j in chunk])
            for k, job_id in enumerate(chunk):
                _, _, closed, closable_at = raw[head + per_job * k: head + per_job * (k + 1)]
                out[job_id] = (bool(closed), int(closable_at))
        return out

    def fund_job(self, job_id: bytes | str, amount: int) -> TxReceipt:
        """Approve (if the allowance is short) and fund ``job_id``, which must be this account's: a job id starts
        with its customer's address (``protocol.jobs``), and JobEscrow refuses anyone else (EscrowJobIdNotYours)."""
        amount = to_uint(amount)
        with self._account_op():
            self._ensure_allowance(self.escrow.address, amount)
            return self._send(self.escrow, "fund", to_bytes32(job_id, "job_id"), amount)

    def fund_job_with_permit(self, job_id: bytes | str, amount: int, *, ttl_s: int = 3600) -> TxReceipt:
        """Fund ``job_id`` in one transaction: signs an EIP-2612 permit (valid ``ttl_s`` seconds) with this account's
        key and calls ``fundWithPermit``."""
        amount, job = to_uint(amount), to_bytes32(job_id, "job_id")
        with self._account_op():
            deadline = self.chain.timestamp() + ttl_s
            v, r, s = self._sign_permit(self.escrow.address, amount, deadline)
            return self._send(self.escrow, "fundWithPermit", job, amount, deadline, v, r, s)

    def get_job(self, job_id: bytes | str) -> JobState:
        customer, funded, released, closed, closable_at = self._call(self.escrow, "getJob", to_bytes32(job_id, "job_id"))
        remaining = 0 if closed else int(funded) - int(released)
        return JobState(
            to_checksum_address(customer), int(funded), int(released), bool(closed), remaining, int(closable_at)
        )

    def unit_released(self, job_id: bytes | str, unit_id: bytes | str) -> bool:
        return bool(self._call(self.escrow, "unitReleased", to_bytes32(job_id, "job_id"), to_bytes32(unit_id, "unit_id")))

    def release(self, job_id: bytes | str, unit_id: bytes | str, provider: str, amount: int) -> bool:
        """Pay ``amount`` of ``job_id``'s escrow to ``provider`` for unit ``unit_id`` (needs UNIT_SETTLER_ROLE).

        Idempotent per (job, unit): returns False, sending nothing, if that unit was already released. Raises
        EscrowError ``EscrowJobCancelled(job, closableAt)`` once a cancelled job's grace is over.
        """
        job, unit = to_bytes32(job_id, "job_id"), to_bytes32(unit_id, "unit_id")
        if self.unit_released(job, unit):
            return False
        return self._send_once(self.escrow, "release", job, unit, to_address(provider), to_uint(amount),
                               done="EscrowUnitAlreadyReleased") is not None

    def batch_released(self, job_id: bytes | str, batch_id: bytes | str) -> bool:
        return bool(
            self._call(self.escrow, "batchReleased", to_bytes32(job_id, "job_id"), to_bytes32(batch_id, "batch_id"))
        )

    def release_to_pool(self, job_id: bytes | str, batch_id: bytes | str, amount: int) -> bool:
        """Move ``amount`` of ``job_id``'s escrow (the pay of the verified units in ``batch_id``) into the epoch
        payout pool (needs SETTLER_ROLE). Idempotent per (job, batch): False, sending nothing, if already moved.
        Raises EscrowError ``EscrowJobCancelled(job, closableAt)`` once a cancelled job's grace is over."""
        job, batch = to_bytes32(job_id, "job_id"), to_bytes32(batch_id, "batch_id")
        if self.batch_released(job, batch):
            return False
        return self._send_once(self.escrow, "releaseToPool", job, batch, to_uint(amount),
                               done="EscrowUnitAlreadyReleased") is not None

    def cancel_job(self, job_id: bytes | str) -> int:
        """Customer: cancel ``job_id``; returns when the customer may ``close_job`` it (a pause of the escrow
        pushes that back by its length: ``get_job(...).closable_at`` has the deadline in force). Units verified until
        then are still paid; from then on nothing more can be released, so the rest is the customer's refund."""
        receipt = self._send(self.escrow, "cancel", to_bytes32(job_id, "job_id"))
        return int(self._event_arg(self.escrow, "JobCancelled", receipt, "closableAt"))

    def close_job(self, job_id: bytes | str) -> int:
        """Close ``job_id`` and return the refund sent to the customer. A settler may close any time; the customer
        after ``cancel_job`` and the grace period.

        Idempotent: returns 0, sending nothing, if the job is already closed.
        """
        job = to_bytes32(job_id, "job_id")
        if self.get_job(job).closed:
            return 0
        receipt = self._send_once(self.escrow, "close", job, done="EscrowJobClosed")
        return 0 if receipt is None else int(self._event_arg(self.escrow, "JobClosed", receipt, "refund"))

    def claimable(self, address: str) -> int:
        """What the per-unit path (``release``) credited to ``address`` and it has not claimed yet."""
        return int(self._call(self.escrow, "claimable", to_address(address)))

    def total_claimable(self) -> int:
        return int(self._call(self.escrow, "totalClaimable"))

    def claim(self) -> int:
        """Withdraw everything the per-unit path released to this account; returns the amount (0, sending nothing,
        if none). Epoch payouts are claimed with ``claim_payout``."""
        if self.claimable(self.address) == 0:
            return 0
        receipt = self._send_once(self.escrow, "claim", done="EscrowNothingToClaim")
        return 0 if receipt is None else int(self._event_arg(self.escrow, "Claimed", receipt, "amount"))
