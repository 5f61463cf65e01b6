"""The matching core: unit tests of its rules, and property tests of its invariants on random books, against
the rules written out directly and against the naive matcher that scores every offer."""
from __future__ import annotations

import random
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from marketplace.matching import (Assignment, Demand, MatchingBook, NaiveBook, Offer, OfferColumns, eligible, match,
                                  match_last_resort, match_naive, sort_key)
from marketplace.pricing import PPM, REFERENCE_THROUGHPUT, REGIONS, effective_price
from marketplace.simulation import synthetic_demands, synthetic_offers
from protocol.errors import GridMintValueError
from protocol.money import tokens

FLOOR = {name: r.floor_per_unit for name, r in REGIONS.items()}
BY_FLOOR = sorted(REGIONS, key=FLOOR.__getitem__)  # cheapest region first


def test_cheapest_first_then_pricier_regions() -> None:
    offers = [
        Offer("0xC", "eu-west", 300, 8000, 100),
        Offer("0xA", "eu-north", 100, 8000, 100),
        Offer("0xB", "us-east", 200, 8000, 100),
    ]
    demands = [Demand(f"u{i}", 4000, 50, 1000) for i in range(3)]
    got = match(offers, demands)
    assert [(a.unit_id, a.provider, a.rank) for a in got] == [("u0", "0xA", 1), ("u1", "0xB", 2), ("u2", "0xC", 3)]


def test_pricier_regions_are_tapped_only_as_cheap_capacity_fills() -> None:
    # every provider asks its region's floor: the matcher must fill the regions in floor order
    offers = [Offer(f"0x{r}{k}", r, FLOOR[r], 24_000, tokens(500), 2) for r in reversed(BY_FLOOR) for k in range(2)]
    got = match(offers, [Demand(f"u{i}", 16_000, tokens(100), tokens(10)) for i in range(4 * 3 + 1)])
    assert [a.region for a in got] == [r for r in BY_FLOOR[:3] for _ in range(4)] + [BY_FLOOR[3]]


def test_skips_low_vram_low_stake_excluded_overpriced_and_disallowed_regions() -> None:
    offers = [
        Offer("0xLowVram", "eu-north", 10, 2000, 100),
        Offer("0xLowStake", "eu-north", 20, 8000, 1),
        Offer("0xCheat", "eu-north", 30, 8000, 100),
        Offer("0xFar", "ap-east", 35, 8000, 100),
        Offer("0xGood", "us-east", 40, 8000, 100),
        Offer("0xPricey", "eu-west", 5000, 8000, 100),
    ]
    d = Demand("u", 4000, 50, 1000, frozenset({"0xCheat"}), frozenset({"us-east", "eu-west", "eu-north"}))
    assert [a.provider for a in match(offers, [d])] == ["0xGood"]
    assert match([o for o in offers if o.provider != "0xGood"], [d]) == []


def test_effective_price_beats_the_listed_ask() -> None:
    slow = Offer("0xslow", "eu-north", 100, 8000, 100, throughput=REFERENCE_THROUGHPUT // 2)  # effective 200
    fast = Offer("0xfast", "eu-north", 150, 8000, 100, throughput=REFERENCE_THROUGHPUT)  # effective 150
    flaky = Offer("0xflaky", "eu-north", 120, 8000, 100, reliability_ppm=PPM // 2)  # effective 240
    got = match([slow, fast, flaky], [Demand(f"u{i}", 1, 0, 1000) for i in range(3)])
    assert [a.provider for a in got] == ["0xfast", "0xslow", "0xflaky"]
    assert [a.price for a in got] == [150, 100, 120]  # the ask is what is paid; effective price only ranks


def test_tie_breaks_are_deterministic() -> None:
    a = Offer("0xb", "us-east", 100, 8000, 100)
    b = Offer("0xa", "us-east", 100, 8000, 100)
    c = Offer("0x0", "eu-west", 100, 8000, 100)  # same ask, costlier region
    d = Offer("0xB0", "us-east", 200, 8000, 100, throughput=2 * REFERENCE_THROUGHPUT)  # same effective price, exactly
    units = [Demand(f"u{i}", 1, 0, 10**9) for i in range(4)]
    want = ["0xa", "0xb", "0xB0", "0x0"]  # floor first, then lower-case address
    for perm in ([a, b, c, d], [d, c, b, a], [c, a, d, b]):
        assert [x.provider for x in match(perm, units)] == want


def test_replicas_go_to_distinct_operators() -> None:
    farm = [Offer(f"0xf{i}", "eu-north", 10 + i, 8000, 100, 4, operator="farm") for i in range(3)]
    other = Offer("0xsolo", "eu-west", 500, 8000, 100)
    got = match(farm + [other], [Demand("u", 1, 0, 1000, replicas=3)])
    assert [(a.provider, a.replica) for a in got] == [("0xf0", 0), ("0xsolo", 1)]  # a third operator: none
    held = match(farm + [other], [Demand("u", 1, 0, 1000, replicas=2, excluded_operators=frozenset({"0xsolo"}))])
    assert [a.provider for a in held] == ["0xf0"]


def test_capacity_comes_back_on_release_and_online() -> None:
    offers = [Offer("0xA", "eu-north", 10, 8000, 100), Offer("0xB", "us-east", 20, 8000, 100)]
    book = MatchingBook(offers, online=[True, False])
    assert [a.provider for a in book.assign(Demand("u0", 1, 0, 100))] == ["0xA"]
    assert book.assign(Demand("u1", 1, 0, 100)) == []  # full, and a failure that is remembered ...
    book.set_online(1, True)  # ... until capacity comes back
    assert [a.provider for a in book.assign(Demand("u1", 1, 0, 100))] == ["0xB"]
    assert book.assign(Demand("u2", 1, 0, 100)) == []
    book.release(0)
    assert [a.provider for a in book.assign(Demand("u2", 1, 0, 100))] == ["0xA"]
    book.set_online(0, False)
    book.release(0)  # a unit finished on a provider that left: the slot is free but offline
    assert book.assign(Demand("u3", 1, 0, 100)) == []
    book.set_online(0, True)
    assert [a.provider for a in book.assign(Demand("u3", 1, 0, 100))] == ["0xA"]


def test_unknown_regions_and_allow_lists() -> None:
    offers = [Offer("0xmars", "mars", 10, 8000, 100), Offer("0xeu", "eu-north", 10, 8000, 100)]
    # equal effective price: a region the cost table does not know ranks after every known one
    assert [a.provider for a in match(offers, [Demand(f"u{i}", 1, 0, 100) for i in range(2)])] == ["0xeu", "0xmars"]
    assert [a.provider for a in match(offers, [Demand("u", 1, 0, 100, regions=frozenset({"mars"}))])] == ["0xmars"]
    assert match(offers, [Demand("u", 1, 0, 100, regions=frozenset({"venus"}))]) == []
    assert match(offers, [Demand("u", 1, 0, 100, regions=frozenset())]) == []


def test_money_beyond_int64_is_compared_exactly() -> None:
    big = 2**130
    offers = [Offer("0xa", "eu-north", big + 2, 8000, big), Offer("0xb", "eu-north", big + 1, 8000, big + 1),
              Offer("0xc", "eu-north", 3, 8000, 2**70)]
    units = [Demand("u0", 1, big + 1, big + 2), Demand("u1", 1, big, big + 1), Demand("u2", 1, big, big + 2),
             Demand("u3", 1, 2**70, 2)]
    assert match(offers, units) == match_naive(offers, units)
    assert [(a.unit_id, a.provider) for a in match(offers, units)] == [("u0", "0xb"), ("u2", "0xa")]


def test_bad_books_are_refused() -> None:
    with pytest.raises(GridMintValueError, match="offers twice"):
        match([Offer("0xAb", "eu-north", 1, 1, 1), Offer("0xab", "us-east", 2, 1, 1)], [])
    with pytest.raises(GridMintValueError, match="price, vram and stake"):
        Offer("0xa", "eu-north", -1, 1, 1)
    with pytest.raises(GridMintValueError, match="throughput"):
        Offer("0xa", "eu-north", 1, 1, 1, throughput=0)
    with pytest.raises(GridMintValueError, match="reliability"):
        Offer("0xa", "eu-north", 1, 1, 1, reliability_ppm=PPM + 1)
    with pytest.raises(GridMintValueError, match="replicas"):
        Demand("u", 1, 0, 1, replicas=0)
    with pytest.raises(GridMintValueError, match="ints"):
        Offer("0xa", "eu-north", 1.5, 1, 1)  # type: ignore[arg-type]  # money is never float
    with pytest.raises(GridMintValueError, match="ints"):
        Demand("u", 1, 0, 2.0)  # type: ignore[arg-type]
    cols = OfferColumns.from_offers([Offer("0xa", "eu-north", 1, 1, 1)])
    with pytest.raises(GridMintValueError, match="length"):
        MatchingBook(OfferColumns(cols.providers, cols.regions, cols.prices + [1], cols.vram_mb, cols.stakes,
                                  cols.free_slots, cols.throughput, cols.reliability_ppm, cols.operators))
    with pytest.raises(GridMintValueError, match="throughput"):
        MatchingBook(OfferColumns(cols.providers, cols.regions, cols.prices, cols.vram_mb, cols.stakes,
                                  cols.free_slots, [0], cols.reliability_ppm, cols.operators))
    with pytest.raises(GridMintValueError, match="must be ints"):
        MatchingBook(OfferColumns(cols.providers, cols.regions, [1.0], cols.vram_mb, cols.stakes,  # type: ignore[list-item]
                                  cols.free_slots, cols.throughput, cols.reliability_ppm, cols.operators))


# ---------------------------------------------------------------- properties on random books

PROVIDERS = [f"0x{i:02x}" for i in range(16)]
OPERATORS = ["", "", "", "farmA", "farmB"]
REGION_NAMES = sorted(REGIONS) + ["mars"]

offer_st = st.builds(
    Offer,
    provider=st.sampled_from(PROVIDERS),
    region=st.sampled_from(REGION_NAMES),
    price=st.integers(0, 60).map(lambda k: k * 25),  # coarse: ties in effective price happen
    vram_mb=st.sampled_from([8_000, 16_000, 24_000, 80_000]),
    stake=st.integers(0, 10).map(lambda k: k * 100),
    free_slots=st.integers(-1, 3),
    throughput=st.sampled_from([REFERENCE_THROUGHPUT // 2, REFERENCE_THROUGHPUT, 2 * REFERENCE_THROUGHPUT, 3_000_000]),
    reliability_ppm=st.sampled_from([PPM, PPM // 2, 800_000, 1]),
    operator=st.sampled_from(OPERATORS),
)
demand_st = st.builds(
    Demand,
    unit_id=st.uuids().map(str),
    vram_mb=st.sampled_from([0, 8_000, 12_000, 24_000, 80_000, 90_000]),
    min_stake=st.integers(0, 11).map(lambda k: k * 100),
    max_price=st.integers(0, 60).map(lambda k: k * 25),
    excluded=st.frozensets(st.sampled_from(PROVIDERS), max_size=3),
    regions=st.none() | st.frozensets(st.sampled_from(REGION_NAMES + ["venus"]), max_size=4),
    replicas=st.integers(1, 3),
    excluded_operators=st.frozensets(st.sampled_from(PROVIDERS + ["farmA", "farmB"]), max_size=2),
)
books = st.lists(offer_st, max_size=16, unique_by=lambda o: o.provider)


def _allowed(o: Offer, d: Demand) -> bool:
    """Eligibility written out from the rules, not from ``eligible``."""
    return (o.vram_mb >= d.vram_mb and o.stake >= d.min_stake and o.price <= d.max_price
            and o.provider not in d.excluded and (d.regions is None or o.region in d.regions)
            and (o.operator or o.provider) not in d.excluded_operators)


@settings(max_examples=400, deadline=None)
@given(books, st.lists(demand_st, max_size=20))
def test_matching_invariants(offers: list[Offer], demands: list[Demand]) -> None:
    got = match(offers, demands)
    by_provider = {o.provider: o for o in offers}
    by_unit = {d.unit_id: d for d in demands}
    per_unit: dict[str, list[Assignment]] = {}
    for a in got:
        per_unit.setdefault(a.unit_id, []).append(a)
    for unit, assigned in per_unit.items():
        d = by_unit[unit]
        # never without VRAM / stake / under the cap / in the allow-list / excluded / a held operator
        assert all(_allowed(by_provider[a.provider], d) and eligible(by_provider[a.provider], d) for a in assigned)
        # never two replicas of a unit on one operator, never more than asked
        ops = [by_provider[a.provider].operated_by for a in assigned]
        assert len(set(ops)) == len(ops) and [a.replica for a in assigned] == list(range(len(assigned)))
        assert len(assigned) <= d.replicas
        # what is reported is the offer's
        assert all((a.price, a.region) == (by_provider[a.provider].price, by_provider[a.provider].region)
                   for a in assigned)
    # never over a provider's free slots
    load = Counter(a.provider for a in got)
    assert all(load[o.provider] <= max(0, o.free_slots) for o in offers)
    # a cheaper eligible provider is never skipped for a pricier one: replay the assignments in order
    free = {o.provider: max(0, o.free_slots) for o in offers}
    rank = {o.provider: r + 1 for r, o in enumerate(sorted(offers, key=sort_key))}
    at = 0
    for d in demands:
        held = set(d.excluded_operators)
        for replica in range(d.replicas):
            now = got[at] if at < len(got) and got[at].unit_id == d.unit_id else None
            open_ = [o for o in offers if free[o.provider] > 0 and _allowed(o, d) and o.operated_by not in held]
            if now is None:
                assert not open_, f"{d.unit_id} replica {replica} left unmatched with {open_[0]} free"
                break
            assert sort_key(by_provider[now.provider]) == min(map(sort_key, open_))
            assert now.rank == rank[now.provider]
            free[now.provider] -= 1
            held.add(by_provider[now.provider].operated_by)
            at += 1
    assert at == len(got)
    # the same as the naive matcher, and independent of the order the offers come in
    assert got == match_naive(offers, demands)
    assert got == match(list(reversed(offers)), demands)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(books, st.lists(st.tuples(st.sampled_from(["assign", "assign", "release", "offline", "online"]),
                                 st.integers(0, 15), demand_st), max_size=40))
def test_book_stays_equal_to_naive_under_churn(offers: list[Offer], ops: list[tuple[str, int, Demand]]) -> None:
    """Capacity going and coming back (lazy removal from the trees, cursors and failure caches) never changes
    an answer: after every step the fast book answers as the naive one does."""
    fast, naive = MatchingBook(offers), NaiveBook(offers)
    held: list[int] = []  # offers holding a unit we can release
    for op, k, d in ops:
        if op == "assign":
            got = fast.assign(d)
            assert got == naive.assign(d)
            held += [next(i for i, o in enumerate(offers) if o.provider == a.provider) for a in got]
        elif op == "release" and held:
            i = held.pop(k % len(held))
            fast.release(i)
            naive.release(i)
        elif op in ("offline", "online") and offers:
            fast.set_online(k % len(offers), op == "online")
            naive.set_online(k % len(offers), op == "online")
    # and a final sweep over every kind of unit
    for d in [Demand(f"end{v}", v, 0, 10**6) for v in (0, 16_000, 80_000)]:
        assert fast.assign(d) == naive.assign(d)


def test_equal_to_naive_on_synthetic_books_with_churn() -> None:
    """Realistic books (money in base units, farms, allow-lists, replicas), bigger than Hypothesis draws,
    with providers leaving and units finishing between assignments."""
    for seed in range(3):
        rng = np.random.default_rng(seed)
        offers = synthetic_offers(1500, rng)
        fast, naive = MatchingBook(offers), NaiveBook(offers)
        pick = random.Random(seed)
        position = {o.provider: i for i, o in enumerate(offers)}
        running: list[int] = []
        for d in synthetic_demands(1200, rng):
            got = fast.assign(d)
            assert got == naive.assign(d)
            running += [position[a.provider] for a in got]
            if pick.random() < 0.3 and running:
                i = running.pop(pick.randrange(len(running)))
                fast.release(i)
                naive.release(i)
            if pick.random() < 0.2:
                i, on = pick.randrange(len(offers)), pick.random() < 0.5
                fast.set_online(i, on)
                naive.set_online(i, on)


def test_batch_updates_equal_single_updates() -> None:
    offers = synthetic_offers(300, np.random.default_rng(7))
    one, many = MatchingBook(offers), MatchingBook(offers)
    units = synthetic_demands(400, np.random.default_rng(8))
    for d in units[:200]:
        assert one.assign(d) == many.assign(d)
    idx = list(range(0, 300, 3))
    for i in idx:
        one.set_online(i, False)
    many.set_online_many(idx, False)
    for i in idx[::2]:
        one.release(i)
        one.set_online(i, True)
    many.release_many(idx[::2])
    many.set_online_many(idx[::2], True)
    for d in units[200:]:
        assert one.assign(d) == many.assign(d)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10**30), st.integers(1, 2**40 - 1), st.integers(1, PPM)), min_size=2,
                max_size=30))
def test_rank_order_is_exact_effective_price_order(offers: list[tuple[int, int, int]]) -> None:
    """Ranks follow the effective price as an exact fraction (the float pre-sort is only a hint)."""
    book = [Offer(f"0x{i:03x}", "eu-north", a, 1, 0, 1, t, r) for i, (a, t, r) in enumerate(offers)]
    got = match(book, [Demand(f"u{i}", 0, 0, 10**31) for i in range(len(book))])
    fractions = [Fraction(a.price * REFERENCE_THROUGHPUT * PPM, next((o.throughput * o.reliability_ppm)
                                                                       for o in book if o.provider == a.provider))
                 for a in got]
    assert fractions == sorted(fractions)
    assert [effective_price(a.price, *next((o.throughput, o.reliability_ppm) for o in book if o.provider == a.provider))
            for a in got] == sorted(effective_price(o.price, o.throughput, o.reliability_ppm) for o in book)


def test_a_last_resort_assignment_is_ranked_among_every_offer() -> None:
    """rank: 1 = the cheapest offer overall, for a last-resort assignment too (a review found it ranked among the
    offers left after the first pass)."""
    offers = [Offer("0xa", "eu-north", 1, 16_000, 100, 1), Offer("0xb", "eu-north", 2, 16_000, 100, 1),
              Offer("0xc", "eu-north", 3, 16_000, 100, 1)]
    demands = [Demand("u1", 0, 0, 10), Demand("u2", 0, 0, 10, excluded=frozenset({"0xc"})),
               Demand("u3", 0, 0, 10, excluded=frozenset({"0xc"}))]
    got = match_last_resort(offers, demands, {"u3": frozenset({"0xc"})})
    last = next(a for a in got if a.unit_id == "u3")
    assert last.provider == "0xc"
    assert last.rank == 3, f"0xc is the 3rd cheapest overall, reported rank {last.rank}"
