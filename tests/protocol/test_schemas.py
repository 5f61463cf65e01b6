"""Wire schemas refuse what they cannot carry: execution plans and reveals."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from protocol.schemas import RevealSubmit, VerifierRegister

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
