"""Standby pool, pure part: spare providers held per running job, and who takes over when one drops out.

The service keeps, for each running job, a few matched-but-idle providers (``pick_standbys``) so a dropout is
replaced at once instead of waiting for the next matching round (``reassign_on_dropout``). Both rank by the
same key as the matcher, so a standby is always the cheapest eligible spare, and a dropout's reliability
drops (``Reliability.after_dropout``), which raises its effective price in later rounds.
"""
from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from marketplace.matching import Demand, Offer, eligible, sort_key
from marketplace.pricing import DEFAULT_TABLE, CostTable, Reliability
from protocol.errors import GridMintValueError


def pick_standbys(offers: Sequence[Offer], demand: Demand, count: int, assigned: Collection[str],
                  table: CostTable = DEFAULT_TABLE) -> list[Offer]:
    """The ``count`` cheapest offers with a free slot that are eligible for ``demand`` (the job's
    requirements), leaving out the providers in ``assigned`` (already working on the job). At most one per
    operator, so one operator going down cannot take every standby with it. Cheapest first."""
    if count < 0:
        raise GridMintValueError(f"standby count must be >= 0, got {count}")
    candidates = sorted((o for o in offers if o.free_slots > 0 and o.provider not in assigned and eligible(o, demand)),
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
    standbys: tuple[Offer, ...]  # the pool left after this (replacement and dropout removed)


def reassign_on_dropout(demand: Demand, dropped: str, dropped_record: Reliability, standbys: Sequence[Offer],
                        busy_operators: Collection[str] = ()) -> Reassignment:
    """Provider ``dropped`` left unit ``demand``: pick the first standby (they are cheapest first) still
    eligible for the unit, not the dropout, and whose operator holds no other replica of the unit
    (``busy_operators``). The dropout joins the unit's exclusions so the unit never goes back to it."""
    unit = Demand(demand.unit_id, demand.vram_mb, demand.min_stake, demand.max_price, demand.excluded | {dropped},
                  demand.regions, demand.replicas, demand.excluded_operators)
    chosen: Offer | None = None
    for o in standbys:
        if o.free_slots > 0 and eligible(o, unit) and o.operated_by not in busy_operators:
            chosen = o
            break
    rest = tuple(o for o in standbys if o is not chosen and o.provider != dropped)
    return Reassignment(demand.unit_id, dropped, dropped_record.after_dropout(), chosen, rest)
