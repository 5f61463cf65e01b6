"""The provider's trainer: one DiLoCo work unit of H AdamW steps, with proof-of-training commitments.

Reproducibility contract (what a verifier relies on to replay a segment bit for bit):

* same torch build and CPU kind (:func:`node.device.kernel_build`: providers and verifiers name theirs, and work on
  other kernels is checked within a tolerance instead), ``torch.use_deterministic_algorithms(True)``, the spec's
  thread count;
* a training state that is the whole story: model weights + AdamW moments and step counts. No dropout,
  and the data order is a pure SHA-256 function of the spec (:func:`node.data.batch_indices`), so no
  random-number-generator state exists to save;
* the optimizer recipe below, which is bound into every spec hash via :data:`RECIPE`.

Training state tensors are named ``model.<param>``, ``optim.<param>.exp_avg``, ``optim.<param>.exp_avg_sq``
and ``optim.<param>.step``. :func:`state_hash` of that dict is what segment commitments contain.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import os
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.utils.deterministic
from torch import Tensor

from node import checkpoint, data, statehash
from node.model import ModelConfig, TinyGPT, build_model, param_shapes
from protocol.errors import CheckpointError, GridMintValueError, VersionMismatch
from protocol.proof import (
    HASH_RE,
    SegmentCommit,
    TrainingProof,
    batch_digest,
    make_proof,
    mean_loss_micro,
)

ADAMW_BETAS = (0.9, 0.95)
ADAMW_EPS = 1e-8
ADAMW_WEIGHT_DECAY = 0.0
#: Everything about training that is code, not spec. Part of every spec hash: change it and old proofs stop matching.
RECIPE = "tinygpt-v1/adamw(b1=0.9,b2=0.95,eps=1e-8,wd=0.0,fused)/sha256-batches-v1/blake3-state-v3"
STATE_FORMAT = "gridmint-train-state/v1"
#: A job's arithmetic (UnitSpec.precision).
PRECISIONS = ("fp32", "bf16")
EVAL_BATCH_SIZE = 16

OnStep = Callable[[int, float], None]

# torch's thread count and deterministic flag are process-global: one unit (or replay) at a time per process.
_TORCH_LOCK = threading.RLock()


# --------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class UnitSpec:
    """Everything that determines a unit's training, bit for bit. ``unit_id`` is 0x + 32-byte hex.

    ``seed`` picks the data order (mixed with job id and round, so reusing a seed across rounds still gives
    new batches). ``threads`` is the CPU thread count the unit must be trained and replayed with. ``precision``
    is the job's arithmetic: ``fp32``, or ``bf16`` (autocast: matmuls in bfloat16, weights, optimizer state and
    loss in float32, on the GPU and, for replays, on the CPU alike); running another one than the spec is a cheat.
    """

    job_id: str
    unit_id: str
    round: int
    shard: int
    n_shards: int
    model: ModelConfig
    steps: int
    segment_len: int
    batch_size: int
    lr: float
    seed: int
    threads: int = 1
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if not isinstance(self.job_id, str) or not 1 <= len(self.job_id) <= 200:
            raise GridMintValueError(f"job_id must be a non-empty str of at most 200 chars, got {self.job_id!r}")
        if not isinstance(self.unit_id, str) or not HASH_RE.match(self.unit_id):
            raise GridMintValueError(f"unit_id must be 0x + 64 lowercase hex digits, got {self.unit_id!r}")
        if not isinstance(self.model, ModelConfig):
            raise GridMintValueError(f"model must be a ModelConfig, got {type(self.model).__name__}")
        for name, minimum in (("round", 0), ("shard", 0), ("n_shards", 1), ("steps", 1), ("segment_len", 1),
                              ("batch_size", 1), ("seed", 0), ("threads", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not minimum <= v < 2**63:
                raise GridMintValueError(f"UnitSpec.{name} must be an int in [{minimum}, 2**63), got {v!r}")
        if self.shard >= self.n_shards:
            raise GridMintValueError(f"shard {self.shard} out of range for n_shards={self.n_shards}")
        if self.steps % self.segment_len:
            raise GridMintValueError(f"steps ({self.steps}) must be a multiple of segment_len ({self.segment_len})")
        if self.threads > 256:
            raise GridMintValueError(f"threads must be at most 256, got {self.threads}")
        if self.precision not in PRECISIONS:
            raise GridMintValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        lr = self.lr
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr) or not 0 < lr < 1:
            raise GridMintValueError(f"lr must be a finite number in (0, 1), got {lr!r}")
        object.__setattr__(self, "lr", float(lr))

    @property
    def n_segments(self) -> int:
        return self.steps // self.segment_len

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {
            "jobId": d["job_id"], "unitId": d["unit_id"], "round": d["round"], "shard": d["shard"],
            "nShards": d["n_shards"], "model": self.model.to_dict(), "steps": d["steps"],
            "segmentLen": d["segment_len"], "batchSize": d["batch_size"], "lr": d["lr"], "seed": d["seed"],
            "threads": d["threads"],
            # said only when not the default, so every fp32 unit keeps the spec hash it always had
            **({"precision": self.precision} if self.precision != "fp32" else {}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> UnitSpec:
        fields = {"jobId", "unitId", "round", "shard", "nShards", "model", "steps", "segmentLen", "batchSize",
                  "lr", "seed", "threads"}
        if not isinstance(d, Mapping) or set(d) - {"precision"} != fields:
            got = sorted(d) if isinstance(d, Mapping) else type(d).__name__
            raise GridMintValueError(f"UnitSpec needs exactly the fields {sorted(fields)}, got {got}")
        return cls(
            job_id=d["jobId"], unit_id=d["unitId"], round=d["round"], shard=d["shard"], n_shards=d["nShards"],
            model=ModelConfig.from_dict(d["model"]), steps=d["steps"], segment_len=d["segmentLen"],
            batch_size=d["batchSize"], lr=d["lr"], seed=d["seed"], threads=d["threads"],
            precision=d.get("precision", "fp32"),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> UnitSpec:
        try:
            d = json.loads(text)
        except ValueError as exc:
            raise GridMintValueError(f"UnitSpec is not valid JSON: {exc}") from exc
        return cls.from_dict(d)

    def spec_hash(self) -> str:
        """``0x`` + SHA-256 of the canonical JSON plus :data:`RECIPE` and the corpus hash."""
        payload = {"recipe": RECIPE, "corpus": data.CORPUS_SHA256, "spec": self.to_dict()}
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        return "0x" + hashlib.sha256(b"GridMint/spec/v1" + blob).hexdigest()


_UPGRADE = "they run different GridMint versions; install the marketplace's version and start again"


def _theirs(value: str | None) -> str:
    return value or "nothing (a version before this check)"


def check_recipe(spec: UnitSpec, market_spec_hash: str | None) -> None:
    """Raise :class:`VersionMismatch` unless this node hashes ``spec`` as the marketplace did (``market_spec_hash``:
    the hash it sends with work, or the one a proof it accepted carries). Another hash means another :data:`RECIPE`:
    a provider's commitments would be refused after all its training, and a verifier's replay would call honest
    work fraud and cost its bond. Checked before any work, so nothing is lost but the wait for an upgrade."""
    mine = spec.spec_hash()
    if market_spec_hash != mine:
        raise VersionMismatch(f"the marketplace hashes unit {spec.unit_id[:10]}'s spec to {_theirs(market_spec_hash)}, "
                              f"this node to {mine} (recipe {RECIPE}): {_UPGRADE}")


def check_market_recipe(market_recipe: str | None) -> None:
    """Raise :class:`VersionMismatch` unless the marketplace (its ``/config``) trains by this node's :data:`RECIPE`:
    checked when a node or verifier starts, before it stakes anything."""
    if market_recipe != RECIPE:
        raise VersionMismatch(f"the marketplace's training recipe is {_theirs(market_recipe)}, this node's {RECIPE}: "
                              f"{_UPGRADE}")


def data_seed(spec: UnitSpec) -> int:
    """The seed handed to :func:`node.data.batch_indices` for this unit (63 bits)."""
    h = hashlib.sha256(
        b"GridMint/data-seed/v1" + spec.job_id.encode() + b"\x00"
        + spec.round.to_bytes(8, "big") + spec.seed.to_bytes(8, "big")
    ).digest()
    return int.from_bytes(h[:8], "big") >> 1


def segment_batches(spec: UnitSpec, seg_index: int) -> list[tuple[int, list[int]]]:
    """(step, batch offsets) of every step of segment ``seg_index``, derived from the spec alone."""
    if not 0 <= seg_index < spec.n_segments:
        raise GridMintValueError(f"segment {seg_index} out of range: unit has {spec.n_segments} segments")
    first = seg_index * spec.segment_len
    return [(step, step_batch(spec, step)) for step in range(first, first + spec.segment_len)]


def step_batch(spec: UnitSpec, step: int) -> list[int]:
    """Batch offsets of optimizer step ``step`` (0-based within the unit), derived from the spec alone."""
    if not isinstance(step, int) or not 0 <= step < spec.steps:
        raise GridMintValueError(f"step {step!r} out of range: unit has {spec.steps} steps")
    return data.batch_indices(data_seed(spec), spec.shard, spec.n_shards, step, spec.batch_size, spec.model.ctx)


def expected_batch_digest(spec: UnitSpec, seg_index: int) -> str:
    return batch_digest(segment_batches(spec, seg_index))


# --------------------------------------------------------------------------- state


def state_hash(tensors: Mapping[str, Tensor]) -> str:
    """``0x`` + BLAKE3 of a training state (names, dtypes, shapes, raw bytes; see :mod:`node.statehash`)."""
    return statehash.state_hash(tensors)


def model_only(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The ``model.*`` tensors of a training state, with the prefix stripped (a no-op on model-only dicts)."""
    if not any(k.startswith("model.") for k in tensors):
        return dict(tensors)
    return {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}


def update_norm(before: Mapping[str, Tensor], after: Mapping[str, Tensor]) -> float:
    """How far the model moved between two states (training states or model-only): the L2 norm of the difference of
    the model tensors, in float64 (what :func:`protocol.verification.update_outliers` ranks)."""
    a, b = model_only(before), model_only(after)
    if set(a) != set(b):
        raise GridMintValueError(f"states differ in tensors {sorted(set(a) ^ set(b))}")
    total = 0.0
    for k in sorted(a):
        if a[k].shape != b[k].shape:
            raise GridMintValueError(f"tensor {k!r} is {tuple(a[k].shape)} in one state, "
                                     f"{tuple(b[k].shape)} in the other")
        total += float((b[k].double() - a[k].double()).pow(2).sum())
    return math.sqrt(total)


def fresh_state(model_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A full training state: the given weights (copied) and a fresh AdamW state (zero moments, step 0)."""
    out: dict[str, Tensor] = {}
    for name, t in model_state.items():
        out[f"model.{name}"] = t.detach().clone()
        out[f"optim.{name}.exp_avg"] = torch.zeros_like(t)
        out[f"optim.{name}.exp_avg_sq"] = torch.zeros_like(t)
        out[f"optim.{name}.step"] = torch.tensor(0.0, dtype=torch.float32)
    return out


def start_state_hash(model_state: Mapping[str, Tensor]) -> str:
    """The start hash every unit of a round must commit: global weights + fresh optimizer."""
    return state_hash(fresh_state(model_state))


def load_training_state(spec: UnitSpec, tensors: Mapping[str, Tensor]) -> tuple[TinyGPT, torch.optim.AdamW]:
    """Model + AdamW holding a copy of ``tensors``; :class:`CheckpointError` if they do not fit the spec."""
    check_training_state(spec, tensors)
    model = build_model(spec.model, model_only(tensors))
    model.autocast_bf16 = spec.precision == "bf16"
    opt = torch.optim.AdamW(
        model.parameters(), lr=spec.lr, betas=ADAMW_BETAS, eps=ADAMW_EPS, weight_decay=ADAMW_WEIGHT_DECAY,
        fused=True,  # one elementwise kernel per tensor: faster on CPU, and order-free so thread-count-proof
    )
    for name, p in model.named_parameters():
        opt.state[p] = {
            "step": tensors[f"optim.{name}.step"].detach().clone(),
            "exp_avg": tensors[f"optim.{name}.exp_avg"].detach().clone(),
            "exp_avg_sq": tensors[f"optim.{name}.exp_avg_sq"].detach().clone(),
        }
    return model, opt


class KeptTrainingState:
    """A model + AdamW kept for the replays of one job shape, every tensor of whose training state (weights, both
    moments, step counts) is a view into one buffer laid out as the state hash lays a state out
    (:class:`node.statehash.Layout`): :meth:`load` is the one copy a replay needs, and :meth:`state_hash` of the
    state loaded or replayed is a digest of that buffer, with no copy (a default job's state hash is half copy)."""

    def __init__(self, spec: UnitSpec, tensors: Mapping[str, Tensor]) -> None:
        model, opt = load_training_state(spec, tensors)
        live = export_training_state(model, opt)
        self.layout = statehash.Layout.of(live)
        if not all(self.layout.nbytes):
            raise GridMintValueError("a training state with an empty tensor cannot be kept")
        self._buf = torch.zeros(self.layout.total, dtype=torch.uint8)
        views = dict(zip(self.layout.names, self.layout.views(live, self._buf)))
        with torch.no_grad():
            for name, p in model.named_parameters():
                views[f"model.{name}"].copy_(p)
                p.data = views[f"model.{name}"]  # the parameter now lives in the buffer (same object: opt keeps it)
                st = opt.state[p]
                for k in ("exp_avg", "exp_avg_sq", "step"):
                    views[f"optim.{name}.{k}"].copy_(st[k])
                    st[k] = views[f"optim.{name}.{k}"]
        self.model, self.opt = model, opt
        self._dst = [views[n] for n in self.layout.names]
        self._mem = memoryview(self._buf.numpy())

    def load(self, spec: UnitSpec, tensors: Mapping[str, Tensor]) -> None:
        """Copy ``tensors`` in (one fused copy); :class:`CheckpointError` if they are no training state of ``spec``."""
        check_training_state(spec, tensors)
        self.layout.pack(tensors, self._buf, self._dst)

    def state_hash(self) -> str:
        """:func:`state_hash` of the model's and optimizer's state as it is now."""
        return self.layout.digest(self._mem)


#: Models + optimizers kept for replays, one per job shape, newest last (see :func:`kept_training_state`).
_REUSED: dict[tuple[Any, ...], KeptTrainingState] = {}
REUSE_SLOTS = 2


def kept_training_state(spec: UnitSpec, tensors: Mapping[str, Tensor]) -> KeptTrainingState:
    """The model + AdamW kept for ``spec``'s job shape (model, lr, precision), built from ``tensors`` if there is
    none (then holding them; else holding whatever it last held: :meth:`KeptTrainingState.load` them). A verifier
    replays segment after segment of units of one shape, and building the pair costs about one training step of a
    default job; a replay on the kept pair is bit for bit a replay on a fresh one (tests). Call it inside
    :func:`deterministic` (which serialises all torch work in this process): the pair is shared, and stays valid
    only until the next call."""
    key = (spec.model, spec.lr, spec.precision)
    kept = _REUSED.pop(key, None)
    if kept is None:
        kept = KeptTrainingState(spec, tensors)
    _REUSED[key] = kept
    while len(_REUSED) > REUSE_SLOTS:
        del _REUSED[next(iter(_REUSED))]
    return kept


def check_training_state(spec: UnitSpec, tensors: Mapping[str, Tensor]) -> None:
    """:class:`CheckpointError` unless ``tensors`` are a full fp32 training state of ``spec``'s model."""
    expected = _state_shapes(spec.model)
    if tensors.keys() != expected.keys():
        raise CheckpointError(
            f"training state does not fit {spec.model}: missing {sorted(set(expected) - set(tensors))}, "
            f"unexpected {sorted(set(tensors) - set(expected))}"
        )
    for name, shape in expected.items():
        t = tensors[name]
        if t.dtype != torch.float32 or tuple(t.shape) != shape:
            raise CheckpointError(f"tensor {name!r} is {t.dtype}{tuple(t.shape)}, expected torch.float32{shape}")


@functools.lru_cache(maxsize=64)
def _state_shapes(cfg: ModelConfig) -> MappingProxyType[str, tuple[int, ...]]:
    """Name -> shape of every tensor of a full training state of ``cfg``'s model (every replay checks its state)."""
    expected: dict[str, tuple[int, ...]] = {}
    for name, shape in param_shapes(cfg).items():
        expected[f"model.{name}"] = shape
        expected[f"optim.{name}.exp_avg"] = shape
        expected[f"optim.{name}.exp_avg_sq"] = shape
        expected[f"optim.{name}.step"] = ()
    return MappingProxyType(expected)


def check_finite(tensors: Mapping[str, Tensor]) -> None:
    """:class:`CheckpointError` naming every floating tensor of ``tensors`` that holds a NaN or an infinity (with how
    many): such a state cannot be averaged into a model anyone would want, nor its loss stored as JSON."""
    bad = {name: int((~torch.isfinite(t)).sum()) for name, t in sorted(tensors.items())
           if t.is_floating_point() and not bool(torch.isfinite(t).all())}
    if bad:
        raise CheckpointError(f"non-finite values (NaN or inf) in {len(bad)} tensor(s), count per tensor: {bad}")


def export_training_state(model: TinyGPT, opt: torch.optim.Optimizer) -> dict[str, Tensor]:
    """Live views (not copies) of the full training state; clone before mutating the model again if kept."""
    out: dict[str, Tensor] = {}
    for name, p in model.named_parameters():
        st = opt.state[p]
        out[f"model.{name}"] = p.detach()
        out[f"optim.{name}.exp_avg"] = st["exp_avg"]
        out[f"optim.{name}.exp_avg_sq"] = st["exp_avg_sq"]
        out[f"optim.{name}.step"] = st["step"]
    return out


@contextmanager
def deterministic(threads: int) -> Iterator[None]:
    """Deterministic algorithms and exactly ``threads`` intra-op threads for the block; restored after."""
    with _TORCH_LOCK:
        prev_threads = torch.get_num_threads()
        prev_det = torch.are_deterministic_algorithms_enabled()
        prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
        prev_fill = torch.utils.deterministic.fill_uninitialized_memory
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(True)
        # Deterministic mode also NaN-fills every fresh allocation, which costs ~10% of a step here. No op we use
        # reads uninitialised memory, and the determinism tests would catch one that did.
        torch.utils.deterministic.fill_uninitialized_memory = False
        try:
            yield
        finally:
            torch.utils.deterministic.fill_uninitialized_memory = prev_fill
            torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
            torch.set_num_threads(prev_threads)


def train_step(model: TinyGPT, opt: torch.optim.Optimizer, x: Tensor, y: Tensor) -> float:
    """One AdamW step on (x, y); returns the loss before the step."""
    opt.zero_grad(set_to_none=True)
    loss = model.loss(x, y)
    loss.backward()
    opt.step()
    return float(loss.detach())


def run_segment(
    spec: UnitSpec, model: TinyGPT, opt: torch.optim.Optimizer, seg_index: int, on_step: OnStep | None = None,
    plan: Plan | None = None,
) -> tuple[list[tuple[int, list[int]]], list[float]]:
    """Train the ``segment_len`` steps of one segment in place on ``plan`` (default: :data:`PROVIDER_PLAN`);
    returns (step batches, losses)."""
    plan = plan or PROVIDER_PLAN
    batches = segment_batches(spec, seg_index)
    tokens = data.train_tokens()
    losses: list[float] = []
    for step, offsets in batches:
        x, y = data.make_batch(tokens, offsets, spec.model.ctx)
        if plan.device != "cpu":
            x, y = x.to(plan.device), y.to(plan.device)
        loss = plan_step(model, opt, x, y, plan)
        losses.append(loss)
        if on_step is not None:
            on_step(step, loss)
    return batches, losses


# --------------------------------------------------------------------------- execution plans


@dataclass(frozen=True)
class Plan:
    """How a machine executes a spec. ``micro_batches`` splits each step's batch and accumulates the gradients
    (the same step, summed in another order). :data:`PROVIDER_PLAN` (CPU, one micro-batch) is what any verifier
    replays bit for bit; work on another plan is checked within a calibrated tolerance (:mod:`node.crosscheck`),
    except by a machine on the very same plan, which replays it bit for bit when the plan is :attr:`exact`.

    ``gpu`` names a CUDA plan's GPU model (:func:`gpu_slug` of the device name, e.g. ``h200``): deterministic
    kernels give the same bits on the same GPU model, not across models, so only a named CUDA plan is exact."""

    device: str = "cpu"
    micro_batches: int = 1
    gpu: str = ""

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise GridMintValueError(f"plan device must be 'cpu' or 'cuda', got {self.device!r}")
        if not isinstance(self.micro_batches, int) or isinstance(self.micro_batches, bool) \
                or not 1 <= self.micro_batches <= 64:
            raise GridMintValueError(f"micro_batches must be an int in [1, 64], got {self.micro_batches!r}")
        if self.gpu and (self.device != "cuda" or not isinstance(self.gpu, str) or not _GPU_SLUG.fullmatch(self.gpu)):
            raise GridMintValueError(f"a GPU model belongs to a cuda plan, as 1-24 of [a-z0-9-], got {self.gpu!r} "
                                     f"on {self.device!r}")

    @property
    def label(self) -> str:
        """``cpu``, ``cuda/mb4``, ``cuda:h200`` ...: what :meth:`parse` reads back (one micro-batch is left unsaid)."""
        base = f"{self.device}:{self.gpu}" if self.gpu else self.device
        return base if self.micro_batches == 1 else f"{base}/mb{self.micro_batches}"

    @property
    def exact(self) -> bool:
        """Whether two machines running this plan compute the same bits (so one replays the other's work exactly):
        any CPU plan (deterministic float32 kernels, a fixed thread count), a CUDA plan only with its GPU model
        named. Two machines on an exact plan compute the same bits only on the same kernels too (the torch build and
        CPU kind; torch, CUDA and cuDNN versions): :func:`same_bits`, with :func:`node.device.kernel_build`."""
        return self.device == "cpu" or bool(self.gpu)

    @classmethod
    def parse(cls, text: str) -> Plan:
        """``cpu``, ``cuda``, ``cuda:h200``, ``cpu/mb4``, ``cuda:h100/mb2`` ..."""
        head, _, mb = text.partition("/")
        if mb and not (mb.startswith("mb") and mb[2:].isdigit()):
            raise GridMintValueError(f"plan {text!r}: expected DEVICE[:GPU] or DEVICE[:GPU]/mbN")
        device, colon, gpu = head.partition(":")
        if colon and not gpu:
            raise GridMintValueError(f"plan {text!r}: a ':' must be followed by the GPU model")
        return cls(device, int(mb[2:]) if mb else 1, gpu)


_GPU_SLUG = re.compile(r"[a-z0-9][a-z0-9-]{0,23}")


def gpu_slug(device_name: str) -> str:
    """A GPU's model as a plan names it: ``NVIDIA H200`` -> ``h200``, ``NVIDIA GeForce RTX 4090`` ->
    ``geforce-rtx-4090`` (lower case, runs of other characters as one ``-``, the vendor dropped, at most 24)."""
    words = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    words = re.sub(r"^nvidia-", "", words)[:24].strip("-")
    return words or "gpu"


PROVIDER_PLAN = Plan()


def same_bits(plan: Plan, build: str | None, other: Plan, other_build: str | None) -> bool:
    """Whether work on ``plan`` computed with kernel ``build`` (:func:`node.device.kernel_build`) replays bit for bit
    on ``other`` with ``other_build``: the same :attr:`~Plan.exact` plan on the same, known kernels. Deterministic
    training is reproducible only on the same kernels: a CPU with another vector ISA or MKL path, or another torch,
    CUDA or cuDNN version, computes other bits on the very same plan (``bench proof``'s ``cross_build``)."""
    return plan == other and plan.exact and bool(build) and build == other_build


def fit_micro_batches(micro_batches: int, batch: int) -> int:
    """The micro-batches a plan of ``micro_batches`` splits a batch of ``batch`` into: its own where they split it
    evenly, else the fewest above them that do (smaller micro-batches: no more memory), else the most below (1 at
    least), at most 64. One rule on every machine (provider, verifier, referee), so a plan computes the same bits
    wherever it runs, whatever batch a customer chose (a batch of 15 stopped every cpu/mb2 node and verifier)."""
    if batch % micro_batches == 0:
        return micro_batches
    divisors = [d for d in range(1, min(batch, 64) + 1) if batch % d == 0]
    return next((d for d in divisors if d > micro_batches), divisors[-1])


def plan_step(model: TinyGPT, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, plan: Plan) -> float:
    m = fit_micro_batches(plan.micro_batches, x.shape[0])
    if m == 1:
        return train_step(model, opt, x, y)
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for xs, ys in zip(x.chunk(m), y.chunk(m)):
        part = model.loss(xs, ys) / m  # equal chunks: the mean over the batch, summed in parts
        part.backward()
        total += float(part.detach())
    opt.step()
    return total


def place(model: TinyGPT, opt: torch.optim.Optimizer, plan: Plan) -> None:
    """Move a model and its AdamW state onto the plan's device (in place)."""
    if plan.device == "cpu":
        return
    if not torch.cuda.is_available():
        raise GridMintValueError("plan wants CUDA but this machine has no CUDA device")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    model.to(plan.device)
    for st in opt.state.values():
        for k in st:
            st[k] = st[k].to(plan.device)


# --------------------------------------------------------------------------- a unit


@dataclass(frozen=True)
class UnitResult:
    """What a provider hands in. ``segment_paths[i]`` is the full training state at the start of segment i."""

    final_path: Path
    segment_paths: list[Path]
    proof: TrainingProof
    losses: list[float]
    final_model: dict[str, Tensor]
    #: wall seconds the training loop spent on commitments (snapshot copies, waiting for a free snapshot buffer,
    #: and at the end for the last hashes and checkpoint writes): the proof's stall on the trainer
    commit_s: float = 0.0


TrainFn = Callable[..., UnitResult]


def checkpoint_metadata(spec: UnitSpec, seg_index: int | None) -> dict[str, str]:
    """Informational only: a verifier never trusts metadata, it hashes tensors."""
    return {
        "format": STATE_FORMAT,
        "spec_hash": spec.spec_hash(),
        "unit_id": spec.unit_id,
        "segment": "final" if seg_index is None else str(seg_index),
    }


def checkpoint_size(spec: UnitSpec, seg_index: int | None) -> int:
    """Exact bytes of the checkpoint :func:`train_unit` writes (and a node uploads, and a reveal re-derives) for
    segment ``seg_index`` of ``spec``'s unit, ``None`` for the final one: :func:`fresh_state` of the model's float32
    parameters (:func:`node.model.param_shapes`, a model built on the meta device) with its metadata, sized by
    :func:`node.checkpoint.serialized_size`. Every training state of a spec has these names, shapes and dtypes
    (:func:`check_training_state`), whatever the precision or the device it was trained on; nothing is allocated."""
    return checkpoint.serialized_size(_meta_training_state(spec.model), checkpoint_metadata(spec, seg_index))


@functools.lru_cache(maxsize=8)
def _meta_training_state(cfg: ModelConfig) -> Mapping[str, Tensor]:
    # a few thousand meta tensors for the largest model (~50 ms): built once per shape, read-only
    with torch.device("meta"):
        return MappingProxyType(fresh_state({name: torch.empty(shape, dtype=torch.float32)
                                             for name, shape in param_shapes(cfg).items()}))


def segment_path(workdir: Path, seg_index: int) -> Path:
    return workdir / f"segment-{seg_index:04d}.safetensors"


def final_path(workdir: Path) -> Path:
    return workdir / "final.safetensors"


def check_start(spec: UnitSpec, start: Mapping[str, Tensor]) -> None:
    try:
        build_model(spec.model, start)
    except GridMintValueError as exc:
        raise GridMintValueError(f"start checkpoint does not fit the unit's model: {exc}") from exc


#: The progress journal :func:`train_unit` keeps in a unit's directory when asked to (``resume_as``).
PROGRESS_FILE = "progress.json"


def _write_progress(workdir: Path, tag: Mapping[str, Any], hashes: Sequence[str],
                    seg_losses: Sequence[Sequence[float]]) -> None:
    """Replace the journal (no fsync: :func:`resume_point` trusts nothing it does not re-hash)."""
    tmp = workdir / (PROGRESS_FILE + ".tmp")
    tmp.write_text(json.dumps({**tag, "hashes": list(hashes), "losses": [list(x) for x in seg_losses]}))
    os.replace(tmp, workdir / PROGRESS_FILE)


def resume_point(spec: UnitSpec, start: Mapping[str, Tensor], workdir: Path, tag: Mapping[str, Any],
                 ) -> tuple[int, list[str], list[list[float]], dict[str, Tensor]] | None:
    """Where a unit stopped partway can go on from: ``(k, hashes of states 0..k, losses of segments 0..k-1, state
    k)`` for the last segment start ``k >= 1`` that ``workdir``'s journal names, if the journal is this unit's on
    this plan and build (``tag``) and starts from ``start``, and checkpoints 0..k are on disk whole and hash to what
    it says (each is uploaded and committed to: one damaged file would be a proof no replay agrees with); else None,
    and the unit is trained from step 0. Runs inside :func:`deterministic` (it hashes)."""
    try:
        journal = json.loads((workdir / PROGRESS_FILE).read_text())
        if not isinstance(journal, dict) or any(journal.get(k) != v for k, v in tag.items()):
            return None
        hashes, losses = list(journal["hashes"]), [[float(x) for x in seg] for seg in journal["losses"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if (not hashes or hashes[0] != start_state_hash(start) or len(losses) > spec.n_segments
            or any(len(seg) != spec.segment_len for seg in losses)):
        return None
    best: tuple[int, dict[str, Tensor]] | None = None
    for k in range(min(len(hashes) - 1, len(losses)) + 1):
        path = final_path(workdir) if k == spec.n_segments else segment_path(workdir, k)
        try:
            state, _ = checkpoint.load(path)
            check_training_state(spec, state)
        except (OSError, CheckpointError, GridMintValueError):
            break
        if state_hash(state) != hashes[k]:
            break
        best = (k, state)
    if best is None or best[0] == 0:
        return None
    k, state = best
    return k, hashes[:k + 1], losses[:k], state


def train_unit(
    spec: UnitSpec, start: Mapping[str, Tensor], workdir: Path, *, on_step: OnStep | None = None,
    plan: Plan = PROVIDER_PLAN, resume_as: str | None = None,
) -> UnitResult:
    """Train one unit honestly from the model-only global checkpoint ``start`` (fresh AdamW state) on ``plan``.

    Writes ``segment-NNNN.safetensors`` (state at the start of each segment) and ``final.safetensors``
    into ``workdir``. ``on_step(step, loss)`` is called after every optimizer step. Deterministic given
    the spec and the plan: two runs on one machine give byte-identical checkpoints and the same proof; on
    :data:`PROVIDER_PLAN` that holds on every machine with the same torch build (what a verifier replays).

    Commitments do not stall training: at every segment boundary the state is snapshotted into a reusable
    buffer (:class:`node.statehash.AsyncStateHasher`: one fused copy on CPU; on CUDA a device-to-device copy,
    then to pinned host memory on a side stream), and hashing it and writing its checkpoint happen on a
    background thread while the next segment trains.

    ``resume_as`` (the kernel build this process trains with, :func:`node.device.plan_build`): keep a journal of the
    unit's progress in ``workdir`` (:data:`PROGRESS_FILE`: each kept checkpoint's state hash and every step's loss,
    rewritten at each segment boundary and once the hash of the state a segment ended in comes in, and when
    training is stopped by an exception: then with every segment trained; a kill loses the segment it lands in, and
    the one before only if it lands before that segment's end state is hashed), and start from the last kept
    segment a journal of this unit, plan and build vouches for (:func:`resume_point`) instead of step 0. Training
    from a segment's start state is what a verifier's replay does: the resumed unit's checkpoints, losses and proof
    are byte for byte an uninterrupted run's (tests).
    """
    check_start(spec, start)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    spec_hash = spec.spec_hash()
    n = spec.n_segments
    paths = [segment_path(workdir, s) for s in range(n)] + [final_path(workdir)]
    metas = [checkpoint_metadata(spec, s) for s in range(n)] + [checkpoint_metadata(spec, None)]

    def saver(k: int) -> Callable[[dict[str, Tensor]], object]:
        return lambda snapshot: checkpoint.save(paths[k], snapshot, metas[k])

    tag = {"unit_id": spec.unit_id, "spec_hash": spec_hash, "plan": plan.label, "build": resume_as}
    with deterministic(spec.threads):
        point = resume_point(spec, start, workdir, tag) if resume_as is not None else None
        first, known, seg_losses, state = point if point is not None else (0, [], [], fresh_state(start))
        digests = [expected_batch_digest(spec, s) for s in range(first)]
        model, opt = load_training_state(spec, state)
        del state
        place(model, opt, plan)
        live = export_training_state(model, opt)
        threads = max(1, min(8, (os.cpu_count() or 2) - (spec.threads if plan.device == "cpu" else 1)))
        with statehash.AsyncStateHasher(live, buffers=2, threads=threads) as hasher:
            t0 = time.perf_counter()
            # a resumed unit's start-of-segment checkpoint is on disk already, its hash vouched for
            futures = [] if first else [hasher.submit(live, then=saver(0))]
            commit_s = time.perf_counter() - t0
            journaled = (-1, -1)  # (hashes, segments) the journal holds

            def journal() -> None:
                """Rewrite the journal if a checkpoint's hash or a segment's losses came in since the last write:
                at each segment boundary, and after the step in which the hash of the state it ended in came in
                (hashed meanwhile, off this thread), so a kill loses at most the segment it lands in."""
                nonlocal journaled
                done = [f.result() for f in itertools.takewhile(lambda f: f.done(), futures)]
                if (len(done), len(seg_losses)) != journaled:
                    _write_progress(workdir, tag, known + done, seg_losses)
                    journaled = (len(done), len(seg_losses))

            def step_hook(step: int, loss: float) -> None:
                if len(futures) > journaled[0] >= 0 and futures[journaled[0]].done():
                    journal()
                if on_step is not None:
                    on_step(step, loss)

            try:
                for s in range(first, n):
                    batches, losses = run_segment(spec, model, opt, s, step_hook if resume_as is not None else on_step,
                                                  plan)
                    t0 = time.perf_counter()
                    futures.append(hasher.submit(live, then=saver(s + 1)))
                    for f in futures[:-2]:
                        if f.done():
                            f.result()  # a failed checkpoint write stops the unit now, not at its end
                    digests.append(batch_digest(batches))
                    seg_losses.append(losses)
                    if resume_as is not None:
                        journal()
                    commit_s += time.perf_counter() - t0
            except BaseException:
                if resume_as is not None and seg_losses:  # stopped (a signal, taken back): keep every segment trained
                    try:
                        _write_progress(workdir, tag, known + [f.result() for f in futures], seg_losses)
                    except Exception:  # noqa: BLE001 - (a failed write: the journal as it was; the stop goes on)
                        pass
                raise
            t0 = time.perf_counter()
            hashes = known + [f.result() for f in futures]
            commit_s += time.perf_counter() - t0
        final_model = {k: v.detach().to("cpu", copy=True) for k, v in model_only(live).items()}
    loss_micro = [mean_loss_micro(losses) for losses in seg_losses]
    all_losses = [x for losses in seg_losses for x in losses]
    commits = [SegmentCommit(s, hashes[s], hashes[s + 1], digests[s], loss_micro[s]) for s in range(n)]
    proof = make_proof(
        unit_id=spec.unit_id, spec_hash=spec_hash, seed=spec.seed, steps=spec.steps,
        segment_len=spec.segment_len, segments=commits,
    )
    return UnitResult(paths[-1], paths[:-1], proof, all_losses, final_model, commit_s)


# --------------------------------------------------------------------------- DiLoCo outer step and evaluation


def average_states(states: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Element-wise mean of model states (the DiLoCo outer step with outer lr 1.0).

    Computed in float64 over the values sorted per element, then cast back: the result does not depend on
    the order of ``states`` (so every marketplace replica gets the same next global checkpoint).
    """
    if not states:
        raise GridMintValueError("average_states needs at least one state")
    names = set(states[0])
    for i, st in enumerate(states[1:], 1):
        if set(st) != names:
            raise GridMintValueError(f"state {i} has tensors {sorted(set(st) ^ names)} that state 0 does not share")
    out: dict[str, Tensor] = {}
    for name in sorted(names):
        ref = states[0][name]
        for i, st in enumerate(states):
            if st[name].shape != ref.shape or st[name].dtype != ref.dtype:
                raise GridMintValueError(
                    f"tensor {name!r}: state {i} is {st[name].dtype}{tuple(st[name].shape)}, "
                    f"state 0 is {ref.dtype}{tuple(ref.shape)}"
                )
        stacked = torch.stack([st[name].detach().to(torch.float64) for st in states])
        ordered = torch.sort(stacked, dim=0).values
        acc = ordered[0].clone()
        for k in range(1, ordered.shape[0]):
            acc = acc + ordered[k]
        out[name] = (acc / len(states)).to(ref.dtype)
    return out


def evaluate(cfg: ModelConfig, model_state: Mapping[str, Tensor], n_batches: int = 8) -> float:
    """Mean next-byte cross-entropy (nats) on fixed held-out batches."""
    model = build_model(cfg, model_only(model_state))
    model.eval()
    total = 0.0
    with torch.no_grad():
        for x, y in data.eval_batches(n_batches, EVAL_BATCH_SIZE, cfg.ctx):
            total += float(model.loss(x, y))
    return total / n_batches
