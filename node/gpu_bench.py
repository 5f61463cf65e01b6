"""GPU figures for proof-of-training: what committing the training state costs a real trainer on CUDA.

A GPT-2-small-shaped byte model (12 layers, d=768, ctx 1024; ~85M parameters with the 256-byte vocabulary) trains
with bf16 autocast, fused AdamW and (by default) torch.compile. The same loop runs with and without an asynchronous
state commitment every ``commit_every`` steps (:class:`node.statehash.AsyncStateHasher`: device-to-device snapshot on
the training stream, copy to pinned memory on a side stream, BLAKE3 on host threads), interleaved in ABBA
order, and the throughput ratio while training is the overhead (the hash of the state after the last step, which
no training is left to hide, is reported as its own latency and in an end-to-end ratio beside it). Where the
overhead goes (``overhead_detail``): every step's time on the training stream (timing events, no host sync) says
whether the cost lands on the step after a commitment or spreads over the interval, and the hasher's stage totals
say what the training thread spent in ``submit`` and what the copy to the host and the hash took. Also measured:
one synchronous hash of the same state (what the async path avoids), and whether an honest segment replays bit for
bit on the same GPU under deterministic algorithms.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Any, Callable

import torch

from node import data
from node.model import ModelConfig, build_model, init_state
from node.statehash import AsyncStateHasher, state_hash
from node.trainer import export_training_state

GPT2_SMALL_BYTES = ModelConfig(vocab=256, d_model=768, n_layer=12, n_head=12, ctx=1024)


def _batches(cfg: ModelConfig, n: int, batch: int, dev: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    toks = data.train_tokens()
    out = []
    for i in range(n):
        offsets = data.batch_indices(11, 0, 1, i, batch, cfg.ctx)
        x, y = data.make_batch(toks, offsets, cfg.ctx)
        out.append((x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)))
    return out


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({os.cpu_count()} cores)"


class StepClock:
    """Each step's time as the device's training stream saw it: on CUDA a timing event recorded after every step
    (no host sync, so the loop runs as it would untimed; gaps where the host launched late count too), on the CPU
    the host clock (its steps are synchronous). :meth:`ms` after the window is synchronized."""

    def __init__(self, dev: torch.device) -> None:
        self.cuda = dev.type == "cuda"
        self.marks: list[Any] = []

    def tick(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def ms(self) -> list[float]:
        pairs = zip(self.marks, self.marks[1:])
        return [a.elapsed_time(b) if self.cuda else (b - a) * 1e3 for a, b in pairs]


def where_the_time_went(plain: list[list[float]], committed: list[list[float]], commit_every: int,
                        timings: dict[str, float]) -> dict[str, Any]:
    """Attribution of the overhead from per-step times (:class:`StepClock`, step ``j`` of a window at index
    ``j - 1``; a commitment is submitted after steps ``commit_every``, ``2 * commit_every``, ...) and the hasher's
    :meth:`~node.statehash.AsyncStateHasher.timings`. ``commit_cost_ms``: the committed windows' extra time per
    commitment that steps followed (a window's last commitment, after its last step, is the end-to-end figure's
    part); ``after_commit_extra_ms``: how much slower than a plain step the step right after a commitment is
    (the snapshot's device copy and the start of the copy to the host land there); ``other_step_extra_ms``: how
    much slower the committed windows' other steps are (contention spread over the interval: host threads, memory,
    clocks). Means, not medians: throughput is the mean's reciprocal."""
    flat_plain = [x for w in plain for x in w]
    base = statistics.fmean(flat_plain)
    after = [w[j] for w in committed for j in range(commit_every, len(w), commit_every)]
    other = [x for w in committed for j, x in enumerate(w) if j < commit_every or j % commit_every]
    extra = sum(x for w in committed for x in w) - base * sum(len(w) for w in committed)
    done = max(1, int(timings["hashed"]))
    return {
        "step_ms_plain": round(base, 3),
        "step_ms_committed": round(statistics.fmean([x for w in committed for x in w]), 3),
        "commit_cost_ms": round(extra / max(1, len(after)), 2),
        "after_commit_extra_ms": round(statistics.fmean(after) - base, 2) if after else None,
        "other_step_extra_ms": round(statistics.fmean(other) - base, 3) if other else None,
        "submit_ms": round(1e3 * timings["submit_s"] / max(1, int(timings["submitted"])), 3),
        "backpressure_ms": round(1e3 * timings["backpressure_s"] / max(1, int(timings["submitted"])), 3),
        "copy_wait_ms": round(1e3 * timings["copy_wait_s"] / done, 2),
        "hash_ms": round(1e3 * timings["hash_s"] / done, 2),
    }


def gpu_overhead(*, steps: int = 300, commit_every: int = 50, compile_model: bool = True, batch: int = 16,
                 repeats: int = 3, log: Callable[[str], None] = print, device: str = "cuda",
                 cfg: ModelConfig = GPT2_SMALL_BYTES, warmup: int = 15) -> dict[str, Any]:
    """The figures in the module doc on ``device``: CUDA on the GPU machine; ``"cpu"`` (with a small ``cfg``) only
    so that CI runs this very code before a GPU session spends its few minutes on it."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    model = build_model(cfg, init_state(cfg, 0)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), fused=True)
    fwd = torch.compile(model) if compile_model else model
    batches = _batches(cfg, 64, batch, dev)

    def step(i: int) -> None:
        x, y = batches[i % len(batches)]
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            logits = fwd(x)
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, cfg.vocab), y.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    compile_error = ""
    try:
        for i in range(warmup):  # compile + allocate optimizer state
            step(i)
        _sync(dev)
    except Exception as exc:  # a GPU session is short: a figure without torch.compile beats none at all
        if not compile_model:
            raise
        compile_error = f"{type(exc).__name__}: {exc}"[:500]
        log(f"torch.compile failed ({compile_error}); measuring eager")
        compile_model, fwd = False, model
        opt.zero_grad(set_to_none=True)  # whatever the failed step left behind
        for i in range(warmup):
            step(i)
        _sync(dev)
    log(f"warm-up (compile={compile_model}) {time.perf_counter() - t0:.1f} s on {device_name(dev)}")
    live = export_training_state(model, opt)
    n_params = sum(p.numel() for p in model.parameters())
    state_bytes = sum(t.numel() * t.element_size() for t in live.values())

    t0 = time.perf_counter()
    ref = state_hash(live)
    sync_hash_s = time.perf_counter() - t0
    hasher = AsyncStateHasher(live, buffers=3, threads=8)
    check = hasher.submit(live).result()
    if check != ref:
        raise RuntimeError(f"async GPU hash {check} differs from the synchronous one {ref}")

    def run(commit: bool) -> tuple[float, float, float]:
        """(steps/s while training, steps/s until the last commitment's hash is done, that last wait in s). The
        training window ends when every step *and* every commitment's device work (snapshot, copy to the host) is
        done; host threads hashing the commitments made along the way overlap it, as they do in a long unit. Only
        the hash of the state after the very last step has no training left to hide behind: a fixed latency per
        unit, reported on its own instead of as lost throughput (in a 300-step window it would count for one
        commitment in six)."""
        futures = []
        clock = StepClock(dev)
        _sync(dev)
        t = time.perf_counter()
        clock.tick()
        for i in range(1, steps + 1):
            step(i)
            clock.tick()  # before the commitment: its snapshot lands in the next step's time
            if commit and i % commit_every == 0:
                futures.append(hasher.submit(live))
        _sync(dev)  # every stream of the device: the side stream's copies to the host too
        trained = time.perf_counter()
        for f in futures:
            f.result()
        done = time.perf_counter()
        (committed_steps if commit else plain_steps).append(clock.ms())
        return steps / (trained - t), steps / (done - t), done - trained

    ratios, ratios_e2e, plain, committed, tails = [], [], [], [], []
    plain_steps: list[list[float]] = []
    committed_steps: list[list[float]] = []
    hashed_before = hasher.timings()  # the check above is not a commitment of the windows
    for k in range(repeats):
        # ABBA: every other pair runs the committed window first, so a drift over the session (clocks, heat)
        # does not always land on the same side of the ratio
        if k % 2:
            (b, b_e2e, tail), (a, a_e2e, _) = run(True), run(False)
        else:
            (a, a_e2e, _), (b, b_e2e, tail) = run(False), run(True)
        plain.append(a)
        committed.append(b)
        ratios.append(b / a)
        ratios_e2e.append(b_e2e / a_e2e)
        tails.append(tail)
        log(f"  steps/s plain {a:.2f}  with commitments every {commit_every} {b:.2f}  ratio {b / a:.4f} (until the "
            f"last hash is done {b_e2e / a_e2e:.4f}: it took {tail:.3f} s after the last step)")
    hasher.close()
    t_all = hasher.timings()
    spent = where_the_time_went(plain_steps, committed_steps, commit_every,
                                {k: v - hashed_before[k] for k, v in t_all.items()})
    log(f"  where it went: {spent}")
    tok_per_step = batch * cfg.ctx

    # same-GPU replay: deterministic algorithms, eager, fp32 (the spec's recipe), a small model
    torch.use_deterministic_algorithms(True)
    small = ModelConfig(d_model=128, n_layer=2, n_head=4, ctx=128)
    sb = _batches(small, 8, 8, dev)
    hashes = []
    for _ in range(2):
        m = build_model(small, init_state(small, 3)).to(dev)
        o = torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True)
        for x, y in sb:
            x, y = x[:, : small.ctx], y[:, : small.ctx]
            m.loss(x, y).backward()
            o.step()
            o.zero_grad(set_to_none=True)
        hashes.append(state_hash(export_training_state(m, o)))
    torch.use_deterministic_algorithms(False)
    return {
        "device": device_name(dev),
        "torch": torch.__version__,
        "params": n_params,
        "state_bytes": state_bytes,
        "commit_every": commit_every,
        "compile": compile_model,
        **({"compile_error": compile_error} if compile_error else {}),
        "tokens_per_s_plain": round(statistics.median(plain) * tok_per_step),
        "tokens_per_s_committed": round(statistics.median(committed) * tok_per_step),
        "proof_overhead": round(statistics.median(ratios), 4),
        "proof_overhead_runs": [round(r, 4) for r in ratios],
        "proof_overhead_end_to_end": round(statistics.median(ratios_e2e), 4),
        "proof_overhead_end_to_end_runs": [round(r, 4) for r in ratios_e2e],
        "final_commit_s": round(statistics.median(tails), 3),
        "sync_hash_s": round(sync_hash_s, 3),
        "sync_hash_steps": round(sync_hash_s * statistics.median(plain), 1),
        "gpu_replay_bitwise": hashes[0] == hashes[1],
        "overhead_detail": spent,
    }
