"""EIP-712 signed messages shared by every side.

Every node, verifier and customer request to the marketplace carries a signed *envelope*:
``Request(signer, method, path, bodyHash, nonce, deadline)`` under the domain ``GridMint/2/chainId/staking``.
The server recovers the signer, checks the deadline, and accepts each (signer, nonce) once
(nonces strictly increase per signer, so one integer per signer is all the server stores).
The domain names the chain and the deployment (its GridStaking contract, as ``verifyingContract``): a signature
made for one marketplace is useless on another chain and on another marketplace on the same chain (each keeps
its own nonces, so without the contract a request to one could be replayed to the other).

Proof roots and verifier verdicts are signed as their own typed structs, so they can be checked
later (by a referee, or on chain) without the HTTP request that carried them.
"""
from __future__ import annotations

import hashlib
import re
import threading
import time
from functools import lru_cache
from dataclasses import dataclass
from typing import Any, Mapping

from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_hash.auto import keccak as eth_hash_keccak
from eth_utils import keccak, to_checksum_address

from protocol.errors import ReplayError, SignatureError

try:
    from coincurve import PublicKey as _PublicKey
except ImportError:  # pragma: no cover - coincurve is a dependency; eth_account's pure-Python path still works
    _PublicKey = None
# eth-hash's shared keccak object: pysha3 once protocol.fastkeccak has run (~2 us a hash); no eth_utils wrapper.
_keccak256 = eth_hash_keccak

DOMAIN_NAME = "GridMint"
DOMAIN_VERSION = "2"  # 2: the domain names the deployment (verifyingContract); 1 named only the chain

HEADER_SIGNER = "x-gm-signer"
HEADER_NONCE = "x-gm-nonce"
HEADER_DEADLINE = "x-gm-deadline"
HEADER_SIGNATURE = "x-gm-signature"
#: the signed ``bodyHash`` (0x + sha256 of the body, hex), sent along so that a server can check the signature, the
#: signer and the nonce before it reads a large body, and the body against it once read
HEADER_BODY_HASH = "x-gm-body-hash"

_EIP712_DOMAIN = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
]

TYPES: dict[str, list[dict[str, str]]] = {
    "Request": [
        {"name": "signer", "type": "address"},
        {"name": "method", "type": "string"},
        {"name": "path", "type": "string"},
        {"name": "bodyHash", "type": "bytes32"},
        {"name": "nonce", "type": "uint256"},
        {"name": "deadline", "type": "uint256"},
    ],
    "TrainingProof": [
        {"name": "unitId", "type": "bytes32"},
        {"name": "merkleRoot", "type": "bytes32"},
        {"name": "startHash", "type": "bytes32"},
        {"name": "finalHash", "type": "bytes32"},
        {"name": "steps", "type": "uint256"},
    ],
    "Verdict": [
        {"name": "unitId", "type": "bytes32"},
        {"name": "segment", "type": "uint256"},
        {"name": "ok", "type": "bool"},
        {"name": "claimedHash", "type": "bytes32"},
        {"name": "replayedHash", "type": "bytes32"},
    ],
    # a provider's state before optimizer step ``step`` of a unit, revealed in a dispute (bisection)
    "Reveal": [
        {"name": "unitId", "type": "bytes32"},
        {"name": "step", "type": "uint256"},
        {"name": "stateHash", "type": "bytes32"},
    ],
}


@dataclass(frozen=True)
class Domain:
    """Where a GridMint signature counts: one chain and one deployment, named by its GridStaking contract (what
    ``/config`` calls ``staking``). Every typed message (requests, proofs, verdicts, reveals) is signed under it."""

    chain_id: int
    contract: str

    def __post_init__(self) -> None:
        if isinstance(self.chain_id, bool) or not isinstance(self.chain_id, int) or not 0 < self.chain_id < 2**256:
            raise SignatureError(f"chain id must be a positive integer, got {self.chain_id!r}")
        if not isinstance(self.contract, str) or len(self.contract) != 42 or not self.contract.startswith(("0x", "0X")) \
                or not _HEX.issuperset(self.contract[2:]):
            raise SignatureError(f"a signing domain's contract must be an address, got {self.contract!r}")
        object.__setattr__(self, "contract", checksum_address(bytes.fromhex(self.contract[2:])))


def _check_domain(d: Any) -> Domain:
    if not isinstance(d, Domain):  # a bare chain id would sign for every deployment on the chain
        raise TypeError(f"expected a protocol.signing.Domain (chain id and staking contract), got {d!r}")
    return d


def domain(d: Domain) -> dict[str, Any]:
    _check_domain(d)
    return {"name": DOMAIN_NAME, "version": DOMAIN_VERSION, "chainId": d.chain_id, "verifyingContract": d.contract}


def to_bytes32(value: str | bytes) -> bytes:
    """Accept 32 raw bytes or a 0x-prefixed 64-hex-digit string."""
    if isinstance(value, bytes):
        raw = value
    elif isinstance(value, str):
        text = value[2:] if value.startswith("0x") else value
        try:
            raw = bytes.fromhex(text)
        except ValueError as exc:
            raise SignatureError(f"not a hex bytes32: {value!r}") from exc
    else:
        raise SignatureError(f"not a bytes32: {value!r}")
    if len(raw) != 32:
        raise SignatureError(f"bytes32 must be 32 bytes, got {len(raw)}: {value!r}")
    return raw


def _typed(primary: str, d: Domain, message: Mapping[str, Any]) -> Any:
    return encode_typed_data(
        full_message={
            "types": {"EIP712Domain": _EIP712_DOMAIN, primary: TYPES[primary]},
            "primaryType": primary,
            "domain": domain(d),
            "message": dict(message),
        }
    )


def sign_typed(account: LocalAccount, primary: str, d: Domain, message: Mapping[str, Any]) -> str:
    """Sign ``message`` as EIP-712 struct ``primary`` under the deployment's domain; returns the 65-byte signature
    as 0x-hex."""
    signed = account.sign_message(_typed(primary, d, message))
    return "0x" + bytes(signed.signature).hex()


def recover_typed(primary: str, d: Domain, message: Mapping[str, Any], signature: str) -> str:
    """Checksum address that signed ``message``; SignatureError if the signature is malformed."""
    _check_domain(d)
    try:
        sig = bytes.fromhex(signature[2:] if signature.startswith("0x") else signature)
        if len(sig) != 65:
            raise ValueError(f"signature must be 65 bytes, got {len(sig)}")
        return str(Account.recover_message(_typed(primary, d, message), signature=sig))
    except SignatureError:
        raise
    except Exception as exc:  # eth_account raises several types for junk input
        raise SignatureError(f"malformed {primary} signature: {exc}") from exc


#: The default ``amount`` of an accusation (the verifier's claimed unearned pay, recorded with the dispute). It no
#: longer caps anything: a fraud verdict slashes the provider's whole stake whatever amount was signed.
ACCUSE_ALL = 2**256 - 1
_ACCUSATION_TYPES = {
    "EIP712Domain": [*_EIP712_DOMAIN, {"name": "verifyingContract", "type": "address"}],
    "Accusation": [
        {"name": "provider", "type": "address"},
        {"name": "evidence", "type": "bytes32"},
        {"name": "amount", "type": "uint256"},
    ],
}


def _accusation(chain_id: int, staking: str, provider: str, evidence: bytes, amount: int) -> Any:
    return encode_typed_data(full_message={
        "types": _ACCUSATION_TYPES, "primaryType": "Accusation",
        "domain": {"name": "GridStaking", "version": "1", "chainId": chain_id,
                   "verifyingContract": to_checksum_address(staking)},
        "message": {"provider": to_checksum_address(provider), "evidence": evidence, "amount": amount},
    })


def sign_accusation(account: LocalAccount, chain_id: int, staking: str, provider: str, evidence: bytes,
                    amount: int = ACCUSE_ALL) -> str:
    """A verifier's fraud claim, as GridStaking.accuse checks it: EIP-712 ``Accusation(provider, evidence, amount)``
    under the domain ``GridStaking/1/chainId/staking``. Anyone may submit it on chain; it bonds the signer's stake."""
    return "0x" + bytes(account.sign_message(_accusation(chain_id, staking, provider, evidence, amount)).signature).hex()


def recover_accusation(chain_id: int, staking: str, provider: str, evidence: bytes, signature: str,
                       amount: int = ACCUSE_ALL) -> str:
    """Who signed this accusation; SignatureError if the signature is malformed, or not in the one form
    GridStaking.accuse (OpenZeppelin's ECDSA.recover) takes: 65 bytes, v 27 or 28, s in the lower half of the curve
    order. eth_account also recovers v 0/1 and a high s (the same signer, malleated): such an accusation, taken here,
    reverted on chain every time its dispute was relayed, and the dispute was never ruled."""
    try:
        sig = bytes.fromhex(signature[2:] if signature.startswith("0x") else signature)
    except ValueError as exc:
        raise SignatureError(f"malformed Accusation signature: {exc}") from exc
    if len(sig) != 65 or sig[64] not in (27, 28) or int.from_bytes(sig[32:64], "big") > _SECP256K1_N // 2:
        raise SignatureError("Accusation signature is not in the form the staking contract takes (65 bytes, "
                             "v 27 or 28, a low s: EIP-2)")
    try:
        return str(Account.recover_message(_accusation(chain_id, staking, provider, evidence, amount), signature=sig))
    except Exception as exc:  # eth_account raises several types for junk input
        raise SignatureError(f"malformed Accusation signature: {exc}") from exc


_SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
_HEX = frozenset("0123456789abcdefABCDEF")


def checksum_address(raw: bytes) -> str:
    """EIP-55 checksum form of a 20-byte address (~3 us; eth_utils' to_checksum_address takes ~50 us)."""
    lower = raw.hex()
    h = _keccak256(lower.encode()).hex()
    return "0x" + "".join(c.upper() if c > "9" and h[i] >= "8" else c for i, c in enumerate(lower))


def parse_address(text: str) -> str:
    """``0x`` + 40 hex digits in any case -> the checksum form; SignatureError otherwise. (Like eth_utils, a
    mixed-case input is not required to carry a valid checksum: the result is always the canonical form.)"""
    if len(text) != 42 or not text.startswith(("0x", "0X")) or not _HEX.issuperset(text[2:]):
        raise SignatureError(f"{HEADER_SIGNER} is not an address: {text!r}")
    return checksum_address(bytes.fromhex(text[2:]))


def _recover_with_coincurve(digest: bytes, sig: bytes) -> str:
    v = sig[64] - 27 if sig[64] >= 27 else sig[64]
    r, s = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:64], "big")
    if v not in (0, 1) or not (0 <= r < _SECP256K1_N and 0 <= s < _SECP256K1_N):
        raise ValueError(f"signature out of range (v={sig[64]})")
    public = _PublicKey.from_signature_and_message(sig[:64] + bytes([v]), digest, hasher=None)
    return checksum_address(_keccak256(public.format(compressed=False)[1:])[-20:])


def _recover_digest(digest: bytes, signature: str, what: str) -> str:
    """Checksum address that signed the 32-byte ``digest``; SignatureError if the signature is malformed.

    libsecp256k1 through coincurve directly (~0.1 ms with the checksum; eth_account's path over eth-keys ~0.35 ms), or
    eth_account (pure Python, ~15 ms) where coincurve is missing. A test checks both agree, also on malformed input."""
    try:
        sig = bytes.fromhex(signature[2:] if signature.startswith("0x") else signature)
        if len(sig) != 65:
            raise ValueError(f"signature must be 65 bytes, got {len(sig)}")
        if _PublicKey is not None:
            return _recover_with_coincurve(digest, sig)
        return str(Account._recover_hash(digest, signature=sig))  # noqa: SLF001 - eth_account's public-ish helper
    except Exception as exc:  # both backends raise several types for junk input
        raise SignatureError(f"malformed {what} signature: {exc}") from exc


def body_hash(body: bytes) -> bytes:
    return hashlib.sha256(body).digest()


# The Request envelope is on every node/verifier call, so its EIP-712 digest is computed directly (two keccaks, the
# domain separator and string hashes cached) instead of through encode_typed_data (~0.5 ms). A test checks the two
# agree byte for byte.
_DOMAIN_TYPEHASH = keccak(text="EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)")
_REQUEST_TYPEHASH = keccak(
    text="Request(address signer,string method,string path,bytes32 bodyHash,uint256 nonce,uint256 deadline)")


@lru_cache(maxsize=64)
def _domain_separator(d: Domain) -> bytes:
    return keccak(_DOMAIN_TYPEHASH + keccak(text=DOMAIN_NAME) + keccak(text=DOMAIN_VERSION) + d.chain_id.to_bytes(32, "big")
                  + bytes(12) + bytes.fromhex(d.contract[2:]))


@lru_cache(maxsize=1024)
def _text_hash(text: str) -> bytes:
    return keccak(text=text)


def request_digest(d: Domain, signer: str, method: str, path: str, body: bytes, nonce: int, deadline: int,
                   digest: bytes | None = None) -> bytes:
    """The EIP-712 digest of ``Request(signer, method, path, bodyHash, nonce, deadline)`` under
    ``GridMint/2/chainId/staking`` (what ``sign_request`` signs and ``verify_request`` recovers from); ``digest``:
    the body's hash, given instead of the body (which is then ignored)."""
    _check_domain(d)
    struct = _keccak256(_REQUEST_TYPEHASH + bytes(12) + bytes.fromhex(signer[2:]) + _text_hash(method.upper())
                    + _text_hash(path) + (body_hash(body) if digest is None else digest)
                    + nonce.to_bytes(32, "big") + deadline.to_bytes(32, "big"))
    return _keccak256(b"\x19\x01" + _domain_separator(d) + struct)


@dataclass(frozen=True)
class SignedRequest:
    signer: str
    nonce: int
    deadline: int


#: Signed routes whose nonces run in a lane of their own: small, frequent requests (heartbeats, the reveal poll) that a
#: node's heartbeat thread sends while its main thread may be in a long upload. Nonces rise within each lane; a
#: marketplace keeps the last one per signer and lane (:func:`nonce_key`), so a beat never waits behind an upload
#: (a review found a node on a slow link reaped as silent while it handed in a unit).
BEAT_LANE_PATHS = frozenset({"/providers/heartbeat", "/verify/heartbeat", "/reveals/next"})


def nonce_key(signer: str, path: str) -> str:
    """Under which key a marketplace keeps ``signer``'s last nonce for a request to ``path``: the address, or the
    address + "/beat" for the routes of :data:`BEAT_LANE_PATHS`."""
    return f"{signer}/beat" if path in BEAT_LANE_PATHS else signer


class NonceSource:
    """Strictly increasing nonces for one signer in this process (microsecond clock, never repeats)."""

    def __init__(self) -> None:
        self._last = 0
        self._lock = threading.Lock()

    def next(self) -> int:
        with self._lock:
            self._last = max(self._last + 1, time.time_ns() // 1000)
            return self._last

    def skip_past(self, nonce: int) -> None:
        """Draw every later nonce above ``nonce`` (the last one the server accepted from this signer, when another
        process signs with the same key or this clock is behind the one that signed before)."""
        with self._lock:
            self._last = max(self._last, nonce)


def sign_request(
    account: LocalAccount,
    d: Domain,
    method: str,
    path: str,
    body: bytes,
    nonce: int,
    deadline: int,
) -> dict[str, str]:
    """Headers that authenticate one HTTP request. ``path`` is the URL path without host or query."""
    message = {
        "signer": account.address,
        "method": method.upper(),
        "path": path,
        "bodyHash": body_hash(body),
        "nonce": nonce,
        "deadline": deadline,
    }
    return {
        HEADER_SIGNER: account.address,
        HEADER_NONCE: str(nonce),
        HEADER_DEADLINE: str(deadline),
        HEADER_SIGNATURE: sign_typed(account, "Request", d, message),
        HEADER_BODY_HASH: "0x" + message["bodyHash"].hex(),
    }


def signed_body_hash(headers: Mapping[str, str]) -> bytes:
    """The body hash a request's headers say was signed (:data:`HEADER_BODY_HASH`); SignatureError if absent or not
    0x + 64 hex digits."""
    text = {k.lower(): v for k, v in headers.items()}.get(HEADER_BODY_HASH)
    if text is None:
        raise SignatureError(f"missing header {HEADER_BODY_HASH}: the signed body hash (0x + sha256 of the body) must "
                             "come first for this route")
    if not re.fullmatch(r"0x[0-9a-fA-F]{64}", text):
        raise SignatureError(f"{HEADER_BODY_HASH} is not 0x + 64 hex digits: {text[:80]!r}")
    return bytes.fromhex(text[2:])


def verify_request(
    headers: Mapping[str, str],
    d: Domain,
    method: str,
    path: str,
    body: bytes | None,
    now: int,
) -> SignedRequest:
    """Check a request's envelope: well-formed, signed by the claimed signer, not expired. ``body`` None: check it
    against the body hash its headers carry (:func:`signed_body_hash`), before the body is read; the caller then
    checks the body against that hash.

    Does *not* check the nonce against history: the caller owns that state (see marketplace.auth).
    Raises SignatureError (bad/forged) or ReplayError (expired).
    """
    _check_domain(d)
    lowered = {k.lower(): v for k, v in headers.items()}
    missing = [h for h in (HEADER_SIGNER, HEADER_NONCE, HEADER_DEADLINE, HEADER_SIGNATURE) if h not in lowered]
    if missing:
        raise SignatureError(f"unsigned request: missing headers {missing}")
    signer = parse_address(lowered[HEADER_SIGNER])
    try:
        nonce = int(lowered[HEADER_NONCE])
        deadline = int(lowered[HEADER_DEADLINE])
    except ValueError as exc:
        raise SignatureError(f"nonce and deadline must be integers: {exc}") from exc
    if nonce < 0 or deadline < 0 or nonce >= 2**256 or deadline >= 2**256:
        raise SignatureError(f"nonce/deadline out of range: {nonce}, {deadline}")
    digest = signed_body_hash(lowered) if body is None else None
    recovered = _recover_digest(request_digest(d, signer, method, path, body or b"", nonce, deadline, digest),
                                lowered[HEADER_SIGNATURE], "Request")
    if recovered != signer:
        raise SignatureError(f"signature is by {recovered}, not by the claimed signer {signer} (or the body, path, chain or marketplace differ)")
    if deadline < now:
        raise ReplayError(f"request expired: deadline {deadline} < now {now}")
    return SignedRequest(signer=signer, nonce=nonce, deadline=deadline)
