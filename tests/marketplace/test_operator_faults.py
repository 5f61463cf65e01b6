"""What an operator's mistakes and a machine's failures must not do: a bad or empty setting starts nothing, and a
blob write that fails leaves nothing behind."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from marketplace.blobs import BlobStore
from marketplace.settings import Settings
from node import checkpoint
from node.model import ModelConfig, init_state


@pytest.mark.parametrize("name, value, says", [
    ("GRIDMINT_DB_URL", "", "set but empty"),  # each API and worker on a SQLite file of its own, silently
    ("GRIDMINT_REDIS_URL", " ", "set but empty"),
    ("GRIDMINT_OPERATOR_KEY", "", "set but empty"),
    ("GRIDMINT_UNIT_TIMEOUT_S", "-5", "greater than or equal to 1"),  # every assigned unit reaped every 5 s
    ("GRIDMINT_REVEAL_TIMEOUT_S", "0", "greater than or equal to 1"),
    ("GRIDMINT_CLOCK_SKEW_S", "-100", "greater than or equal to 0"),  # every signed request refused
    ("GRIDMINT_MIN_STAKE", "-1", "greater than or equal to 0"),
    ("GRIDMINT_MAX_UPLOAD_BYTES", "0", "greater than or equal to 1"),
    ("GRIDMINT_SESSION_TTL_S", "-1", "greater than or equal to 1"),
])
def test_a_bad_or_empty_setting_is_refused_not_defaulted(monkeypatch: pytest.MonkeyPatch, name: str, value: str,
                                                          says: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=says):
        Settings()


def test_a_blob_write_that_fails_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a full disk each retried upload left its .part file for good, so the disk stayed full."""
    store = BlobStore(tmp_path / "blobs")
    data = checkpoint.serialize(init_state(ModelConfig(d_model=16, n_layer=1, n_head=2, ctx=8), 0), {})

    def full(*_: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)  # (the write itself failing half way ends the same)
    for _ in range(3):
        with pytest.raises(OSError, match="No space left"):
            store.put_checkpoint(data)
    assert list((tmp_path / "blobs").iterdir()) == []
    monkeypatch.undo()
    sha = store.put_checkpoint(data)
    assert [p.name for p in (tmp_path / "blobs").iterdir()] == [f"{sha}.safetensors"] and store.read(sha) == data


def test_the_operator_key_never_shows_in_a_repr_or_log_of_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """GRIDMINT_OPERATOR_KEY holds the slasher and settler roles; as a plain str it was printed whole by any repr of
    the settings (a debug log line, a traceback's locals, a crash report). It is used all the same."""
    from eth_account import Account

    from marketplace.bootstrap import operator_account

    acct = Account.create()
    key = bytes(acct.key).hex()
    monkeypatch.setenv("GRIDMINT_OPERATOR_KEY", "0x" + key)
    settings = Settings()
    shown = [repr(settings), str(settings), f"{settings!r}", settings.model_dump_json(), repr(settings.model_dump())]
    assert not [text for text in shown if key in text.lower()]
    assert operator_account(settings).address == acct.address
