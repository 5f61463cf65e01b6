"""`gridmint bench api` end to end at toy size: the real service and the baseline under wrk, every request accepted."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_bench_api_runs_and_reports_its_figures() -> None:
    if shutil.which("wrk") is None:
        pytest.fail("wrk is not installed (Debian package 'wrk'; .ci/run installs it)", pytrace=False)
    proc = subprocess.run([sys.executable, "-m", "gridmint.cli", "bench", "api", "--seconds", "1", "--warmup", "1",
                           "--repeats", "1", "--connections", "2", "--profile-samples", "5"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["service_errors"] == 0, proc.stdout[-3000:]
    assert result["rps"] > 0 and result["baseline_rps"] > 0 and result["p99_ms"] > 0
    assert result["ratio"] == pytest.approx(result["rps"] / result["baseline_rps"], rel=1e-3)
    assert result["service_runs"][0]["ok"] == result["service_runs"][0]["requests"] > 0
    assert result["steps_us"]["ecdsa_backend"].startswith("coincurve")
    assert result["steps_us"]["keccak_backend"] == "pysha3"
    assert result["steps_us"]["nonce_and_heartbeat_one_txn_us"] > 0
