"""``gridmint bench matching`` runs end to end at toy sizes and checks itself against the naive matcher."""
from __future__ import annotations

import json

import pytest

from gridmint.bench import available
from gridmint.bench import matching as bench


def test_matching_bench_runs_at_toy_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    assert "matching" in available()
    rc = bench.main(["--providers", "3000", "--jobs", "300", "--naive-jobs", "30", "--sim-providers", "2000",
                     "--sim-hours", "4", "--seed", "2"])
    lines = capsys.readouterr().out.strip().splitlines()
    figures = json.loads(lines[-1])
    assert rc == 0 and figures["agree"] is True
    assert len(lines) > 4  # progress lines before the JSON
    for key in ("assignments_per_s", "p99_ms", "speedup_vs_naive", "speedup_basis", "naive_assignments", "sim_s",
                "speedup_vs_numpy_scan"):
        assert key in figures
    assert figures["assignments"] > figures["naive_assignments"] > 0
    assert figures["assignments_per_s"] > 0 and figures["p99_ms"] > 0 and figures["speedup_vs_naive"] > 1
    assert "sim_day_1m_providers_s" not in figures  # only a day with a million providers is reported as that


def test_unit_demands_share_their_jobs_requirements() -> None:
    import numpy as np

    jobs = bench.unit_demands(20, np.random.default_rng(0))
    assert len(jobs) == 20 and all(1 <= len(units) <= 8 for units in jobs)
    for units in jobs:
        assert len({(d.vram_mb, d.min_stake, d.max_price, d.regions, d.replicas) for d in units}) == 1
        assert len({d.unit_id for d in units}) == len(units)
