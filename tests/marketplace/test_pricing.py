"""Pricing: exact integer effective price, the versioned regional cost table, reliability, stake that scales
with the value at risk, and quotes from the matcher itself."""
from __future__ import annotations

from dataclasses import FrozenInstanceError
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from marketplace import pricing
from marketplace.matching import Demand, Offer, match
from marketplace.pricing import (DEFAULT_TABLE, MAX_THROUGHPUT, PPM, REFERENCE_THROUGHPUT, REGIONS, TABLE_VERSION,
                                 CostTable, RegionCost, Reliability, check_ask, check_performance, effective_price,
                                 observe_throughput, quote, rank_key, region_cost, reliability_ppm, required_stake)
from protocol.errors import GridMintValueError
from protocol.money import tokens

asks = st.integers(0, 10**30)
speeds = st.integers(1, MAX_THROUGHPUT)
reliabilities = st.integers(1, PPM)


def exact(ask: int, throughput: int, rel: int) -> Fraction:
    return Fraction(ask * REFERENCE_THROUGHPUT * PPM, throughput * rel)


def test_effective_price_is_an_exact_int() -> None:
    assert effective_price(tokens(1)) == tokens(1)  # reference node, perfect record: the ask
    assert effective_price(tokens(1), 2 * REFERENCE_THROUGHPUT) == tokens("0.5")
    assert effective_price(tokens(1), REFERENCE_THROUGHPUT, PPM // 4) == tokens(4)
    assert effective_price(1000, 3 * REFERENCE_THROUGHPUT) == 333  # rounded down, never a float
    assert type(effective_price(10**40, 7, 3)) is int and effective_price(10**40, 7, 3) == exact(10**40, 7, 3) // 1


@settings(max_examples=500)
@given(asks, speeds, reliabilities, asks, speeds, reliabilities)
def test_rank_key_orders_exactly_as_the_effective_price(a1: int, t1: int, r1: int, a2: int, t2: int, r2: int) -> None:
    k1, k2 = rank_key(a1, t1, r1), rank_key(a2, t2, r2)
    f1, f2 = exact(a1, t1, r1), exact(a2, t2, r2)
    assert type(k1) is int
    assert (k1 < k2) == (f1 < f2) and (k1 == k2) == (f1 == f2)
    assert effective_price(a1, t1, r1) == f1.numerator // f1.denominator


@given(asks, speeds, reliabilities)
def test_faster_and_more_reliable_is_never_dearer(ask: int, t: int, r: int) -> None:
    assert rank_key(ask, min(MAX_THROUGHPUT, t + 1), r) <= rank_key(ask, t, r)
    assert rank_key(ask, t, min(PPM, r + 1)) <= rank_key(ask, t, r)
    assert rank_key(ask, t, r) <= rank_key(ask + 1, t, r)


def test_performance_bounds() -> None:
    check_performance(MAX_THROUGHPUT, PPM)
    for t, r in ((0, PPM), (MAX_THROUGHPUT + 1, PPM), (1, 0), (1, PPM + 1), (1.5, PPM), (1, 0.5)):
        with pytest.raises(GridMintValueError):
            check_performance(t, r)  # type: ignore[arg-type]


# ---------------------------------------------------------------- the cost table

def test_default_table_and_exports() -> None:
    assert TABLE_VERSION == DEFAULT_TABLE.version == 1
    assert REGIONS is DEFAULT_TABLE.regions and "eu-north" in REGIONS
    assert region_cost("eu-north").floor_per_unit == DEFAULT_TABLE.floor("eu-north")
    floors = sorted(REGIONS.values(), key=lambda r: r.floor_per_unit)
    # dearer power, higher floor
    assert [r.energy_usd_per_mwh for r in floors] == sorted(r.energy_usd_per_mwh for r in floors)
    with pytest.raises(TypeError):
        REGIONS["eu-north"] = RegionCost("eu-north", 1, 1)  # type: ignore[index]
    with pytest.raises(FrozenInstanceError):
        DEFAULT_TABLE.version = 2  # type: ignore[misc]


def test_amend_makes_a_new_version_and_leaves_the_old_one() -> None:
    t2 = DEFAULT_TABLE.amend({"eu-north": RegionCost("eu-north", 60, tokens("0.6"), 2),
                              "sa-east": RegionCost("sa-east", 70, tokens("0.7"))}, frozenset({"ap-east"}))
    assert t2.version == 2 and DEFAULT_TABLE.version == 1
    assert t2.floor("eu-north") == tokens("0.6") and DEFAULT_TABLE.floor("eu-north") == tokens("0.5")
    assert "sa-east" in t2.regions and "ap-east" not in t2.regions and "ap-east" in DEFAULT_TABLE.regions
    assert t2.amend().version == 3
    with pytest.raises(GridMintValueError, match="unknown region"):
        t2.floor("ap-east")
    with pytest.raises(GridMintValueError, match="cannot remove"):
        t2.amend(removed=frozenset({"atlantis"}))
    with pytest.raises(GridMintValueError, match="bad cost table entry"):
        DEFAULT_TABLE.amend({"eu-north": RegionCost("us-east", 1, 1)})
    with pytest.raises(GridMintValueError, match="floor_per_unit"):
        RegionCost("x", 1, -1)
    with pytest.raises(GridMintValueError, match="version"):
        CostTable(0, {})
    assert hash(t2) == hash(CostTable(2, {}))  # usable as a key: hashed by version


def test_check_ask_against_the_floor_of_each_version() -> None:
    floor = DEFAULT_TABLE.floor("us-east")
    check_ask("us-east", floor)
    with pytest.raises(GridMintValueError, match="below the us-east floor"):
        check_ask("us-east", floor - 1)
    with pytest.raises(GridMintValueError, match="unknown region"):
        check_ask("atlantis", 10**30)
    cheaper = DEFAULT_TABLE.amend({"us-east": RegionCost("us-east", 80, floor - 1)})
    check_ask("us-east", floor - 1, cheaper)


def test_matching_ranks_by_the_table_given() -> None:
    offers = [Offer("0xa", "eu-north", 100, 1, 0), Offer("0xb", "us-east", 100, 1, 0)]
    units = [Demand("u", 0, 0, 100)]
    assert match(offers, units)[0].provider == "0xa"  # equal asks: the cheaper region's floor wins
    flipped = DEFAULT_TABLE.amend({"eu-north": RegionCost("eu-north", 45, tokens(5))})
    assert match(offers, units, flipped)[0].provider == "0xb"


# ---------------------------------------------------------------- reliability and throughput

def test_reliability() -> None:
    fresh = Reliability()
    assert fresh.ppm == PPM
    one_drop = fresh.after_dropout()
    assert one_drop.dropped == 1 and one_drop.ppm == 800_000  # 4 / (4 + 1) with the prior of 4
    assert one_drop.after_completion().ppm > one_drop.ppm
    assert Reliability(96, 0, 500_000).ppm == 500_000  # uptime scales it
    assert Reliability(0, 10**9).ppm == 1  # never 0: effective price stays finite
    assert reliability_ppm(10, 0, 2 * PPM) == PPM and reliability_ppm(10, 0, -5) == 1
    with pytest.raises(GridMintValueError):
        reliability_ppm(-1, 0)
    # a dropout raises the effective price
    ask = tokens(1)
    assert rank_key(ask, REFERENCE_THROUGHPUT, one_drop.ppm) > rank_key(ask, REFERENCE_THROUGHPUT, fresh.ppm)


@given(st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, PPM))
def test_reliability_is_bounded_and_monotone(done: int, dropped: int, uptime: int) -> None:
    r = reliability_ppm(done, dropped, uptime)
    assert 1 <= r <= PPM
    assert reliability_ppm(done, dropped + 1, uptime) <= r <= reliability_ppm(done + 1, dropped, uptime)


def test_observe_throughput() -> None:
    assert observe_throughput(1_000_000, 2_000_000) == 1_250_000
    assert observe_throughput(1_000_000, 2_000_000, 0) == 1_000_000
    assert observe_throughput(1_000_000, 2_000_000, PPM) == 2_000_000
    assert observe_throughput(5, 0, PPM) == 1
    assert observe_throughput(MAX_THROUGHPUT, 2 * MAX_THROUGHPUT, PPM) == MAX_THROUGHPUT
    with pytest.raises(GridMintValueError):
        observe_throughput(1, 1, PPM + 1)


# ---------------------------------------------------------------- stake

def test_required_stake_scales_with_the_value_at_risk() -> None:
    floor = tokens(200)
    assert required_stake(tokens(10), floor) == floor  # small jobs: the minimum
    assert required_stake(tokens(1000), floor) == tokens(1000)  # big ones: the whole value at risk
    assert required_stake(tokens(1000), floor, 2 * PPM) == tokens(2000)
    assert required_stake(3, 0, PPM // 2) == 2  # rounded up: never under-collateralised by rounding
    with pytest.raises(GridMintValueError):
        required_stake(-1, floor)


@given(st.integers(0, 10**30), st.integers(0, 10**30), st.integers(0, 10**30), st.integers(0, 4 * PPM))
def test_required_stake_is_monotone_and_covers_the_risk(v1: int, v2: int, floor: int, ratio: int) -> None:
    lo, hi = sorted((v1, v2))
    assert floor <= required_stake(lo, floor, ratio) <= required_stake(hi, floor, ratio)
    assert required_stake(hi, floor, ratio) * PPM >= hi * ratio


# ---------------------------------------------------------------- quotes

def test_quote_is_the_matcher_run_dry() -> None:
    offers = [Offer("0xa", "eu-north", tokens(1), 24_000, tokens(500), 2),
              Offer("0xb", "us-east", tokens("0.9"), 24_000, tokens(500), 1, REFERENCE_THROUGHPUT // 2),
              Offer("0xc", "eu-west", tokens(3), 8_000, tokens(500), 4)]
    q = quote(offers, 5, 16_000, tokens(100), tokens(2))
    got = match(offers, [Demand(f"q{i}", 16_000, tokens(100), tokens(2)) for i in range(5)])
    assert (q.table_version, q.units, q.filled) == (1, 5, len(got)) == (1, 5, 3)
    assert q.total == sum(a.price for a in got) == tokens("2.9")
    assert q.max_unit_price == tokens(1)
    assert q.effective_total == tokens(1) * 2 + tokens("1.8")  # the slow node counts double
    assert quote(offers, 0, 1, 0, 0) == pricing.Quote(1, 0, 0, 0, 0, 0)
    assert quote(offers, 2, 1, 0, tokens(5), frozenset({"eu-west"})).filled == 2
    amended = DEFAULT_TABLE.amend()
    assert quote(offers, 1, 1, 0, tokens(5), table=amended).table_version == 2
    with pytest.raises(GridMintValueError):
        quote(offers, -1, 1, 0, 0)


def test_a_missed_deadline_only_ever_lowers_a_providers_delivered_throughput() -> None:
    """A unit not in ``seconds`` after its assignment (at ``now`` - ``seconds``) bounds its provider's speed from above:
    the bound sets a first record, is blended into a faster one, and never raises a slower one
    (service._observe_late; with no busy stretch recorded, timed from the assignment)."""
    from marketplace.db import Provider
    from marketplace.service import _observe_late
    from protocol.schemas import JobSpec

    spec = JobSpec(rounds=1, units_per_round=1, steps_per_unit=20, segment_len=5, batch_size=8, max_price=tokens(2))
    unit_tokens = 20 * 8 * spec.model.ctx
    new = Provider(observed_tps=None)
    assert _observe_late(new, spec, 1_000, 900) == unit_tokens // 100 == new.observed_tps
    fast = Provider(observed_tps=10 * unit_tokens)
    _observe_late(fast, spec, 1_000, 900)
    assert fast.observed_tps == observe_throughput(10 * unit_tokens, unit_tokens // 100)
    slow = Provider(observed_tps=7)
    assert _observe_late(slow, spec, 1_000, 900) > 7 and slow.observed_tps == 7
    idle = Provider(observed_tps=None)
    assert _observe_late(idle, spec, 10**12, 0) == 1 == idle.observed_tps  # floored at 1 token/s
