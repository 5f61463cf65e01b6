"""Helper processes die with the process that started them, even when it is SIGKILLed (e.g. a test timeout)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest


def _can_run_as_postgres() -> bool:
    if os.geteuid() != 0:
        return False
    import pwd

    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return False
    return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
@pytest.mark.parametrize("user", [None, pytest.param("postgres", marks=pytest.mark.skipif(
    not _can_run_as_postgres(), reason="dropping to the postgres user needs root and that user"))])
def test_children_die_when_the_parent_is_killed(tmp_path: Path, user: str | None) -> None:
    """Also a child run as another user (PostgreSQL when we are root): Linux clears the parent-death signal when the
    uid changes, so it must be set after the switch."""
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from gridmint.procs import Proc
        p = Proc("sleeper", ["sleep", "120"], Path({str(tmp_path)!r}), user={user!r})
        print(p.popen.pid, flush=True)
        time.sleep(120)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[2])
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    os.kill(child, 0)  # running
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        # a zombie still answers kill(0) until reaped by init; check its state
        try:
            if Path(f"/proc/{child}/stat").read_text().split()[2] == "Z":
                return
        except OSError:
            return
        time.sleep(0.1)
    os.kill(child, signal.SIGKILL)
    pytest.fail(f"child {child} outlived its SIGKILLed parent")
