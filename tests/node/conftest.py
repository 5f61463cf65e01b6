"""Shared fixtures for the node tests: a tiny model so the whole folder runs in seconds on 2 cores."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

import pytest
from torch import Tensor

from node.model import ModelConfig, init_state
from node.trainer import UnitResult, UnitSpec, train_unit

TINY = ModelConfig(d_model=32, n_layer=1, n_head=2, ctx=32)


def _make_spec(**changes: object) -> UnitSpec:
    base = UnitSpec(
        job_id="job-test",
        unit_id="0x" + "a1" * 32,
        round=0,
        shard=0,
        n_shards=2,
        model=TINY,
        steps=8,
        segment_len=2,
        batch_size=4,
        lr=1e-2,
        seed=42,
        threads=1,
    )
    return replace(base, **changes)


SpecFactory = Callable[..., UnitSpec]


@pytest.fixture(scope="session")
def make_spec() -> SpecFactory:
    """``make_spec(**changes)``: the tiny test spec with some fields replaced."""
    return _make_spec


@pytest.fixture(scope="session")
def tiny_cfg() -> ModelConfig:
    return TINY


@pytest.fixture(scope="session")
def spec() -> UnitSpec:
    return _make_spec()


@pytest.fixture(scope="session")
def global_state() -> dict[str, Tensor]:
    return init_state(TINY, seed=7)


@pytest.fixture(scope="session")
def honest(spec: UnitSpec, global_state: dict[str, Tensor], tmp_path_factory: pytest.TempPathFactory) -> UnitResult:
    return train_unit(spec, global_state, tmp_path_factory.mktemp("honest"))


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    return tmp_path / "unit"
