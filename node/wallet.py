"""The node's wallet: an encrypted Ethereum keystore file (created on first use, mode 0600), and the lock that keeps
a second agent process off a wallet one already runs on."""
from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from eth_account import Account
from eth_account.signers.local import LocalAccount

from protocol.errors import GridMintValueError

DEFAULT_WALLET = Path.home() / ".gridmint" / "wallet.json"


def password_from_env() -> str:
    return os.environ.get("GRIDMINT_WALLET_PASSWORD", "")


def load(path: Path = DEFAULT_WALLET, password: str | None = None) -> LocalAccount:
    """Open the existing keystore at ``path`` (a command that only reads, such as ``node status``: a mistyped path
    must not create a new wallet and report on an address nobody meant)."""
    if not path.exists():
        raise GridMintValueError(f"no wallet at {path}: create one with `gridmint node wallet --wallet {path}`, or name "
                                 f"the file your node uses")
    return load_or_create(path, password)


def load_or_create(path: Path = DEFAULT_WALLET, password: str | None = None) -> LocalAccount:
    """Load the keystore at ``path``, or create a fresh key there. The password comes from GRIDMINT_WALLET_PASSWORD."""
    password = password_from_env() if password is None else password
    if path.is_symlink():  # (a link to where the key is to live: made there, as before; a review found a link to a
        # file not yet made was never written, and each try made a new key)
        path = Path(os.path.realpath(path))
    if path.is_dir():
        raise GridMintValueError(f"wallet {path} is a directory: name a file (e.g. {path / 'wallet.json'})")
    if path.exists():
        try:
            keystore = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise GridMintValueError(f"cannot read wallet {path}: {exc}") from exc
        if not isinstance(keystore, dict) or "crypto" not in keystore and "Crypto" not in keystore:
            raise GridMintValueError(f"{path} is not an Ethereum keystore file (a wallet GridMint wrote)")
        try:
            key = Account.decrypt(keystore, password)
        except (ValueError, KeyError, TypeError) as exc:
            raise GridMintValueError(f"cannot open wallet {path}: {exc} (wrong GRIDMINT_WALLET_PASSWORD?)") from exc
        return Account.from_key(key)
    account = Account.create()
    try:
        created = _create(account, path, password)
    except OSError as exc:
        raise GridMintValueError(f"cannot create wallet {path}: {exc.strerror or exc}") from exc
    # another process created it meanwhile (two agents started together on a new wallet): use that key, never
    # overwrite it (a review found the second start's key replaced the first's, which ran on with a key on no disk)
    if not created and not path.exists():
        raise GridMintValueError(f"cannot create wallet {path}: something else holds the name")
    return account if created else load_or_create(path, password)


def _create(account: LocalAccount, path: Path, password: str) -> bool:
    """Write ``account``'s keystore at ``path`` whole, only if no file is there (False if one is)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.part")
    _write(account, part, password)
    try:
        os.link(part, path)  # (atomic, and refuses an existing name: of two, one wins)
    except FileExistsError:
        return False
    except OSError:  # a filesystem without hard links: made exclusively, then written
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as fh:
            fh.write(part.read_bytes())
            fh.flush()
            os.fsync(fh.fileno())
    finally:
        part.unlink(missing_ok=True)
    return True


def save(account: LocalAccount, path: Path, password: str | None = None) -> None:
    """Write ``account``'s keystore at ``path``, replacing any file there."""
    password = password_from_env() if password is None else password
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(account, path, password)


def _write(account: LocalAccount, path: Path, password: str) -> None:
    keystore = Account.encrypt(account.key, password, kdf="pbkdf2", iterations=200_000)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(keystore, fh)
        fh.flush()
        os.fsync(fh.fileno())


def lock_path(address: str) -> Path:
    """The lock file of the agent running on wallet ``address``: one per address (two keystore files holding the
    same key are one wallet), next to the node's default work directory."""
    return Path.home() / ".gridmint" / "work" / f"{address}.lock"


@contextmanager
def hold(address: str, what: str, path: Path | None = None) -> Iterator[Path]:
    """Hold the exclusive lock of wallet ``address`` (at ``path``, default :func:`lock_path`) while the block runs:
    an agent that signs with the wallet (``what``: e.g. ``gridmint node run``) must be its only one. Two would each
    draw request nonces from their own clock, and the marketplace takes only nonces above the last it accepted; two
    started together could both stake. Raises GridMintValueError naming the process that holds it.

    The lock is ``flock``'s: the kernel drops it when its holder exits, however it exits, so a crash leaves no stale
    lock behind. The holder's pid and command are written into the file for the message."""
    path = path or lock_path(address)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 500, 0).decode(errors="replace").strip() or "another process"
            raise GridMintValueError(f"wallet {address} is in use by {holder} (lock {path}): one agent per wallet; "
                                     f"stop that one first, or use another wallet") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{what} (pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')})\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race a process about to lock it)
