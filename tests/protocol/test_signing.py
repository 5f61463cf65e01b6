from __future__ import annotations

import pytest
from eth_account import Account

from protocol.errors import ReplayError, SignatureError
from protocol.signing import (
    Domain,
    HEADER_SIGNATURE,
    HEADER_SIGNER,
    NonceSource,
    recover_typed,
    sign_request,
    sign_typed,
    verify_request,
)

CHAIN = Domain(31337, "0x" + "ab" * 20)
OTHER_DEPLOYMENT = Domain(31337, "0x" + "cd" * 20)  # the same chain, another marketplace's contracts


@pytest.fixture()
def acct():
    return Account.from_key("0x" + "11" * 32)


def test_signed_request_verifies(acct) -> None:
    h = sign_request(acct, CHAIN, "post", "/work/next", b'{"a":1}', 7, 2_000)
    req = verify_request(h, CHAIN, "POST", "/work/next", b'{"a":1}', now=1_000)
    assert (req.signer, req.nonce, req.deadline) == (acct.address, 7, 2_000)


@pytest.mark.parametrize(
    "chain,method,path,body",
    [(Domain(1, CHAIN.contract), "POST", "/work/next", b'{"a":1}'), (OTHER_DEPLOYMENT, "POST", "/work/next", b'{"a":1}'),
     (CHAIN, "GET", "/work/next", b'{"a":1}'),
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
    assert recover_typed("Verdict", OTHER_DEPLOYMENT, msg, sig) != acct.address  # another marketplace's verdict


def test_a_domain_names_a_deployment() -> None:
    """A bare chain id would sign for every marketplace on the chain: refused, as are malformed domains."""
    acct = Account.create()
    with pytest.raises(TypeError, match="Domain"):
        sign_request(acct, 31337, "POST", "/p", b"", 1, 2)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Domain"):
        verify_request({}, 31337, "POST", "/p", b"", now=0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Domain"):
        recover_typed("Verdict", 31337, {}, "0x00")  # type: ignore[arg-type]
    for chain, contract in [(0, CHAIN.contract), (True, CHAIN.contract), (1, "0x1234"), (1, None), (1, "zz" * 21)]:
        with pytest.raises(SignatureError):
            Domain(chain, contract)  # type: ignore[arg-type]
    assert Domain(1, "0x" + "AB" * 20) == Domain(1, "0x" + "ab" * 20)  # any case: one canonical form


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
        (Domain(1, "0x" + "00" * 20), "post", "/work/next", b"", 1, 2**40),
        (Domain(31337, "0x" + "5f" * 20), "PUT", "/blobs", b"\x00" * 1000, 2**63 - 1, 0),
        (Domain(2**64, acct.address), "GET", "/p\u00e4th", b'{"a":1}', 0, 2**256 - 1),
    ]:
        message = {"signer": acct.address, "method": method.upper(), "path": path, "bodyHash": body_hash(body),
                   "nonce": nonce, "deadline": deadline}
        expected = _hash_eip191_message(_typed("Request", chain_id, message))
        assert request_digest(chain_id, acct.address, method, path, body, nonce, deadline) == expected


def test_libsecp256k1_recovery_agrees_with_eth_account_also_on_junk(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path (coincurve + own EIP-55) and eth_account's give the same signer, and refuse the same junk."""
    import os

    from eth_utils import to_checksum_address

    from protocol import signing

    n = signing._SECP256K1_N  # noqa: SLF001
    good = [(d, Account.create().unsafe_sign_hash(d).signature) for d in (os.urandom(32) for _ in range(50))]
    tweak = [(d, s[:64] + bytes([s[64] - 27])) for d, s in good[:5]]  # v as 0/1 is accepted too
    bad = [(good[0][0], good[0][1][:64] + bytes([v])) for v in (2, 26, 29, 34)]
    bad += [(good[1][0], n.to_bytes(32, "big") + good[1][1][32:]),  # r out of range
            (good[2][0], good[2][1][:32] + (n + 1).to_bytes(32, "big") + good[2][1][64:])]  # s out of range
    bad += [(good[3][0], bytes(65))]

    def outcome(digest: bytes, sig: bytes) -> str:
        try:
            return signing._recover_digest(digest, "0x" + sig.hex(), "test")  # noqa: SLF001
        except SignatureError:
            return "refused"

    fast = [outcome(d, s) for d, s in good + tweak + bad]
    monkeypatch.setattr(signing, "_PublicKey", None)
    slow = [outcome(d, s) for d, s in good + tweak + bad]
    assert fast == slow
    assert fast[-len(bad):] == ["refused"] * len(bad)
    assert "refused" not in fast[:len(good) + len(tweak)]
    # eth_account also reads v >= 35 as an EIP-155 transaction v; a request signature has no chain id in v: refused
    monkeypatch.undo()
    assert [outcome(good[4][0], good[4][1][:64] + bytes([v])) for v in (35, 36, 255)] == ["refused"] * 3
    for _ in range(50):
        raw = os.urandom(20)
        assert signing.checksum_address(raw) == to_checksum_address(raw)
        assert signing.parse_address("0x" + raw.hex().upper()) == to_checksum_address(raw)
    for junk in ("", "0x", "0x" + "g" * 40, "0x" + "1" * 39, "1" * 42, "0x" + "1" * 41):
        with pytest.raises(SignatureError):
            signing.parse_address(junk)


def test_keccak_backend_is_swapped_in_place_and_gives_the_same_hashes() -> None:
    from Crypto.Hash import keccak as cryptodome_keccak
    from eth_utils import keccak

    import protocol

    assert protocol.KECCAK_BACKEND == "pysha3"  # safe-pysha3 is a declared dependency
    for data in (b"", b"abc", bytes(range(256)) * 5):
        assert keccak(data) == cryptodome_keccak.new(digest_bits=256, data=data).digest()
