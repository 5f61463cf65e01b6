"""Wire schemas refuse what they cannot carry: execution plans, reveals, integers over their columns, money
that is not ASCII digits or is over a uint256."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from protocol.errors import GridMintValueError
from protocol.money import MAX_AMOUNT, base_units, tokens

from protocol.schemas import (INT32_MAX, INT64_MAX, JobSpec, ProviderRegister, RevealSubmit, VerdictSubmit,
                              VerificationBeat, VerifierRegister)

GOOD = {"verification_id": 1, "step": 4, "state_hash": "0x" + "ab" * 32, "blob": "cd" * 32, "signature": "0x" + "11" * 65}


@pytest.mark.parametrize("plan", ["cpu", "cuda", "cpu/mb2", "cuda/mb16", "cpu/mb64"])
def test_plans_that_parse(plan: str) -> None:
    from node.crosscheck import Plan

    assert VerifierRegister(plan=plan).plan == plan == Plan.parse(plan).label


@pytest.mark.parametrize("plan", ["tpu", "cpu/mb0", "cpu/mb", "cpu/mb65", "cpu/mb128", "CPU", "cuda/mb2/x", ""])
def test_plans_that_do_not(plan: str) -> None:
    with pytest.raises(ValidationError):
        VerifierRegister(plan=plan)


@pytest.mark.parametrize("bad", [{"step": -1}, {"state_hash": "0x12"}, {"blob": "0x" + "cd" * 32},
                                 {"signature": "0x" + "11" * 64}, {"extra": 1}])
def test_malformed_reveals_are_refused(bad: dict) -> None:
    RevealSubmit(**GOOD)
    with pytest.raises(ValidationError):
        RevealSubmit(**{**GOOD, **bad})


REG = {"region": "eu-north", "gpu": "x", "vram_mb": 8000, "price": "1", "tokens_per_s": 1000}
VERDICT = {"verification_id": 1, "ok": True, "replayed_hash": "0x" + "ab" * 32, "signature": "0x" + "11" * 65}
# (model, valid body, field, the largest value its column holds): PostgreSQL INTEGER / BIGINT, SQLite 64-bit
BOUNDED = [
    (ProviderRegister, REG, "tokens_per_s", INT64_MAX),  # providers.tokens_per_s BIGINT
    (ProviderRegister, REG, "vram_mb", 10_000_000),  # providers.vram_mb INTEGER
    (VerificationBeat, {"verification_id": 1}, "verification_id", INT32_MAX),  # verifications.id INTEGER
    (VerdictSubmit, VERDICT, "verification_id", INT32_MAX),
    (RevealSubmit, GOOD, "verification_id", INT32_MAX),
    (RevealSubmit, GOOD, "step", 100_000),
    (JobSpec, {"max_price": "1"}, "vram_mb", 10_000_000),  # matched against providers.vram_mb
    (JobSpec, {"max_price": "1", "steps_per_unit": 100_000}, "segment_len", 100_000),
]


@pytest.mark.parametrize(("model", "body", "field", "top"), BOUNDED,
                         ids=[f"{m.__name__}.{f}" for m, _, f, _ in BOUNDED])
def test_integers_stop_at_what_their_column_holds(model: type, body: dict, field: str, top: int) -> None:
    """2**80 in tokens_per_s, or 2**31 in a verification id, reached the database and overflowed it (a 500)."""
    assert getattr(model(**{**body, field: top}), field) == top
    for too_big in (top + 1, 2**63, 2**80):
        with pytest.raises(ValidationError, match="less than or equal to"):
            model(**{**body, field: too_big})
    if field == "verification_id":
        with pytest.raises(ValidationError, match="greater than or equal to 1"):
            model(**{**body, field: 0})


@pytest.mark.parametrize("value", [7, "7", "007", str(MAX_AMOUNT), MAX_AMOUNT, "0" * 5000 + "1"],
                         ids=lambda v: repr(v)[:24])
def test_money_that_parses(value: object) -> None:
    assert base_units(value) == int(str(value).lstrip("0"))


@pytest.mark.parametrize("value", ["\u0661\u0662\u0663", "\u00b2", "\uff11\uff12", " 1", "1_000", "-1", "",
                                   MAX_AMOUNT + 1, str(MAX_AMOUNT + 1), 2**300, "1" * 5000, 1.0, True, None],
                         ids=lambda v: repr(v)[:24])
def test_money_that_does_not(value: object) -> None:
    """str.isdigit() took Arabic-Indic digits and superscripts; nothing stopped an amount over a uint256 (stored as 91
    digits, or over the Money column's 80 on PostgreSQL: a 500)."""
    with pytest.raises(GridMintValueError):
        base_units(value)
    with pytest.raises(ValidationError):
        ProviderRegister(**{**REG, "price": value})


def test_token_amounts_stop_at_a_uint256() -> None:
    assert tokens(10**59) == 10**77 <= MAX_AMOUNT
    for over in (2 * 10**59, "1e80", "Infinity"):
        with pytest.raises(GridMintValueError, match="uint256 cap"):
            tokens(over)


def test_a_job_budget_stops_at_a_uint256() -> None:
    """The budget (rounds x units x max_price) was quoted above 2**256, an escrow no chain can hold."""
    fits = JobSpec(rounds=2, units_per_round=3, max_price=MAX_AMOUNT // 6, verification="none")  # no verifier fees
    assert fits.budget() <= MAX_AMOUNT
    with pytest.raises(ValidationError, match="budget 2 rounds x 3 units .* is over the uint256 cap"):
        JobSpec(rounds=2, units_per_round=3, max_price=MAX_AMOUNT // 6 + 1, verification="none")
    with pytest.raises(ValidationError, match="over the uint256 cap"):  # the fees count too
        JobSpec(rounds=2, units_per_round=3, max_price=MAX_AMOUNT // 6)


def test_token_amounts_are_exact_past_28_significant_digits() -> None:
    """Decimal's default context keeps 28 digits: tokens('12345678901.123456789012345678') came out as ...680, and
    '99999999999.999999999999999999' as 10**29, rounded without a word."""
    assert tokens("12345678901.123456789012345678") == 12345678901_123456789012345678
    assert tokens("99999999999.999999999999999999") == 10**29 - 1
    assert tokens(12345678901234567890123) == 12345678901234567890123 * 10**18
    whole, frac = divmod(MAX_AMOUNT, 10**18)
    assert tokens(f"{whole}.{frac:018d}") == MAX_AMOUNT


def test_format_tokens_is_exact_truncated_toward_zero_and_signed() -> None:
    from protocol.money import format_tokens

    assert format_tokens(tokens("1.23456")) == "1.2345 GMT" and format_tokens(tokens(1234567)) == "1,234,567.0000 GMT"
    assert format_tokens(0) == "0.0000 GMT" and format_tokens(1) == "0.0000 GMT"  # one base unit: below 4 places
    assert format_tokens(-tokens("1.5")) == "-1.5000 GMT" and format_tokens(-1) == "-0.0000 GMT"  # was -1.9999 GMT
    assert format_tokens(tokens(2), places=0) == "2 GMT" and format_tokens(-tokens(2), places=0) == "-2 GMT"
