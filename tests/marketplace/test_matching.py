from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from marketplace.matching import Demand, Offer, eligible, match
from marketplace.pricing import REGIONS


def test_cheapest_first_then_pricier_regions() -> None:
    offers = [
        Offer("0xC", "eu-west", 300, 8000, 100),
        Offer("0xA", "eu-north", 100, 8000, 100),
        Offer("0xB", "us-east", 200, 8000, 100),
    ]
    demands = [Demand(f"u{i}", 4000, 50, 1000) for i in range(3)]
    got = match(offers, demands)
    assert [(a.unit_id, a.provider, a.rank) for a in got] == [("u0", "0xA", 1), ("u1", "0xB", 2), ("u2", "0xC", 3)]


def test_skips_low_vram_low_stake_excluded_and_overpriced() -> None:
    offers = [
        Offer("0xLowVram", "eu-north", 10, 2000, 100),
        Offer("0xLowStake", "eu-north", 20, 8000, 1),
        Offer("0xCheat", "eu-north", 30, 8000, 100),
        Offer("0xGood", "us-east", 40, 8000, 100),
        Offer("0xPricey", "eu-west", 5000, 8000, 100),
    ]
    d = Demand("u", 4000, 50, 1000, frozenset({"0xCheat"}))
    assert [a.provider for a in match(offers, [d])] == ["0xGood"]
    assert match(offers[:3] + offers[4:], [d]) == []


def test_tie_breaks_are_deterministic() -> None:
    a = Offer("0xb", "us-east", 100, 8000, 100)
    b = Offer("0xa", "us-east", 100, 8000, 100)
    c = Offer("0x0", "eu-west", 100, 8000, 100)  # same ask, costlier region
    assert [x.provider for x in match([c, a, b], [Demand(f"u{i}", 1, 0, 10**9) for i in range(3)])] == ["0xa", "0xb", "0x0"]


offer_st = st.builds(
    Offer,
    provider=st.sampled_from([f"0x{i:02x}" for i in range(12)]),
    region=st.sampled_from(sorted(REGIONS)),
    price=st.integers(1, 1000),
    vram_mb=st.integers(1000, 80000),
    stake=st.integers(0, 1000),
    free_slots=st.integers(0, 3),
)
demand_st = st.builds(
    Demand,
    unit_id=st.uuids().map(str),
    vram_mb=st.integers(1000, 80000),
    min_stake=st.integers(0, 1000),
    max_price=st.integers(1, 1000),
    excluded=st.frozensets(st.sampled_from([f"0x{i:02x}" for i in range(12)]), max_size=3),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(offer_st, max_size=12, unique_by=lambda o: o.provider), st.lists(demand_st, max_size=15))
def test_matching_invariants(offers: list[Offer], demands: list[Demand]) -> None:
    got = match(offers, demands)
    by_provider = {o.provider: o for o in offers}
    by_unit = {d.unit_id: d for d in demands}
    # never assigns a provider that lacks VRAM / stake / is excluded / over the cap
    for a in got:
        assert eligible(by_provider[a.provider], by_unit[a.unit_id])
    # capacity respected, each unit at most once
    assert len({a.unit_id for a in got}) == len(got)
    for o in offers:
        assert sum(a.provider == o.provider for a in got) <= o.free_slots
    # a cheaper eligible provider with a slot left is never skipped for a pricier one
    used = {o.provider: 0 for o in offers}
    assigned = {a.unit_id: a for a in got}
    for d in demands:
        a = assigned.get(d.unit_id)
        for o in offers:
            free = used[o.provider] < o.free_slots
            if free and eligible(o, d):
                assert a is not None, "an eligible provider with a free slot was left idle"
                assert (o.price, REGIONS[o.region].floor_per_unit, o.provider) >= (
                    a.price, REGIONS[a.region].floor_per_unit, a.provider)
        if a is not None:
            used[a.provider] += 1
