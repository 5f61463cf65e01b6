"""Probe the node's accelerator and measure training throughput (what the provider advertises)."""
from __future__ import annotations

import functools
import os
import platform
import re
import time
from dataclasses import dataclass

import torch

from node.data import train_batch
from node.model import ModelConfig, build_model, init_state
from node.trainer import Plan, gpu_slug
from protocol.errors import GridMintValueError
from protocol.schemas import KERNEL_BUILD


@dataclass(frozen=True)
class DeviceInfo:
    kind: str  # "cuda" or "cpu"
    name: str
    vram_mb: int  # GPU memory, or system memory for a CPU node


def probe(device: str | None = None) -> DeviceInfo:
    """This machine's device: CUDA device 0 where there is one, else the CPU (its threads and RAM); ``device="cpu"``:
    the CPU whatever else there is (what a node on a CPU plan trains on, and so advertises)."""
    if device != "cpu" and torch.cuda.is_available():
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


#: Environment that makes a child process compute with other CPU kernels than this one: ATen's scalar kernels
#: instead of its vectorised ones, MKL's compatible code path, oneDNN's oldest ISA. A machine with another CPU kind
#: or torch build runs other kernels like these; :func:`node.crosscheck.tolerance_for` calibrates the honest drift
#: between kernel builds by training in such a child (``bench proof`` reports it as ``cross_build``).
FOREIGN_KERNELS = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "SSE41"}

_BUILD = re.compile(KERNEL_BUILD)


def _cpu_kind() -> str:
    """``x86_64.genuineintel.avx2``: architecture, vendor and widest vector ISA (what MKL and oneDNN dispatch on)."""
    arch = platform.machine().lower() or "unknown"
    vendor, flags = "", set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, val = line.partition(":")
                key = key.strip().lower()
                if key in ("vendor_id", "cpu implementer") and not vendor:
                    vendor = val.strip().lower()
                elif key in ("flags", "features") and not flags:
                    flags = set(val.split())
                if vendor and flags:
                    break
    except OSError:
        pass
    isa = next((name for flag, name in (("amx_tile", "amx"), ("avx512_bf16", "avx512bf16"), ("avx512f", "avx512"),
                                         ("avx2", "avx2"), ("avx", "avx"), ("sve", "sve"), ("asimd", "neon"))
                if flag in flags), "base")
    return ".".join(re.sub(r"[^a-z0-9_+-]+", "-", x) or "unknown" for x in (arch, vendor or "unknown", isa))


@functools.lru_cache(maxsize=4)
def kernel_build(device: str = "cpu") -> str:
    """Which kernels this process computes ``device`` work with: deterministic training gives the same bits on two
    machines only on the same plan *and* the same build. CPU: the torch build, the CPU kind (architecture, vendor,
    widest vector ISA) and ATen's kernel set, plus MKL's code-path setting if pinned (``MKL_CBWR``); CUDA: the torch
    build, CUDA and cuDNN versions and the GPU's compute capability (the model itself is in the plan). E.g.
    ``torch-2.13.0+cpu.cf30153c/x86_64.genuineintel.avx2/aten-avx2``."""
    head = f"torch-{torch.__version__}.{(torch.version.git_version or 'unknown')[:8]}"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise GridMintValueError("no CUDA device here: no CUDA kernel build to name")
        major, minor = torch.cuda.get_device_capability(0)
        parts = [head, f"cuda-{torch.version.cuda}.cudnn-{torch.backends.cudnn.version()}.sm{major}{minor}"]
    else:
        parts = [head, _cpu_kind(), f"aten-{torch.backends.cpu.get_cpu_capability()}"]
        if os.environ.get("MKL_CBWR"):
            parts.append(f"mkl-{os.environ['MKL_CBWR']}")
    build = re.sub(r"[^a-z0-9._+/-]+", "-", "/".join(parts).lower())[:160]
    if not _BUILD.fullmatch(build):
        raise GridMintValueError(f"cannot name this machine's kernel build: {build!r}")
    return build


def plan_build(plan: Plan) -> str:
    """The kernels this machine runs ``plan`` with (:func:`kernel_build` of its device); "" without that device."""
    if plan.device == "cuda" and not torch.cuda.is_available():
        return ""
    return kernel_build(plan.device)


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
