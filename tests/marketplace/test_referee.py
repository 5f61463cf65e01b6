"""The referee's judgement of an accusation it cleared (marketplace.referee.judge_accusation): made in good faith (the
verifier keeps its bond), proven false (the verifier is benched), or neither? On a real case: honest micro-batch
training (plan cpu/mb2) that a cpu verifier's calibrated tolerance disputes. Honest drift across plans passes a
calibrated tolerance in a few percent of segments, but which segments depends on the CPU's kernels (a job found to
drift 4.76x past it on an AVX2 machine stays well inside it on an AVX-512 one), so the tests put it there on any
machine: :func:`drift_past_tolerance`."""
from __future__ import annotations

import functools
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from eth_account import Account
from eth_utils import keccak

from marketplace import referee
from marketplace.common import model_config, unit_id_for
from node import checkpoint
from node import crosscheck as cc
from node.model import init_state
from node.trainer import UnitSpec, fresh_state
from protocol.jobs import RANDOM_BYTES, new_job_id
from protocol.schemas import JobSpec
from tests.marketplace.chainless import chainless_runtime

#: The job whose only unit, trained honestly on cpu/mb2, the tests dispute in segment 0 (and not in segment 1). Its
#: id is bound to test_flow's FIXED_CUSTOMER (JobEscrow funds a new id for the address it starts with only); of the
#: 48 such ids with a repeated random byte, this one's segment 0 drifts 10.4x segment 1 on AVX-512 (0.317 vs 0.031
#: of the tolerance), where DRIFT_OVER needs 2x
DRIFTING_JOB = new_job_id(Account.from_key(keccak(text="GridMint test_flow: the customer of fixed job ids")).address,
                          bytes([0x20]) * RANDOM_BYTES)
DRIFTING_SPEC = JobSpec(rounds=1, units_per_round=1, steps_per_unit=16, segment_len=8, batch_size=8,
                        max_price=2 * 10**18, verification="full")
MB2, CPU = cc.Plan.parse("cpu/mb2"), cc.Plan.parse("cpu")
#: How far past the cpu verifier's tolerance the tests put segment 0's honest drift (over the bond margin 1 a
#: verifier on the referee's plan bonds at).
DRIFT_OVER = 2.0
_TOLERANCE_FOR = cc.tolerance_for


def unit_spec(job_id: str = DRIFTING_JOB, spec: JobSpec = DRIFTING_SPEC) -> UnitSpec:
    return UnitSpec(job_id=job_id, unit_id=unit_id_for(job_id, 0, 0), round=0, shard=0, n_shards=1,
                    model=model_config(spec), steps=spec.steps_per_unit, segment_len=spec.segment_len,
                    batch_size=spec.batch_size, lr=spec.lr, seed=spec.seed * 1_000_003, threads=1)


@functools.lru_cache(maxsize=1)
def _honest_run() -> tuple[UnitSpec, dict, list, object]:
    """The drifting job's unit trained honestly on cpu/mb2 (once per session): spec, start, every state, proof."""
    spec = unit_spec()
    start = init_state(spec.model, DRIFTING_SPEC.seed)
    states, _, proof = cc.record_policy(spec, start, plan=MB2)
    return spec, start, states, proof


def _cpu_checks(tol: cc.Tolerance) -> list[cc.CrossVerdict]:
    """A cpu verifier's check of each segment of :func:`_honest_run` within ``tol``."""
    spec, start, states, proof = _honest_run()
    runner, L = cc.PlanRunner(spec, fresh_state(start), CPU), spec.segment_len
    return [cc.check_segment_across(spec, proof, s, states[s * L], states[(s + 1) * L], tol, runner)
            for s in range(spec.n_segments)]


@functools.lru_cache(maxsize=1)
def drift_scale() -> float:
    """The factor on the cpu verifier's calibrated state tolerance (for work on cpu/mb2 shaped like
    DRIFTING_SPEC) that puts the honest drift of DRIFTING_JOB's segment 0 at DRIFT_OVER times it: a calibration
    that came out tight, as one on a few units does now and then. Segment 1 must stay inside it (it drifts far
    less on every machine seen: 0.04-0.08 of the tolerance against segment 0's 0.2-0.4 on AVX-512)."""
    over = [v.distance / v.threshold for v in _cpu_checks(_TOLERANCE_FOR(unit_spec(), CPU, provider_plan=MB2))]
    if not (over[0] > 0 and over[1] * DRIFT_OVER < over[0]):
        raise AssertionError(f"honest drift of the drifting job on this machine: {over} x the tolerance by segment; "
                             f"the tests need segment 0's over {DRIFT_OVER}x segment 1's")
    return over[0] / DRIFT_OVER


def drift_past_tolerance() -> Callable[..., cc.Tolerance]:
    """A ``crosscheck.tolerance_for`` (monkeypatch it in) whose state table, for a cpu verifier or referee checking
    cpu/mb2 work shaped like DRIFTING_SPEC, is :func:`drift_scale` times the calibrated one; every other tolerance,
    its loss tolerance and the referee's one-step line (what a slash is decided on) as calibrated."""
    scale, shape = drift_scale(), unit_spec()

    def tolerance_for(spec: UnitSpec, plan: cc.Plan, **kw: Any) -> cc.Tolerance:
        tol = _TOLERANCE_FOR(spec, plan, **kw)
        if (plan == CPU and kw.get("provider_plan") == MB2 and not kw.get("foreign")
                and (spec.model, spec.steps, spec.segment_len, spec.batch_size)
                == (shape.model, shape.steps, shape.segment_len, shape.batch_size)):
            return replace(tol, state=tuple((k, v * scale) for k, v in tol.state),
                           note=f"{tol.note} (state table x{scale:.3g}: the tests' tight calibration)")
        return tol

    return tolerance_for


@pytest.fixture(scope="module")
def drifting(tmp_path_factory) -> tuple[UnitSpec, object, list[Path], list[str], dict[int, Path]]:
    """The unit trained honestly on cpu/mb2: its proof, segment-boundary checkpoints, the hash a cpu verifier's
    replay of each segment reaches, and every step's state (what the honest provider reveals when asked), with the
    tolerance of :func:`drift_past_tolerance` in place for the module's tests (the referee's rulings go through it
    too)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cc, "tolerance_for", drift_past_tolerance())
        spec, _, states, proof = _honest_run()
        d = tmp_path_factory.mktemp("drift")
        L = spec.segment_len
        paths = [d / f"s{i}.safetensors" for i in range(spec.n_segments + 1)]
        for i, path in enumerate(paths):
            checkpoint.save(path, states[i * L], {})
        reveals = {k: d / f"step{k}.safetensors" for k in range(1, spec.steps)}
        for k, path in reveals.items():
            checkpoint.save(path, states[k], {})
        verdicts = _cpu_checks(cc.tolerance_for(spec, CPU, provider_plan=MB2))
        assert not verdicts[0].ok and verdicts[0].kind == "state", verdicts[0].reason
        assert verdicts[0].distance / verdicts[0].threshold == pytest.approx(DRIFT_OVER)
        assert verdicts[1].ok, verdicts[1].reason
        yield spec, proof, paths, [v.replayed_hash for v in verdicts], reveals


def _cleared(drifting, seg: int) -> referee.Ruling:
    """The referee's ruling on segment ``seg`` with the honest provider answering every reveal: cleared."""
    spec, proof, paths, _, reveals = drifting
    ruling = referee.rule(spec, proof, seg, MB2, paths[seg], paths[seg + 1], reveals, lambda step: "")
    assert ruling.fraud is False, ruling
    return ruling


def test_an_honest_accusation_past_the_tolerance_is_in_good_faith(drifting) -> None:
    """Segment 0: the referee's first look backs the dispute (its replay is the verifier's, bit for bit), so it
    bisects; the honest reveals clear the provider, and the ruling keeps the first look: good faith, from it alone."""
    replayed = drifting[3]
    ruling = _cleared(drifting, 0)
    assert "bisected to step" in ruling.reason and ruling.look_ok is False and ruling.look_hash == replayed[0]
    faith = referee.judge_accusation(ruling, MB2, CPU, replayed[0])
    assert faith.good and not faith.proven_false, faith
    assert "reproduced the verifier's replay" in faith.reason


def test_a_made_up_replay_or_one_within_tolerance_is_proven_false_another_plan_is_neither(drifting) -> None:
    replayed = drifting[3]
    ruling = _cleared(drifting, 0)
    faith = referee.judge_accusation(ruling, MB2, CPU, "0x" + "ab" * 32)
    assert not faith.good and faith.proven_false and "signed a replay ending in 0xababababab" in faith.reason
    # segment 1 replays within the tolerance: cleared at the first look (nothing asked of the provider), and an
    # accusation signed over that very replay contradicts the verifier's own check
    ruling = _cleared(drifting, 1)
    assert ruling.look_ok is True and "the provider was not asked" in ruling.reason
    faith = referee.judge_accusation(ruling, MB2, CPU, replayed[1])
    assert not faith.good and faith.proven_false and "within the tolerance" in faith.reason
    # a verifier declaring a plan the referee does not replay on can be judged neither way
    faith = referee.judge_accusation(_cleared(drifting, 0), MB2, MB2, replayed[0])
    assert not faith.good and not faith.proven_false and "cannot reproduce a replay on plan cpu/mb2" in faith.reason
    # a provider on the verifier's own plan is checked bit for bit: a cleared dispute there is proven false
    bit_for_bit = referee.Ruling(False, "the replay reproduces the claim", look_hash=replayed[0], look_ok=True)
    faith = referee.judge_accusation(bit_for_bit, CPU, CPU, replayed[0])
    assert not faith.good and faith.proven_false and "bit for bit" in faith.reason


def test_the_referee_convicts_a_claim_wrong_on_its_face_and_bisects_the_rest(drifting) -> None:
    """A segment committed with another data order than the spec's is fraud on its face, whatever its states (before,
    the cross-plan referee replayed and bisected the states only, so it cleared such a claim and the verifier that
    flagged it lost its bond). An honest segment's dispute goes to bisection: the referee asks for the midpoint."""
    from dataclasses import replace

    from protocol.proof import make_proof

    spec, proof, paths, _, _ = drifting
    segments = [replace(c, batch_digest="0x" + "11" * 32) if c.index == 0 else c for c in proof.segments]
    forged = make_proof(unit_id=proof.unit_id, spec_hash=proof.spec_hash, seed=proof.seed, steps=proof.steps,
                        segment_len=proof.segment_len, segments=segments)
    ruling = referee.rule(spec, forged, 0, MB2, paths[0], paths[1], {}, lambda step: "")
    assert ruling.fraud is True and "is not the spec's data order" in ruling.reason
    ruling = referee.rule(spec, proof, 0, MB2, paths[0], paths[1], {}, lambda step: "")
    assert ruling.fraud is None and ruling.pending == spec.segment_len // 2


def test_the_loss_rule_leaves_a_chaotic_stretch_to_the_bisection(drifting) -> None:
    """A committed mean loss convicts on its own only past REFEREE_LOSS_FACTOR x its tolerance, scaled by how far the
    replayed states drifted: honest chaotic drift moves both (seen: an honest 40-step segment 162x past the state
    tolerance with its loss 60x past the loss tolerance; another, in a flow test, slashed on its loss alone)."""
    spec = drifting[0]
    tol = cc.tolerance_for(spec, CPU, provider_plan=MB2)
    dl = int(100 * max(1, tol.loss_micro))  # past 64x the loss tolerance
    assert cc.loss_ruling(spec, 0, tol, dl).fraud  # honest states (within their tolerance): the loss alone convicts
    assert cc.loss_ruling(spec, 0, tol, dl, state_over=0.9).fraud
    assert not cc.loss_ruling(spec, 0, tol, dl, state_over=162.0).fraud  # the states drifted as far: bisect them
    assert cc.loss_ruling(spec, 0, tol, 200 * dl, state_over=162.0).fraud  # a faked loss still stands out
    assert not cc.loss_ruling(spec, 0, tol, 10**9, state_over=float("inf")).fraud  # states wrong on their face


def test_a_referee_on_the_providers_own_plan_judges_it_bit_for_bit(drifting, tmp_path: Path) -> None:
    """A referee that replays cpu/mb2 itself (GRIDMINT_REFEREE_PLANS) judges a segment trained there by an exact
    replay: the honest segment that drifted past a cpu verifier's tolerance is cleared at once (nothing asked of
    the provider; the cpu verifier's accusation still in good faith, from the look on its plan), a verifier on
    cpu/mb2 that disputed it is proven false, and a cheat whose every segment has one step in cheaper arithmetic is
    convicted on that replay alone."""
    from node.adversary import low_precision

    spec, proof, paths, replayed, _ = drifting
    exact = referee.exact_plans("cpu, cpu/mb2")
    assert exact == {CPU, MB2}
    ruling = referee.rule(spec, proof, 0, MB2, paths[0], paths[1], {}, lambda step: "", exact=exact)
    assert ruling.fraud is False and "replayed bit for bit on the provider's own plan: replay matches" in ruling.reason
    assert ruling.replayed == proof.segments[0].end_hash and ruling.pending is None
    assert ruling.look_ok is False and ruling.look_hash == replayed[0]
    faith = referee.judge_accusation(ruling, MB2, CPU, replayed[0], exact)
    assert faith.good and not faith.proven_false, faith
    faith = referee.judge_accusation(ruling, MB2, MB2, "0x" + "ab" * 32, exact)
    assert faith.proven_false and "checked bit for bit on plan cpu/mb2" in faith.reason
    # without the plan among the referee's, the same ruling on a cpu/mb2 verifier can be judged neither way
    assert not referee.judge_accusation(ruling, MB2, MB2, "0x" + "ab" * 32).proven_false

    from node.model import init_state

    cheat = low_precision(spec, init_state(spec.model, DRIFTING_SPEC.seed), tmp_path / "cheat", plan=MB2)
    ends = cheat.segment_paths[1:] + [cheat.final_path]
    for seg in range(spec.n_segments):
        ruling = referee.rule(spec, cheat.proof, seg, MB2, cheat.segment_paths[seg], ends[seg], {},
                              lambda step: "", exact=exact)
        assert ruling.fraud is True and "[cpu/mb2] replayed bit for bit" in ruling.reason, ruling
        assert "replayed end state differs" in ruling.reason and ruling.replayed != ruling.claimed


def test_the_referee_takes_only_plans_it_replays_bit_for_bit() -> None:
    from protocol.errors import GridMintValueError

    assert referee.exact_plans("") == referee.exact_plans("cpu") == {CPU}
    with pytest.raises(GridMintValueError, match="must name its GPU model"):
        referee.exact_plans("cpu,cuda")
    with pytest.raises(GridMintValueError, match="needs a no-such-gpu GPU here"):
        referee.exact_plans("cuda:no-such-gpu")
    # an API process only tells verifiers what the referee's workers replay (they may have the GPU, it need not)
    assert referee.exact_plans("cpu,cuda:no-such-gpu", here=False) == {CPU, cc.Plan("cuda", 1, "no-such-gpu")}
    with pytest.raises(GridMintValueError):
        referee.exact_plans("cpu/mb0")


def test_a_worker_on_other_kernels_than_the_marketplace_names_refuses_to_referee(tmp_path: Path) -> None:
    """Verifiers bond disputes when their kernels are the referee's (GET /config referee_build): a worker computing
    with other kernels than that could not release an honest bond, so it says so instead of judging."""
    from marketplace.runtime import Runtime
    from marketplace.settings import Settings
    from node.device import kernel_build
    from protocol.errors import GridMintValueError

    def runtime(build: str) -> Runtime:
        return Runtime(settings=Settings(data_dir=tmp_path, referee_build=build), sessions=None, blobs=None,
                       chain_id=1, contracts=None, enqueue=lambda name, args, queue=None: None)  # type: ignore[arg-type]

    assert runtime("").referee_build() == kernel_build("cpu") and runtime("").referee_plans(here=True) == {CPU}
    assert runtime(kernel_build("cpu")).referee_plans(here=True) == {CPU}
    other = runtime("torch-2.13.0.example/aarch64.arm.neon/aten-default")
    assert other.referee_plans() == {CPU}  # an API process only reads the labels
    with pytest.raises(GridMintValueError, match="GRIDMINT_REFEREE_BUILD says the referee computes with torch-2.13.0"):
        other.referee_plans(here=True)
    with pytest.raises(ValueError):
        Settings(data_dir=tmp_path, referee_build="Torch 2 (AVX2)")


def test_disputes_over_work_on_a_referee_pools_kernels_go_to_that_pools_queue(tmp_path: Path) -> None:
    """GRIDMINT_REFEREE_POOLS names CPU kernels other referee workers compute with: work computed with them is
    judged by that pool (its own Celery queue, bit for bit), anything else by the default referee; a machine whose
    own kernels are a pool's must be told the default referee's; a malformed pool, a GPU build or a pool with the
    referee's own kernels fails at start-up."""
    from marketplace.runtime import Runtime, pool_queue
    from marketplace.settings import Settings
    from node.device import kernel_build
    from protocol.errors import GridMintValueError

    avx512 = "torch-2.13.0.example/x86_64.genuineintel.avx512/aten-avx512"
    arm = "torch-2.13.0.example/aarch64.arm.neon/aten-default"
    here = kernel_build("cpu")

    def runtime(**kw: str) -> Runtime:
        return Runtime(settings=Settings(data_dir=tmp_path, **kw), sessions=None, blobs=None, chain_id=1,
                       contracts=None, enqueue=lambda name, args, queue=None: None)  # type: ignore[arg-type]

    rt = runtime(referee_pools=f"{avx512}, {arm}")
    assert rt.referee_builds() == {here, avx512, arm} and not rt.referee_pool_here()
    assert rt.referee_for(avx512) == avx512 and rt.referee_queue(avx512) == pool_queue(avx512)
    assert rt.referee_queue(avx512, fallen_back=True) is None  # its pool was away: the default referee has it
    assert pool_queue(avx512) != pool_queue(arm) and pool_queue(avx512).startswith("referee.")
    # the referee's own kernels, unknown ones and unsaid ones: the default referee, on the default queue
    for build in (here, "torch-2.13.0.example/x86_64.genuineintel.avx2/aten-avx2", ""):
        assert rt.referee_for(build) == here and rt.referee_queue(build) is None
        assert rt.referee_plans(here=True, build=build) == {CPU}  # this worker judges them
    # a worker handed a pool's dispute refuses it
    with pytest.raises(GridMintValueError, match=re.escape(f"this dispute is for the referee computing with {avx512}, "
                                                           f"this worker computes with {here}")):
        rt.referee_plans(here=True, build=avx512)
    # a pool's machine: it referees (its kernels are a referee's), but cannot take its own for the default's
    pool_here = runtime(referee_pools=here)
    assert pool_here.referee_pool_here() and pool_here.referee_for(here) == here
    assert pool_here.referee_plans(here=True, build=here) == {CPU}  # its own pool's work, without the default named
    with pytest.raises(GridMintValueError, match="set GRIDMINT_REFEREE_BUILD to the default referee's"):
        pool_here.referee_build()
    told = runtime(referee_pools=here, referee_build=avx512)
    assert told.referee_plans(here=True) == {CPU} and told.referee_for(arm) == avx512
    for bad in ("AVX-512 box", f"{avx512}/cuda-12.4.cudnn-9.sm90"):
        with pytest.raises(ValueError, match="is not a CPU kernel build"):
            Settings(data_dir=tmp_path, referee_pools=bad)
    with pytest.raises(ValueError, match="is the referee's own kernels"):
        Settings(data_dir=tmp_path, referee_pools=avx512, referee_build=avx512)


def test_gpu_work_is_replayed_bit_for_bit_only_on_the_cuda_kernels_the_referees_gpu_workers_name(
        tmp_path: Path) -> None:
    """A GPU plan the referee replays bit for bit (GRIDMINT_REFEREE_PLANS) is so only for work computed with the
    CUDA kernels its GPU workers compute with (GRIDMINT_REFEREE_GPU_BUILDS): another torch or CUDA computes other
    bits on the same GPU model, so there a verifier on that GPU, told the referee replays it exactly, bonded a
    dispute the referee (judging within the tolerance) could not back, and lost the bond. A GPU plan with no build
    named, or a build that is not CUDA's, fails at start-up; a GPU worker on other kernels refuses to referee."""
    from marketplace import checking
    from marketplace.runtime import Runtime
    from marketplace.settings import Settings
    from protocol.errors import GridMintValueError

    h100 = cc.Plan.parse("cuda:h100")
    ours, theirs = ("torch-2.13.0.example/cuda-12.8.cudnn-91002.sm90", "torch-2.12.0.example/cuda-12.4.cudnn-90100.sm90")

    def runtime(**kw: str) -> Runtime:
        return Runtime(settings=Settings(data_dir=tmp_path, **kw), sessions=None, blobs=None, chain_id=1,
                       contracts=None, enqueue=lambda name, args, queue=None: None)  # type: ignore[arg-type]

    rt = runtime(referee_plans="cpu,cuda:h100", referee_gpu_builds=f"{ours}, ")
    assert rt.referee_gpu_builds() == {ours} and h100 in rt.referee_plans()
    assert checking._referee_exact(rt, h100, ours) and checking._auditable(rt, h100, ours)
    for build in (theirs, ""):  # other kernels, or kernels unsaid: judged within the tolerance, not audited
        assert not checking._referee_exact(rt, h100, build) and not checking._auditable(rt, h100, build)
    assert not checking._referee_exact(rt, cc.Plan.parse("cuda:h200"), ours)  # a GPU no referee runs
    assert not checking._referee_exact(rt, CPU, ours)  # (a CPU plan is the CPU referees')
    with pytest.raises(ValueError, match="need the CUDA kernels the referee replays them with"):
        Settings(data_dir=tmp_path, referee_plans="cpu,cuda:h100")
    for bad in ("H100 box", "torch-2.13.0.example/x86_64.genuineintel.avx2/aten-avx2"):
        with pytest.raises(ValueError, match="is not a CUDA kernel build"):
            Settings(data_dir=tmp_path, referee_plans="cpu,cuda:h100", referee_gpu_builds=bad)
    if not torch.cuda.is_available():  # a worker told to replay an H100 plan on a machine without one refuses
        with pytest.raises(GridMintValueError, match="needs a h100 GPU here"):
            rt.referee_plans(here=True)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_dispute_whose_referee_pool_is_away_goes_to_the_default_referee(tmp_path: Path, db_url: str) -> None:
    """A pool's workers write its sign of life every few seconds (checking.pool_alive). A dispute over work on its
    kernels whose pool was not seen for referee_pool_wait_s, nor the dispute itself (its verdict, else its verifier's
    last sign of life), is handed to the default referee by the reaper: marked (once, logged), sent to the default
    queue, and routed there from then on (sweep); the pool, should it come back, leaves it alone. A pool seen recently
    keeps its disputes; a wait of 0 never hands one over; disputes over other kernels are the default's anyway."""
    from sqlalchemy import select

    from marketplace import checking, service
    from marketplace.db import Event, Job, RefereePool, Unit, Verification, make_sessionmaker, now_s
    from marketplace.runtime import Runtime, pool_queue
    from marketplace.settings import Settings
    from node.device import kernel_build

    pool, here = "torch-2.13.0.example/x86_64.genuineintel.avx512/aten-avx512", kernel_build("cpu")
    sent: list[tuple[str, list[object], str | None]] = []
    sessions = make_sessionmaker(db_url)

    def runtime(**kw: object) -> Runtime:
        settings = Settings(data_dir=tmp_path, db_url=db_url, **kw)  # type: ignore[arg-type]
        return chainless_runtime(settings, sessions=sessions,
                                 enqueue=lambda name, args, queue=None: sent.append((name, args, queue)))

    rt = runtime(referee_pools=pool, referee_pool_wait_s=60)
    now, job = now_s(), "0x" + "01" * 32
    with sessions.begin() as s:
        # not "running": the sweep reads a running job's escrow on chain, and this runtime has no chain
        s.add(Job(id=job, customer="0x" + "0" * 40, spec=JobSpec(max_price=1).model_dump(mode="json"), budget=1,
                  global_blob="0" * 64, status="done"))
        s.flush()
        for shard, build in enumerate([pool, here]):
            s.add(Unit(id=f"0x{shard:064x}", job_id=job, round=0, shard=shard, status="submitted", build=build))
        s.flush()
        rows = [Verification(unit_id=f"0x{0:064x}", provider="0x" + "0" * 40, segment=0, status="disputed",
                             assigned_at=now - 120),  # quiet for 2 minutes: its pool is away
                Verification(unit_id=f"0x{0:064x}", provider="0x" + "0" * 40, segment=1, status="bisecting",
                             assigned_at=now - 120, heartbeat_at=now - 10),  # its verifier was here 10 s ago
                Verification(unit_id=f"0x{1:064x}", provider="0x" + "0" * 40, segment=0, status="disputed",
                             assigned_at=now - 1000),  # the referee's own kernels: the default's anyway
                Verification(unit_id=f"0x{0:064x}", provider="0x" + "0" * 40, segment=2, status="disputed",
                             assigned_at=now - 1000, heartbeat_at=now - 1000,
                             verdict_at=now - 5),  # a long replay, disputed 5 s ago
                Verification(unit_id=f"0x{0:064x}", provider="0x" + "0" * 40, segment=3, status="auditing",
                             assigned_at=now - 1000, verdict_at=now - 120)]  # a pass its pool has not audited
        s.add_all(rows)
    away, recent, ours, fresh, audit = (v.id for v in rows)

    assert service.reap(rt) == 0
    assert sorted(sent) == [("gridmint.adjudicate", [away], None), ("gridmint.audit_check", [audit], None)]
    with sessions() as s:
        marked = {v.id: v.fallback_at for v in s.scalars(select(Verification))}
        events = {e.data["verification"]: e.data
                  for e in s.scalars(select(Event).where(Event.kind == "referee_fallback"))}
    assert sorted(events) == [away, audit]
    event, audited = events[away], events[audit]
    assert marked[away] is not None and marked[away] >= now and marked[audit] is not None
    assert marked[recent] is None and marked[ours] is None and marked[fresh] is None
    assert event["verification"] == away and event["pool"] == pool and event["pool_seen"] is None
    assert audited["verification"] == audit and "judges the audit across kernels" in audited["reason"]
    sent.clear()
    assert service.reap(rt) == 0 and sent == []  # handed over once
    # the pool says it is alive: its quiet disputes stay with it
    with sessions.begin() as s:
        s.get(Verification, recent).heartbeat_at = now - 1000  # type: ignore[union-attr]
        s.get(Verification, fresh).verdict_at = now - 1000  # type: ignore[union-attr]
    checking.pool_alive(rt, pool)
    checking.pool_alive(rt, pool)  # written, then brought up to date: one row per pool
    with sessions() as s:
        assert [(r.build, r.seen_at >= now) for r in s.scalars(select(RefereePool))] == [(pool, True)]
    assert service.reap(rt) == 0 and sent == []
    # the sweep routes by the mark: the handed-over dispute to the default queue, the pool's to the pool's
    service.sweep(rt)
    assert sorted((args[0], queue or "") for name, args, queue in sent if name == "gridmint.adjudicate") == sorted(
        [(away, ""), (recent, pool_queue(pool)), (ours, ""), (fresh, pool_queue(pool))])
    # never handed over with a wait of 0, however long the pool is away
    with sessions.begin() as s:
        s.execute(Verification.__table__.update().values(fallback_at=None))
        s.execute(RefereePool.__table__.delete())
    sent.clear()
    assert service.reap(runtime(referee_pools=pool, referee_pool_wait_s=0)) == 0 and sent == []
    assert checking.pool_away(100, None, 0, 60) and not checking.pool_away(100, None, 0, 0)
    assert not checking.pool_away(100, 50, 0, 60) and not checking.pool_away(100, None, 50, 60)
    assert checking.pool_away(200, 139, 100, 60) and not checking.pool_away(200, 140, 100, 60)


def test_a_pools_worker_leaves_a_dispute_handed_to_the_default_referee_alone(tmp_path: Path) -> None:
    """Once a dispute (or an audit) fell back from its away pool, a worker of that pool that comes back (and finds it
    in its queue) does not judge it: the default referee has it."""
    from marketplace import checking
    from marketplace.db import Job, Unit, Verification, make_sessionmaker, now_s
    from marketplace.settings import Settings
    from node.device import kernel_build

    here, default = kernel_build("cpu"), "torch-2.13.0.example/x86_64.genuineintel.avx512/aten-avx512"
    sessions = make_sessionmaker(f"sqlite:///{tmp_path / 'm.db'}")
    settings = Settings(data_dir=tmp_path, referee_pools=here, referee_build=default)
    rt = chainless_runtime(settings, sessions=sessions)
    assert rt.referee_pool_here()
    with sessions.begin() as s:
        s.add(Job(id="0x" + "01" * 32, customer="0x" + "0" * 40, spec=JobSpec(max_price=1).model_dump(mode="json"),
                  budget=1, global_blob="0" * 64))
        s.flush()
        s.add(Unit(id=f"0x{0:064x}", job_id="0x" + "01" * 32, round=0, shard=0, status="submitted", build=here))
        s.flush()
        v = Verification(unit_id=f"0x{0:064x}", provider="0x" + "0" * 40, segment=0, status="disputed",
                         fallback_at=now_s())
        s.add(v)
    assert checking.adjudicate(rt, v.id) == "disputed"  # untouched: no proof was even read
    with sessions() as s:
        assert s.get(Verification, v.id).status == "disputed"  # type: ignore[union-attr]
    with sessions.begin() as s:  # so too an audit handed over
        s.get(Verification, v.id).status = "auditing"  # type: ignore[union-attr]
    assert checking.audit_check(rt, v.id) == "auditing"
    with sessions() as s:
        assert s.get(Verification, v.id).status == "auditing"  # type: ignore[union-attr]
