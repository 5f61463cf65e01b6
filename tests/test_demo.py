"""`gridmint demo` end to end, as a user runs it: real Hardhat node, Redis, API, Celery worker, agent processes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(900)
def test_demo_runs_the_whole_story(tmp_path: Path) -> None:
    env = {**os.environ, "COLUMNS": "160", "TERM": "dumb"}
    proc = subprocess.run([sys.executable, "-m", "gridmint.cli", "demo", "--data-dir", str(tmp_path), "--rounds", "3"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    for line in ("SLASHED", "ok   token totals conserved", "ok   cheat slashed", "ok   cheat paid nothing",
                 "ok   honest providers paid and claimed", "ok   loss went down",
                 "ok   provider on another execution plan checked within tolerance and paid", "plan cpu/mb2",
                 "ok   the job's web page shows it settled, and the cheat slashed", "watch it run: http://"):
        assert line in out, f"{line!r} missing from demo output:\n{out[-6000:]}"
    assert "FAIL" not in out
