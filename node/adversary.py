"""Dishonest trainers, for tests and demos: each has :func:`node.trainer.train_unit`'s signature.

Each cheat is as good as a real cheater could make it: the proofs pass :func:`protocol.proof.check_structure`
(start from the right global state, contiguous hash chain, right segment count, correct Merkle root) and
every uploaded checkpoint hashes to what was committed. Only a replay of a segment exposes them.

* ``skip-steps``: does half the optimizer steps of every segment and commits the result as if it had done all.
* ``random-weights``: commits a chain of random states (each saved, so checkpoints match their hashes).
* ``replay-old``: trains another unit (other shard; or other seed if there is one shard), then relabels that
  result as this unit's (new unit id, spec hash, seed and the batch digests this unit should have had).
* ``replay-old-verbatim``: hands in the other unit's proof unchanged; :func:`check_structure` catches it.
* ``idle-segment``: trains honestly but one segment (the middle one), where it does no work at all and commits the
  previous segment's losses; it bumps AdamW's step counters so that segment's end state still differs from its
  start. A short unit's budget may never reach that segment; its update (zero) marks it for replay all the same.
* ``skip-last-update``: trains every step but skips the optimizer update of each segment's last step (it still
  computes that step's loss, so every committed loss is the honest one): only the states give it away, and across
  execution plans only a bisection down to that one step proves it.
* ``fake-loss``: trains honestly, on the plan it declares, but commits a loss 3% lower on one step (the middle step
  of the middle segment): every state is honest, only that segment's committed mean loss is not. In bf16 across
  plans the mean alone is no evidence (honest means drift further); the referee's step-by-step scan is.
* ``low-precision``: trains on the (CPU) plan it declares but runs the middle step of every segment in cheaper
  arithmetic (bf16 in an fp32 job, float8 weights in a bf16 one). In a bf16 job that step lies inside the honest
  drift between plans: only a bit-for-bit replay on its own plan proves it (a verifier and a referee on that plan).
"""
from __future__ import annotations

import hashlib
import inspect
from dataclasses import replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from node import checkpoint
from node.trainer import (
    OnStep,
    TrainFn,
    UnitResult,
    UnitSpec,
    checkpoint_metadata,
    deterministic,
    expected_batch_digest,
    export_training_state,
    final_path,
    fresh_state,
    load_training_state,
    mean_loss_micro,
    model_only,
    segment_batches,
    segment_path,
    state_hash,
    PROVIDER_PLAN,
    Plan,
    plan_step,
    train_step,
    train_unit,
)
from node import data
from protocol.errors import GridMintValueError
from protocol.proof import SegmentCommit, TrainingProof, loss_to_micro, make_proof


def _finish(spec: UnitSpec, workdir: Path, commits: list[SegmentCommit], final_state: Mapping[str, Tensor],
            seg_paths: list[Path], losses: list[float]) -> UnitResult:
    fpath = final_path(workdir)
    checkpoint.save(fpath, final_state, checkpoint_metadata(spec, None))
    proof = make_proof(unit_id=spec.unit_id, spec_hash=spec.spec_hash(), seed=spec.seed, steps=spec.steps,
                       segment_len=spec.segment_len, segments=commits)
    final_model = {k: v.detach().clone() for k, v in model_only(final_state).items()}
    return UnitResult(fpath, seg_paths, proof, losses, final_model)


SegmentFn = Callable[[UnitSpec, int, torch.nn.Module, torch.optim.Optimizer], list[float]]


def _cheat_unit(spec: UnitSpec, start: Mapping[str, Tensor], workdir: Path, segment: SegmentFn,
                on_step: OnStep | None) -> UnitResult:
    """Run ``segment`` (what a cheat does in segment s; returns the losses it claims) over the unit and commit the
    states it really holds: a self-consistent chain of real checkpoints with the batch digests the spec dictates."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with deterministic(spec.threads):
        model, opt = load_training_state(spec, fresh_state(start))
        cur = state_hash(export_training_state(model, opt))
        commits, seg_paths, all_losses = [], [], []
        for s in range(spec.n_segments):
            path = segment_path(workdir, s)
            checkpoint.save(path, export_training_state(model, opt), checkpoint_metadata(spec, s))
            seg_paths.append(path)
            losses = segment(spec, s, model, opt)
            for k, loss in enumerate(losses):
                if on_step is not None:
                    on_step(s * spec.segment_len + k, loss)
            end = state_hash(export_training_state(model, opt))
            commits.append(SegmentCommit(s, cur, end, expected_batch_digest(spec, s), mean_loss_micro(losses)))
            all_losses += losses
            cur = end
        return _finish(spec, workdir, commits, export_training_state(model, opt), seg_paths, all_losses)


def _half_the_steps(spec: UnitSpec, s: int, model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[float]:
    losses: list[float] = []
    for step, offsets in segment_batches(spec, s)[:spec.segment_len // 2]:
        x, y = data.make_batch(data.train_tokens(), offsets, spec.model.ctx)
        losses.append(train_step(model, opt, x, y))
    fake = losses[-1] if losses else 5.0
    return losses + [fake] * (spec.segment_len - len(losses))  # claimed losses for the skipped steps


def _all_but_the_last_update(spec: UnitSpec, s: int, model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[float]:
    losses: list[float] = []
    batches = segment_batches(spec, s)
    for k, (step, offsets) in enumerate(batches):
        x, y = data.make_batch(data.train_tokens(), offsets, spec.model.ctx)
        if k < len(batches) - 1:
            losses.append(train_step(model, opt, x, y))
        else:  # the loss is the honest one (it is taken before the update); the update is skipped, but the
            with torch.no_grad():  # optimizer's step counters are bumped as if it had run
                losses.append(float(model.loss(x, y)))
                for st in opt.state.values():
                    st["step"] += 1
    return losses


def skip_steps(spec: UnitSpec, start: Mapping[str, Tensor], workdir: Path, *, on_step: OnStep | None = None) -> UnitResult:
    """Half the work per segment, a self-consistent chain of real states, full-work batch digests."""
    return _cheat_unit(spec, start, workdir, _half_the_steps, on_step)


def skip_last_update(spec: UnitSpec, start: Mapping[str, Tensor], workdir: Path, *,
                     on_step: OnStep | None = None) -> UnitResult:
    """Honest losses, one missing update per segment (the last step's backward and AdamW step)."""
    return _cheat_unit(spec, start, workdir, _all_but_the_last_update, on_step)


def random_weights(spec: UnitSpec, start: Mapping[str, Tensor], workdir: Path, *, on_step: OnStep | None = None) -> UnitResult:
    """No training: the honest start state, then a fabricated chain of random states with plausible losses."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(spec.unit_id.encode()).digest()[:7], "big"))
    state = fresh_state(start)
    cur = state_hash(state)
    commits, seg_paths, all_losses = [], [], []
    for s in range(spec.n_segments):
        path = segment_path(workdir, s)
        checkpoint.save(path, state, checkpoint_metadata(spec, s))
        seg_paths.append(path)
        state = {k: (torch.randn(v.shape, generator=gen) * 0.02 if k.startswith("model.") else v) for k, v in state.items()}
        end = state_hash(state)
        losses = [5.0 - 0.01 * (s * spec.segment_len + k) for k in range(spec.segment_len)]
        for k, loss in enumerate(losses):
            if on_step is not None:
                on_step(s * spec.segment_len + k, loss)
        commits.append(SegmentCommit(s, cur, end, expected_batch_digest(spec, s), loss_to_micro(sum(losses) / len(losses))))
        all_losses += losses
        cur = end
    return _finish(spec, workdir, commits, state, seg_paths, all_losses)


def _other_spec(spec: UnitSpec) -> UnitSpec:
    other_id = "0x" + hashlib.sha256(b"old" + spec.unit_id.encode()).hexdigest()
    if spec.n_shards > 1:
        return replace(spec, unit_id=other_id, shard=(spec.shard + 1) % spec.n_shards)
    return replace(spec, unit_id=other_id, seed=(spec.seed + 1) % 2**63)


def replay_old_verbatim(spec: UnitSpec, start: Mapping[str, Tensor], workdir: Path, *, on_step: OnStep | None = None) -> UnitResult:
    """The result of another unit, handed in as is."""
    return train_unit(_other_spec(spec), start, workdir, on_step=on_step)


def replay_old(spec: UnitSpec, start: Mapping[str, Tensor], workdir: Path, *, on_step: OnStep | None = None) -> UnitResult:
    """Another unit's real work, relabelled so that every structural check passes."""
    old = train_unit(_other_spec(spec), start, workdir, on_step=on_step)
    commits = [replace(c, batch_digest=expected_batch_digest(spec, c.index)) for c in old.proof.segments]
    proof = make_proof(unit_id=spec.unit_id, spec_hash=spec.spec_hash(), seed=spec.seed, steps=spec.steps,
                       segment_len=spec.segment_len, segments=commits)
    return replace(old, proof=proof)


def idle_segment(spec: UnitSpec, start: Mapping[str, Tensor], workdir: Path, *, on_step: OnStep | None = None) -> UnitResult:
    """Honest work but one idle segment (the middle one), with plausible losses and a moved step counter."""
    idle = spec.n_segments // 2
    last = [5.0] * spec.segment_len

    def segment(spec: UnitSpec, s: int, model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[float]:
        nonlocal last
        if s != idle:
            losses = []
            for step, offsets in segment_batches(spec, s):
                x, y = data.make_batch(data.train_tokens(), offsets, spec.model.ctx)
                losses.append(train_step(model, opt, x, y))
            last = losses
            return losses
        with torch.no_grad():  # no forward, no backward, no update: only the counters move
            for st in opt.state.values():
                st["step"] += spec.segment_len
        return list(last)

    return _cheat_unit(spec, start, workdir, segment, on_step)


def fake_step_loss(proof: TrainingProof, losses: Sequence[float], step: int,
                   factor: float = 0.97) -> tuple[TrainingProof, list[float]]:
    """The lie of a provider that fakes one step's loss: ``losses`` with step ``step``'s scaled by ``factor``, and
    ``proof`` with that segment's committed mean loss (and so the Merkle root) recomputed from them."""
    out = list(losses)
    out[step] *= factor
    s, n = step // proof.segment_len, proof.segment_len
    segs = list(proof.segments)
    segs[s] = replace(segs[s], loss_micro=mean_loss_micro(out[s * n:(s + 1) * n]))
    return make_proof(unit_id=proof.unit_id, spec_hash=proof.spec_hash, seed=proof.seed, steps=proof.steps,
                      segment_len=n, segments=segs), out


def fake_loss(spec: UnitSpec, start: Mapping[str, Tensor], workdir: Path, *, on_step: OnStep | None = None,
              plan: Plan = PROVIDER_PLAN) -> UnitResult:
    """Honest training on ``plan``; one step's committed loss 3% lower (the middle step of the middle segment)."""
    honest = train_unit(spec, start, workdir, on_step=on_step, plan=plan)
    step = spec.n_segments // 2 * spec.segment_len + spec.segment_len // 2
    proof, losses = fake_step_loss(honest.proof, honest.losses, step)
    return replace(honest, proof=proof, losses=losses)


def low_precision(spec: UnitSpec, start: Mapping[str, Tensor], workdir: Path, *, on_step: OnStep | None = None,
                  plan: Plan = PROVIDER_PLAN) -> UnitResult:
    """Trains on the CPU plan it declares, but runs the middle step of every segment in cheaper arithmetic
    (:class:`LowPrecision`: bf16 for an fp32 job, float8 weights for a bf16 one)."""
    if plan.device != "cpu":
        raise GridMintValueError(f"the low-precision cheat trains on CPU plans, not {plan.label}")

    def segment(spec: UnitSpec, s: int, model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[float]:
        cheap = LowPrecision(frozenset({s * spec.segment_len + spec.segment_len // 2}))
        cheap.plan = plan
        losses = []
        for step, offsets in segment_batches(spec, s):
            x, y = data.make_batch(data.train_tokens(), offsets, spec.model.ctx)
            losses.append(cheap(spec, step, model, opt, x, y))
        return losses

    return _cheat_unit(spec, start, workdir, segment, on_step)


def trains_on_its_plan(train: TrainFn) -> bool:
    """Whether adversary ``train`` trains honestly, apart from its lie, on the plan it declares (it takes ``plan``);
    the others train their own way, whatever plan they declare."""
    return "plan" in inspect.signature(train).parameters


ADVERSARIES: dict[str, TrainFn] = {
    "fake-loss": fake_loss,
    "low-precision": low_precision,
    "idle-segment": idle_segment,
    "skip-last-update": skip_last_update,
    "skip-steps": skip_steps,
    "random-weights": random_weights,
    "replay-old": replay_old,
    "replay-old-verbatim": replay_old_verbatim,
}


# --------------------------------------------------------------------------- step-level cheats (node.prover policies)
#
# Each is a StepPolicy for :func:`node.prover.train_traced`: it performs (or fakes) one optimizer step and returns the
# loss it will commit. ``bad`` is the set of steps it cheats on (see :func:`node.prover.bad_step_set`); the state it
# commits is always the state it really holds, so every revealed checkpoint hashes to its commitment.


class _StepCheat:
    """A step-level cheat's honest steps run on ``plan`` (class default :data:`PROVIDER_PLAN`; set it on the
    instance for a cheat that declares another plan): only its bad steps are its own arithmetic."""

    plan: Plan = PROVIDER_PLAN

    def honest(self, model: torch.nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor) -> float:
        return plan_step(model, opt, x, y, self.plan)


class SkipSteps(_StepCheat):
    """Does nothing on its bad steps (no forward, no backward, no update) and commits the previous loss."""

    def __init__(self, bad: frozenset[int]) -> None:
        self.bad, self.last = bad, 5.545  # ~ln(256): the loss of an untrained byte model

    def __call__(self, spec: UnitSpec, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer,
                 x: Tensor, y: Tensor) -> float:
        if step not in self.bad:
            self.last = self.honest(model, opt, x, y)
        return self.last


class OtherData(_StepCheat):
    """Trains its bad steps on other batches (another shard's, cheaper to get or already cached) but commits the
    digest of the batches the spec dictates. With every step bad, this is copying another provider's run."""

    def __init__(self, bad: frozenset[int], shard_shift: int = 1) -> None:
        self.bad, self.shift = bad, shard_shift

    def __call__(self, spec: UnitSpec, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer,
                 x: Tensor, y: Tensor) -> float:
        if step in self.bad:
            n = max(2, spec.n_shards)
            offsets = data.batch_indices(spec.seed + 1, (spec.shard + self.shift) % n, n, step, spec.batch_size,
                                         spec.model.ctx)
            other = data.make_batch(data.train_tokens(), offsets, spec.model.ctx)
            x, y = other[0].to(x.device), other[1].to(y.device)
        return self.honest(model, opt, x, y)


class FakeLoss(_StepCheat):
    """Trains honestly but commits a prettier loss (3% lower) on its bad steps."""

    def __init__(self, bad: frozenset[int]) -> None:
        self.bad = bad

    def __call__(self, spec: UnitSpec, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer,
                 x: Tensor, y: Tensor) -> float:
        loss = self.honest(model, opt, x, y)
        return loss * 0.97 if step in self.bad else loss


class Extrapolate(_StepCheat):
    """A skipper that knows the marketplace measures every segment's update: on its bad steps it runs no forward and
    no backward but moves the weights by the previous step's update once more (and bumps AdamW's counters), so each
    segment's update looks like its neighbours'; it commits the previous loss. Only a replay tells."""

    def __init__(self, bad: frozenset[int]) -> None:
        self.bad, self.last = bad, 5.545
        self.delta: list[Tensor] | None = None

    def __call__(self, spec: UnitSpec, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer,
                 x: Tensor, y: Tensor) -> float:
        params = list(model.parameters())
        if step not in self.bad:
            before = [p.detach().clone() for p in params]
            self.last = self.honest(model, opt, x, y)
            self.delta = [p.detach() - b for p, b in zip(params, before)]
            return self.last
        with torch.no_grad():
            for p, d in zip(params, self.delta or []):
                p.add_(d)
            for st in opt.state.values():
                if "step" in st:
                    st["step"] += 1
        return self.last


class LowPrecision(_StepCheat):
    """Runs its bad steps in cheaper arithmetic than the spec's: bfloat16 autocast for a float32 job; for a bfloat16
    job, float8 (e4m3, per-tensor scaled) weights in the forward and backward pass, what an fp8 tensor core runs,
    with the float32 master weights stepped as usual."""

    def __init__(self, bad: frozenset[int]) -> None:
        self.bad = bad

    def __call__(self, spec: UnitSpec, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer,
                 x: Tensor, y: Tensor) -> float:
        if step not in self.bad:
            return self.honest(model, opt, x, y)
        if spec.precision == "fp32":
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                return train_step(model, opt, x, y)
        masters = [p.detach().clone() for p in model.parameters()]
        with torch.no_grad():
            for p in model.parameters():
                scale = float(p.abs().max()) / 448.0 or 1.0  # e4m3's largest finite value
                p.copy_((p / scale).to(torch.float8_e4m3fn).to(p.dtype) * scale)
        opt.zero_grad(set_to_none=True)
        loss = model.loss(x, y)
        loss.backward()
        with torch.no_grad():
            for p, m in zip(model.parameters(), masters):
                p.copy_(m)
        opt.step()
        return float(loss.detach())


class RandomWeights:
    """No training at all: every step overwrites weights and moments with seeded noise, commits a made-up curve."""

    def __call__(self, spec: UnitSpec, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer,
                 x: Tensor, y: Tensor) -> float:
        gen = torch.Generator().manual_seed(step)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
                st = opt.state.get(p)
                if st:
                    st["exp_avg"].copy_(torch.randn(p.shape, generator=gen) * 1e-3)
                    st["exp_avg_sq"].copy_(torch.rand(p.shape, generator=gen) * 1e-6)
                    st["step"].add_(1)
        return 5.5 - 0.002 * step
