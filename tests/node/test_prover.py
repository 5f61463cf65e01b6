"""Step-level proof-of-training: honest units replay exactly (across thread counts); every cheat fails exactly the
segments it touched; the proof bench runs end to end at toy sizes."""
from __future__ import annotations

import json
import math

import pytest

from gridmint.bench import proof as bench
from node import adversary
from node.model import init_state
from node.prover import bad_step_set, honest_step, train_traced
from node.replay import check_state
from node.trainer import fresh_state
from protocol.proof import check_structure
from tests.node.conftest import TINY

STEPS = 48


def _spec(idx: int, threads: int = 1):  # type: ignore[no-untyped-def]
    return bench._spec(TINY, STEPS, idx, threads=threads)


def test_honest_trace_is_deterministic_structurally_valid_and_replays_with_another_thread_count() -> None:
    start = init_state(TINY, 0)
    spec = _spec(1, threads=2)
    a, b = train_traced(spec, start), train_traced(spec, start)
    assert a.proof == b.proof
    from node.trainer import start_state_hash

    check_structure(a.proof, start_state_hash(start), spec.spec_hash())
    _, verdicts = bench.traced_with_verdicts(spec, start, honest_step, verify_threads=1)
    assert verdicts == [True] * STEPS


@pytest.mark.parametrize("make", [adversary.SkipSteps, adversary.OtherData, adversary.FakeLoss, adversary.LowPrecision,
                                  adversary.Extrapolate])
def test_sparse_cheats_fail_exactly_where_they_cheated(make) -> None:  # type: ignore[no-untyped-def]
    start = init_state(TINY, 0)
    spec = _spec(2)
    bad = bad_step_set(spec, 0.05, 9)
    assert len(bad) == 3
    trace, verdicts = bench.traced_with_verdicts(spec, start, make(bad))
    failing = {i for i, ok in enumerate(verdicts) if not ok}
    assert failing == set(bad), make.__name__
    assert trace.proof.segments[0].start_hash == train_traced(spec, start).proof.segments[0].start_hash


def test_a_skipped_step_is_an_update_outlier_but_an_extrapolated_one_is_not() -> None:
    """The update measure sees a step that did not move the model, so the marketplace replays it beyond the budget;
    a cheat that repeats the previous update instead hides from that measure, and only the uniform draw (and the
    stake) stands against it: the bench's ``extrapolate`` row."""
    from protocol.verification import update_outliers

    start = init_state(TINY, 0)
    spec = _spec(4)
    bad = bad_step_set(spec, 0.05, 9)
    seen = {}
    for make in (adversary.SkipSteps, adversary.Extrapolate):
        norms: list[float] = []
        _, verdicts = bench.traced_with_verdicts(spec, start, make(bad), norms=norms)
        assert {i for i, ok in enumerate(verdicts) if not ok} == set(bad) and len(norms) == STEPS
        seen[make.__name__] = set(update_outliers(norms))
    assert seen == {"SkipSteps": set(bad), "Extrapolate": set()}


def test_whole_unit_cheats_fail_everywhere_and_replay_old_fails_its_start() -> None:
    start = init_state(TINY, 0)
    spec = _spec(3)
    _, rnd = bench.traced_with_verdicts(spec, start, adversary.RandomWeights())
    _, copied = bench.traced_with_verdicts(spec, start, adversary.OtherData(frozenset(range(STEPS))))
    _, old = bench.traced_with_verdicts(spec, start, honest_step, first_state=fresh_state(init_state(TINY, 99)))
    assert not any(rnd) and not any(copied)
    assert old == [False] + [True] * (STEPS - 1)  # honest steps from the wrong start: only segment 0 betrays it


def test_replayer_rejects_a_revealed_state_that_is_not_the_committed_one() -> None:
    start = init_state(TINY, 0)
    spec = _spec(4)
    trace = train_traced(spec, start)
    assert check_state(spec, trace.proof, 0, fresh_state(start)).ok
    v = check_state(spec, trace.proof, 1, fresh_state(start))  # segment 1 does not start from the fresh state
    assert not v.ok and "committed start" in v.reason


def test_proof_bench_runs_at_toy_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    rc = bench.main(["--steps", "64", "--trials", "20", "--pool", "1", "--honest-units", "4", "--honest-steps", "4",
                     "--overhead-steps", "16", "--repeats", "1", "--fraction", "0.05", "--cross-units", "2",
                     "--cross-cheat-units", "1", "--cross-steps", "16", "--cross-seg", "4", "--cal-units", "1",
                     "--cost-steps", "16", "--cost-repeats", "1", "--job-steps", "15", "--job-repeats", "2",
                     "--build-units", "1", "--build-cheat-units", "1"])
    assert rc == 0
    fig = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("min_caught_rate", "false_slash", "verify_cost_ratio", "proof_overhead", "lazy_verifier_caught_rate"):
        assert key in fig
    assert 0 < fig["proof_overhead_default_job"] < 10 and len(fig["proof_overhead_default_job_runs"]) == 2
    assert 0 < fig["proof_stall_default_job"] < 0.5  # the trainer's own loop, not the background hashing
    assert 0 < fig["verify_cost_ratio"] and 0 < fig["verify_cost_ratio_wall"]
    # where a replayed segment's compute goes: a training step besides loading the state and its two digests
    assert 0 < fig["verify_load_steps"] + 2 * fig["verify_digest_steps"] < fig["verify_segment_steps"]
    assert fig["state_hash_vs_sha256"] > 0
    assert fig["honest_verifier_canaries"] > 0 and fig["honest_verifier_canary_errors"] == 0  # real replays
    assert 0 <= fig["canaries_declined"] < fig["honest_verifier_canaries"]  # most segments make a canary, even short ones
    assert fig["lazy_verifier_caught_rate"] == 1.0 and 1 <= fig["lazy_verifier_tasks_to_catch_max"] <= 500
    assert fig["verify_cost_ratio_with_canaries"] > fig["verify_cost_ratio"]
    assert fig["false_slash"] == 0 and fig["honest_update_outliers"] == 0
    whole_unit = ("random_weights", "copied_weights", "replay_old")
    for whole in whole_unit:  # every segment is wrong: any replay sees it
        assert fig["adversaries"][whole]["caught_rate"] == 1.0
        # through a colluding verifier, only the referee's audits of its passes catch it: at this size (one challenge
        # a unit, plus its outliers) some units, not all
        assert 0 < fig["adversaries"][whole]["colluding_unit_catch_rate"] < 1
        assert fig["adversaries"][whole]["colluding_caught_rate"] > 0
        by = [fig["adversaries"][whole]["colluding_by_providers"][m] for m in ("2", "5", "10")]
        assert all(b["ring_share"] in (0.25, 0.5, 0.75, 1.0) and 0 < b["caught_rate"] <= 1 for b in by)
        # the ring its friend's only verifier, every segment faked: each of its passes is a fake, and the cheat is
        # caught only by an audit of one of them, which slashes the ring too: whenever the cheat is caught, the ring is
        assert fig["adversaries"][whole]["colluding_ring_slashed_rate"] == fig["adversaries"][whole][
            "colluding_caught_rate"]
        assert all(0 <= b["ring_slashed_rate"] <= 1 and b["ring_slashed_share"] in (0.25, 0.5, 0.75, 1.0) for b in by)
    # the cheat its plan's only provider (a plan of the ring's own naming), the ring its only verifier: its shares are
    # the same, yet the plan counts as AUDIT_PEERS providers' work, so most of its passes are audited. At the base
    # rate (0.1 a pass; a unit has at most 1 + UPDATE_OUTLIER_PICKS passes here) no more than 1 - 0.9^3 = 0.271 of
    # its units could be caught
    alone = [fig["adversaries"][w]["colluding_unit_catch_rate"] for w in whole_unit]
    assert sum(alone) / len(alone) > 0.4, alone
    # (the cheat one of several providers on its plan: its passes' odds rise with the ring's share of its checking
    # over its share of the plan's, from a prior of AUDIT_PRIOR checks for each of 11 verifiers, which these few
    # toy units barely pass: test_verification's audit-rate test and the full-size bench show it)
    assert fig["audit_rate"] == 0.1 and fig["colluding_min_caught_rate"] <= fig["min_caught_rate"]
    assert set(fig["colluding_min_caught_rate_by_providers"]) == {"2", "5", "10"}
    assert set(fig["colluding_min_ring_slashed_rate_by_providers"]) == {"2", "5", "10"}
    # the minima are over every adversary (a whole-unit cheat's ring is slashed whenever the cheat is caught, above)
    advs = fig["adversaries"].values()
    assert fig["colluding_min_ring_slashed_rate"] == min(r["colluding_ring_slashed_rate"] for r in advs) <= min(
        fig["adversaries"][w]["colluding_caught_rate"] for w in whole_unit)
    assert fig["colluding_min_ring_slashed_rate_by_providers"] == {
        m: min(r["colluding_by_providers"][m]["ring_slashed_rate"] for r in advs) for m in ("2", "5", "10")}
    # an honest market of ten providers on the plan pays a little over the base rate for audits (chance shares over
    # the fair one), not double; a thin one more: AUDIT_PEERS x the base for a plan of one provider (capped at every
    # pass), falling with more (10 providers count as AUDIT_PEERS: 1.2 x the base)
    assert all(0.1 <= r < 0.15 for r in fig["honest_audit_rate"].values())
    by_providers = fig["honest_audit_rate_by_providers"]
    assert by_providers["10"] == fig["honest_audit_rate"] and list(by_providers) == ["1", "2", "5", "10"]
    assert all(0.99 < r <= 1 for r in by_providers["1"].values())
    assert all(0.55 < r < 0.65 for r in by_providers["2"].values())
    assert fig["audit_cost_ratio"] == round(fig["verify_cost_ratio"] * max(fig["honest_audit_rate"].values()), 4)
    cost = fig["audit_cost_ratio_by_providers"]
    assert cost["10"] == fig["audit_cost_ratio"] < cost["1"]
    # 64 segments at the standard rate buy one challenge, drawn uniformly: a sparse cheat (5% of the segments) is
    # caught in about one unit of 16 at this size, which is why real units are long (the full-size bench shows them
    # caught); except a skipped step, whose segment's model did not move: an update outlier, replayed on top of the
    # budget every time
    assert fig["adversaries"]["skip_steps"]["unit_catch_rate"] == 1.0
    for sparse in ("fake_loss", "low_precision", "extrapolate"):  # extrapolate: a skip that hides its update
        assert 0 <= fig["adversaries"][sparse]["unit_catch_rate"] < 0.5, sparse
    assert fig["verify_challenges"] == 1  # an honest unit: one segment, no update outlier
    cross = fig["cross_plan"]  # verification on another execution plan: tolerance, bisection, referee
    assert cross["bit_identical_segments"] == 0 and cross["false_slash"] == 0
    assert cross["honest_worst_over_tolerance"] < 1 and cross["referee_honest_worst_over_tolerance"] < 1
    assert 0 <= cross["scan_honest_worst_over_threshold"] < 1  # the loss scan, forced on one honest segment per unit
    assert cross["adversaries"]["fake_loss"]["slashed_rate"] == 1.0
    assert cross["min_slashed_rate"] == 1.0 and cross["referee_margin_min"] > 1
    for name, r in cross["adversaries"].items():
        assert r["detected_rate"] == r["bisected_to_faked_step"] == 1.0, name
    same = fig["same_plan"]  # a verifier on the provider's own plan: bit for bit, a faked step cannot hide
    assert same["plan"] == "cpu/mb2" and same["honest_segments"] == 8 == same["bit_identical"]
    assert same["false_disputes"] == 0 and same["min_detected_rate"] == 1.0
    assert same["adversaries"]["fake_loss"]["by"] == {"loss": 1}  # honest states on its plan, a lie in the loss
    other = fig["cross_build"]  # the same plan on other kernels (a child on ATen's scalar kernels)
    assert other["other_kernels"] != other["here"] and other["honest_segments"] == 4
    assert other["bit_identical"] == 0 and other["false_slash"] == 0 and other["one_step_line_used"] < 1
    for name in ("fake-loss", "skip-last-update"):
        assert other["adversaries"][name]["convicted_rate"] == 1.0, name
    pool = other["referee_pool"]  # a referee pool (and a verifier) on those kernels: bit for bit, in another child
    assert pool["honest_bit_identical"] == 4 and pool["false_slash"] == 0
    assert all(r["convicted_rate"] == 1.0 for r in pool["adversaries"].values()), pool


def test_gpu_bench_code_runs_on_the_cpu_at_toy_sizes() -> None:
    """``--device cuda`` runs only on the GPU machine, a few minutes a session at best: the same code (run_gpu,
    gpu_overhead, the device trainer's overhead, cross-device verification) runs here on the CPU at toy sizes, so a
    typo cannot cost that run. The async hash is checked against the synchronous one inside (it raises)."""
    import argparse

    from node.model import ModelConfig

    a = argparse.Namespace(gpu_steps=4, gpu_commit_every=2, no_compile=True, repeats=1, job_steps=15, job_repeats=2,
                           cross_units=1, cross_cheat_units=1, cross_steps=8, cross_seg=4, cal_units=1,
                           cross_precision="fp32")
    lines: list[str] = []
    fig = bench.run_gpu(a, lines.append, device="cpu", model=ModelConfig(d_model=32, n_layer=1, n_head=2, ctx=32))
    assert fig["device"].startswith("cpu") and fig["compile"] is False and fig["commit_every"] == 2
    assert 0 < fig["proof_overhead"] < 10 and len(fig["proof_overhead_runs"]) == 1
    # the last commitment's hash, after the last step, is its own latency: end to end can only be slower
    assert fig["final_commit_s"] >= 0 and 0 < fig["proof_overhead_end_to_end"] <= fig["proof_overhead"] * 1.01
    assert fig["gpu_replay_bitwise"] is True  # deterministic algorithms, same device: bit for bit
    spent = fig["overhead_detail"]  # per-step times and the hasher's stage totals, the two windows' commitments
    assert spent["step_ms_plain"] > 0 and spent["step_ms_committed"] > 0 and spent["hash_ms"] > 0
    assert spent["submit_ms"] > 0 and spent["after_commit_extra_ms"] is not None
    assert fig["default_job_plan"] == "cpu" and len(fig["proof_overhead_default_job_runs"]) == 2
    assert fig["cross_device"]["false_slash"] == 0 and fig["cross_device"]["min_slashed_rate"] == 1.0
    bf16 = fig["cross_device_bf16"]  # fp8 hides in bf16 drift across plans (known); a faked loss is scanned
    assert bf16["precision"] == "bf16" and bf16["false_slash"] == 0
    for name in ("skip_steps", "random_weights", "copied_weights", "replay_old", "fake_loss"):
        assert bf16["adversaries"][name]["slashed_rate"] == 1.0, name
    assert any("proof overhead on a default job on cpu" in line for line in lines)
    for prec in ("fp32", "bf16"):  # on the provider's own device (here the CPU plan): bit for bit
        same = fig[f"same_device_{prec}"]
        assert same["precision"] == prec and same["false_disputes"] == 0 and same["min_detected_rate"] == 1.0


def test_gpu_bench_measures_eager_when_torch_compile_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failing torch.compile (no Triton, no compiler) must not cost the GPU session its figures."""
    from node import gpu_bench
    from node.model import ModelConfig

    def broken(model: object) -> object:
        def call(*args: object) -> object:
            raise RuntimeError("no compiler here")
        return call

    monkeypatch.setattr(gpu_bench.torch, "compile", broken)
    fig = gpu_bench.gpu_overhead(steps=2, commit_every=1, repeats=1, device="cpu", warmup=1, log=lambda s: None,
                                 cfg=ModelConfig(d_model=32, n_layer=1, n_head=2, ctx=32))
    assert fig["compile"] is False and "no compiler here" in fig["compile_error"]
    # measured, eagerly: a positive finite ratio (of 2 steps: any value under load; a fresh-clone CI saw 15.8)
    assert 0 < fig["proof_overhead"] < math.inf and fig["gpu_replay_bitwise"] is True


def test_a_failing_gpu_bench_section_keeps_the_others_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from node.model import ModelConfig

    def broken(*args: object, **kw: object) -> object:
        raise RuntimeError("deterministic kernel missing")

    monkeypatch.setattr(bench, "trainer_overhead", broken)
    a = argparse.Namespace(gpu_steps=2, gpu_commit_every=1, no_compile=True, repeats=1, job_steps=15, job_repeats=1,
                           cross_units=0)
    lines: list[str] = []
    fig = bench.run_gpu(a, lines.append, device="cpu", model=ModelConfig(d_model=32, n_layer=1, n_head=2, ctx=32))
    assert fig["errors"] == {"trainer_overhead": "RuntimeError: deterministic kernel missing"}
    assert 0 < fig["proof_overhead"] < 10 and "proof_overhead_default_job" not in fig
    # a run cut off at the GPU machine's time limit still has each finished section's figures in its log
    so_far = [json.loads(s.split(": ", 1)[1]) for s in lines if s.startswith("figures so far: ")]
    assert [sorted(f) == sorted(fig) for f in so_far] == [False, True]
    assert so_far[0]["proof_overhead"] == fig["proof_overhead"] and "errors" not in so_far[0]


def test_proof_bench_drift_section_runs_at_toy_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    """The honest-drift section (demo-shaped jobs on micro-batches checked on the CPU; every dispute refereed, one
    segment per unit loss-scanned) runs end to end and slashes no one."""
    rc = bench.main(["--only-drift", "--drift-jobs", "1", "--drift-shapes", "8x4x4"])
    assert rc == 0
    fig = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["drift"]
    assert fig["drift_segments"] == 6 and fig["drift_false_slash"] == 0 and fig["drift_verifiers_benched"] == 0
    assert 0 <= fig["drift_scan_worst"] < 1 and fig["drift_precision"] == "fp32"


def test_gpu_overhead_attribution_from_step_times() -> None:
    """Where the commitments' time went, from per-step times: here each commitment makes the step after it 4 ms
    slower and nothing else, so all of the cost is that step's (and the per-commitment cost is exactly 4 ms)."""
    from node.gpu_bench import where_the_time_went

    plain = [[10.0] * 12, [10.0] * 12]
    # commitments after steps 4, 8 and 12: the steps at indices 4 and 8 follow one; nothing follows the last
    committed = [[14.0 if j and j % 4 == 0 else 10.0 for j in range(12)]]
    t = {"submitted": 3, "hashed": 3, "submit_s": 0.003, "backpressure_s": 0.0, "copy_wait_s": 0.06,
         "hash_s": 0.09, "then_s": 0.0}
    got = where_the_time_went(plain, committed, 4, t)
    assert got["step_ms_plain"] == 10.0 and got["after_commit_extra_ms"] == 4.0
    assert got["other_step_extra_ms"] == 0.0 and got["commit_cost_ms"] == 4.0
    assert got["submit_ms"] == 1.0 and got["copy_wait_ms"] == 20.0 and got["hash_ms"] == 30.0
    spread = [[11.0] * 12]  # a uniform 10% slowdown: none of it after the commitments in particular
    got = where_the_time_went(plain, spread, 4, t)
    assert got["after_commit_extra_ms"] == 1.0 and got["other_step_extra_ms"] == 1.0
