"""One agent process per wallet: the second one is refused, told which process holds the wallet."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from node.wallet import hold
from protocol.errors import GridMintValueError

ADDRESS = "0x" + "ab" * 20
TRY = ("import sys; from pathlib import Path; from node.wallet import hold\n"
       "with hold(sys.argv[1], 'second', Path(sys.argv[2])): print('held')")


def other_process(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", TRY, ADDRESS, str(path)], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2])


def test_a_second_process_on_the_wallet_is_refused_until_the_first_exits(tmp_path: Path) -> None:
    path = tmp_path / "locks" / f"{ADDRESS}.lock"
    with hold(ADDRESS, "gridmint node run", path):
        got = other_process(path)
        assert got.returncode != 0 and "held" not in got.stdout
        assert f"wallet {ADDRESS} is in use by gridmint node run (pid {os.getpid()}" in got.stderr, got.stderr
        with pytest.raises(GridMintValueError, match="one agent per wallet"):  # a second open in this process too
            with hold(ADDRESS, "again", path):
                pass
    got = other_process(path)
    assert got.returncode == 0 and got.stdout.strip() == "held", got.stderr


def test_the_lock_lives_under_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    with hold(ADDRESS, "gridmint node run") as path:
        assert path == tmp_path / ".gridmint" / "work" / f"{ADDRESS}.lock"
