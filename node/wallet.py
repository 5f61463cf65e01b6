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


def load_or_create(path: Path = DEFAULT_WALLET, password: str | None = None) -> LocalAccount:
    """Load the keystore at ``path``, or create a fresh key there. The password comes from GRIDMINT_WALLET_PASSWORD."""
    password = password_from_env() if password is None else password
    if path.exists():
        try:
            key = Account.decrypt(json.loads(path.read_text()), password)
        except (ValueError, json.JSONDecodeError) as exc:
            raise GridMintValueError(f"cannot open wallet {path}: {exc} (wrong GRIDMINT_WALLET_PASSWORD?)") from exc
        return Account.from_key(key)
    account = Account.create()
    save(account, path, password)
    return account


def save(account: LocalAccount, path: Path, password: str | None = None) -> None:
    password = password_from_env() if password is None else password
    path.parent.mkdir(parents=True, exist_ok=True)
    keystore = Account.encrypt(account.key, password, kdf="pbkdf2", iterations=200_000)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(keystore, fh)
