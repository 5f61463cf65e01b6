"""The node's wallet: an encrypted Ethereum keystore file (created on first use, mode 0600)."""
from __future__ import annotations

import json
import os
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
        save(account, path, password)
    except OSError as exc:
        raise GridMintValueError(f"cannot create wallet {path}: {exc.strerror or exc}") from exc
    return account


def save(account: LocalAccount, path: Path, password: str | None = None) -> None:
    password = password_from_env() if password is None else password
    path.parent.mkdir(parents=True, exist_ok=True)
    keystore = Account.encrypt(account.key, password, kdf="pbkdf2", iterations=200_000)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(keystore, fh)
