"""Verification policy: budgets, challenge choice, exact catch probabilities, quotes, trust, canaries."""
from __future__ import annotations

from fractions import Fraction
import math
from math import comb

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import verification as vp
from protocol.errors import GridMintValueError
from protocol.money import tokens


def test_levels_and_trust() -> None:
    assert vp.level_rate("none") == 0 and vp.level_rate("full") == 1
    assert vp.level_rate("standard") == Fraction(16, 1000)
    assert vp.level_rate("standard", vp.TRUST_AFTER_UNITS) == Fraction(8, 1000)
    assert vp.level_rate("full", 10_000) == 1  # full replication is never discounted
    with pytest.raises(GridMintValueError, match="unknown verification level"):
        vp.level_rate("lax")


def test_trusted_hosts_are_sampled_less_only_where_a_cheat_still_loses_its_stake() -> None:
    """The discount never takes a 1% cheat's odds of being caught within its stake below 0.995 (the target is 0.99;
    the bench measured 0.990 at the 0.99 line, 34x): a trusted host on a long unit (2,048 one-step segments) at the
    standard rate gets it with 39x the unit price staked, not with 20x (the halved rate would catch a 1% cheat
    within 21 units with p = 0.94)."""
    trusted = vp.TRUST_AFTER_UNITS
    half, full = Fraction(8, 1000), Fraction(16, 1000)
    kw = {"n_segments": 2048, "unit_price": 10}
    assert vp.sampling_rate("standard", consecutive_verified=trusted, stake=400, **kw) == (half, True)
    assert vp.sampling_rate("standard", consecutive_verified=trusted, stake=200, **kw) == (full, False)
    assert vp.sampling_rate("standard", consecutive_verified=trusted - 1, stake=10**6, **kw) == (full, False)
    assert vp.TRUSTED_MIN_CATCH == Fraction(995, 1000)
    for stake in (200, 340, 380, 390, 400):  # it discounts exactly where the halved rate keeps 0.995
        _, discounted = vp.sampling_rate("standard", consecutive_verified=trusted, stake=stake, **kw)
        k = vp.challenge_budget(2048, half)  # 16: segment 0, 2 targeted, 13 uniform
        caught = vp.catch_within(2048, 21, k - 1 - k // 8, vp.stake_horizon(stake, 10))
        assert (caught >= vp.TRUSTED_MIN_CATCH) == discounted == (stake >= 390), (stake, float(caught))
    # short units: one pick either way, so the discount costs nothing
    assert vp.sampling_rate("standard", consecutive_verified=trusted, n_segments=4, unit_price=10,
                            stake=0) == (half, True)
    # paranoid on 40 segments: 4 picks or 2. A cheap unit (horizon 223) keeps 0.9965 at 2; a dear one would drop from
    # 0.83 to 0.44 (never below what the level itself gives)
    assert vp.sampling_rate("paranoid", consecutive_verified=trusted, n_segments=40, unit_price=9,
                            stake=2000) == (Fraction(1, 20), True)
    assert vp.sampling_rate("paranoid", consecutive_verified=trusted, n_segments=40, unit_price=90,
                            stake=2000) == (Fraction(1, 10), False)
    assert vp.sampling_rate("full", consecutive_verified=10**6, n_segments=40, unit_price=1, stake=10**9) == (1, False)
    # what the quote shows a buyer: the least stake that earns the discount, exactly where sampling_rate gives it
    for level, n, price in (("standard", 2048, 10), ("paranoid", 40, 9), ("standard", 700, 3)):
        least = vp.trusted_min_stake(level, n_segments=n, unit_price=price)
        assert least is not None and least > 0
        kw = {"consecutive_verified": trusted, "n_segments": n, "unit_price": price}
        assert vp.sampling_rate(level, stake=least, **kw)[1] and not vp.sampling_rate(level, stake=least - 1, **kw)[1]
    assert vp.trusted_min_stake("standard", n_segments=2048, unit_price=10) == 390
    assert vp.trusted_min_stake("standard", n_segments=4, unit_price=10) == 0  # one pick either way
    assert vp.trusted_min_stake("full", n_segments=4, unit_price=10) is None
    # a stake over a uint256 cannot exist: no discount is on offer at any stake (it was quoted above 2**256)
    top = (2**256 - 1) // 39  # the dearest unit whose 39 unit prices still fit
    assert vp.trusted_min_stake("standard", n_segments=2048, unit_price=top) == 39 * top
    assert vp.trusted_min_stake("standard", n_segments=2048, unit_price=top + 1) is None


def test_budget() -> None:
    assert vp.challenge_budget(2048, vp.LEVELS["standard"]) == 32
    assert vp.challenge_budget(10, vp.LEVELS["standard"]) == 1  # at least one
    assert vp.challenge_budget(10, Fraction(0)) == 0
    assert vp.challenge_budget(10, Fraction(1)) == 10


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 400), seed=st.integers(0, 2**64), level=st.sampled_from(["standard", "paranoid", "full"]),
       losses=st.data())
def test_challenges_are_within_budget_distinct_sorted_and_include_segment_zero(n: int, seed: int, level: str,
                                                                               losses: st.DataObject) -> None:
    loss = losses.draw(st.lists(st.integers(0, 10**7), min_size=n, max_size=n))
    rate = vp.level_rate(level)
    picks = vp.choose_challenges("0x" + "ab" * 32, loss, rate, seed)
    assert picks == sorted(set(picks)) and len(picks) == vp.challenge_budget(n, rate)
    assert all(0 <= i < n for i in picks)
    assert 0 in picks or len(picks) == 1  # a budget of one is drawn uniformly
    assert picks == vp.choose_challenges("0x" + "ab" * 32, loss, rate, seed)  # deterministic given the seed


def test_a_budget_of_one_looks_at_every_segment_and_the_quote_counts_it() -> None:
    """A short unit (the default job: four segments) gets one replay at "standard": drawn uniformly, so a forger of
    any one segment is caught a quarter of the time per unit, and well before its stake is earned back (fixed on
    segment 0, it never was: the quote said 0)."""
    loss = [3_000_000] * 4
    seen = [vp.choose_challenges("0x" + "01" * 32, loss, vp.LEVELS["standard"], seed) for seed in range(400)]
    assert all(len(p) == 1 for p in seen)
    counts = [sum(p == [i] for p in seen) for i in range(4)]
    assert all(60 < c < 140 for c in counts), counts  # 100 each expected; +-4 sigma
    q = vp.quote("standard", n_segments=4, unit_price=tokens("1.5"), stake=tokens(200))
    assert q.replayed_segments == 1 and q.catch_probability_1pct == Fraction(1, 4)
    assert q.catch_within_stake_1pct > Fraction(999, 1000)
    assert vp.choose_challenges("0x" + "01" * 32, loss * 32, vp.LEVELS["standard"], 3)[0] == 0  # 2 picks: 0 first


def test_uniform_part_depends_on_the_seed_and_targets_the_odd_loss() -> None:
    loss = [3_000_000] * 2048
    loss[1500] = 2_000_000  # a faked, too-pretty loss
    a = vp.choose_challenges("0x" + "01" * 32, loss, vp.LEVELS["standard"], 1)
    b = vp.choose_challenges("0x" + "01" * 32, loss, vp.LEVELS["standard"], 2)
    assert 1500 in a and 1500 in b and a != b


def test_update_outliers_are_the_segments_that_moved_far_more_or_far_less_than_their_neighbours() -> None:
    honest = [3.1, 2.1, 1.7, 1.6, 1.3, 1.3, 1.1, 1.0]  # a real honest unit's updates (first segment largest)
    assert vp.update_outliers(honest) == []
    idle = honest[:4] + [0.0] + honest[5:]
    assert vp.update_outliers(idle) == [4]
    jumps = [1.0] * 20
    jumps[7], jumps[12], jumps[15] = 50.0, 9.0, 1 / 20  # a jump to copied weights; two past the factor of 8
    assert vp.update_outliers(jumps) == [7, 15, 12]
    assert vp.update_outliers([1.0, 7.9]) == [] and vp.update_outliers([1.0, 8.1]) == [0, 1]  # both ways, of 2
    assert vp.update_outliers([0.0, 0.0, 0.0]) == [] and vp.update_outliers([2.0]) == []
    # weights that overflowed (a diverging job replays the same): replayed, never a reason to refuse the unit
    assert vp.update_outliers([1.0, 1.0, math.nan, 1.0, 1.0]) == [2] == vp.update_outliers([1, 1, math.inf, 1, 1])
    assert vp.update_outliers([math.inf] * 3) == []
    for bad in ([1.0, -1.0], [1.0, "2"], [True, 1.0]):
        with pytest.raises(GridMintValueError):
            vp.update_outliers(bad)  # type: ignore[arg-type]


def test_update_outliers_are_replayed_on_top_of_the_budget_and_honest_updates_add_nothing() -> None:
    loss = [3_000_000] * 64
    norms = [1.0 + 0.01 * (i % 7) for i in range(64)]
    rate = vp.LEVELS["standard"]
    plain = vp.choose_challenges("0x" + "02" * 32, loss, rate, 5)
    assert len(plain) == 1 and vp.choose_challenges("0x" + "02" * 32, loss, rate, 5, norms) == plain
    for i in (20, 30, 40):
        norms[i] = 0.0  # three idle segments: the two most extreme (ties by index) go on top of the budget
    assert vp.choose_challenges("0x" + "02" * 32, loss, rate, 5, norms) == sorted(set(plain) | {20, 30})
    assert vp.choose_challenges("0x" + "02" * 32, loss, vp.LEVELS["none"], 5, norms) == []  # the buyer chose none
    with pytest.raises(GridMintValueError):
        vp.choose_challenges("0x" + "02" * 32, loss, rate, 5, norms[:-1])


def test_miss_probability_is_the_hypergeometric_ratio() -> None:
    assert vp.miss_probability(10, 2, 3) == Fraction(comb(8, 3), comb(10, 3))
    assert vp.miss_probability(10, 8, 3) == 0
    assert vp.catch_within(2048, 21, 36, 21) > Fraction(999, 1000)
    assert vp.stake_horizon(20 * 7, 7) == 21


def test_quote_is_integer_money_and_says_what_it_buys() -> None:
    q = vp.quote("standard", n_segments=2048, unit_price=10**18, stake=20 * 10**18)
    assert isinstance(q.fee, int) and q.fee == -(-(10**18) * 32 // 2048)
    assert q.replayed_segments == 32 and q.catch_within_stake_1pct > Fraction(99, 100)
    assert vp.quote("none", n_segments=2048, unit_price=10**18, stake=1).fee == 0


def test_canaries_are_planted_at_about_the_rate_and_are_reproducible() -> None:
    plan = vp.plant_canaries(20_000, b"s")
    assert abs(sum(plan) / len(plan) - float(vp.CANARY_RATE)) < 0.25 * float(vp.CANARY_RATE)
    assert plan == vp.plant_canaries(20_000, b"s") != vp.plant_canaries(20_000, b"t")


def test_a_jobs_budget_holds_its_levels_verifier_fees_at_the_price_cap() -> None:
    """The escrow pays the verifiers too: per unit, the price cap and the fee of every replay the level can make at
    that price (its budget and the update outliers on top), which is what the quote's fee says plus the outliers."""
    from protocol.schemas import JobSpec

    price = tokens("1.5")
    base = dict(rounds=2, units_per_round=3, steps_per_unit=60, segment_len=15, max_price=price)  # 4 segments
    fee = vp.check_fee(price, 4)
    assert fee == tokens("0.375") and vp.check_fee(10, 4) == 3  # rounded up
    assert JobSpec(**base, verification="none").budget() == 6 * price
    assert vp.max_checks("standard", 4) == 3  # one replay + two outliers
    assert JobSpec(**base, verification="standard").budget() == 6 * (price + 3 * fee)
    assert vp.max_checks("full", 4) == 4 and JobSpec(**base, verification="full").budget() == 6 * 2 * price
    q = vp.quote("standard", n_segments=4, unit_price=price, stake=tokens(200))
    assert q.fee == fee * q.replayed_segments
    many = JobSpec(**{**base, "steps_per_unit": 2048, "segment_len": 1})  # the bench's shape: 32 + 2 replays
    assert vp.max_checks("standard", 2048) == 34
    assert many.budget() == 6 * (price + 34 * vp.check_fee(price, 2048))


@pytest.mark.timeout(60)
def test_a_stake_over_a_tiny_price_is_quoted_at_once() -> None:
    """A stake of 200 GMT over a price of 1 base unit is a horizon of 2 * 10**20 units: the exact Fraction power
    never returned (an unsigned quote held the API's GIL for good). Beyond EXACT_HORIZON it is computed in floating
    point, and agrees with the exact value where both can be had."""
    q = vp.quote("standard", n_segments=4, unit_price=1, stake=200 * 10**18)
    assert q.catch_within_stake_1pct == 1
    assert vp.catch_within(2048, 1, 1, 10**20) == 1 and vp.catch_within(2048, 1, 1, 0) == 0
    for units in (vp.EXACT_HORIZON + 1, 3000):
        exact = 1 - vp.miss_probability(2048, 1, 1) ** units
        assert abs(vp.catch_within(2048, 1, 1, units) - exact) < Fraction(1, 10**9)
    assert vp.trusted_min_stake("standard", n_segments=2048, unit_price=1) is not None


def _old_catch_1pct(n_segments: int, rate: Fraction, horizon: int) -> Fraction:
    """The quote's catch odds as computed before they were cached (protocol/verification.py at cd3c9e5)."""
    k = vp.challenge_budget(n_segments, rate)
    bad = max(1, math.ceil(n_segments / 100))
    uniform = k if k >= n_segments or k == 1 else max(0, k - 1 - math.floor(k * vp.TARGETED_SHARE))
    miss = vp.miss_probability(n_segments, bad, uniform)
    if horizon <= vp.EXACT_HORIZON or miss in (0, 1):
        return 1 - miss ** horizon
    return Fraction(-math.expm1(horizon * (math.log(miss.numerator) - math.log(miss.denominator))))


def _old_trusted_min_stake(level: str, n_segments: int, unit_price: int, max_units: int = 10_000) -> int | None:
    rate, trusted = vp.level_rate(level), vp.level_rate(level, vp.TRUST_AFTER_UNITS)
    if trusted == rate:
        return None
    if vp.challenge_budget(n_segments, trusted) == vp.challenge_budget(n_segments, rate):
        return 0
    for horizon in range(1, max_units + 2):
        if _old_catch_1pct(n_segments, trusted, horizon) >= min(vp.TRUSTED_MIN_CATCH,
                                                                _old_catch_1pct(n_segments, rate, horizon)):
            least = (horizon - 1) * unit_price
            return least if least <= vp.MAX_AMOUNT else None
    return None


@pytest.mark.parametrize("level", ["standard", "paranoid", "full", "none"])
def test_the_cached_trusted_stake_search_gives_what_the_plain_one_gave(level: str) -> None:
    """A quote's trusted_min_stake keeps its horizon search per (segments, rates), since the stake it finds is that
    many unit prices whatever the price: the same answers as the search run afresh each time, at every price, in
    the second asking (from the cache) as in the first."""
    prices = [1, tokens("0.5"), tokens("1.5"), 10**30, vp.MAX_AMOUNT // 40]
    for n in [1, 2, 3, 4, 15, 63, 64, 100, 190, 274, 298, 500, 1000, 2048, 2685]:
        for price in prices:
            want = _old_trusted_min_stake(level, n, price)
            assert vp.trusted_min_stake(level, n_segments=n, unit_price=price) == want, (n, price)
            assert vp.trusted_min_stake(level, n_segments=n, unit_price=price) == want, (n, price)
        assert vp.trusted_min_stake(level, n_segments=n, unit_price=7, max_units=30) == \
            _old_trusted_min_stake(level, n, 7, max_units=30)
        for horizon in (1, 21, 1024, 1025, 10**6):
            rate = vp.level_rate(level)
            if rate:
                assert vp._catch_1pct(n, rate, horizon) == _old_catch_1pct(n, rate, horizon)


def test_the_audit_rate_rises_with_a_verifiers_share_of_one_providers_checking_over_its_share_of_the_plans() -> None:
    """Base rate where a verifier's two shares agree (a fast verifier, the only one) on a plan of ``AUDIT_PEERS``
    providers or more, or it checks less of the provider than of the plan; for a ring doing all its friend's checks
    and nothing else, a rate that grows with the evidence and with the number of providers on the plan, toward 1
    (not over); split over wallets, the same. A plan of fewer providers counts as ``AUDIT_PEERS`` providers' work: a
    ring on a plan of its own naming, where its friend is the only provider, has every pass audited once its checks
    are a few (so has an honest lone provider: a thin market is audited more). 0 stays 0 (audits off)."""
    base = float(vp.AUDIT_RATE)
    assert vp.AUDIT_PEERS == 12
    assert vp.audit_rate(base, 21, 256, 256, 3072, 12, 12) == pytest.approx(base, abs=0.002)  # its share both ways
    assert vp.audit_rate(base, 200, 256, 2400, 3072, 12, 12) == pytest.approx(base, abs=0.002)  # a fast verifier
    assert vp.audit_rate(base, 256, 256, 3072, 3072, 1, 12) == base  # the only verifier
    assert vp.audit_rate(base, 0, 256, 300, 3072, 12, 12) == base
    assert vp.audit_rate(base, 32, 256, 384, 3072, 8, 12) == base  # AUDIT_PEERS providers: no more peers counted
    # fewer providers on the plan: the missing ones' checking counted, done by others
    assert vp.audit_rate(base, 90, 256, 90, 256, 4, 1) == 1.0  # an honest lone one: 12 x the base, capped
    assert vp.audit_rate(base, 45, 256, 90, 512, 4, 2) == pytest.approx(6 * base, abs=0.01)  # one of two
    assert vp.audit_rate(base, 26, 256, 256, 2560, 10, 10) == pytest.approx(1.2 * base, abs=0.003)  # one of ten
    alone = [vp.audit_rate(base, n, n, n, n, 1, 1) for n in (1, 8, 32, 64, 256)]  # a ring on a plan of its own
    assert alone == sorted(alone) and alone[0] < 0.5 and alone[1] > 0.95 and alone[2] == 1.0
    ring = [vp.audit_rate(base, n, n, n, 10 * n, 11, 10) for n in (1, 8, 32, 64, 256)]  # 1 of 10 providers' work
    assert ring == sorted(ring) and ring[0] < 0.15 and 0.7 < ring[2] < 0.8 and 0.9 < ring[3] < 1 and ring[-1] == 1.0
    assert vp.audit_rate(base, 64, 64, 64, 640, 11, 10) < vp.audit_rate(base, 64, 64, 64, 1280, 11, 20)  # 10 vs 20
    # the same ring over four wallets: each has a quarter of both shares, and nearly the same odds
    assert vp.audit_rate(base, 64, 256, 64, 2560, 14, 10) == pytest.approx(ring[-1], rel=0.15)
    assert vp.audit_rate(0.5, 256, 256, 256, 2560, 11, 10) == 1.0
    assert vp.audit_rate(0.0, 256, 256, 256, 2560, 11, 10) == 0
    for bad in ((base, 5, 4, 5, 9, 3, 1), (base, 1, 4, 9, 5, 3, 1), (base, -1, 4, 1, 4, 3, 1), (1.5, 1, 1, 1, 1, 1, 1),
                (base, 1, 1, 1, 1, True, 1), (base, 1, 1, 1, 1, 1, -1), (base, 1, 1, 1, 1, 1, 1.0)):
        with pytest.raises(GridMintValueError):
            vp.audit_rate(*bad)  # type: ignore[arg-type]
