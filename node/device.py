"""Probe the node's accelerator and measure training throughput (what the provider advertises)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from node.data import train_batch
from node.model import ModelConfig, build_model, init_state
from node.trainer import Plan, gpu_slug
from protocol.errors import GridMintValueError


@dataclass(frozen=True)
class DeviceInfo:
    kind: str  # "cuda" or "cpu"
    name: str
    vram_mb: int  # GPU memory, or system memory for a CPU node


def probe() -> DeviceInfo:
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return DeviceInfo("cuda", props.name, props.total_memory // (1024 * 1024))
    try:
        with open("/proc/meminfo") as fh:
            kb = int(fh.readline().split()[1])
    except (OSError, ValueError, IndexError):
        kb = 0
    return DeviceInfo("cpu", f"cpu x{torch.get_num_threads()}", kb // 1024)


def gpu_name() -> str | None:
    """CUDA device 0's name (``NVIDIA H200``), or None on a machine without CUDA."""
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def local_plan(plan: Plan, name: str | None = None) -> Plan:
    """``plan`` as this machine runs it: a CUDA plan names this machine's GPU model (``cuda`` -> ``cuda:h200``), so a
    verifier on the same model replays its work bit for bit; one that names another model than this machine's is
    refused. ``name``: the GPU's device name (default: :func:`gpu_name`)."""
    if plan.device != "cuda":
        return plan
    name = name if name is not None else gpu_name()
    if name is None:
        return plan  # no GPU here: training on it fails on its own, with its own message
    here = gpu_slug(name)
    if plan.gpu and plan.gpu != here:
        raise GridMintValueError(f"plan {plan.label!r} names a {plan.gpu} GPU, this machine has {name} ({here})")
    return Plan(plan.device, plan.micro_batches, here)


def benchmark(cfg: ModelConfig = ModelConfig(), batch_size: int = 16, seconds: float = 1.0, device: str = "cpu") -> int:
    """Training tokens per second of the job model on this device (forward + backward + AdamW), after one warm-up step."""
    model = build_model(cfg, init_state(cfg, 0)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = 0
    step = 0
    start = None
    while True:
        _, x, y = train_batch(0, 0, 1, step, batch_size, cfg.ctx)
        loss = model.loss(x.to(device), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        step += 1
        if start is None:
            start = time.perf_counter()
            continue
        tokens += batch_size * cfg.ctx
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return int(tokens / elapsed)
