"""Fine-grained proof-of-training: commit every segment (down to every step) without stalling the trainer,
and re-execute one committed segment cheaply.

:func:`train_traced` runs a unit under a *step policy* (the honest :func:`honest_step`, or a cheat from
:mod:`node.adversary`), hashes the state at every segment boundary on background threads
(:class:`node.statehash.AsyncStateHasher`) and returns the signed-ready :class:`~protocol.proof.TrainingProof`.
It does not write a checkpoint per segment: a provider keeps sparse checkpoints and re-derives a challenged
segment's start state on demand (its cost, not the verifier's). For tests and benchmarks, ``verifier`` receives
every segment's start state as it passes, so each transition's verdict is a real replay.

:func:`node.replay.replay_state` / :func:`node.replay.check_state` are the verifier's side (the live verifier's
own): one model and optimizer kept per job shape, into which a challenged state is copied; the segment's steps are
replayed on the batches the *spec* dictates and hashes and loss compared.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import Tensor

from node import data
from node.model import TinyGPT
from node.statehash import AsyncStateHasher
from node.trainer import (
    UnitSpec,
    deterministic,
    export_training_state,
    fresh_state,
    load_training_state,
    mean_loss_micro,
    segment_batches,
    state_hash,
    train_step,
)
from protocol.proof import SegmentCommit, TrainingProof, batch_digest, make_proof

#: A step policy performs optimizer step ``step`` (or pretends to) and returns the loss it will commit.
StepPolicy = Callable[[UnitSpec, int, TinyGPT, torch.optim.Optimizer, Tensor, Tensor], float]
#: Called with (segment index, start state, its committed start hash) before the segment is trained.
SegmentTap = Callable[[int, Mapping[str, Tensor]], None]


def honest_step(spec: UnitSpec, step: int, model: TinyGPT, opt: torch.optim.Optimizer, x: Tensor, y: Tensor) -> float:
    return train_step(model, opt, x, y)


@dataclass(frozen=True)
class Trace:
    proof: TrainingProof
    losses: list[float]
    final_state: dict[str, Tensor]
    train_s: float  # wall time of the training loop, hashing included


def train_traced(
    spec: UnitSpec,
    start: Mapping[str, Tensor],
    policy: StepPolicy = honest_step,
    *,
    tap: SegmentTap | None = None,
    first_state: Mapping[str, Tensor] | None = None,
) -> Trace:
    """Train ``spec`` from the model-only ``start`` (fresh AdamW), committing every ``segment_len`` steps.

    ``first_state`` (a cheat's hook): the full training state actually trained from, while the proof still claims
    the honest start. ``tap`` sees every segment's start state (live tensors: copy what you keep).
    """
    tokens = data.train_tokens()
    with deterministic(spec.threads):
        model, opt = load_training_state(spec, first_state if first_state is not None else fresh_state(start))
        claimed_start = state_hash(fresh_state(start))
        live = export_training_state(model, opt)
        futures = []
        digests, loss_micro, all_losses = [], [], []
        t0 = time.perf_counter()
        with AsyncStateHasher(live, buffers=4, threads=1) as hasher:
            for s in range(spec.n_segments):
                if tap is not None:
                    tap(s, live)
                batches = segment_batches(spec, s)
                losses = []
                for step, offsets in batches:
                    x, y = data.make_batch(tokens, offsets, spec.model.ctx)
                    losses.append(policy(spec, step, model, opt, x, y))
                futures.append(hasher.submit(live))
                digests.append(batch_digest(batches))
                loss_micro.append(mean_loss_micro(losses))
                all_losses.extend(losses)
            ends = [f.result() for f in futures]
        train_s = time.perf_counter() - t0
        final = {k: v.detach().clone() for k, v in live.items()}
    starts = [claimed_start] + ends[:-1]
    commits = [SegmentCommit(i, starts[i], ends[i], digests[i], loss_micro[i]) for i in range(spec.n_segments)]
    proof = make_proof(unit_id=spec.unit_id, spec_hash=spec.spec_hash(), seed=spec.seed, steps=spec.steps,
                       segment_len=spec.segment_len, segments=commits)
    return Trace(proof, all_losses, final, train_s)


class PlainLoop:
    """The unit's honest training without commitments, in pieces: the model, its AdamW and every batch built once
    (untimed), :meth:`steps` trains the next ``n``. Where a benchmark times it beside other work, interleaved."""

    def __init__(self, spec: UnitSpec, start: Mapping[str, Tensor]) -> None:
        self.spec, self.done = spec, 0
        tokens = data.train_tokens()
        with deterministic(spec.threads):
            self.model, self.opt = load_training_state(spec, fresh_state(start))
            batches = [b for s in range(spec.n_segments) for b in segment_batches(spec, s)]
            self.xs = [data.make_batch(tokens, offsets, spec.model.ctx) for _, offsets in batches]

    def steps(self, n: int) -> None:
        with deterministic(self.spec.threads):
            for x, y in self.xs[self.done:self.done + n]:
                train_step(self.model, self.opt, x, y)
        self.done += n


def plain_throughput(spec: UnitSpec, start: Mapping[str, Tensor], *, commit_every: int | None,
                     cpu: bool = False) -> float:
    """Optimizer steps per second over ``spec.steps`` honest steps, hashing the state asynchronously every
    ``commit_every`` steps (None: no commitments at all). The same loop either way, for an overhead ratio.
    ``cpu``: per second of this process's CPU time (its compute) instead of wall time."""
    clock = time.process_time if cpu else time.perf_counter
    loop = PlainLoop(spec, start)
    model, opt, xs = loop.model, loop.opt, loop.xs
    with deterministic(spec.threads):
        live = export_training_state(model, opt)
        hasher = AsyncStateHasher(live, buffers=4, threads=1) if commit_every else None
        futures = []
        t0 = clock()
        for i, (x, y) in enumerate(xs, 1):
            train_step(model, opt, x, y)
            if hasher is not None and commit_every and i % commit_every == 0:
                futures.append(hasher.submit(live))
        for f in futures:
            f.result()
        dt = clock() - t0
        if hasher is not None:
            hasher.close()
    return len(xs) / dt


def bad_step_set(spec: UnitSpec, fraction: float, salt: int) -> frozenset[int]:
    """``ceil(fraction * steps)`` distinct steps (at least one), a pure function of the unit and ``salt``: where a
    sparse cheater fakes its work."""
    import hashlib

    n = max(1, math.ceil(fraction * spec.steps - 1e-9))
    key = lambda i: hashlib.sha256(f"{spec.unit_id}/{salt}/{i}".encode()).digest()  # noqa: E731
    return frozenset(sorted(range(spec.steps), key=key)[:n])
