"""Faster sender recovery for the in-process py-evm chain (development and tests only).

py-evm recovers every transaction's sender from its signature (twice per transaction, in eth-tester), with
eth-keys' pure-Python secp256k1, when ``coincurve`` is not installed: that is ~2/3 of an in-process transaction's
time. ``install()`` memoises recovery, and seeds the memo whenever this process signs: ECDSA public-key recovery
is a pure function of (message hash, v, r, s), and for a signature this process just made with key ``k`` its
result is ``k``'s public key. Nothing else changes: a signature made elsewhere is recovered as before.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from functools import lru_cache
from typing import Any

_MAX_ENTRIES = 1 << 16
_lock = threading.Lock()
_installed = False


def install() -> bool:
    """Patch eth-keys' native backend (idempotent). Returns False if that backend is not the one in use."""
    global _installed
    with _lock:
        if _installed:
            return True
        try:
            from eth_keys.backends.native import main as native
        except ImportError:  # pragma: no cover - eth-keys always ships it
            return False
        memo: OrderedDict[tuple[bytes, tuple[int, int, int]], bytes] = OrderedDict()
        raw_sign: Callable[[bytes, bytes], tuple[int, int, int]] = native.ecdsa_raw_sign
        raw_recover: Callable[[bytes, Any], bytes] = native.ecdsa_raw_recover
        public_key = lru_cache(maxsize=256)(native.private_key_to_public_key)

        def remember(key: tuple[bytes, tuple[int, int, int]], value: bytes) -> None:
            with _lock:
                memo[key] = value
                if len(memo) > _MAX_ENTRIES:
                    memo.popitem(last=False)

        def sign(msg_hash: bytes, private_key_bytes: bytes) -> tuple[int, int, int]:
            vrs = raw_sign(msg_hash, private_key_bytes)
            remember((bytes(msg_hash), tuple(int(x) for x in vrs)), public_key(bytes(private_key_bytes)))  # type: ignore[arg-type]
            return vrs

        def recover(msg_hash: bytes, vrs: Any) -> bytes:
            key = (bytes(msg_hash), tuple(int(x) for x in vrs))
            with _lock:
                hit = memo.get(key)
            if hit is None:
                hit = raw_recover(msg_hash, vrs)
                remember(key, hit)  # type: ignore[arg-type]
            return hit

        native.ecdsa_raw_sign = sign  # type: ignore[assignment]
        native.ecdsa_raw_recover = recover  # type: ignore[assignment]
        _installed = True
        return True
