"""What a provider uploads is checked before it is taken: through the real HTTP API (uvicorn, a Celery worker on
Redis, the in-process EVM), on SQLite and on PostgreSQL."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import select
from torch import Tensor

from marketplace.db import LedgerEntry, Unit, Verification
from node import checkpoint
from node.agent import ProviderAgent
from node.trainer import UnitResult, UnitSpec, state_hash
from protocol.money import tokens
from protocol.proof import make_proof
from protocol.schemas import JobSpec
from tests.marketplace.test_flow import _assigned, _refused, provider, submit_job

PRICE = tokens(2)

Tensors = dict[str, Tensor]


def tampered(index: int, change: Callable[[Tensors], Tensors]) -> Callable[[Callable[..., UnitResult]], Any]:
    """A trainer wrapper: train honestly, then rewrite checkpoint ``index`` (the start of that segment; the number of
    segments: the final state) with ``change`` and commit to it, so the hash chain, the proof and its signature are
    all consistent with what is uploaded: only the checkpoint's content is wrong."""
    def wrap(train: Callable[..., UnitResult]) -> Callable[..., UnitResult]:
        def run(spec: UnitSpec, start: Tensors, workdir: Path) -> UnitResult:
            res = train(spec, start, workdir)
            path = [*res.segment_paths, res.final_path][index]
            tensors, meta = checkpoint.load(path)
            tensors = change(tensors)
            checkpoint.save(path, tensors, meta)
            h, segs = state_hash(tensors), list(res.proof.segments)
            if index < len(segs):
                segs[index] = replace(segs[index], start_hash=h)
            if index > 0:
                segs[index - 1] = replace(segs[index - 1], end_hash=h)
            proof = make_proof(unit_id=spec.unit_id, spec_hash=spec.spec_hash(), seed=spec.seed, steps=spec.steps,
                               segment_len=spec.segment_len, segments=segs)
            return replace(res, proof=proof)
        return run
    return wrap


def half_precision_weights(t: Tensors) -> Tensors:
    """The model's weights saved in float16 (a GPU node's half-precision save; or a saboteur)."""
    return {k: v.to(torch.float16) if k.startswith("model.") else v for k, v in t.items()}


def one(value: float, prefix: str) -> Callable[[Tensors], Tensors]:
    """One element of the first tensor named ``prefix...`` set to ``value`` (NaN, inf: a diverged run)."""
    def change(t: Tensors) -> Tensors:
        name = min(k for k in t if k.startswith(prefix))
        t = dict(t)
        t[name] = t[name].clone()
        t[name].view(-1)[0] = value
        return t
    return change


@pytest.mark.parametrize("market", ["sqlite", "postgres"], indirect=True)
def test_a_checkpoint_in_another_dtype_or_with_a_nan_is_refused_and_the_unit_stays_the_providers(
        market, tmp_path: Path) -> None:
    """At level "none" a result that passes the structural checks is paid at once; at "standard" the last segment of a
    4-segment unit is replayed 1 time in 4. A float16 final state passed (hash, names and shapes were all that was
    checked), was paid, and then failed every average of its round: the job never ended. A NaN weight was averaged
    into the customer's model (on PostgreSQL its NaN loss could not even be stored, and the job never ended either).
    Now each is refused with a 422 naming the checkpoint and the tensor, before anything is written: the unit stays
    the provider's, nothing is credited or queued, and its sound result is then taken."""
    p: ProviderAgent = provider(market, tmp_path, "p", "us-east", "0.9")
    job_id = submit_job(market, JobSpec(rounds=1, units_per_round=1, steps_per_unit=10, segment_len=5, batch_size=8,
                                        max_price=PRICE, verification="none"))
    market.wait(lambda: _assigned(market, job_id) == 1, what="the unit matched")
    final = 2  # 10 steps in segments of 5: checkpoints 0 and 1 start the segments, 2 is the final state
    for trainer, says in ((tampered(final, half_precision_weights), "final checkpoint: tensor 'model."),
                          (tampered(1, one(float("nan"), "model.")), "checkpoint for segment 1: non-finite"),
                          (tampered(final, one(float("inf"), "optim.")), "final checkpoint: non-finite")):
        err = _refused(p, trainer)
        assert err.status == 422 and says in str(err.detail), err.detail
        with market.rt.sessions() as s:
            [unit] = s.scalars(select(Unit).where(Unit.job_id == job_id))
            assert unit.status == "assigned" and unit.provider == p.account.address and unit.proof is None
            assert not list(s.scalars(select(Verification).where(Verification.unit_id == unit.id)))
            assert not list(s.scalars(select(LedgerEntry).where(LedgerEntry.job_id == job_id)))
    assert "float16" in str(_refused(p, tampered(final, half_precision_weights)).detail)
    assert p.work_once()  # the same unit, trained again and submitted as it is: taken and (level none) credited
    with market.rt.sessions() as s:
        [unit] = s.scalars(select(Unit).where(Unit.job_id == job_id))
        assert unit.status == "verified"
