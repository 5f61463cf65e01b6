"""A tiny byte-level GPT whose training is bit-for-bit reproducible on CPU.

Every op was chosen so that a replay (same torch build, same CPU kind, same thread count) gives the same
bytes: LayerNorm is written out as mean/var (torch's fused LayerNorm backward reduces in a thread-dependent
order that deterministic mode does not catch), and there is no dropout, so training needs no random state at
all once the weights exist. The thread count still matters (matmul blocking), which is why a unit's spec
pins it.
"""
from __future__ import annotations

import functools

from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from protocol.errors import GridMintValueError

LN_EPS = 1e-5
INIT_STD = 0.02


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the model. ``vocab`` is 256 because the model reads raw bytes."""

    vocab: int = 256
    d_model: int = 64
    n_layer: int = 2
    n_head: int = 4
    ctx: int = 64

    def __post_init__(self) -> None:
        for name in ("vocab", "d_model", "n_layer", "n_head", "ctx"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise GridMintValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_head:
            raise GridMintValueError(
                f"ModelConfig.d_model ({self.d_model}) must be a multiple of n_head ({self.n_head})"
            )

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        expected = {"vocab", "d_model", "n_layer", "n_head", "ctx"}
        if not isinstance(data, Mapping) or set(data) != expected:
            got = sorted(data) if isinstance(data, Mapping) else type(data).__name__
            raise GridMintValueError(f"ModelConfig needs exactly the fields {sorted(expected)}, got {got}")
        return cls(**{k: data[k] for k in expected})


class HandLayerNorm(nn.Module):
    """LayerNorm from elementwise ops and last-dim means: its backward does not depend on the thread count."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(dim=-1, keepdim=True)
        centered = x - mean
        var = (centered * centered).mean(dim=-1, keepdim=True)
        return centered * torch.rsqrt(var + LN_EPS) * self.weight + self.bias


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        hd = c // self.n_head
        q, k, v = self.qkv(x).split(c, dim=2)
        q = q.view(b, t, self.n_head, hd).transpose(1, 2)
        k = k.view(b, t, self.n_head, hd).transpose(1, 2)
        v = v.view(b, t, self.n_head, hd).transpose(1, 2)
        # The fused CPU kernel is ~17% faster per training step than matmul + masked softmax here. It splits work
        # per (batch, head), so results are reproducible for a fixed thread count (which the unit spec pins).
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).contiguous().view(b, t, c))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln1 = HandLayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = HandLayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.out = nn.Linear(4 * cfg.d_model, cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        # tanh-approximate GELU: about 3x cheaper than the erf form on CPU, and just as deterministic.
        return x + self.out(torch.nn.functional.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class TinyGPT(nn.Module):
    """Token + position embeddings, ``n_layer`` pre-norm blocks, final LayerNorm, untied output head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos = nn.Embedding(cfg.ctx, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = HandLayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab)

    def forward(self, idx: Tensor) -> Tensor:
        """``idx``: int64 (batch, time) with time <= ctx. Returns logits (batch, time, vocab)."""
        t = idx.shape[1]
        if t > self.cfg.ctx:
            raise GridMintValueError(f"sequence length {t} exceeds the model context {self.cfg.ctx}")
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    #: Run the forward pass under bfloat16 autocast (a ``bf16`` job; set by node.trainer.load_training_state).
    autocast_bf16: bool = False

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        """Mean next-byte cross-entropy in nats (always computed in float32)."""
        if self.autocast_bf16:
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                logits = self(x)
            logits = logits.float()
        else:
            logits = self(x)
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every trainable tensor, without allocating a model's weights twice."""
    return dict(_param_shapes(cfg))


@functools.lru_cache(maxsize=64)
def _param_shapes(cfg: ModelConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:
    # building even a weightless (meta) model costs ~10 ms, and every checkpoint load checks its shapes
    with torch.device("meta"):
        model = TinyGPT(cfg)
    return tuple((name, tuple(p.shape)) for name, p in model.named_parameters())


def init_state(cfg: ModelConfig, seed: int) -> dict[str, Tensor]:
    """Fresh float32 weights, a pure function of (cfg, seed) on any machine.

    Matrices and embeddings ~ N(0, 0.02) drawn from one ``torch.Generator`` in sorted name order;
    biases 0; LayerNorm weights 1.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise GridMintValueError(f"init seed must be an int in [0, 2**63), got {seed!r}")
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    state: dict[str, Tensor] = {}
    for name, shape in sorted(param_shapes(cfg).items()):
        leaf = name.rsplit(".", 1)[-1]
        if ".ln" in f".{name}" and leaf == "weight":
            state[name] = torch.ones(shape, dtype=torch.float32)
        elif leaf == "bias":
            state[name] = torch.zeros(shape, dtype=torch.float32)
        else:
            state[name] = torch.randn(shape, generator=gen, dtype=torch.float32) * INIT_STD
    return state


def build_model(cfg: ModelConfig, state: Mapping[str, Tensor]) -> TinyGPT:
    """A TinyGPT holding copies of ``state`` (strict: every name, shape and dtype must match)."""
    model = TinyGPT(cfg)
    expected = param_shapes(cfg)
    if set(state) != set(expected):
        missing = sorted(set(expected) - set(state))
        extra = sorted(set(state) - set(expected))
        raise GridMintValueError(f"model state does not fit {cfg}: missing {missing}, unexpected {extra}")
    for name, shape in expected.items():
        t = state[name]
        if tuple(t.shape) != shape or t.dtype != torch.float32:
            raise GridMintValueError(
                f"model tensor {name!r} is {t.dtype}{tuple(t.shape)}, expected torch.float32{shape}"
            )
    model.load_state_dict(dict(state), strict=True)
    return model
