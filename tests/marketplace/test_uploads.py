"""What a provider uploads is checked before it is taken, and a round that cannot be averaged ends its job.

Refusals go through the real HTTP API (uvicorn, a Celery worker on Redis, the in-process EVM), on SQLite and on
PostgreSQL. The end of a job whose round cannot be averaged into a finite model runs the service's own steps
(create_job, advance, sweep, settle_job) against the real contracts on the in-process EVM and a real database, as
tests/marketplace/test_cancel.py does."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from eth_utils import keccak
from sqlalchemy import select
from torch import Tensor

from marketplace import service, settlement
from marketplace.common import model_config
from marketplace.db import Event, Job, LedgerEntry, Provider, Unit, Verification
from node import checkpoint
from node.agent import ProviderAgent
from node.model import init_state
from node.trainer import UnitResult, UnitSpec, state_hash
from protocol.jobs import RANDOM_BYTES, new_job_id
from protocol.money import tokens
from protocol.proof import make_proof
from protocol.schemas import JobSpec
from tests.marketplace.test_flow import _assigned, _refused, provider, submit_job
from tests.marketplace.test_settlement import World, make_world

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
    Now each is refused with a 422 naming the checkpoint and the tensor (the float16 one at its upload, the NaN and
    infinite ones at the submission), before anything is written: the unit stays the provider's, nothing is credited
    or queued, and its sound result is then taken."""
    p: ProviderAgent = provider(market, tmp_path, "p", "us-east", "0.9")
    job_id = submit_job(market, JobSpec(rounds=1, units_per_round=1, steps_per_unit=10, segment_len=5, batch_size=8,
                                        max_price=PRICE, verification="none"))
    market.wait(lambda: _assigned(market, job_id) == 1, what="the unit matched")
    final = 2  # 10 steps in segments of 5: checkpoints 0 and 1 start the segments, 2 is the final state
    # (a float16 state is refused at its upload already: no training state of the unit's model, naming its hash)
    for trainer, says in ((tampered(final, half_precision_weights), "is not a training state of the model"),
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


# ---------------------------------------------------------------- a round that cannot be averaged


@pytest.fixture()
def world(tmp_path: Path, db_url: str) -> World:
    return make_world(tmp_path, db_url)


def _diverged(spec: JobSpec) -> Tensors:
    """Finite weights whose held-out loss is not: the output head scaled to 1e38 (its logits overflow)."""
    state = init_state(model_config(spec), spec.seed)
    return {**state, "head.weight": state["head.weight"] * 1e38}


def _nan_weight(spec: JobSpec) -> Tensors:
    return one(float("nan"), "blocks.0.attn.proj.bias")(init_state(model_config(spec), spec.seed))


def _float16(spec: JobSpec) -> Tensors:
    return half_precision_weights({f"model.{k}": v for k, v in init_state(model_config(spec), spec.seed).items()})


@pytest.mark.parametrize("finals, says", [
    ((_diverged, _diverged), "held-out loss is inf"),                   # an honest job that diverged
    ((lambda spec: init_state(model_config(spec), spec.seed), _nan_weight), "non-finite values"),  # taken before uploads
    ((lambda spec: init_state(model_config(spec), spec.seed), _float16), "torch.float16"),         # were checked
], ids=["diverged", "nan-weight", "float16"])
def test_a_round_that_cannot_be_averaged_into_a_finite_model_fails_the_job_which_is_settled(
        world: World, finals: tuple[Callable[[JobSpec], Tensors], ...], says: str) -> None:
    """advance used to raise (dtype mismatch in average_states; on PostgreSQL a NaN eval loss cannot be stored as
    JSON) or to adopt a NaN model (SQLite). Only chain errors are retried, and the sweep re-queued the advance every
    minute: the job stayed running for ever and never settled. Now the job fails (``failing``, a ``job_failed``
    event saying why), keeps the last global model that averaged cleanly, and is settled like a finished job: its
    verified units paid into the pool, the rest refunded, the escrow closed; it ends ``failed`` and is never queued
    again."""
    w = world
    spec = JobSpec(rounds=2, units_per_round=2, steps_per_unit=10, segment_len=5, max_price=PRICE)
    job_id = new_job_id(w.customer.address, keccak(text=f"diverges-{says}")[:RANDOM_BYTES])
    w.customer.fund_job(job_id, spec.budget())
    service.create_job(w.rt, w.customer.address, job_id, spec)
    start = _job(w, job_id)
    with w.rt.sessions.begin() as s:  # round 0 verified and credited, as maybe_verified leaves it
        for shard, (who, final) in enumerate(zip(w.providers, finals)):
            s.add(Provider(address=who.address, region="eu-north", gpu="test", vram_mb=8000, price=PRICE,
                           tokens_per_s=1000, capacity=1, stake=tokens(100)))
            u = s.scalars(select(Unit).where(Unit.job_id == job_id, Unit.shard == shard)).one()
            u.status, u.provider, u.price, u.assigned_at = "verified", who.address, PRICE, int(time.time())
            u.final_blob = w.rt.blobs.put_tensors(final(spec), {"kind": "unit", "job": job_id})
            s.add(LedgerEntry(job_id=job_id, unit_id=u.id, provider=who.address, amount=PRICE))

    assert service.advance(w.rt, job_id) == "failing"
    job = _job(w, job_id)
    assert (job.status, job.round, job.global_blob, job.eval_losses) == ("failing", 0, start.global_blob,
                                                                        start.eval_losses)
    [failed] = _events(w, job_id, "job_failed")
    assert failed["round"] == 0 and says in failed["reason"], failed
    assert not _events(w, job_id, "round_done")
    assert ("gridmint.settle", [job_id]) in w.queued
    with w.rt.sessions() as s:  # no next round was opened
        assert {u.round for u in s.scalars(select(Unit).where(Unit.job_id == job_id))} == {0}
    assert service.advance(w.rt, job_id) == "failing"  # a re-run (a lost task re-queued) does nothing more
    assert len(_events(w, job_id, "job_failed")) == 1
    w.queued.clear()
    assert service.sweep(w.rt)["advance"] == 0 and w.queued == [("gridmint.settle", [job_id])]

    before = w.ops.balance_of(w.customer.address)
    refund = settlement.settle_job(w.rt, job_id)
    assert refund == spec.budget() - 2 * PRICE
    assert w.ops.balance_of(w.customer.address) == before + refund
    assert w.ops.total_deposited() == 2 * PRICE  # the verified units' pay is in the payout pool
    assert w.ops.get_job(job_id).closed
    with w.rt.sessions() as s:
        assert all(e.released and e.batch for e in s.scalars(select(LedgerEntry).where(LedgerEntry.job_id == job_id)))
    job = _job(w, job_id)
    assert (job.status, job.refund) == ("failed", refund)
    [settled] = _events(w, job_id, "job_settled")
    assert settled["paid"] == str(2 * PRICE)
    assert settlement.settle_job(w.rt, job_id) == refund  # final: a re-run pays nothing twice
    w.queued.clear()
    assert service.sweep(w.rt) == {"adjudicate": 0, "punish_verifier": 0, "advance": 0, "settle": 0, "cancelled": 0,
                                   "stock_canaries": 0, "audit_check": 0,
                                   "slashes_paid": 0}
    assert w.queued == []


def _job(w: World, job_id: str) -> Job:
    with w.rt.sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def _events(w: World, job_id: str, kind: str) -> list[dict[str, Any]]:
    with w.rt.sessions() as s:
        return [e.data for e in s.scalars(select(Event).where(Event.job_id == job_id, Event.kind == kind))]
