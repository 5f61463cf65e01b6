"""Customer login, Sign-In with Ethereum style (EIP-4361), and the session tokens it hands out.

The pure core (``parse_message``, ``format_message``, ``verify_login``, ``issue_token``, ``verify_token``) takes the
clock, chain id, expected domain and secret as arguments and does no I/O. The adapters at the bottom keep the
server-issued nonces in the database (single use, multi-process safe) and load the token secret.

Flow: ``POST /auth/nonce`` -> the customer's wallet signs an EIP-4361 message holding that nonce (EIP-191
``personal_sign``) -> ``POST /auth/login`` -> a bearer token ``gm1.<address>.<expires_at>.<hmac>`` for
``Authorization: Bearer``. Tokens are stateless (HMAC-SHA256 under the server secret, bound to the chain id), so
every API process that shares the secret accepts them; they cannot be revoked before they expire.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from eth_account import Account
from eth_account.messages import encode_defunct
from eth_utils import is_checksum_address
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import delete, update
from sqlalchemy.orm import Session, sessionmaker

from marketplace.db import LoginNonce
from marketplace.settings import Settings
from protocol.errors import GridMintValueError, SignatureError

MAX_MESSAGE_CHARS = 8192
TOKEN_PREFIX = "gm1"
SECRET_FILE = "session_secret"
MIN_SECRET_BYTES = 32


class MalformedLogin(GridMintValueError):
    """A login message that is not a well-formed EIP-4361 message (HTTP 422)."""


class LoginRejected(SignatureError):
    """A well-formed login or session token that is refused: forged, expired, replayed, wrong chain or domain (401)."""


# ------------------------------------------------------------------------------------------------ messages
@dataclass(frozen=True)
class SiweMessage:
    """An EIP-4361 message. Times are timezone-aware datetimes; ``address`` is EIP-55 checksummed."""

    domain: str
    address: str
    uri: str
    chain_id: int
    nonce: str
    issued_at: datetime
    statement: str | None = None
    version: str = "1"
    scheme: str | None = None
    expiration_time: datetime | None = None
    not_before: datetime | None = None
    request_id: str | None = None
    resources: tuple[str, ...] = ()


_PREAMBLE = re.compile(r"^(?:(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*)://)?(?P<domain>[^\s/?#@]+(?:@[^\s/?#@]+)?)"
                       r" wants you to sign in with your Ethereum account:$")
_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:\S+$")
_NONCE = re.compile(r"^[A-Za-z0-9]{8,}$")
_CHAIN_ID = re.compile(r"^[1-9][0-9]{0,77}$")
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:[Zz]|[+-]\d{2}:\d{2})$")
_EXPIRY = re.compile(r"[0-9]{1,12}")  # ASCII digits only: str.isdigit() would let '²' through to int()
_MAC = re.compile(r"[0-9a-f]{64}")  # what _mac gives; hmac.compare_digest raises TypeError on a non-ASCII str
_PREAMBLE_SUFFIX = " wants you to sign in with your Ethereum account:"


def _time(field: str, text: str) -> datetime:
    if not _RFC3339.fullmatch(text):
        raise MalformedLogin(f"{field} {text!r} is not an RFC 3339 date-time with a time zone")
    try:
        return datetime.fromisoformat(text.upper())
    except ValueError as exc:
        raise MalformedLogin(f"{field} {text!r} is not a valid date-time: {exc}") from None


def _format_time(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def parse_message(text: str) -> SiweMessage:
    """Parse an EIP-4361 message exactly as its ABNF lays it out (LF line ends, fields in order, nothing extra).

    Raises ``MalformedLogin`` naming the first line that does not fit."""
    if len(text) > MAX_MESSAGE_CHARS:
        raise MalformedLogin(f"message is {len(text)} characters, over the {MAX_MESSAGE_CHARS} limit")
    if "\r" in text:
        raise MalformedLogin("message must use LF line ends, not CR LF")
    lines = text.split("\n")
    if len(lines) < 9:
        raise MalformedLogin(f"message has {len(lines)} lines; an EIP-4361 message has at least 9")
    head = _PREAMBLE.fullmatch(lines[0])
    if head is None:
        raise MalformedLogin(f"line 1 must be '<domain>{_PREAMBLE_SUFFIX}', got {lines[0]!r}")
    address = lines[1]
    if not _ADDRESS.fullmatch(address):
        raise MalformedLogin(f"line 2 must be a 0x-prefixed 20-byte hex address, got {address!r}")
    if not is_checksum_address(address):
        raise MalformedLogin(f"address {address} is not EIP-55 checksummed (EIP-4361 requires mixed case)")
    if lines[2] != "":
        raise MalformedLogin(f"line 3 must be empty, got {lines[2]!r}")
    if lines[3] == "":
        statement, i = None, 4
    else:
        statement, i = lines[3], 5
        if lines[4] != "":
            raise MalformedLogin(f"the statement must be one line followed by an empty line, got {lines[4]!r}")

    def optional(name: str) -> str | None:
        nonlocal i
        prefix = f"{name}: "
        if i < len(lines) and lines[i].startswith(prefix):
            i += 1
            return lines[i - 1][len(prefix):]
        return None

    def required(name: str) -> str:
        got = optional(name)
        if got is None:
            found = repr(lines[i]) if i < len(lines) else "the end of the message"
            raise MalformedLogin(f"line {i + 1} must be '{name}: ...', got {found}")
        return got

    uri, version, chain_id, nonce = (required(n) for n in ("URI", "Version", "Chain ID", "Nonce"))
    issued_at = required("Issued At")
    expiration, not_before, request_id = optional("Expiration Time"), optional("Not Before"), None
    if i < len(lines) and lines[i].startswith("Request ID:"):
        request_id = lines[i][len("Request ID:"):].removeprefix(" ")
        i += 1
    resources: list[str] = []
    if i < len(lines) and lines[i] == "Resources:":
        i += 1
        while i < len(lines) and lines[i].startswith("- "):
            if not _URI.fullmatch(lines[i][2:]):
                raise MalformedLogin(f"resource {lines[i][2:]!r} is not a URI")
            resources.append(lines[i][2:])
            i += 1
    if i != len(lines):
        raise MalformedLogin(f"unexpected line {i + 1}: {lines[i]!r}")
    if not _URI.fullmatch(uri):
        raise MalformedLogin(f"URI {uri!r} is not an absolute URI")
    if version != "1":
        raise MalformedLogin(f"Version must be 1, got {version!r}")
    if not _CHAIN_ID.fullmatch(chain_id):
        raise MalformedLogin(f"Chain ID {chain_id!r} is not a positive decimal integer")
    if not _NONCE.fullmatch(nonce):
        raise MalformedLogin(f"Nonce {nonce!r} must be at least 8 letters or digits")
    return SiweMessage(
        domain=head["domain"], address=address, uri=uri, chain_id=int(chain_id), nonce=nonce,
        issued_at=_time("Issued At", issued_at), statement=statement, version=version, scheme=head["scheme"],
        expiration_time=None if expiration is None else _time("Expiration Time", expiration),
        not_before=None if not_before is None else _time("Not Before", not_before),
        request_id=request_id, resources=tuple(resources))


def format_message(m: SiweMessage) -> str:
    """The EIP-4361 text a wallet signs for ``m`` (``parse_message(format_message(m)) == m``)."""
    out = [f"{m.scheme}://{m.domain}" if m.scheme else m.domain]
    out[0] += _PREAMBLE_SUFFIX
    out += [m.address, ""]
    if m.statement is not None:
        out.append(m.statement)
    out += ["", f"URI: {m.uri}", f"Version: {m.version}", f"Chain ID: {m.chain_id}", f"Nonce: {m.nonce}",
            f"Issued At: {_format_time(m.issued_at)}"]
    if m.expiration_time is not None:
        out.append(f"Expiration Time: {_format_time(m.expiration_time)}")
    if m.not_before is not None:
        out.append(f"Not Before: {_format_time(m.not_before)}")
    if m.request_id is not None:
        out.append(f"Request ID: {m.request_id}")
    if m.resources:
        out += ["Resources:", *(f"- {r}" for r in m.resources)]
    return "\n".join(out)


def recover_signer(message: str, signature: str) -> str:
    """The checksummed address whose EIP-191 ``personal_sign`` of ``message`` is ``signature`` (65 bytes, hex)."""
    try:
        return str(Account.recover_message(encode_defunct(text=message), signature=signature))
    except Exception as exc:  # noqa: BLE001 - eth_account raises several types for a bad signature
        raise LoginRejected(f"signature does not recover to any address: {exc}") from None


def verify_login(message: str, signature: str, *, chain_id: int, domain: str, now: float, skew_s: int) -> SiweMessage:
    """Check a signed login message against everything but its nonce (the caller checks the nonce is ours and unused).

    ``now`` is unix seconds; ``skew_s`` is how far the signer's clock may run ahead of ours. Raises ``MalformedLogin``
    for a message that does not parse and ``LoginRejected`` for one that parses but must not log anyone in."""
    m = parse_message(message)
    signer = recover_signer(message, signature)
    if signer != m.address:
        raise LoginRejected(f"signature was made by {signer}, not by the message's address {m.address}")
    if m.chain_id != chain_id:
        raise LoginRejected(f"message is for chain {m.chain_id}; this marketplace is on chain {chain_id}")
    if m.domain.lower() != domain.lower():
        raise LoginRejected(f"message is for domain {m.domain!r}; this marketplace is {domain!r}")
    if m.issued_at.timestamp() > now + skew_s:
        raise LoginRejected(f"message issued at {_format_time(m.issued_at)}, in the future (now {int(now)},"
                            f" skew {skew_s}s)")
    if m.expiration_time is not None and m.expiration_time.timestamp() <= now:
        raise LoginRejected(f"message expired at {_format_time(m.expiration_time)} (now {int(now)})")
    if m.not_before is not None and m.not_before.timestamp() > now + skew_s:
        raise LoginRejected(f"message is not valid before {_format_time(m.not_before)} (now {int(now)})")
    return m


# ------------------------------------------------------------------------------------------------ session tokens
@dataclass(frozen=True)
class CustomerSession:
    address: str
    expires_at: int  # unix seconds


def _mac(secret: bytes, chain_id: int, address: str, expires_at: int) -> str:
    msg = f"gridmint-session|{TOKEN_PREFIX}|{chain_id}|{address}|{expires_at}".encode()
    return hmac.new(secret, msg, hashlib.sha256).hexdigest()


def issue_token(address: str, expires_at: int, *, secret: bytes, chain_id: int) -> str:
    """A bearer token for ``address`` valid until ``expires_at`` on ``chain_id``, MACed with ``secret``."""
    return f"{TOKEN_PREFIX}.{address}.{expires_at}.{_mac(secret, chain_id, address, expires_at)}"


def verify_token(token: str, *, secret: bytes, chain_id: int, now: float) -> CustomerSession:
    """The session a token stands for; ``LoginRejected`` if it is malformed, forged, for another chain or expired."""
    parts = token.split(".")
    if len(parts) != 4 or parts[0] != TOKEN_PREFIX or not _ADDRESS.fullmatch(parts[1]) \
            or not _EXPIRY.fullmatch(parts[2]) or not _MAC.fullmatch(parts[3]):
        raise LoginRejected("session token is malformed; log in again at POST /auth/login")
    _, address, expires, mac = parts
    if not hmac.compare_digest(mac, _mac(secret, chain_id, address, int(expires))):
        raise LoginRejected("session token signature is invalid; log in again at POST /auth/login")
    if int(expires) <= now:
        raise LoginRejected(f"session token expired at {expires} (now {int(now)}); log in again at POST /auth/login")
    return CustomerSession(address=address, expires_at=int(expires))


# ------------------------------------------------------------------------------------------------ wire schemas
class LoginIn(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    message: str = Field(max_length=MAX_MESSAGE_CHARS, description="The EIP-4361 message, exactly as signed")
    signature: str = Field(pattern=r"^0x[0-9a-fA-F]{130}$", description="EIP-191 personal_sign of the message")


class NonceOut(BaseModel):
    nonce: str = Field(description="Put this in the message's Nonce field; usable once")
    expires_at: int = Field(description="Unix seconds after which the nonce is refused")
    domain: str = Field(description="What the message's domain must be")
    chain_id: int = Field(description="What the message's Chain ID must be")


class SessionOut(BaseModel):
    token: str = Field(description="Send as 'Authorization: Bearer <token>'")
    token_type: str = "bearer"
    address: str
    expires_at: int = Field(description="Unix seconds")


class MeOut(BaseModel):
    address: str
    expires_at: int = Field(description="Unix seconds when the session token expires")


# ------------------------------------------------------------------------------------------------ adapters (I/O)
@dataclass(frozen=True)
class IssuedNonce:
    nonce: str
    expires_at: int  # unix seconds


def issue_nonce(sessions: sessionmaker[Session], *, now: int, ttl_s: int) -> IssuedNonce:
    """Store and return a fresh random nonce valid for ``ttl_s`` seconds; drops nonces that have expired."""
    issued = IssuedNonce(nonce=secrets.token_hex(16), expires_at=now + ttl_s)
    with sessions.begin() as s:
        s.execute(delete(LoginNonce).where(LoginNonce.expires_at < now))
        s.add(LoginNonce(nonce=issued.nonce, issued_at=now, expires_at=issued.expires_at))
    return issued


def use_nonce(sessions: sessionmaker[Session], nonce: str, address: str, *, now: int) -> None:
    """Mark ``nonce`` used by ``address``. Atomic (one conditional UPDATE), so of two concurrent logins with one
    nonce, on any number of API processes, exactly one gets through."""
    with sessions.begin() as s:
        res = s.execute(update(LoginNonce)
                        .where(LoginNonce.nonce == nonce, LoginNonce.used_at.is_(None), LoginNonce.expires_at > now)
                        .values(used_at=now, used_by=address))
        if res.rowcount == 1:  # type: ignore[attr-defined]
            return
        row = s.get(LoginNonce, nonce)
        if row is None:
            raise LoginRejected(f"nonce {nonce} was not issued by this marketplace (get one from POST /auth/nonce)")
        if row.used_at is not None:
            raise LoginRejected(f"nonce {nonce} was already used to log in at {row.used_at}; a login cannot be "
                                "replayed")
        raise LoginRejected(f"nonce {nonce} expired at {row.expires_at} (now {now}); get a new one from "
                            "POST /auth/nonce")


def login(sessions: sessionmaker[Session], body: LoginIn, *, secret: bytes, chain_id: int, domain: str, now: int,
          skew_s: int, ttl_s: int) -> SessionOut:
    """Verify a signed login, spend its nonce and return a session token valid for ``ttl_s`` seconds (or until the
    message's Expiration Time, if sooner). The nonce is spent only once the signature checks out, so a forged attempt
    cannot burn a customer's nonce."""
    m = verify_login(body.message, body.signature, chain_id=chain_id, domain=domain, now=now, skew_s=skew_s)
    use_nonce(sessions, m.nonce, m.address, now=now)
    expires_at = now + ttl_s
    if m.expiration_time is not None:
        expires_at = min(expires_at, int(m.expiration_time.timestamp()))
    return SessionOut(token=issue_token(m.address, expires_at, secret=secret, chain_id=chain_id), address=m.address,
                      expires_at=expires_at)


def load_secret(settings: Settings) -> bytes:
    """The session-token key: ``settings.session_secret`` if set, else the one kept in ``data_dir/session_secret``,
    created (mode 0600) by the first process that needs it. Created race-free (written aside, then hard-linked into
    place), so API processes sharing a data_dir start together and all agree on one key."""
    if settings.session_secret is not None:
        key = settings.session_secret.get_secret_value().encode()
        if len(key) < MIN_SECRET_BYTES:
            raise GridMintValueError(f"GRIDMINT_SESSION_SECRET has {len(key)} bytes; use at least {MIN_SECRET_BYTES}")
        return key
    path = Path(settings.data_dir) / SECRET_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{SECRET_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another process won the race; use its key
        finally:
            tmp.unlink(missing_ok=True)
    key = path.read_text().strip().encode()
    if len(key) < MIN_SECRET_BYTES:
        raise GridMintValueError(f"{path} holds {len(key)} bytes; delete it to make a new key")
    return key


def request_domain(settings: Settings, host_header: str | None, fallback: str) -> str:
    """The domain a login message must name: ``settings.siwe_domain`` if set, else the Host — on a loopback address
    only. The Host header is the client's to write: a phishing site's login message (its own domain) replayed here
    with that Host would pass, so a marketplace others reach must name its domain (GRIDMINT_SIWE_DOMAIN)."""
    if settings.siwe_domain:
        return settings.siwe_domain
    host = host_header or fallback
    name = host[1:].split("]")[0] if host.startswith("[") else host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if name == "localhost" or name == "::1" or re.fullmatch(r"127(\.\d{1,3}){3}", name):
        return host
    raise SignatureError(f"sign-in is off for {host!r}: set GRIDMINT_SIWE_DOMAIN to the domain customers reach this "
                         f"marketplace at (the Host header is trusted on a loopback address only)")
