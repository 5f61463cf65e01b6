"""CUDA paths of proof-of-training (run on the GPU machine: ``pytest -m gpu``; skipped without CUDA)."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from node.model import ModelConfig, build_model, init_state
from node.statehash import AsyncStateHasher, state_hash
from node.trainer import export_training_state

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CFG = ModelConfig(d_model=64, n_layer=2, n_head=4, ctx=64)


def _trained(steps: int, det: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.use_deterministic_algorithms(det)
    model = build_model(CFG, init_state(CFG, 1)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randint(0, 256, (8, CFG.ctx), generator=gen).cuda()
        model.loss(x[:, :-1], x[:, 1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.use_deterministic_algorithms(False)
    return model, opt


def test_async_hash_of_a_cuda_state_equals_the_synchronous_hash_and_ignores_later_steps() -> None:
    model, opt = _trained(3, det=False)
    live = export_training_state(model, opt)
    before = state_hash(live)
    with AsyncStateHasher(live, buffers=2, threads=4) as hasher:
        fut = hasher.submit(live)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)  # the next step must not leak into the snapshot being hashed
        assert fut.result() == before
        assert hasher.submit(live).result() == state_hash(live) != before


def test_honest_cuda_training_replays_bit_for_bit_on_the_same_gpu() -> None:
    a = state_hash(export_training_state(*_trained(5, det=True)))
    b = state_hash(export_training_state(*_trained(5, det=True)))
    assert a == b


def test_cuda_work_verifies_on_the_cpu_within_a_calibrated_tolerance_and_a_cheat_does_not() -> None:
    """Across devices the replay is not bit-identical; the calibrated tolerance passes honest CUDA work checked on
    the CPU, and a CPU cheat checked on CUDA is bisected to its faked step and slashed by a CUDA referee."""
    from node import adversary
    from node import crosscheck as cc
    from node.trainer import UnitSpec, fresh_state, train_unit

    tiny = ModelConfig(d_model=32, n_layer=1, n_head=2, ctx=32)
    start = init_state(tiny, 3)

    def spec(i: int) -> UnitSpec:
        return UnitSpec(job_id="job-gpu", unit_id="0x" + f"{i:064x}", round=0, shard=i % 4, n_shards=4, model=tiny,
                        steps=32, segment_len=8, batch_size=4, lr=3e-3, seed=i)

    cuda, cpu = cc.Plan("cuda"), cc.Plan("cpu")
    tol = cc.calibrate([(spec(i), fresh_state(start)) for i in range(3)], [cpu], provider_plan=cuda).tolerance
    sp = spec(10)
    states, _, proof = cc.record_policy(sp, start, plan=cuda)
    on_cpu = cc.PlanRunner(sp, fresh_state(start), cpu)
    got, _ = on_cpu.replay(states[0], 0, 8)
    assert state_hash(got) != proof.segments[0].end_hash  # the devices really differ
    for s in range(4):
        v = cc.check_segment_across(sp, proof, s, states[8 * s], states[8 * s + 8], tol, on_cpu)
        assert v.ok, v.reason
    sp = spec(11)
    states, _, proof = cc.record_policy(sp, start, adversary.SkipSteps(frozenset({13})))
    on_cuda = cc.PlanRunner(sp, fresh_state(start), cuda)
    v = cc.check_segment_across(sp, proof, 1, states[8], states[16], tol, on_cuda)
    assert not v.ok and v.kind == "state"
    d = cc.bisect_segment(sp, proof, 1, cc.RecordedReveal(states), tol, on_cuda)
    assert d.step == 13
    assert cc.referee_step(sp, d, cc.RecordedReveal(states), tol, cc.PlanRunner(sp, fresh_state(start), cuda)).fraud


def test_a_provider_trains_on_cuda_in_bf16_reproducibly_and_re_derives_any_state(tmp_path) -> None:
    """The live provider's GPU path: ``train_unit`` on the CUDA plan (bf16 autocast for a bf16 job) gives the same proof
    twice on one GPU, and its Revealer re-derives a mid-segment state that lands on the commitment."""
    from node import checkpoint
    from node import crosscheck as cc
    from node.trainer import UnitSpec, fresh_state, train_unit

    tiny = ModelConfig(d_model=32, n_layer=1, n_head=2, ctx=32)
    start = init_state(tiny, 3)
    for precision in ("fp32", "bf16"):
        sp = UnitSpec(job_id="job-gpu", unit_id="0x" + "c3" * 32, round=0, shard=0, n_shards=2, model=tiny, steps=16,
                      segment_len=8, batch_size=4, lr=3e-3, seed=5, precision=precision)
        a = train_unit(sp, start, tmp_path / f"a-{precision}", plan=cc.Plan("cuda"))
        b = train_unit(sp, start, tmp_path / f"b-{precision}", plan=cc.Plan("cuda"))
        assert a.proof == b.proof, precision
        starts = {i: checkpoint.load(p)[0] for i, p in enumerate(a.segment_paths)}
        runner = cc.PlanRunner(sp, fresh_state(start), cc.Plan("cuda"))
        mid = cc.Revealer(sp, runner, starts)(11)
        end, _ = runner.replay(mid, 11, 5)
        assert state_hash(end) == a.proof.segments[1].end_hash, precision


def _bf16_cuda_vs_cpu(job: str):  # type: ignore[no-untyped-def]
    """Tiny bf16 units of ``job`` (spec by index), their start, and a tolerance calibrated cuda vs cpu on 3 units."""
    from node import crosscheck as cc
    from node.trainer import UnitSpec, fresh_state

    tiny = ModelConfig(d_model=32, n_layer=1, n_head=2, ctx=32)
    start = init_state(tiny, 3)

    def spec(i: int) -> UnitSpec:
        return UnitSpec(job_id=job, unit_id="0x" + f"{i:064x}", round=0, shard=i % 4, n_shards=4, model=tiny,
                        steps=32, segment_len=8, batch_size=4, lr=3e-3, seed=i, precision="bf16")

    metric, factor = cc.REFEREE_RULE["bf16"]
    tol = cc.calibrate([(spec(i), fresh_state(start)) for i in range(3)], [cc.Plan("cpu")],
                       provider_plan=cc.Plan("cuda"), referee_metric=metric, referee_factor=factor).tolerance
    return spec, start, tol


def test_a_bf16_cuda_provider_is_refereed_on_the_cpu_relative_to_each_update() -> None:
    """A bf16 job on a GPU, its referee on the CPU: honest CUDA work passes the calibrated check and a forced dispute
    over it is cleared by the CPU's one-step replay (judged against the step's own update); a skipped step is
    bisected to and convicted."""
    from node import adversary
    from node import crosscheck as cc
    from node.trainer import fresh_state

    spec, start, tol = _bf16_cuda_vs_cpu("job-gpu-bf16")
    cuda, cpu = cc.Plan("cuda"), cc.Plan("cpu")
    sp = spec(10)
    states, _, proof = cc.record_policy(sp, start, plan=cuda)
    on_cpu = cc.PlanRunner(sp, fresh_state(start), cpu)
    for s in range(4):
        v = cc.check_segment_across(sp, proof, s, states[8 * s], states[8 * s + 8], tol, on_cpu)
        assert v.ok, v.reason
    liar_tol = replace(tol, state=tuple((k, 1e-30) for k, _ in tol.state))  # a verifier that disputes everything
    d = cc.bisect_segment(sp, proof, 1, cc.RecordedReveal(states), liar_tol, on_cpu)
    r = cc.referee_step(sp, d, cc.RecordedReveal(states), tol, cc.PlanRunner(sp, fresh_state(start), cpu))
    assert not r.fraud and r.distance < tol.referee / 2, r.reason
    sp = spec(11)
    states, _, proof = cc.record_policy(sp, start, adversary.SkipSteps(frozenset({13})))
    on_cuda = cc.PlanRunner(sp, fresh_state(start), cuda)
    v = cc.check_segment_across(sp, proof, 1, states[8], states[16], tol, on_cuda)
    assert not v.ok
    d = cc.bisect_segment(sp, proof, 1, cc.RecordedReveal(states), tol, on_cuda)
    assert d.step == 13
    assert cc.referee_step(sp, d, cc.RecordedReveal(states), tol, cc.PlanRunner(sp, fresh_state(start), cpu)).fraud


def test_a_bf16_cuda_providers_loss_is_scanned_on_the_cpu_honest_passes_a_faked_one_step_loss_does_not() -> None:
    """The loss scan across devices: every step of an honest bf16 CUDA segment replayed on the CPU from the
    provider's own states lands within the scan's line (``crosscheck.scan_line`` of the one-step loss drift
    calibrated cuda vs cpu), and the same segment committing a loss 3% lower on one step is convicted."""
    from node import adversary
    from node import crosscheck as cc
    from node.trainer import fresh_state

    spec, start, tol = _bf16_cuda_vs_cpu("job-gpu-scan")
    sp = spec(12)
    states, losses, proof = cc.record_policy(sp, start, plan=cc.Plan("cuda"))
    on_cpu = cc.PlanRunner(sp, fresh_state(start), cc.Plan("cpu"))
    for s in range(4):
        r = cc.scan_segment(sp, proof, s, cc.RecordedReveal(states), tol, on_cpu)
        assert not r.fraud and r.distance < r.threshold / 2, r.reason
    lie, _ = adversary.fake_step_loss(proof, losses, 8 + 3)
    r = cc.scan_segment(sp, lie, 1, cc.RecordedReveal(states), tol, on_cpu)
    assert r.fraud and "mean loss" in r.reason, r.reason


def test_a_verifier_on_the_same_gpu_model_replays_bit_for_bit_and_catches_a_float8_step(tmp_path) -> None:
    """A CUDA plan names its GPU model (``cuda:h200``): a verifier on that plan replays a unit trained there with
    the live verifier's check (:func:`node.replay.check_segment` on the plan) bit for bit, in fp32 and in bf16,
    and a cheat that runs one step in cheaper arithmetic (float8 weights in a bf16 job, which hides inside the drift
    between a GPU and a CPU) fails its segment there."""
    from node import adversary, checkpoint
    from node import crosscheck as cc
    from node.device import local_plan
    from node.replay import check_segment
    from node.trainer import UnitSpec, train_unit

    from node.device import plan_build

    plan = local_plan(cc.Plan("cuda"))
    assert plan.exact and plan.gpu
    # the kernels it names besides the model: the torch build, CUDA and cuDNN versions, the compute capability
    build = plan_build(plan)
    assert build.startswith("torch-") and "/cuda-" in build and ".sm" in build and build != plan_build(cc.Plan("cpu"))
    tiny = ModelConfig(d_model=32, n_layer=1, n_head=2, ctx=32)
    start = init_state(tiny, 3)
    for precision in ("fp32", "bf16"):
        sp = UnitSpec(job_id="job-gpu", unit_id="0x" + "c5" * 32, round=0, shard=0, n_shards=2, model=tiny, steps=16,
                      segment_len=8, batch_size=4, lr=3e-3, seed=5, precision=precision)
        honest = train_unit(sp, start, tmp_path / f"honest-{precision}", plan=plan)
        for seg, path in enumerate(honest.segment_paths):
            v = check_segment(sp, honest.proof, seg, path, plan)
            assert v.ok and v.replayed_end == v.claimed_end, (precision, v)
        states, _, proof = cc.record_policy(sp, start, adversary.LowPrecision(frozenset({11})), plan=plan)
        p = tmp_path / f"cheat-{precision}.safetensors"
        checkpoint.save(p, states[8], {})
        v = check_segment(sp, proof, 1, p, plan)
        assert not v.ok and "replayed end state differs" in v.reason, (precision, v)


def test_a_gpu_referee_worker_refuses_to_referee_on_other_cuda_kernels_than_the_marketplace_names(tmp_path) -> None:
    """GRIDMINT_REFEREE_GPU_BUILDS tells verifiers which CUDA kernels the referee replays its GPU plans with (they
    bond disputes on work computed with them): a GPU worker computing with others says so instead of judging."""
    from marketplace.runtime import Runtime
    from marketplace.settings import Settings
    from node.device import gpu_name, kernel_build
    from node.trainer import gpu_slug
    from protocol.errors import GridMintValueError

    plans = f"cpu,cuda:{gpu_slug(gpu_name())}"

    def runtime(gpu_builds: str) -> Runtime:
        return Runtime(settings=Settings(data_dir=tmp_path, referee_plans=plans, referee_gpu_builds=gpu_builds),
                       sessions=None, blobs=None, chain_id=1, contracts=None,  # type: ignore[arg-type]
                       enqueue=lambda name, args, queue=None: None)

    here = kernel_build("cuda")
    assert {p.label for p in runtime(here).referee_plans(here=True)} == set(plans.split(","))
    with pytest.raises(GridMintValueError, match="this worker computes GPU work with"):
        runtime("torch-0.0.0.example/cuda-0.0.cudnn-0.sm00").referee_plans(here=True)
