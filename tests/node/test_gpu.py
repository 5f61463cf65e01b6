"""CUDA paths of proof-of-training (run on the GPU machine: ``pytest -m gpu``; skipped without CUDA)."""
from __future__ import annotations

import pytest
import torch

from node.model import ModelConfig, build_model, init_state
from node.statehash import AsyncStateHasher, state_hash
from node.trainer import export_training_state

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CFG = ModelConfig(d_model=64, n_layer=2, n_head=4, ctx=64)


def _trained(steps: int, det: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.use_deterministic_algorithms(det)
    model = build_model(CFG, init_state(CFG, 1)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randint(0, 256, (8, CFG.ctx), generator=gen).cuda()
        model.loss(x[:, :-1], x[:, 1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.use_deterministic_algorithms(False)
    return model, opt


def test_async_hash_of_a_cuda_state_equals_the_synchronous_hash_and_ignores_later_steps() -> None:
    model, opt = _trained(3, det=False)
    live = export_training_state(model, opt)
    before = state_hash(live)
    with AsyncStateHasher(live, buffers=2, threads=4) as hasher:
        fut = hasher.submit(live)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)  # the next step must not leak into the snapshot being hashed
        assert fut.result() == before
        assert hasher.submit(live).result() == state_hash(live) != before


def test_honest_cuda_training_replays_bit_for_bit_on_the_same_gpu() -> None:
    a = state_hash(export_training_state(*_trained(5, det=True)))
    b = state_hash(export_training_state(*_trained(5, det=True)))
    assert a == b
