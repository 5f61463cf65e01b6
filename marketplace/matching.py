"""The matching engine's pure core: who trains which work unit.

``match(offers, demands)`` assigns each unit (in the order given: oldest job first) to the eligible
offer with the lowest ask; ties go to the cheaper region, then to the lower address, so results are
deterministic. An offer is eligible for a unit when it has a free slot, enough VRAM, enough stake,
is not excluded from the unit (a provider caught cheating on it, or one that dropped it), and asks no
more than the unit's price cap. Pricier offers are reached only when cheaper ones are full or ineligible.
No I/O, no clock: the caller passes plain data in and writes the assignments out.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from marketplace.pricing import REGIONS


@dataclass(frozen=True)
class Offer:
    provider: str
    region: str
    price: int  # ask per work unit, base units
    vram_mb: int
    stake: int  # base units currently staked on chain
    free_slots: int = 1


@dataclass(frozen=True)
class Demand:
    unit_id: str
    vram_mb: int
    min_stake: int
    max_price: int
    excluded: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True)
class Assignment:
    unit_id: str
    provider: str
    price: int
    region: str
    rank: int  # 1 = cheapest offer overall; tells the user how far down the price list we had to go


def _key(offer: Offer) -> tuple[int, int, str]:
    region = REGIONS.get(offer.region)
    return (offer.price, region.floor_per_unit if region else 2**255, offer.provider.lower())


def eligible(offer: Offer, demand: Demand) -> bool:
    return (
        offer.vram_mb >= demand.vram_mb
        and offer.stake >= demand.min_stake
        and offer.price <= demand.max_price
        and offer.provider not in demand.excluded
    )


def match(offers: list[Offer], demands: list[Demand]) -> list[Assignment]:
    """Assign units cheapest-first. Each unit gets at most one provider; each provider at most its free slots."""
    ranked = sorted(offers, key=_key)
    rank_of = {o.provider: i + 1 for i, o in enumerate(ranked)}
    slots = {o.provider: o.free_slots for o in ranked}
    heap = [(_key(o), i) for i, o in enumerate(ranked) if o.free_slots > 0]
    heapq.heapify(heap)
    out: list[Assignment] = []
    for demand in demands:
        skipped: list[tuple[tuple[int, int, str], int]] = []
        chosen: Offer | None = None
        while heap:
            item = heapq.heappop(heap)
            offer = ranked[item[1]]
            if eligible(offer, demand):
                chosen = offer
                slots[offer.provider] -= 1
                if slots[offer.provider] > 0:
                    skipped.append(item)
                break
            skipped.append(item)
        for item in skipped:
            heapq.heappush(heap, item)
        if chosen is not None:
            out.append(Assignment(demand.unit_id, chosen.provider, chosen.price, chosen.region, rank_of[chosen.provider]))
    return out
