"""Wire schemas refuse what they cannot carry: execution plans, reveals, integers over their columns."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

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
