from __future__ import annotations

import math

import pytest
import torch

from node.model import ModelConfig, TinyGPT, build_model, init_state, param_shapes
from protocol.errors import GridMintValueError


def test_init_is_a_pure_function_of_seed(tiny_cfg) -> None:
    a, b, c = init_state(tiny_cfg, 1), init_state(tiny_cfg, 1), init_state(tiny_cfg, 2)
    assert a.keys() == b.keys() == param_shapes(tiny_cfg).keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["tok.weight"], c["tok.weight"])
    assert torch.equal(a["blocks.0.ln1.weight"], torch.ones(tiny_cfg.d_model))
    assert torch.equal(a["head.bias"], torch.zeros(tiny_cfg.vocab))


def test_default_config_size_and_initial_loss() -> None:
    cfg = ModelConfig()
    state = init_state(cfg, 0)
    n = sum(t.numel() for t in state.values())
    assert 100_000 < n < 200_000
    model = build_model(cfg, state)
    x = torch.randint(0, 256, (2, cfg.ctx), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = float(model.loss(x, x))
    assert abs(loss - math.log(256)) < 0.1


def test_attention_is_causal(tiny_cfg) -> None:
    model = build_model(tiny_cfg, init_state(tiny_cfg, 3))
    x = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(1))
    y = x.clone()
    y[0, 7] = (y[0, 7] + 1) % 256
    with torch.no_grad():
        la, lb = model(x), model(y)
    assert torch.equal(la[:, :7], lb[:, :7])
    assert not torch.equal(la[:, 7:], lb[:, 7:])


def test_hand_layernorm_matches_torch() -> None:
    from node.model import HandLayerNorm

    ln = HandLayerNorm(16)
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0))
    ref = torch.nn.functional.layer_norm(x, (16,), ln.weight, ln.bias, eps=1e-5)
    assert torch.allclose(ln(x), ref, atol=1e-6)


@pytest.mark.parametrize("kw", [{"d_model": 30, "n_head": 4}, {"ctx": 0}, {"vocab": True}])
def test_config_validation(kw) -> None:
    with pytest.raises(GridMintValueError):
        ModelConfig(**kw)


def test_build_model_is_strict(tiny_cfg) -> None:
    state = init_state(tiny_cfg, 0)
    with pytest.raises(GridMintValueError, match="missing"):
        build_model(tiny_cfg, {k: v for k, v in state.items() if k != "head.bias"})
    with pytest.raises(GridMintValueError, match="float32"):
        build_model(tiny_cfg, {**state, "head.bias": state["head.bias"].double()})
    with pytest.raises(GridMintValueError):
        TinyGPT(tiny_cfg)(torch.zeros(1, tiny_cfg.ctx + 1, dtype=torch.int64))


def test_config_dict_round_trip(tiny_cfg) -> None:
    assert ModelConfig.from_dict(tiny_cfg.to_dict()) == tiny_cfg
    with pytest.raises(GridMintValueError):
        ModelConfig.from_dict({**tiny_cfg.to_dict(), "extra": 1})
