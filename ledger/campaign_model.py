"""The reference model behind the invariant campaign (pure: no chain).

``Model`` holds what the GridMint contracts *should* hold after a sequence of operations, and each method predicts
one operation: it returns the custom error the contracts must revert with (checked in the contracts' own order),
or None and applies the operation's effects. ``ledger.campaign`` runs every operation against the real contracts
and the model side by side, and flags any difference: a wrong outcome, a wrong balance, a token out of place.

``now`` is the block timestamp the operation executes at (the campaign pins it before every transaction).
"""
from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ledger.staking_ops import redo_evidence

MAX_BPS = 10_000


@dataclass
class StakeM:
    staked: int = 0
    locked: int = 0
    bonded: int = 0
    unbonding: int = 0
    ready_at: int = 0  # nominal: the request's time + the delay; Model.ready_at adds the time paused since
    open_disputes: int = 0
    paused_at_request: int = 0  # Model.paused_total at the request
    #: the bonds of the account's open accusations as bonded: ``bonded`` is at most that (a slash may have cut it; a
    #: voided slash gives back what it cut, up to it). GridStaking's bondsOpen (not in accountOf).
    bonds_open: int = 0

    def free(self) -> int:
        return max(self.staked - self.locked - self.bonded, 0)


@dataclass
class JobM:
    customer: str | None = None
    funded: int = 0
    released: int = 0
    closed: bool = False
    closable_at: int = 0  # nominal: the cancel's time + the grace; Model.deadline adds the time paused since
    paused_at_cancel: int = 0  # Model.paused_total at the cancel


@dataclass(frozen=True)
class DisputeM:
    provider: str
    verifier: str
    amount: int
    bond: int


@dataclass
class PendingSlashM:
    """A slash waiting out the slash delay (GridStaking.slashOf): ``amount`` taken from ``account``, ``bounty`` of it
    for ``verifier`` (None: a false accusation's penalty, all of it the treasury's)."""

    account: str
    verifier: str | None
    amount: int
    bounty: int
    ready_at: int  # nominal: the slash's time + the delay then; Model.slash_ready_at adds the time paused since
    paused_at_set: int  # Model.paused_seconds() at the slash
    bond_cut: int  # what the slash cut from the account's open bonds (Model._take): a void backs them again


@dataclass
class Params:
    bounty_bps: int
    unbonding_delay: int
    verifier_bond: int
    dispute_window: int
    cancel_grace: int
    #: GridStaking.slashDelay; 0 (deploy's default, a development deployment): a slash pays out at once
    slash_delay: int = 0


@dataclass
class Model:
    """Expected state. ``operator`` holds every operator role (settler, poster, slasher, locker, referee, guardian)."""

    operator: str
    treasury: str
    params: Params
    now: int
    balances: dict[str, int] = field(default_factory=dict)
    stakes: dict[str, StakeM] = field(default_factory=dict)
    total_staked: int = 0
    jobs: dict[bytes, JobM] = field(default_factory=dict)
    units: set[tuple[bytes, bytes]] = field(default_factory=set)
    batches: set[tuple[bytes, bytes]] = field(default_factory=set)
    claimable: dict[str, int] = field(default_factory=dict)
    deposited: int = 0
    #: the off-chain ledger: cumulative earnings credited on the pool path (the entitlement roots are built from)
    ledger: dict[str, int] = field(default_factory=dict)
    roots: dict[int, dict[str, int]] = field(default_factory=dict)
    latest: int = 0
    #: when the latest root becomes claimable, fixed at post time (post time + the window then); 0 before the first
    #: root and after a void (PayoutDistributor.latestClaimableAt)
    claimable_at: int = 0
    claimed: dict[str, int] = field(default_factory=dict)
    paused: bool = False
    #: the paused-time accounting of JobEscrow and GridStaking (PauseClock; the kill switch pauses both at once):
    #: seconds paused before the current pause, and when the current one began
    paused_total: int = 0
    paused_since: int = 0
    evidence_used: set[bytes] = field(default_factory=set)
    disputes: dict[bytes, DisputeM] = field(default_factory=dict)
    #: slashes waiting out the slash delay, by evidence (GridStaking.slashOf)
    pending_slashes: dict[bytes, PendingSlashM] = field(default_factory=dict)
    #: every evidence a slash of a nonzero amount was made for (pending, paid or voided), and the account it took
    #: from: the campaign compares slashOf for each with ``pending_slashes`` (empty once settled)
    slash_evidence: dict[bytes, str] = field(default_factory=dict)
    # Per-account stake flows. ``slashed`` counts what a slash takes, at the verdict (the stake leaves the account
    # then, delay or not); a guardian's void gives it back, counted in ``restored`` (``slashed`` never decreases).
    # Always: stake_in + restored == withdrawn + slashed + staked + unbonding, and every slashed token is paid out,
    # still pending, or restored: slashed == slash_paid + pending (the account's) + restored.
    stake_in: dict[str, int] = field(default_factory=dict)
    withdrawn: dict[str, int] = field(default_factory=dict)
    slashed: dict[str, int] = field(default_factory=dict)
    slash_paid: dict[str, int] = field(default_factory=dict)
    restored: dict[str, int] = field(default_factory=dict)

    def copy(self) -> Model:
        return copy.deepcopy(self)

    def stake_of(self, a: str) -> StakeM:
        return self.stakes.setdefault(a, StakeM())

    def _add(self, table: dict[str, int], a: str, amount: int) -> None:
        table[a] = table.get(a, 0) + amount

    # ---------------------------------------------------------------- staking

    def stake(self, a: str, amount: int) -> str | None:
        if self.paused:
            return "EnforcedPause"
        if amount == 0:
            return "StakingZeroAmount"
        if self.balances.get(a, 0) < amount:
            return "ERC20InsufficientBalance"
        self._add(self.balances, a, -amount)
        self.stake_of(a).staked += amount
        self.total_staked += amount
        self._add(self.stake_in, a, amount)
        return None

    def request_unbond(self, a: str, amount: int) -> str | None:
        s = self.stake_of(a)
        if self.paused:
            return "EnforcedPause"
        if amount == 0:
            return "StakingZeroAmount"
        if s.open_disputes:
            return "StakingUnderDispute"
        if amount > s.free():
            return "StakingInsufficientStake"
        s.staked -= amount
        s.unbonding += amount
        s.ready_at = self.now + self.params.unbonding_delay
        s.paused_at_request = self.paused_total
        return None

    def withdraw(self, a: str) -> str | None:
        s = self.stake_of(a)
        if self.paused:
            return "EnforcedPause"
        if s.unbonding == 0:
            return "StakingNothingToWithdraw"
        if s.open_disputes:
            return "StakingUnderDispute"
        if self.now < self.ready_at(s):
            return "StakingStillUnbonding"
        self._add(self.balances, a, s.unbonding)
        self._add(self.withdrawn, a, s.unbonding)
        self.total_staked -= s.unbonding
        s.unbonding = 0
        return None

    def lock(self, p: str, amount: int) -> str | None:
        s = self.stake_of(p)
        if amount == 0:
            return "StakingZeroAmount"
        if amount > s.free():
            return "StakingInsufficientStake"
        s.locked += amount
        return None

    def unlock(self, p: str, amount: int) -> str | None:
        s = self.stake_of(p)
        if amount == 0:
            return "StakingZeroAmount"
        if amount > s.locked:
            return "StakingInsufficientLocked"
        s.locked -= amount
        return None

    def slash(self, p: str, amount: int, verifier: str, evidence: bytes) -> str | None:
        if self.paused:
            return "EnforcedPause"
        if amount == 0:
            return "StakingZeroAmount"
        if evidence in self.evidence_used or evidence in self.disputes:
            return "StakingEvidenceUsed"
        s = self.stake_of(p)
        if s.staked + s.unbonding == 0:
            return "StakingNothingToSlash"
        self.evidence_used.add(evidence)
        self._pay_out(p, verifier, evidence, *self._take(p, amount))
        return None

    def accuse(self, verifier: str, p: str, evidence: bytes, amount: int) -> str | None:
        if self.paused:
            return "EnforcedPause"
        if amount == 0:
            return "StakingZeroAmount"
        if evidence in self.evidence_used or evidence in self.disputes:
            return "StakingEvidenceUsed"
        if verifier == p:
            return "StakingSelfAccusation"
        ps, vs = self.stake_of(p), self.stake_of(verifier)
        if ps.staked + ps.unbonding == 0:
            return "StakingNothingToSlash"
        bond = self.params.verifier_bond
        if bond == 0 or bond > vs.free():
            return "StakingInsufficientStake"
        vs.bonded += bond
        vs.bonds_open += bond
        vs.open_disputes += 1
        ps.open_disputes += 1
        self.disputes[evidence] = DisputeM(p, verifier, amount, bond)
        return None

    def resolve(self, evidence: bytes, fraud: bool) -> str | None:
        if self.paused:
            return "EnforcedPause"
        closed = self._close_dispute(evidence)
        if closed is None:
            return "StakingUnknownDispute"
        d, bond_left = closed
        if fraud:
            ps = self.stake_of(d.provider)
            # The whole slashable stake: the accused amount is the accuser's choice and does not cap the slash.
            self._pay_out(d.provider, d.verifier, evidence, *self._take(d.provider, ps.staked + ps.unbonding))
        else:
            # The bond, as far as a slash of the verifier's stake has not taken it already.
            self._pay_out(d.verifier, None, evidence, *self._take(d.verifier, bond_left))
        return None

    def dismiss(self, evidence: bytes) -> str | None:
        """Good-faith accusation, provider innocent: the dispute closes, the bond is released, no token moves."""
        if self.paused:
            return "EnforcedPause"
        return "StakingUnknownDispute" if self._close_dispute(evidence) is None else None

    def _close_dispute(self, evidence: bytes) -> tuple[DisputeM, int] | None:
        """Both accounts leave the dispute, the bond is released, the evidence is spent (GridStaking._closeDispute).
        Returns the dispute and the part of its bond still backed: all of it unless a slash cut ``bonded`` (what is
        left backs the open bonds in the order they close)."""
        d = self.disputes.pop(evidence, None)
        if d is None:
            return None
        self.evidence_used.add(evidence)
        ps, vs = self.stake_of(d.provider), self.stake_of(d.verifier)
        ps.open_disputes -= 1
        vs.open_disputes -= 1
        bond_left = min(d.bond, vs.bonded)
        vs.bonded -= bond_left
        vs.bonds_open -= d.bond
        return d, bond_left

    def _take(self, a: str, amount: int) -> tuple[int, int]:
        """Takes up to ``amount`` (staked, then unbonding); returns what it took and what that cut from the
        account's open bonds."""
        s = self.stake_of(a)
        from_staked = min(amount, s.staked)
        from_unbonding = min(amount - from_staked, s.unbonding)
        s.staked -= from_staked
        s.unbonding -= from_unbonding
        # the account's open bonds are part of its stake: what was taken from under them was taken from them
        bond_cut = max(s.bonded - (s.staked + s.unbonding), 0)
        s.bonded -= bond_cut
        taken = from_staked + from_unbonding
        self.total_staked -= taken
        self._add(self.slashed, a, taken)
        return taken, bond_cut

    def _pay_out(self, account: str, verifier: str | None, evidence: bytes, slashed: int, bond_cut: int) -> None:
        """Splits what a slash took from ``account`` (the bounty is fixed here, at the bounty rate of the moment): paid
        at once without a slash delay, else held under ``evidence`` (with the ``bond_cut`` a void gives back) until
        finalized or voided. A slash of 0 records nothing (a verdict on an account a slash already emptied)."""
        if slashed == 0:
            return
        bounty = 0 if verifier is None else slashed * self.params.bounty_bps // MAX_BPS
        self.slash_evidence[evidence] = account
        if self.params.slash_delay == 0:
            self._transfer_slash(account, verifier, slashed, bounty)
            return
        self.pending_slashes[evidence] = PendingSlashM(
            account, verifier, slashed, bounty, self.now + self.params.slash_delay, self.paused_seconds(), bond_cut)

    def _transfer_slash(self, account: str, verifier: str | None, slashed: int, bounty: int) -> None:
        if verifier is not None:
            self._add(self.balances, verifier, bounty)
        self._add(self.balances, self.treasury, slashed - bounty)
        self._add(self.slash_paid, account, slashed)

    def total_pending_slashes(self) -> int:
        return sum(ps.amount for ps in self.pending_slashes.values())

    def pending_slashes_of(self, a: str) -> int:
        """What ``a``'s pending slashes hold of its former stake (GridStaking.pendingSlashesOf)."""
        return sum(ps.amount for ps in self.pending_slashes.values() if ps.account == a)

    def slash_ready_at(self, ps: PendingSlashM, at: int | None = None) -> int:
        """A pending slash's deadline in force at ``at`` (GridStaking slashOf's readyAt): the nominal one pushed back
        by the seconds paused since the slash."""
        return ps.ready_at + self.paused_seconds(at) - ps.paused_at_set

    def finalize_slash(self, evidence: bytes) -> str | None:
        """Anyone pays out a pending slash from its deadline on (GridStaking.finalizeSlash)."""
        if self.paused:
            return "EnforcedPause"
        ps = self.pending_slashes.get(evidence)
        if ps is None:
            return "StakingUnknownSlash"
        if self.now < self.slash_ready_at(ps):
            return "StakingSlashNotReady"
        del self.pending_slashes[evidence]
        self._transfer_slash(ps.account, ps.verifier, ps.amount, ps.bounty)
        return None

    def void_slash(self, sender: str, evidence: bytes) -> str | None:
        """The guardian (``operator``) undoes a pending slash before its deadline, paused or not: the amount goes back
        to the account's ``staked`` (whatever it was taken from), what it cut from the account's open bonds backs
        them again as far as they are still open and the stake covers them; the evidence stays spent (and a dispute
        the verdict closed stays closed). Its redo (``redo_evidence``), pending and not final, is voided with it, also
        where the slash itself has nothing pending."""
        if sender != self.operator:
            return "AccessControlUnauthorizedAccount"
        ps = self.pending_slashes.get(evidence)
        redo = redo_evidence(evidence)
        child = self.pending_slashes.get(redo)
        if child is not None and self.now >= self.slash_ready_at(child):
            child = None  # final: it stands
        if ps is not None:
            if self.now >= self.slash_ready_at(ps):
                return "StakingSlashFinal"
            self._void(evidence, ps)
        elif child is None:
            return "StakingUnknownSlash"
        if child is not None:
            self._void(redo, child)  # its redo, pending and not final, goes with it (alone, if it is all pending)
        return None

    def _void(self, evidence: bytes, ps: PendingSlashM) -> None:
        del self.pending_slashes[evidence]
        s = self.stake_of(ps.account)
        s.staked += ps.amount
        if ps.bond_cut:
            s.bonded = min(s.bonded + ps.bond_cut, s.bonds_open, s.staked + s.unbonding)
        self.total_staked += ps.amount
        self._add(self.restored, ps.account, ps.amount)

    def set_slash_delay(self, delay: int) -> str | None:
        """Governance (through the timelock): applies to slashes made from now on; pending ones keep their deadline."""
        self.params.slash_delay = delay
        return None

    def ready_at(self, s: StakeM, at: int | None = None) -> int:
        """An unbonding's deadline in force at ``at`` (GridStaking accountOf's unbondingReadyAt): the nominal one
        pushed back by the seconds paused since the request; 0 if nothing was ever requested."""
        return s.ready_at + self.paused_seconds(at) - s.paused_at_request if s.ready_at else 0

    # ---------------------------------------------------------------- escrow

    def paused_seconds(self, at: int | None = None) -> int:
        """pausedSeconds() of JobEscrow and GridStaking at time ``at`` (default ``now``): the current pause included."""
        at = self.now if at is None else at
        return self.paused_total + (at - self.paused_since if self.paused else 0)

    def deadline(self, j: JobM, at: int | None = None) -> int:
        """A cancelled job's deadline in force at ``at`` (JobEscrow getJob's closableAt): the nominal one pushed back
        by the seconds paused since the cancel; 0 if not cancelled."""
        return j.closable_at + self.paused_seconds(at) - j.paused_at_cancel if j.closable_at else 0

    def fund(self, c: str, job: bytes, amount: int) -> str | None:
        j = self.jobs.get(job, JobM())
        if self.paused:
            return "EnforcedPause"
        if amount == 0:
            return "EscrowZeroAmount"
        if j.closed:
            return "EscrowJobClosed"
        if j.closable_at:
            return "EscrowJobCancelled"
        if j.customer is None and job[:20] != bytes.fromhex(c[2:]):
            return "EscrowJobIdNotYours"  # a new job id is its customer's (its first 20 bytes)
        if j.customer is not None and j.customer != c:
            return "EscrowNotCustomer"
        if self.balances.get(c, 0) < amount:
            return "ERC20InsufficientBalance"
        j.customer = c
        j.funded += amount
        self.jobs[job] = j
        self._add(self.balances, c, -amount)
        return None

    def _debit(self, job: bytes, amount: int) -> str | None:
        j = self.jobs.get(job, JobM())
        if amount == 0:
            return "EscrowZeroAmount"
        if j.closed:
            return "EscrowJobClosed"
        if j.closable_at and self.now >= self.deadline(j):
            return "EscrowJobCancelled"  # the cancel's grace is over: the rest is the customer's refund
        if amount > j.funded - j.released:
            return "EscrowInsufficientFunds"
        j.released += amount
        self.jobs[job] = j
        return None

    def release(self, job: bytes, unit: bytes, p: str, amount: int) -> str | None:
        if self.paused:
            return "EnforcedPause"
        if (job, unit) in self.units:
            return "EscrowUnitAlreadyReleased"
        error = self._debit(job, amount)
        if error is None:
            self.units.add((job, unit))
            self._add(self.claimable, p, amount)
        return error

    def release_to_pool(self, job: bytes, batch: bytes, shares: Iterable[tuple[str, int]]) -> str | None:
        """Moves the batch (the sum of ``shares``) to the pool; the ledger credits each provider its share."""
        shares = list(shares)
        amount = sum(v for _, v in shares)
        if self.paused:
            return "EnforcedPause"
        if (job, batch) in self.batches:
            return "EscrowUnitAlreadyReleased"
        error = self._debit(job, amount)
        if error is None:
            self.batches.add((job, batch))
            self.deposited += amount
            for p, v in shares:
                self._add(self.ledger, p, v)
        return error

    def cancel(self, c: str, job: bytes) -> str | None:
        j = self.jobs.get(job, JobM())
        if self.paused:
            return "EnforcedPause"
        if j.customer is None:
            return "EscrowUnknownJob"
        if c != j.customer:
            return "EscrowNotCustomer"
        if j.closed:
            return "EscrowJobClosed"
        if j.closable_at:
            return "EscrowJobCancelled"
        j.closable_at = self.now + self.params.cancel_grace
        j.paused_at_cancel = self.paused_total
        return None

    def close(self, sender: str, job: bytes) -> str | None:
        j = self.jobs.get(job, JobM())
        settler = sender == self.operator
        if self.paused:
            return "EnforcedPause"
        if sender != j.customer and not settler:
            return "EscrowNotAuthorized"
        if j.customer is None:
            return "EscrowUnknownJob"
        if j.closed:
            return "EscrowJobClosed"
        if not settler and (j.closable_at == 0 or self.now < self.deadline(j)):
            return "EscrowCancelPending"
        j.closed = True
        self._add(self.balances, j.customer, j.funded - j.released)
        return None

    def claim_escrow(self, p: str) -> str | None:
        if self.paused:
            return "EnforcedPause"
        amount = self.claimable.get(p, 0)
        if amount == 0:
            return "EscrowNothingToClaim"
        self.claimable[p] = 0
        self._add(self.balances, p, amount)
        return None

    # ---------------------------------------------------------------- settlement

    def post_root(self, epoch: int, cumulative: dict[str, int], total: int) -> str | None:
        if self.paused:
            return "EnforcedPause"
        if epoch != self.latest + 1:
            return "SettlementWrongEpoch"
        if self.now < self.claimable_at:
            return "SettlementRootInDispute"
        if total > self.deposited:
            return "SettlementUnderfunded"
        self.roots[epoch] = dict(cumulative)
        self.latest = epoch
        self.claimable_at = self.now + self.params.dispute_window
        return None

    def void_root(self, epoch: int) -> str | None:
        if epoch != self.latest or epoch == 0 or self.now >= self.claimable_at:
            return "SettlementNotVoidable"
        del self.roots[epoch]
        self.latest -= 1
        self.claimable_at = 0  # the previous root was already claimable
        return None

    def set_dispute_window(self, window: int) -> str | None:
        """Governance (through the timelock): applies to roots posted from now on, not to the latest one."""
        self.params.dispute_window = window
        return None

    def _claimable_epoch_error(self, epoch: int) -> str | None:
        if epoch == 0 or epoch > self.latest:
            return "SettlementUnknownEpoch"
        if epoch == self.latest and self.now < self.claimable_at:
            return "SettlementRootInDispute"
        return None

    def claim_payout(self, a: str, epoch: int, cumulative: int, proof_ok: bool) -> str | None:
        """``proof_ok``: the caller sent the tree's real proof for (``a``, ``cumulative``) in ``epoch``'s root."""
        if self.paused:
            return "EnforcedPause"
        error = self._claimable_epoch_error(epoch)
        if error is not None:
            return error
        if not proof_ok or self.roots.get(epoch, {}).get(a) != cumulative:
            return "SettlementInvalidProof"
        prior = self.claimed.get(a, 0)
        if cumulative <= prior:
            return "SettlementNothingToClaim"
        self.claimed[a] = cumulative
        self._add(self.balances, a, cumulative - prior)
        return None

    def claim_payout_batch(
        self, epoch: int, entries: Sequence[tuple[str, int, bool]], lengths_match: bool = True
    ) -> str | None:
        """``claimMany``: ``entries`` are (account, cumulative, proof_ok) in order. An entry with nothing new for its
        account (including an account listed earlier in the same batch) is skipped before its proof is looked at;
        any other entry with a bad proof reverts the whole batch (nothing is paid)."""
        if self.paused:
            return "EnforcedPause"
        if not lengths_match:
            return "SettlementLengthMismatch"
        error = self._claimable_epoch_error(epoch)
        if error is not None:
            return error
        claimed = dict(self.claimed)
        paid: dict[str, int] = {}
        for a, cumulative, proof_ok in entries:
            prior = claimed.get(a, 0)
            if cumulative <= prior:
                continue
            if not proof_ok or self.roots.get(epoch, {}).get(a) != cumulative:
                return "SettlementInvalidProof"
            claimed[a] = cumulative
            paid[a] = paid.get(a, 0) + cumulative - prior
        self.claimed = claimed
        for a, amount in paid.items():
            self._add(self.balances, a, amount)
        return None

    def claimable_root(self) -> int:
        """The newest epoch whose root is past its dispute window (0 if none)."""
        if self.latest and self.now < self.claimable_at:
            return self.latest - 1
        return self.latest

    # ---------------------------------------------------------------- kill switch

    def pause(self) -> str | None:
        if not self.paused:  # the kill switch skips a paused target: its pause clock keeps running
            self.paused, self.paused_since = True, self.now
        return None

    def unpause(self) -> str | None:
        if not self.paused:
            return "ExpectedPause"
        self.paused = False
        self.paused_total += self.now - self.paused_since
        return None
