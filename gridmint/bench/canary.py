"""``gridmint bench canary``: can a lazy verifier tell a canary from a real task without replaying it, and does an
honest verifier on another plan still flag every canary?

A canary (:mod:`marketplace.canary`) is a real task whose claimed end state is forged. The verifier holds the
segment's start checkpoint, the claimed end checkpoint (a verifier on another plan downloads it) and the public spec
(lr, segment length, data order). From those alone it can compute cheap features of the claimed segment and skip
replaying the tasks that look honest. This bench trains honest units of the default job shape and, for every
segment, computes those features for the real end, for :func:`marketplace.canary.forge`'s forgery (``canary``: the
segment trained again, :func:`marketplace.canary.retrained`), for its elementwise one (``elementwise``: made-up
gradients, :func:`marketplace.canary.carried`, what a bf16 job or one too large to train again gets), and for the
forgeries before them, measured in the same run as baselines: ``two_segments_on`` (the state two segments on; another
unit's final state for a last segment) and ``stop27`` (the start moved by a neighbour's update, with another state's
own moments). The features:

* ``movement``: how far the weights moved, over ``lr x segment_len x sqrt(parameters)`` (Adam moves each weight by
  about lr a step);
* ``movement_vs_adam``: how far the weights moved, over ``segment_len`` x Adam's step predicted from the end's
  moments;
* ``cos_update_end_moment``: the cosine between the weights' move and the end moments' step direction;
* ``v_drift`` / ``m_drift``: how far the second / first moments moved, relative to the start's;
* ``cs_near``: the share of second-moment entries whose first moment's gain lies near its Cauchy-Schwarz bound
  (``gain ** 2 >= 0.9 x C x`` the second's gain, :func:`marketplace.canary.moment_cs_sides`; ``moment_cs`` counts
  those past 1),
  which made-up steps that must raise the second moments to carry the first ones leave more of (statistical);
* ``loss_drop_last``: how far the loss on the segment's last batch fell from the start to the end (two forward
  passes: a few percent of a replay); ``loss_recency``: that less the fall on its first batch (an honest end
  trained on the last batch most recently);
* ``moment_floor``: the share of second-moment entries below the floor ``segment_len`` AdamW steps leave of the
  start's (:func:`marketplace.canary.moment_floor_breaches`). Not statistical: an honest end has none, so any breach
  tells a forgery for sure (``told_by_moment_floor``: the share of each kind's ends with one; of honest ends, too);
* ``step_bound``: the share of weights that moved farther than ``segment_len`` AdamW steps from the start's moments
  can move them, whatever the gradients (:func:`marketplace.canary.step_bound_breaches`); exact too
  (``told_by_step_bound``);
* ``idle_rows``: input-embedding rows of bytes the segment's batches never hold (public: the data order) that are
  not where AdamW with zero gradients takes them (:func:`marketplace.canary.idle_row_breaches`); exact
  (``told_by_idle_rows``; ``told_exactly``: by any of the three).

Not free: ``told_by_replaying``, what a verifier that replays the first j steps of the segment (j/``segment_len`` of
the work; j = 1 and half the segment) tells exactly by running those tests from the state it reached
(:func:`replay_breaches`). A canary's first steps are the true ones (``canary_prefix_mean``: how many, on average), so
a partial replay tells only those it replayed past.

Figures: for each feature and each forgery, the AUC of telling it from an honest end (0.5: no tell; 1.0: every
forgery told; folded, so a tell either way counts, and the feature's distance from the honest median too, so a
spread to both sides counts: :func:`tell`). Then ``margins``: how far past its calibrated tolerance an
honest verifier on another plan (cpu/mb2 checking a cpu unit) finds each forgery, in fp32 (retrained) and bf16
(elementwise: :func:`marketplace.canary.retrainable`). A margin
below 1 means the verifier approves it. ``approved`` counts those for canaries made up from the segment's start
(no true prefix), and must be 0; ``approved_prefixed`` for canaries as planted (a random true prefix: the longer, the
closer to the truth), each excused by the referee as long as it lies within twice the tolerance of the truth. ``from_truth``: how far each
forgery lies from the true end, in the same tolerances; the referee voids a canary a verifier on another plan
approved where that is at most :data:`marketplace.referee.CANARY_EXCUSE_FACTOR` (an honest replay might have
approved it): ``void_for_cross_plan`` counts those, canaries that cannot catch a lazy verifier on that plan.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor

from marketplace import canary, referee
from marketplace.blobs import BlobStore
from node import checkpoint, data
from node import crosscheck as cc
from node.model import ModelConfig, build_model, init_state
from node.trainer import ADAMW_BETAS, ADAMW_EPS, UnitSpec, model_only, state_hash, step_batch, train_unit
from protocol.proof import TrainingProof, make_proof

FEATURES = ("movement", "movement_vs_adam", "cos_update_end_moment", "v_drift", "m_drift", "cs_near", "loss_drop_last",
            "loss_recency", "moment_floor", "moment_cs", "step_bound", "idle_rows")
#: the forgeries measured against the honest ends: the canary as planted on this job (retrained), the elementwise
#: one (made-up gradients: bf16 jobs, and those too large to train again) and the two before them
KINDS = ("canary", "elementwise", "two_segments_on", "stop27")
#: the exact tests (an honest end fails none): any failure tells a forgery for sure
EXACT = ("moment_floor", "moment_cs", "step_bound", "idle_rows")


def _loss(spec: UnitSpec, state: Mapping[str, Tensor], step: int) -> float:
    """The loss of ``state``'s model on the batch of step ``step`` (public: the spec's data order): a forward pass."""
    model = build_model(spec.model, model_only(state))
    x, y = data.make_batch(data.train_tokens(), step_batch(spec, step), spec.model.ctx)
    with torch.no_grad():
        return float(model.loss(x, y))


def features(spec: UnitSpec, start: Mapping[str, Tensor], end: Mapping[str, Tensor], seg: int) -> dict[str, float]:
    """What a verifier can compute from a segment's start and claimed end checkpoints and the spec (module doc)."""
    first, last = seg * spec.segment_len, (seg + 1) * spec.segment_len - 1
    drop_last = _loss(spec, start, last) - _loss(spec, end, last)
    drop_first = _loss(spec, start, first) - _loss(spec, end, first)
    ps = model_only(start)
    names = sorted(ps)
    pe = model_only(end)

    def flat(state: Mapping[str, Tensor], fmt: str) -> Tensor:
        return torch.cat([state[fmt.format(n)].double().flatten() for n in names])

    dp = flat(pe, "{}") - flat(ps, "{}")
    steps = float(next(v for k, v in end.items() if k.endswith(".step")))
    (b1, b2), eps = ADAMW_BETAS, ADAMW_EPS
    m, v = flat(end, "optim.{}.exp_avg"), flat(end, "optim.{}.exp_avg_sq")
    ms, vs = flat(start, "optim.{}.exp_avg"), flat(start, "optim.{}.exp_avg_sq")
    step = spec.lr * (m / (1 - b1 ** steps)) / ((v / (1 - b2 ** steps)).sqrt() + eps)
    tiny = 1e-30
    cs_lhs, cs_rhs = canary.moment_cs_sides(spec, start, end)
    return {
        "movement": float(dp.norm()) / (spec.lr * spec.segment_len * math.sqrt(dp.numel())),
        "movement_vs_adam": float(dp.norm()) / (spec.segment_len * float(step.norm()) + tiny),
        "cos_update_end_moment": float(-(dp @ step) / (dp.norm() * step.norm() + tiny)),
        "v_drift": float((v - vs).norm() / (vs.norm() + tiny)),
        "m_drift": float((m - ms).norm() / (ms.norm() + tiny)),
        "cs_near": float((cs_lhs >= 0.9 * cs_rhs).double().mean()),
        "loss_drop_last": drop_last,
        "loss_recency": drop_last - drop_first,
        "moment_floor": canary.moment_floor_breaches(spec, start, end) / v.numel(),
        "moment_cs": canary.moment_cs_breaches(spec, start, end) / v.numel(),
        "step_bound": canary.step_bound_breaches(spec, start, end) / v.numel(),
        "idle_rows": float(canary.idle_row_breaches(spec, seg, start, end)),
    }


@contextmanager
def elementwise(on: bool = True) -> Iterator[None]:
    """Canaries forged elementwise (:func:`marketplace.canary.carried`) in the block, as for a job too large to
    train again (``canary.BUDGET`` 0: no true prefix either)."""
    budget = canary.BUDGET
    if on:
        canary.BUDGET = 0
    try:
        yield
    finally:
        canary.BUDGET = budget


def auc(honest: list[float], forged: list[float]) -> float:
    """P(a forgery's feature > an honest one's), ties half, folded to >= 0.5 (a tell in either direction)."""
    a = sum((f > h) + 0.5 * (f == h) for f in forged for h in honest) / (len(forged) * len(honest))
    return round(max(a, 1 - a), 3)


def tell(honest: list[float], forged: list[float]) -> float:
    """The stronger of two tells: :func:`auc` of the feature itself, and of its distance from the honest median (a
    verifier that replays the tasks that look odd either way: forgeries spread to both sides of the honest ends, as
    the end moments' cosine does with the prefix, are told by that more than by the first)."""
    med = statistics.median(honest)
    return max(auc(honest, forged), auc([abs(x - med) for x in honest], [abs(x - med) for x in forged]))


def two_segments_on(states: list[dict[str, Tensor]], seg: int, sibling_final: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The forgery before: the state two segments on (for a last segment another unit's final state), with the true
    end's step counters."""
    source = sibling_final if seg + 2 >= len(states) else states[seg + 2]
    return {k: v if k.endswith(".step") else source[k] for k, v in states[seg + 1].items()}


def replay_breaches(spec: UnitSpec, seg: int, start: Mapping[str, Tensor], end: Mapping[str, Tensor], j: int) -> int:
    """A verifier that replays the segment's first ``j`` steps (``j / segment_len`` of a replay) holds the exact state
    there, and can run the exact tests from it over the steps left: the moment floor, Cauchy-Schwarz on the moments
    and the step bound (:mod:`marketplace.canary`). An honest end passes them; how many entries of ``end`` do not."""
    after = canary.true_prefix(spec, seg, start, j)
    rest = replace(spec, steps=spec.segment_len - j, segment_len=spec.segment_len - j)
    return (canary.moment_floor_breaches(rest, after, end) + canary.moment_cs_breaches(rest, after, end)
            + canary.step_bound_breaches(rest, after, end))


def stop27(states: list[dict[str, Tensor]], seg: int) -> dict[str, Tensor]:
    """The forgery of stop 27 (the one this stop replaced): the start moved by the next segment's update, with the
    state further on's own moments (a last segment: the update before, the moments of the state before the start)."""
    start = states[seg]
    before, after, moments = ((states[seg + 1], states[seg + 2], states[seg + 2]) if seg + 2 < len(states)
                              else (states[seg - 1], start, states[seg - 1]))
    return {k: v if k.endswith(".step") else moments[k] if not k.startswith("model.")
            else (start[k].double() + after[k].double() - before[k].double()).to(v.dtype)
            for k, v in states[seg + 1].items()}


def claiming(proof: TrainingProof, seg: int, end: Mapping[str, Tensor]) -> TrainingProof:
    """``proof`` with segment ``seg`` claimed to end in ``end`` (the next segment starting there)."""
    h = state_hash(end)
    segments = list(proof.segments)
    segments[seg] = replace(segments[seg], end_hash=h)
    if seg + 1 < len(segments):
        segments[seg + 1] = replace(segments[seg + 1], start_hash=h)
    return make_proof(unit_id=proof.unit_id, spec_hash=proof.spec_hash, seed=proof.seed, steps=proof.steps,
                      segment_len=proof.segment_len, segments=segments)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="gridmint bench canary", description=__doc__.split("\n\n")[0])
    p.add_argument("--units", type=int, default=4)
    p.add_argument("--segments", type=int, default=12, help="segments per unit (>= 3)")
    p.add_argument("--segment-len", type=int, default=15)
    p.add_argument("--margin-segments", type=int, default=6, help="segments of the fp32 and bf16 margin units")
    p.add_argument("--small", action="store_true", help="a toy model (the test's size)")
    a = p.parse_args(argv)
    if a.segments < 3 or a.units < 2 or a.margin_segments < 3:
        raise SystemExit("--segments and --margin-segments must be >= 3, --units >= 2")
    log: Callable[[str], None] = lambda s: print(s, flush=True)
    t0 = time.perf_counter()
    cfg = ModelConfig(d_model=32, n_layer=1, n_head=2, ctx=32) if a.small else ModelConfig()
    start = init_state(cfg, 7)
    base = UnitSpec(job_id="bench-canary", unit_id="0x" + "11" * 32, round=0, shard=0, n_shards=a.units, model=cfg,
                    steps=a.segment_len * a.segments, segment_len=a.segment_len, batch_size=16, lr=3e-3, seed=5,
                    threads=1)
    out: dict[str, Any] = {"model_params": sum(t.numel() for t in start.values()), "segment_len": a.segment_len}
    with tempfile.TemporaryDirectory() as tmp:
        store = BlobStore(Path(tmp) / "blobs")
        units = []
        for u in range(a.units):
            spec = replace(base, unit_id="0x" + f"{u + 0x21:02x}" * 32, shard=u)
            r = train_unit(spec, start, Path(tmp) / f"unit{u}")
            units.append((spec, r, [store.put_file(x) for x in r.segment_paths], store.put_file(r.final_path)))
        log(f"trained {a.units} units of {a.segments} segments of {a.segment_len} steps "
            f"({out['model_params']:,} parameters) in {time.perf_counter() - t0:.1f} s")
        rows: dict[str, list[dict[str, float]]] = {"honest": [], **{kind: [] for kind in KINDS}}
        declined, prefixes = 0, []
        replayed = (1, a.segment_len // 2)
        for i, (spec, r, blobs, final) in enumerate(units):
            sib_spec, sib_r, sib_blobs, sib_final = units[(i + 1) % a.units]
            states = [checkpoint.load(x)[0] for x in r.segment_paths] + [checkpoint.load(r.final_path)[0]]
            for seg in range(1, a.segments):  # segment 0 starts from zero moments: a population of its own
                rows["honest"].append(features(spec, states[seg], states[seg + 1], seg))
                rows["two_segments_on"].append(features(spec, states[seg], two_segments_on(
                    states, seg, checkpoint.load(sib_r.final_path)[0]), seg))
                rows["stop27"].append(features(spec, states[seg], stop27(states, seg), seg))
                for kind, end in (("honest", states[seg + 1]), ("stop27", stop27(states, seg))):
                    for j in replayed:
                        rows[kind][-1][f"replay_{j}"] = float(replay_breaches(spec, seg, states[seg], end, j))
                for kind in ("canary", "elementwise"):
                    with elementwise(kind == "elementwise"):
                        fake = canary.forge(spec, r.proof, seg, blobs, final, store, (sib_blobs[seg], sib_final))
                    if fake is None:
                        declined += 1
                        continue
                    forged = checkpoint.load(store.path(fake["end_blob"]))[0]
                    rows[kind].append(features(spec, states[seg], forged, seg))
                    for j in replayed:
                        rows[kind][-1][f"replay_{j}"] = float(replay_breaches(spec, seg, states[seg], forged, j))
                    if kind == "canary":
                        prefixes.append(fake["prefix"])
        out["segments"] = {k: len(v) for k, v in rows.items()}
        out["declined"] = declined
        out["tell_auc"] = {f: {kind: tell([x[f] for x in rows["honest"]], [x[f] for x in rows[kind]])
                               for kind in KINDS} for f in FEATURES}
        out["tell_auc_max"] = {kind: max(v[kind] for v in out["tell_auc"].values()) for kind in KINDS}
        for f in EXACT:
            out[f"told_by_{f}"] = {kind: round(sum(x[f] > 0 for x in v) / len(v), 3) for kind, v in rows.items() if v}
        out["told_by_replaying"] = {
            f"{j}_of_{a.segment_len}_steps": {kind: round(sum(x.get(f"replay_{j}", 0) > 0 for x in v) / len(v), 3)
                                              for kind, v in rows.items() if v and kind != "two_segments_on"}
            for j in replayed}
        out["canary_prefix_mean"] = round(sum(prefixes) / max(1, len(prefixes)), 2)
        out["told_exactly"] = {kind: round(sum(any(x[f] > 0 for f in EXACT) for x in v) / len(v), 3)
                               for kind, v in rows.items() if v}
        log(f"tell (AUC, 0.5 = none): {json.dumps(out['tell_auc'])}")

        margins: dict[str, dict[str, list[float]]] = {"canary": {}, "canary_prefixed": {}, "two_segments_on": {}}
        from_truth: dict[str, dict[str, list[float]]] = {"canary": {}, "canary_prefixed": {}, "two_segments_on": {}}
        void = {"canary": 0, "canary_prefixed": 0, "two_segments_on": 0}
        approved = {"canary": 0, "canary_prefixed": 0, "two_segments_on": 0}
        plan = cc.Plan.parse("cpu/mb2")
        for prec in ("fp32", "bf16"):
            spec = replace(base, steps=a.segment_len * a.margin_segments, precision=prec)
            r = train_unit(spec, start, Path(tmp) / f"margin-{prec}")
            blobs, final = [store.put_file(x) for x in r.segment_paths], store.put_file(r.final_path)
            states = [checkpoint.load(x)[0] for x in r.segment_paths] + [checkpoint.load(r.final_path)[0]]
            tol = cc.tolerance_for(spec, plan)
            got: dict[str, list[float]] = {"canary": [], "canary_prefixed": [], "two_segments_on": []}
            far: dict[str, list[float]] = {"canary": [], "canary_prefixed": [], "two_segments_on": []}
            for seg in range(a.margin_segments):  # the canary's last segment is a backward forgery
                forged = {}
                if seg < a.margin_segments - 1:  # (the baseline has no last-segment forgery without a sibling)
                    forged["two_segments_on"] = two_segments_on(states, seg, states[-1])
                for kind, k in (("canary", 0), ("canary_prefixed", None)):  # made up from the start; as planted
                    fake = canary.forge(spec, r.proof, seg, blobs, final, store, prefix=k)
                    if fake is not None:
                        forged[kind] = checkpoint.load(store.path(fake["end_blob"]))[0]
                for kind, end in forged.items():
                    v = cc.check_segment_across(spec, claiming(r.proof, seg, end), seg, states[seg], end, tol,
                                                cc.PlanRunner(spec, states[seg], plan))
                    approved[kind] += int(v.ok)
                    got[kind].append(round(v.margin, 2) if not v.ok else 0.0)
                    far[kind].append(round(cc.distance(states[seg + 1], end) / v.threshold, 2))
            for kind in got:
                margins[kind][prec] = got[kind]
                from_truth[kind][prec] = far[kind]
                void[kind] += sum(x <= referee.CANARY_EXCUSE_FACTOR for x in far[kind])
            log(f"{prec}: an honest cpu/mb2 verifier finds the canaries {got['canary']} x past its tolerance (the "
                f"forgery before: {got['two_segments_on']})")
        out["margins"] = margins
        out["margin_min"] = {kind: {k: min(v) for k, v in m.items() if v} for kind, m in margins.items()}
        out["from_truth"] = from_truth
        out["void_for_cross_plan"] = void
        out["approved"] = approved["canary"]
        out["approved_prefixed"] = approved["canary_prefixed"]
        out["approved_two_segments_on"] = approved["two_segments_on"]
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out))
    return 0
