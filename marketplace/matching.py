"""The matching engine's pure core: who trains which work unit.

``match(offers, demands)`` assigns each unit (in the order given: oldest job first) to the eligible offer
with the lowest effective price (``pricing.rank_key``: ask per completed unit at reference speed); ties go to
the cheaper region, then to the lower address, so results are deterministic. An offer is eligible for a unit
when it has a free slot, enough VRAM, enough stake, an ask no more than the unit's price cap (the escrow
holds units x cap), a region on the unit's allow-list, is not excluded from the unit (a provider caught
cheating on it, or one that dropped it), and its operator holds no other replica of the unit. Pricier offers
are reached only when cheaper ones are full or ineligible. ``match_last_resort`` then lets a unit that found
no free slot go back to a provider excluded from it only for dropping it (never to a cheat).

``MatchingBook`` keeps that state between calls (the simulation adds and removes capacity as it goes);
``match_naive`` is the reference that scores every offer for every unit: it must give the same answer.
No I/O, no clock: the caller passes plain data in and writes the assignments out.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np

from marketplace.matching_index import MatchIndex
from marketplace.pricing import (DEFAULT_TABLE, MAX_THROUGHPUT, PPM, REFERENCE_THROUGHPUT, CostTable, check_performance,
                                 rank_key)
from protocol.errors import GridMintValueError

#: Region floor used to rank an offer from a region the cost table does not know: after every known region.
_UNKNOWN_FLOOR = 2**255


@dataclass(frozen=True, slots=True)
class Offer:
    provider: str
    region: str
    price: int  # ask per work unit, base units
    vram_mb: int
    stake: int  # base units currently staked on chain
    free_slots: int = 1  # <= 0 means full
    throughput: int = REFERENCE_THROUGHPUT  # training tokens/s: benchmark, blended with real work
    reliability_ppm: int = PPM  # pricing.Reliability(...).ppm
    operator: str = ""  # who runs the machine; "" = the provider is its own operator

    def __post_init__(self) -> None:
        check_performance(self.throughput, self.reliability_ppm)
        numbers_ok = _ints(self.price, self.vram_mb, self.stake, self.free_slots)
        if not numbers_ok or min(self.price, self.vram_mb, self.stake) < 0:
            raise GridMintValueError(f"offer {self.provider}: price, vram and stake must be ints >= 0: {self}")

    @property
    def operated_by(self) -> str:
        return self.operator or self.provider


@dataclass(frozen=True, slots=True)
class Demand:
    unit_id: str
    vram_mb: int
    min_stake: int  # e.g. pricing.required_stake(value at risk, settings.min_stake)
    max_price: int  # cap on the ask, base units per unit
    excluded: frozenset[str] = field(default_factory=frozenset)  # providers
    regions: frozenset[str] | None = None  # allow-list; None = anywhere
    replicas: int = 1  # copies of the unit, each on a different operator
    excluded_operators: frozenset[str] = field(default_factory=frozenset)  # e.g. holders of earlier replicas

    def __post_init__(self) -> None:
        if (not _ints(self.vram_mb, self.min_stake, self.max_price, self.replicas) or self.vram_mb < 0
                or self.min_stake < 0 or self.replicas < 1):
            raise GridMintValueError(f"demand {self.unit_id}: vram, stake and cap must be ints, vram and stake >= 0, "
                                     f"replicas >= 1: {self}")


def _ints(*values: object) -> bool:
    """All plain ints (money and sizes are never float; bool is not a number here)."""
    return all(type(v) is int for v in values)


class Assignment(NamedTuple):
    """One replica of one unit given to one provider (immutable; a tuple, since matching makes millions)."""

    unit_id: str
    provider: str
    price: int
    region: str
    rank: int  # 1 = cheapest offer overall; tells the user how far down the price list we had to go
    replica: int = 0


def sort_key(offer: Offer, table: CostTable = DEFAULT_TABLE) -> tuple[int, int, str]:
    """The total order of offers: effective price (exact), region floor, lower-case address."""
    region = table.regions.get(offer.region)
    return (rank_key(offer.price, offer.throughput, offer.reliability_ppm),
            region.floor_per_unit if region else _UNKNOWN_FLOOR, offer.provider.lower())


def eligible(offer: Offer, demand: Demand) -> bool:
    """Whether ``offer`` may take ``demand`` at all (slots and replica operators are checked by the matcher)."""
    return (
        offer.vram_mb >= demand.vram_mb
        and offer.stake >= demand.min_stake
        and offer.price <= demand.max_price
        and offer.provider not in demand.excluded
        and (demand.regions is None or offer.region in demand.regions)
    )


@dataclass(frozen=True)
class OfferColumns:
    """An offer book column by column (what ``MatchingBook`` indexes), for books too big to hold as ``Offer``s."""

    providers: list[str]
    regions: list[str]
    prices: list[int]
    vram_mb: list[int]
    stakes: list[int]
    free_slots: list[int]
    throughput: list[int]
    reliability_ppm: list[int]
    operators: list[str]  # "" = the provider is its own operator

    @classmethod
    def from_offers(cls, offers: Sequence[Offer]) -> OfferColumns:
        return cls([o.provider for o in offers], [o.region for o in offers], [o.price for o in offers],
                   [o.vram_mb for o in offers], [o.stake for o in offers], [o.free_slots for o in offers],
                   [o.throughput for o in offers], [o.reliability_ppm for o in offers], [o.operator for o in offers])

    def offer(self, i: int) -> Offer:
        return Offer(self.providers[i], self.regions[i], self.prices[i], self.vram_mb[i], self.stakes[i],
                     self.free_slots[i], self.throughput[i], self.reliability_ppm[i], self.operators[i])

    def check(self) -> None:
        """The checks ``Offer`` makes, over whole columns; and one offer per provider."""
        n = len(self.providers)
        if any(len(col) != n for col in (self.regions, self.prices, self.vram_mb, self.stakes, self.free_slots,
                                          self.throughput, self.reliability_ppm, self.operators)):
            raise GridMintValueError("offer columns differ in length")
        numbers = (self.prices, self.vram_mb, self.stakes, self.free_slots, self.throughput, self.reliability_ppm)
        if any(set(map(type, col)) - {int} for col in numbers):
            bad = next(i for i in range(n) if not _ints(*(col[i] for col in numbers)))
            raise GridMintValueError(f"offer {self.providers[bad]}: price, vram, stake, slots, throughput and "
                                     "reliability must be ints")
        if n and min(min(self.prices), min(self.vram_mb), min(self.stakes)) < 0:
            bad = next(i for i in range(n) if min(self.prices[i], self.vram_mb[i], self.stakes[i]) < 0)
            raise GridMintValueError(f"offer {self.providers[bad]}: price, vram and stake must be >= 0")
        if n and (min(self.throughput) < 1 or max(self.throughput) > MAX_THROUGHPUT
                  or min(self.reliability_ppm) < 1 or max(self.reliability_ppm) > PPM):
            for t, r in zip(self.throughput, self.reliability_ppm):
                check_performance(t, r)
        if len(set(map(str.lower, self.providers))) != n:
            seen: set[str] = set()
            for p in self.providers:
                if p.lower() in seen:
                    raise GridMintValueError(f"provider {p} offers twice; merge its slots into one offer")
                seen.add(p.lower())


def rank_order(cols: OfferColumns, table: CostTable = DEFAULT_TABLE) -> list[int]:
    """Input positions sorted by ``sort_key``: exact integer keys, sorted from a float pre-order (numpy, then
    timsort finishes a nearly sorted list in about n comparisons), the rare ties broken by floor and address."""
    n = len(cols.prices)
    keys = list(map(rank_key, cols.prices, cols.throughput, cols.reliability_ppm))
    if n < 2:
        return list(range(n))
    try:
        approx = np.array(cols.prices, dtype=np.float64) / (
            np.array(cols.throughput, dtype=np.float64) * np.array(cols.reliability_ppm, dtype=np.float64))
        order = sorted(np.argsort(approx, kind="stable").tolist(), key=keys.__getitem__)
    except OverflowError:  # an ask beyond float range: sort the exact keys outright
        order = sorted(range(n), key=keys.__getitem__)
    ranked = np.array(keys, dtype=object)[np.array(order)]
    tied = np.flatnonzero(ranked[1:] == ranked[:-1]) + 1  # position j: same key as j - 1
    if len(tied):
        floor = {r: (c.floor_per_unit if (c := table.regions.get(r)) else _UNKNOWN_FLOOR) for r in set(cols.regions)}
        tied_l, k = tied.tolist(), 0
        while k < len(tied_l):  # each run of equal keys, order[j0 - 1 : j1 + 1]
            j0 = j1 = tied_l[k]
            while k + 1 < len(tied_l) and tied_l[k + 1] == j1 + 1:
                k += 1
                j1 = tied_l[k]
            order[j0 - 1: j1 + 1] = sorted(order[j0 - 1: j1 + 1],
                                           key=lambda i: (floor[cols.regions[i]], cols.providers[i].lower()))
            k += 1
    return order


class MatchingBook:
    """An offer book with capacity that changes as units are assigned and finish. Offers are addressed by
    their position in the book given (``i``); ``assign`` is the one place units are matched. O(n log n) to
    build, then O(log n) per assignment, release or change of online state (``matching_index``)."""

    def __init__(self, offers: Sequence[Offer] | OfferColumns, table: CostTable = DEFAULT_TABLE,
                 online: Sequence[bool] | None = None) -> None:
        cols = offers if isinstance(offers, OfferColumns) else OfferColumns.from_offers(offers)
        cols.check()
        self.cols = cols  # kept, not copied: do not change the columns while the book is in use
        self.index = MatchIndex(rank_order(cols, table), cols.regions, cols.vram_mb, cols.stakes, cols.prices,
                                cols.free_slots, online)
        self.operators = [op or p for op, p in zip(cols.operators, cols.providers)]  # by position

    def assign(self, demand: Demand) -> list[Assignment]:
        """Match up to ``demand.replicas`` copies of one unit and take their slots. Partial if fewer eligible
        operators exist: the caller retries the rest later with ``excluded_operators`` set."""
        ix = self.index
        cols = self.cols
        index_of = ix.index_of
        scope = ix.regions_for(demand.regions)
        excluded = demand.excluded
        if demand.replicas == 1 and not excluded and not demand.excluded_operators:  # the common case, no filter
            r = ix.best(demand.vram_mb, demand.min_stake, demand.max_price, scope)
            if r < 0:
                return []
            ix.take(r)
            i = index_of[r]
            return [Assignment(demand.unit_id, cols.providers[i], cols.prices[i], cols.regions[i], r + 1, 0)]
        providers, operators = cols.providers, self.operators
        used = set(demand.excluded_operators)

        def skip(r: int) -> bool:  # few per unit: checked at the leaves, the trees are not touched
            i = index_of[r]
            return providers[i] in excluded or operators[i] in used

        out: list[Assignment] = []
        for replica in range(demand.replicas):
            r = ix.best(demand.vram_mb, demand.min_stake, demand.max_price, scope,
                        skip if excluded or used else None)
            if r < 0:
                break
            ix.take(r)
            i = index_of[r]
            used.add(operators[i])
            out.append(Assignment(demand.unit_id, providers[i], cols.prices[i], cols.regions[i], r + 1,
                                  replica))
        return out

    def release(self, i: int) -> None:
        """Offer ``i`` finished (or dropped) a unit: one slot back."""
        self.index.give(self.index.rank_of[i])

    def set_online(self, i: int, online: bool) -> None:
        """Offer ``i`` comes online (its free slots can be matched) or goes offline (they cannot)."""
        self.index.set_online(self.index.rank_of[i], online)

    def release_many(self, indices: Sequence[int]) -> None:
        """``release(i)`` for each of ``indices`` (one slot back per entry)."""
        self.index.give_many(list(map(self.index.rank_of.__getitem__, indices)))

    def set_online_many(self, indices: Sequence[int], online: bool) -> None:
        """``set_online(i, online)`` for each of ``indices``."""
        self.index.set_online_many(list(map(self.index.rank_of.__getitem__, indices)), online)


def match(offers: Sequence[Offer], demands: Sequence[Demand], table: CostTable = DEFAULT_TABLE) -> list[Assignment]:
    """Assign units cheapest-first, in the order given. Each replica of a unit gets at most one provider (of
    distinct operators); each provider at most its free slots. O(n log n) to rank, then O(log n) per unit."""
    book = MatchingBook(offers, table)
    out: list[Assignment] = []
    for demand in demands:
        out.extend(book.assign(demand))
    return out


def match_last_resort(offers: Sequence[Offer], demands: Sequence[Demand], lifted: Mapping[str, frozenset[str]],
                      table: CostTable = DEFAULT_TABLE) -> list[Assignment]:
    """``match``, then each unit left without a provider is matched once more among the slots still free with the
    providers in ``lifted[unit_id]`` let back in (providers excluded from it only for having dropped it: a link
    blip, a restart, a missed deadline; never a cheat). A dropout is a last resort, not banned for good: in a
    market where every provider able to take a unit has dropped it once, the unit would otherwise wait for ever.
    Single-replica demands (what the service matches)."""
    got = match(offers, demands, table)
    done = {a.unit_id for a in got}
    retry = [replace(d, excluded=d.excluded - lifted[d.unit_id])
             for d in demands if d.unit_id not in done and lifted.get(d.unit_id)]
    if not retry:
        return got
    taken = Counter(a.provider for a in got)
    left = [replace(o, free_slots=o.free_slots - taken[o.provider]) for o in offers
            if o.free_slots > taken[o.provider]]
    # (ranks among every offer, as the first pass's: a review found them counted among the leftovers)
    rank = {o.provider: r + 1 for r, o in enumerate(sorted(offers, key=lambda o: sort_key(o, table)))}
    return got + [a._replace(rank=rank[a.provider]) for a in match(left, retry, table)]


class NaiveBook:
    """Reference matcher: for every replica of every unit, look at every offer and keep the cheapest eligible
    one (by ``sort_key``, computed once). O(n) per unit; checks ``MatchingBook`` and is the benchmark's
    baseline."""

    def __init__(self, offers: Sequence[Offer], table: CostTable = DEFAULT_TABLE) -> None:
        OfferColumns.from_offers(offers).check()
        self.offers = list(offers)
        self.keys = [sort_key(o, table) for o in offers]
        self.rank = [0] * len(offers)
        for r, i in enumerate(sorted(range(len(offers)), key=self.keys.__getitem__)):
            self.rank[i] = r + 1
        self.free = [max(0, o.free_slots) for o in offers]
        self.online = [True] * len(offers)

    def assign(self, d: Demand) -> list[Assignment]:
        keys, free, online = self.keys, self.free, self.online
        used = set(d.excluded_operators)
        out: list[Assignment] = []
        for replica in range(d.replicas):
            best = -1
            for i, o in enumerate(self.offers):
                if (free[i] > 0 and online[i] and o.vram_mb >= d.vram_mb and o.stake >= d.min_stake
                        and o.price <= d.max_price
                        and o.provider not in d.excluded and (d.regions is None or o.region in d.regions)
                        and (o.operator or o.provider) not in used and (best < 0 or keys[i] < keys[best])):
                    best = i
            if best < 0:
                break
            o = self.offers[best]
            free[best] -= 1
            used.add(o.operated_by)
            out.append(Assignment(d.unit_id, o.provider, o.price, o.region, self.rank[best], replica))
        return out

    def release(self, i: int) -> None:
        self.free[i] += 1

    def set_online(self, i: int, online: bool) -> None:
        self.online[i] = online


def match_naive(offers: Sequence[Offer], demands: Sequence[Demand],
                table: CostTable = DEFAULT_TABLE) -> list[Assignment]:
    """``match`` done the slow, obvious way (``NaiveBook``): the same answer, O(n) per unit."""
    book = NaiveBook(offers, table)
    return [a for d in demands for a in book.assign(d)]
