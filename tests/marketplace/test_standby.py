"""The standby pool as pure functions: spares picked like the matcher picks, a dropout's unit handed to the
first eligible spare from its last verified checkpoint, and the dropout's reliability going down."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from marketplace.matching import Demand, Offer, eligible, sort_key
from marketplace.pricing import PPM, REFERENCE_THROUGHPUT, Reliability, rank_key
from marketplace.standby import Checkpoint, dropouts, last_verified, pick_standbys, reassign_on_dropout
from protocol.errors import GridMintValueError

UNIT = Demand("unit-7", 16_000, 100, 1_000)
BOOK = [
    Offer("0xworker", "eu-north", 100, 24_000, 500, 1),
    Offer("0xs1", "eu-north", 150, 24_000, 500, 1, operator="farm"),
    Offer("0xs2", "eu-north", 160, 24_000, 500, 1, operator="farm"),  # same operator as 0xs1
    Offer("0xs3", "us-east", 200, 24_000, 500, 2),
    Offer("0xsmall", "eu-north", 50, 8_000, 500, 1),  # too little VRAM
    Offer("0xbusy", "eu-north", 60, 24_000, 500, 0),  # no free slot
    Offer("0xs4", "ap-east", 900, 24_000, 500, 1),
]
CHECKPOINTS = [Checkpoint(0, "00" * 32, True), Checkpoint(100, "aa" * 32, True), Checkpoint(200, "bb" * 32, True),
               Checkpoint(300, "cc" * 32, False)]


def test_standbys_are_the_cheapest_eligible_spares_one_per_operator() -> None:
    spares = pick_standbys(BOOK, UNIT, 3, assigned={"0xworker"})
    assert [o.provider for o in spares] == ["0xs1", "0xs3", "0xs4"]
    assert pick_standbys(BOOK, UNIT, 0, assigned=()) == []
    assert [o.provider for o in pick_standbys(BOOK, UNIT, 10, assigned=())] == ["0xworker", "0xs1", "0xs3", "0xs4"]
    with pytest.raises(GridMintValueError):
        pick_standbys(BOOK, UNIT, -1, assigned=())


def test_dropout_goes_to_the_first_standby_from_the_last_verified_checkpoint() -> None:
    spares = pick_standbys(BOOK, UNIT, 3, assigned={"0xworker"})
    record = Reliability(completed=20, dropped=1)
    r = reassign_on_dropout(UNIT, "0xworker", record, spares, checkpoints=CHECKPOINTS)
    assert r.replacement is not None and r.replacement.provider == "0xs1"
    assert r.resume_from == Checkpoint(200, "bb" * 32, True)  # not step 300: never verified, it is redone
    assert [o.provider for o in r.standbys] == ["0xs3", "0xs4"]
    assert "0xworker" in r.unit.excluded and r.unit.unit_id == UNIT.unit_id
    # the dropout's reliability drops, and with it its place in the price order
    assert r.dropped_reliability == Reliability(completed=20, dropped=2)
    assert r.dropped_reliability.ppm < record.ppm
    before, after = record.ppm, r.dropped_reliability.ppm
    assert rank_key(100, REFERENCE_THROUGHPUT, after) > rank_key(100, REFERENCE_THROUGHPUT, before)


def test_dropout_with_nothing_verified_restarts_the_unit() -> None:
    r = reassign_on_dropout(UNIT, "0xworker", Reliability(), BOOK[1:2], checkpoints=[Checkpoint(100, "aa" * 32)])
    assert r.resume_from is None and r.replacement is not None
    assert last_verified([]) is None


def test_standbys_that_no_longer_fit_are_passed_over() -> None:
    spares = pick_standbys(BOOK, UNIT, 3, assigned={"0xworker"})
    # the farm already runs another replica of this unit; 0xs3 is excluded from it (caught cheating there)
    unit = Demand(UNIT.unit_id, UNIT.vram_mb, UNIT.min_stake, UNIT.max_price, frozenset({"0xs3"}))
    r = reassign_on_dropout(unit, "0xworker", Reliability(), spares, busy_operators={"farm"})
    assert r.replacement is not None and r.replacement.provider == "0xs4"
    # a dropout that was itself a standby leaves the pool; nobody fits under a low cap
    cheap = Demand(UNIT.unit_id, UNIT.vram_mb, UNIT.min_stake, 120)
    r = reassign_on_dropout(cheap, "0xs1", Reliability(), spares)
    assert r.replacement is None and [o.provider for o in r.standbys] == ["0xs3", "0xs4"]


def test_missed_heartbeats() -> None:
    seen = {"0xa": 1_000, "0xb": 1_050, "0xc": 1_061}
    assert dropouts(seen, now_s=1_110, deadline_s=60) == ["0xa"]  # 110 s late; 0xb exactly at the deadline is not
    assert dropouts(seen, now_s=1_200, deadline_s=60) == ["0xa", "0xb", "0xc"]
    assert dropouts({}, now_s=0, deadline_s=0) == []
    with pytest.raises(GridMintValueError):
        dropouts(seen, 0, -1)


offer_st = st.builds(
    Offer,
    provider=st.sampled_from([f"0x{i:02x}" for i in range(10)]),
    region=st.sampled_from(["eu-north", "us-east", "eu-west"]),
    price=st.integers(1, 500),
    vram_mb=st.sampled_from([8_000, 24_000, 80_000]),
    stake=st.integers(0, 600),
    free_slots=st.integers(0, 2),
    reliability_ppm=st.integers(1, PPM),
    operator=st.sampled_from(["", "", "farm"]),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(offer_st, max_size=10, unique_by=lambda o: o.provider), st.integers(0, 5),
       st.sampled_from([f"0x{i:02x}" for i in range(10)]), st.integers(0, 600), st.integers(1, 500))
def test_replacement_is_the_cheapest_eligible_standby(offers: list[Offer], count: int, dropped: str, stake: int,
                                                      cap: int) -> None:
    unit = Demand("u", 16_000, stake, cap)
    spares = pick_standbys(offers, unit, count, assigned={dropped})
    assert len(spares) <= count and len({o.operated_by for o in spares}) == len(spares)
    assert all(eligible(o, unit) and o.free_slots > 0 and o.provider != dropped for o in spares)
    assert [sort_key(o) for o in spares] == sorted(sort_key(o) for o in spares)
    r = reassign_on_dropout(unit, dropped, Reliability(3, 1), spares, checkpoints=CHECKPOINTS)
    fits = [o for o in spares if eligible(o, r.unit)]
    assert r.replacement == (fits[0] if fits else None)
    assert r.dropped_reliability.ppm < Reliability(3, 1).ppm
    assert r.replacement is None or r.replacement.provider != dropped
