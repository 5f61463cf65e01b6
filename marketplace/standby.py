"""Standby pool, pure part: spare providers held per running job, who takes over when one drops out, and from
where the unit resumes.

The service keeps, for each running job, a few matched-but-idle providers (``pick_standbys``) so a dropout is
replaced at once instead of waiting for the next matching round. A provider that misses its heartbeat deadline
(``dropouts``; the clock is an argument) has dropped its unit: ``reassign_on_dropout`` hands the unit to the
first standby still eligible for it, to resume from the unit's last *verified* checkpoint (work after it was
never checked, so it is redone), and returns the dropout's record with one more dropout, which raises its
effective price (``pricing.rank_key``) in later rounds. Standbys are ranked by the matcher's own key, so a
standby is always the cheapest eligible spare.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from marketplace.matching import Demand, Offer, eligible, sort_key
from marketplace.pricing import DEFAULT_TABLE, CostTable, Reliability
from protocol.errors import GridMintValueError


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint of a unit: the training step it is at and the sha256 of its blob. ``verified`` once a
    verifier (or the referee) has replayed the segment that ends in it."""

    step: int
    sha256: str
    verified: bool = False


def last_verified(checkpoints: Collection[Checkpoint]) -> Checkpoint | None:
    """The verified checkpoint with the highest step (None: nothing verified, start the unit over)."""
    return max((c for c in checkpoints if c.verified), key=lambda c: c.step, default=None)


def dropouts(last_heartbeat_s: Mapping[str, int], now_s: int, deadline_s: int) -> list[str]:
    """Providers whose last heartbeat is more than ``deadline_s`` seconds before ``now_s``, sorted."""
    if deadline_s < 0:
        raise GridMintValueError(f"heartbeat deadline must be >= 0 s, got {deadline_s}")
    return sorted(p for p, seen in last_heartbeat_s.items() if now_s - seen > deadline_s)


def pick_standbys(offers: Sequence[Offer], demand: Demand, count: int, assigned: Collection[str],
                  table: CostTable = DEFAULT_TABLE) -> list[Offer]:
    """The ``count`` cheapest offers with a free slot that are eligible for ``demand`` (the job's
    requirements, its excluded operators too), leaving out the providers in ``assigned`` (already working on the
    job). At most one per operator, so one operator going down cannot take every standby with it. Cheapest first."""
    if count < 0:
        raise GridMintValueError(f"standby count must be >= 0, got {count}")
    candidates = sorted((o for o in offers if o.free_slots > 0 and o.provider not in assigned and eligible(o, demand)
                         and o.operated_by not in demand.excluded_operators),
                        key=lambda o: sort_key(o, table))
    out: list[Offer] = []
    operators: set[str] = set()
    for o in candidates:
        if len(out) == count:
            break
        if o.operated_by not in operators:
            operators.add(o.operated_by)
            out.append(o)
    return out


@dataclass(frozen=True)
class Reassignment:
    unit_id: str
    dropped: str
    dropped_reliability: Reliability  # the dropout's record after this dropout
    replacement: Offer | None  # None: no standby fits; the unit goes back to the matching pool
    resume_from: Checkpoint | None  # the unit's last verified checkpoint; None: from the unit's start
    standbys: tuple[Offer, ...]  # the pool left after this (replacement and dropout removed)
    unit: Demand  # the unit's demand from now on: the dropout excluded


def reassign_on_dropout(demand: Demand, dropped: str, dropped_record: Reliability, standbys: Sequence[Offer],
                        busy_operators: Collection[str] = (),
                        checkpoints: Collection[Checkpoint] = ()) -> Reassignment:
    """Provider ``dropped`` left unit ``demand``: pick the first standby (they are cheapest first) still
    eligible for the unit, not the dropout, and whose operator holds no other replica of the unit
    (``busy_operators``). The unit resumes from its last verified checkpoint among ``checkpoints``. The
    dropout joins the unit's exclusions here, so it is never its own standby; the service records it in the
    unit's ``dropped_by``, passed over in later rounds while anyone else has a free slot. Pure: the caller
    persists the result (and retries the unit in the next matching round if no standby fits)."""
    unit = Demand(demand.unit_id, demand.vram_mb, demand.min_stake, demand.max_price, demand.excluded | {dropped},
                  demand.regions, demand.replicas, demand.excluded_operators)
    chosen: Offer | None = None
    for o in standbys:
        if (o.free_slots > 0 and eligible(o, unit) and o.operated_by not in busy_operators
                and o.operated_by not in unit.excluded_operators):
            chosen = o
            break
    rest = tuple(o for o in standbys if o is not chosen and o.provider != dropped)
    return Reassignment(demand.unit_id, dropped, dropped_record.after_dropout(), chosen, last_verified(checkpoints),
                        rest, unit)
