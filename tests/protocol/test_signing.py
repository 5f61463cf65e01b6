from __future__ import annotations

import pytest
from eth_account import Account

from protocol.errors import ReplayError, SignatureError
from protocol.signing import (
    HEADER_SIGNATURE,
    HEADER_SIGNER,
    NonceSource,
    recover_typed,
    sign_request,
    sign_typed,
    verify_request,
)

CHAIN = 31337


@pytest.fixture()
def acct():
    return Account.from_key("0x" + "11" * 32)


def test_signed_request_verifies(acct) -> None:
    h = sign_request(acct, CHAIN, "post", "/work/next", b'{"a":1}', 7, 2_000)
    req = verify_request(h, CHAIN, "POST", "/work/next", b'{"a":1}', now=1_000)
    assert (req.signer, req.nonce, req.deadline) == (acct.address, 7, 2_000)


@pytest.mark.parametrize(
    "chain,method,path,body",
    [(1, "POST", "/work/next", b'{"a":1}'), (CHAIN, "GET", "/work/next", b'{"a":1}'),
     (CHAIN, "POST", "/work/other", b'{"a":1}'), (CHAIN, "POST", "/work/next", b'{"a":2}')],
)
def test_any_change_breaks_signature(acct, chain, method, path, body) -> None:
    h = sign_request(acct, CHAIN, "POST", "/work/next", b'{"a":1}', 7, 2_000)
    with pytest.raises(SignatureError, match="not by the claimed signer"):
        verify_request(h, chain, method, path, body, now=1_000)


def test_forged_signer_rejected(acct) -> None:
    other = Account.from_key("0x" + "22" * 32)
    h = sign_request(acct, CHAIN, "POST", "/p", b"", 1, 2_000)
    h[HEADER_SIGNER] = other.address
    with pytest.raises(SignatureError):
        verify_request(h, CHAIN, "POST", "/p", b"", now=0)


def test_expired_and_malformed(acct) -> None:
    h = sign_request(acct, CHAIN, "POST", "/p", b"", 1, 10)
    with pytest.raises(ReplayError):
        verify_request(h, CHAIN, "POST", "/p", b"", now=11)
    h[HEADER_SIGNATURE] = "0x1234"
    with pytest.raises(SignatureError, match="malformed"):
        verify_request(h, CHAIN, "POST", "/p", b"", now=0)
    with pytest.raises(SignatureError, match="missing headers"):
        verify_request({}, CHAIN, "POST", "/p", b"", now=0)


def test_typed_struct_roundtrip(acct) -> None:
    msg = {"unitId": b"\x01" * 32, "segment": 3, "ok": False, "claimedHash": b"\x02" * 32, "replayedHash": b"\x03" * 32}
    sig = sign_typed(acct, "Verdict", CHAIN, msg)
    assert recover_typed("Verdict", CHAIN, msg, sig) == acct.address
    assert recover_typed("Verdict", CHAIN, {**msg, "ok": True}, sig) != acct.address


def test_nonces_strictly_increase() -> None:
    src = NonceSource()
    seen = [src.next() for _ in range(1000)]
    assert all(b > a for a, b in zip(seen, seen[1:]))


def test_direct_request_digest_equals_the_eip712_library_digest() -> None:
    from eth_account import Account
    from eth_account.messages import _hash_eip191_message

    from protocol.signing import _typed, body_hash, request_digest

    acct = Account.create()
    for chain_id, method, path, body, nonce, deadline in [
        (1, "post", "/work/next", b"", 1, 2**40),
        (31337, "PUT", "/blobs", b"\x00" * 1000, 2**63 - 1, 0),
        (2**64, "GET", "/p\u00e4th", b'{"a":1}', 0, 2**256 - 1),
    ]:
        message = {"signer": acct.address, "method": method.upper(), "path": path, "bodyHash": body_hash(body),
                   "nonce": nonce, "deadline": deadline}
        expected = _hash_eip191_message(_typed("Request", chain_id, message))
        assert request_digest(chain_id, acct.address, method, path, body, nonce, deadline) == expected
