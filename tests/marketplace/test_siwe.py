"""Customer login (EIP-4361, Sign-In with Ethereum): the pure parser/verifier and tokens, then the HTTP routes on a
real database (SQLite and PostgreSQL): forged, replayed, expired, wrong-chain and wrong-domain logins get 401,
malformed messages 422, and a session token only ever stands for the address that signed."""
from __future__ import annotations

import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st

from marketplace import siwe
from marketplace.app import create_app
from marketplace.db import Job, LoginNonce
from marketplace.runtime import Runtime
from marketplace.settings import Settings
from protocol.errors import GridMintValueError
from protocol.schemas import JobSpec
from tests.marketplace.chainless import chainless_runtime

CHAIN = 31337
DOMAIN = "localhost"  # the Host the test client sends (a loopback name: trusted without GRIDMINT_SIWE_DOMAIN)
NOW = 1_800_000_000
SECRET = b"k" * 32
ALICE: LocalAccount = Account.from_key("0x" + "11" * 32)
BOB: LocalAccount = Account.from_key("0x" + "22" * 32)


def at(t: float) -> datetime:
    return datetime.fromtimestamp(t, tz=timezone.utc)


def message(who: LocalAccount = ALICE, nonce: str = "abcdef0123456789", *, now: float = NOW,
            **kw: Any) -> siwe.SiweMessage:
    fields: dict[str, Any] = dict(domain=DOMAIN, address=who.address, uri=f"http://{DOMAIN}/", chain_id=CHAIN,
                                  nonce=nonce, issued_at=at(now), statement="Sign in to GridMint.",
                                  expiration_time=at(now + 600))
    fields.update(kw)
    return siwe.SiweMessage(**fields)


def sign(text: str, who: LocalAccount = ALICE) -> str:
    return "0x" + who.sign_message(encode_defunct(text=text)).signature.hex().removeprefix("0x")


# ------------------------------------------------------------------------------------------------ parsing
SPEC_EXAMPLE = """service.invalid wants you to sign in with your Ethereum account:
0xC02aaA39b223FE8D0A0e5C4F27eAD9083C756Cc2

I accept the ServiceOrg Terms of Service: https://service.invalid/tos

URI: https://service.invalid/login
Version: 1
Chain ID: 1
Nonce: 32891756
Issued At: 2021-09-30T16:25:24Z
Resources:
- ipfs://bafybeiemxf5abjwjbikoz4mc3a3dla6ual3jsgpdr4cjr3oz3evfyavhwq/
- https://example.com/my-web2-claim.json"""


def test_parses_the_eip4361_example() -> None:
    m = siwe.parse_message(SPEC_EXAMPLE)
    assert (m.domain, m.address, m.chain_id, m.nonce) == (
        "service.invalid", "0xC02aaA39b223FE8D0A0e5C4F27eAD9083C756Cc2", 1, "32891756")
    assert m.statement == "I accept the ServiceOrg Terms of Service: https://service.invalid/tos"
    assert m.issued_at == datetime(2021, 9, 30, 16, 25, 24, tzinfo=timezone.utc)
    assert m.expiration_time is None and m.not_before is None and m.scheme is None
    assert len(m.resources) == 2
    assert siwe.format_message(m) == SPEC_EXAMPLE


def test_optional_parts() -> None:
    m = message(statement=None, scheme="https", expiration_time=None, not_before=at(NOW), request_id="req-1")
    text = siwe.format_message(m)
    assert text.startswith(f"https://{DOMAIN} wants you") and "\n\n\nURI: " in text  # no statement: two empty lines
    assert siwe.parse_message(text) == m


_times = st.integers(1_000_000_000, 4_000_000_000).map(at)


@given(st.builds(
    siwe.SiweMessage,
    domain=st.sampled_from(["example.com", "localhost:8000", "127.0.0.1:9", "a.b.c"]),
    address=st.binary(min_size=20, max_size=20).map(to_checksum_address),
    uri=st.sampled_from(["https://example.com/login", "urn:x:y", "http://localhost:8000/"]),
    chain_id=st.integers(1, 2**64), nonce=st.text("abcXYZ0189", min_size=8, max_size=40),
    issued_at=_times, statement=st.none() | st.text("ab :./-", min_size=1, max_size=30).filter(lambda t: t.strip()),
    scheme=st.none() | st.just("https"), expiration_time=st.none() | _times, not_before=st.none() | _times,
    request_id=st.none() | st.text("abc-1", max_size=10),
    resources=st.lists(st.sampled_from(["ipfs://x", "https://a.example/r.json"]), max_size=3).map(tuple)))
def test_format_then_parse_round_trips(m: siwe.SiweMessage) -> None:
    assert siwe.parse_message(siwe.format_message(m)) == m


GOOD = siwe.format_message(message())


@pytest.mark.parametrize("bad, why", [
    (GOOD.replace(" wants you to sign in", " would like you to sign in"), "line 1"),
    (GOOD.replace(ALICE.address, ALICE.address.lower()), "EIP-55"),
    (GOOD.replace(ALICE.address, "0x1234"), "20-byte"),
    (GOOD.replace("Version: 1", "Version: 2"), "Version"),
    (GOOD.replace("Chain ID: 31337", "Chain ID: one"), "Chain ID"),
    (GOOD.replace("Nonce: abcdef0123456789", "Nonce: abc"), "Nonce"),
    (GOOD.replace("Issued At: ", "Issued At: yesterday "), "RFC 3339"),
    (GOOD.replace("2027-01-15T08:00:00Z", "2027-01-15 08:00:00"), "RFC 3339"),
    (GOOD.replace("\nNonce: abcdef0123456789", ""), "Nonce"),
    (GOOD.replace("URI: ", "URL: "), "URI"),
    (GOOD + "\nSomething: else", "unexpected line"),
    (GOOD.replace("\n", "\r\n"), "LF"),
    ("hello", "lines"),
    (GOOD.replace("Sign in to GridMint.\n", "Sign in to GridMint.\nsecond line\n"), "statement"),
])
def test_malformed_messages_are_refused_with_the_reason(bad: str, why: str) -> None:
    with pytest.raises(siwe.MalformedLogin, match=why):
        siwe.parse_message(bad)


def test_good_fixture_is_what_the_malformed_cases_edit() -> None:
    assert "Issued At: 2027-01-15T08:00:00Z" in GOOD  # NOW; the RFC 3339 cases above rely on this text


# ------------------------------------------------------------------------------------------------ verification
def verify(text: str, signature: str, *, now: float = NOW, domain: str = DOMAIN, chain_id: int = CHAIN
           ) -> siwe.SiweMessage:
    return siwe.verify_login(text, signature, chain_id=chain_id, domain=domain, now=now, skew_s=60)


def test_verify_accepts_a_good_login() -> None:
    assert verify(GOOD, sign(GOOD)).address == ALICE.address
    assert verify(GOOD, sign(GOOD), domain=DOMAIN.upper()).address == ALICE.address  # host names are case-blind


@pytest.mark.parametrize("case, why", [
    ("forged", "not by the message's address"),
    ("tampered", "not by the message's address"),
    ("wrong chain", "chain 1; this marketplace is on chain 31337"),
    ("wrong domain", "domain 'evil.example'"),
    ("expired", "expired"),
    ("from the future", "in the future"),
    ("not yet valid", "not valid before"),
    ("garbage signature", "does not recover"),
])
def test_verify_refuses(case: str, why: str) -> None:
    text, sig, now = GOOD, sign(GOOD), float(NOW)
    if case == "forged":
        sig = sign(GOOD, BOB)  # Bob signs a message claiming to be Alice
    elif case == "tampered":
        text = GOOD.replace("Sign in to GridMint.", "Sign in to GridMint!")
    elif case == "wrong chain":
        text = siwe.format_message(message(chain_id=1))
        sig = sign(text)
    elif case == "wrong domain":
        text = siwe.format_message(message(domain="evil.example"))
        sig = sign(text)
    elif case == "expired":
        now = NOW + 600  # the Expiration Time itself is already too late
    elif case == "from the future":
        now = NOW - 61
    elif case == "not yet valid":
        text = siwe.format_message(message(not_before=at(NOW + 120)))
        sig = sign(text)
    elif case == "garbage signature":
        sig = "0x" + "00" * 65
    with pytest.raises(siwe.LoginRejected, match=why):
        verify(text, sig, now=now)


def test_clock_skew_is_tolerated() -> None:
    assert verify(GOOD, sign(GOOD), now=NOW - 59).address == ALICE.address


# ------------------------------------------------------------------------------------------------ tokens
def test_token_round_trip() -> None:
    token = siwe.issue_token(ALICE.address, NOW + 100, secret=SECRET, chain_id=CHAIN)
    assert siwe.verify_token(token, secret=SECRET, chain_id=CHAIN, now=NOW) == siwe.CustomerSession(ALICE.address,
                                                                                                     NOW + 100)


@pytest.mark.parametrize("case", ["other address", "longer expiry", "flipped mac", "other secret", "other chain",
                                  "expired", "garbage", "empty", "extra part", "superscript expiry",
                                  "non-ascii mac"])
def test_tampered_tokens_are_refused(case: str) -> None:
    token = siwe.issue_token(ALICE.address, NOW + 100, secret=SECRET, chain_id=CHAIN)
    prefix, address, expires, mac = token.split(".")
    secret, chain_id, now = SECRET, CHAIN, NOW
    if case == "other address":
        token = ".".join([prefix, BOB.address, expires, mac])
    elif case == "longer expiry":
        token = ".".join([prefix, address, str(NOW + 10**6), mac])
    elif case == "flipped mac":
        token = ".".join([prefix, address, expires, ("0" if mac[0] != "0" else "1") + mac[1:]])
    elif case == "other secret":
        secret = b"x" * 32
    elif case == "other chain":
        chain_id = 1
    elif case == "expired":
        now = NOW + 100
    elif case == "garbage":
        token = "not-a-token"
    elif case == "empty":
        token = ""
    elif case == "extra part":
        token += ".x"
    elif case == "superscript expiry":
        token = ".".join([prefix, address, "\u00b2", mac])  # latin-1, so it can arrive in a header
    elif case == "non-ascii mac":  # hmac.compare_digest raised TypeError on it (a 500)
        token = ".".join([prefix, address, expires, "\u00e9" * 64])
    with pytest.raises(siwe.LoginRejected):
        siwe.verify_token(token, secret=secret, chain_id=chain_id, now=now)


# ------------------------------------------------------------------------------------------------ over HTTP
def runtime(data_dir: Path, db_url: str, **settings: Any) -> Runtime:
    s = Settings(data_dir=data_dir, db_url=db_url, **settings)
    return chainless_runtime(s, chain_id=CHAIN)


@pytest.fixture()
def rt(tmp_path: Path, db_url: str) -> Runtime:
    return runtime(tmp_path, db_url)


@pytest.fixture()
def client(rt: Runtime) -> TestClient:
    return TestClient(create_app(rt), base_url=f"http://{DOMAIN}")


def fresh_login(client: TestClient, who: LocalAccount = ALICE, signer: LocalAccount | None = None,
                **kw: Any) -> tuple[str, str]:
    """A message with a nonce from the server, in real time (the server's clock), and its signature."""
    got = client.post("/auth/nonce")
    assert got.status_code == 201, got.text
    issued = got.json()
    now = datetime.now(timezone.utc).timestamp()
    text = siwe.format_message(message(who, issued["nonce"], now=now, **kw))
    return text, sign(text, signer or who)


def login(client: TestClient, text: str, sig: str) -> Any:
    return client.post("/auth/login", json={"message": text, "signature": sig})


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_login_then_me(client: TestClient, rt: Runtime) -> None:
    issued = client.post("/auth/nonce").json()
    assert issued["domain"] == DOMAIN and issued["chain_id"] == CHAIN and len(issued["nonce"]) >= 8
    assert client.post("/auth/nonce").json()["nonce"] != issued["nonce"]
    got = login(client, *fresh_login(client))
    assert got.status_code == 200, got.text
    body = got.json()
    assert body["address"] == ALICE.address and body["token_type"] == "bearer"
    me = client.get("/auth/me", headers=bearer(body["token"]))
    assert me.status_code == 200, me.text
    assert me.json() == {"address": ALICE.address, "expires_at": body["expires_at"]}
    # the session ends no later than the message's Expiration Time (600 s after issue), before the 24 h default
    assert body["expires_at"] <= datetime.now(timezone.utc).timestamp() + 600


def test_forged_login_is_refused_and_spends_no_nonce(client: TestClient) -> None:
    text, forged = fresh_login(client, ALICE, signer=BOB)
    got = login(client, text, forged)
    assert got.status_code == 401 and "not by the message's address" in got.json()["detail"]
    assert login(client, text, sign(text, ALICE)).status_code == 200  # Alice's nonce survived the forgery


def test_replayed_login_is_refused(client: TestClient) -> None:
    text, sig = fresh_login(client)
    assert login(client, text, sig).status_code == 200
    again = login(client, text, sig)
    assert again.status_code == 401 and "already used" in again.json()["detail"]


def test_nonce_not_issued_by_us_is_refused(client: TestClient) -> None:
    text = siwe.format_message(message(nonce="madeUpByTheClient1", now=datetime.now(timezone.utc).timestamp()))
    got = login(client, text, sign(text))
    assert got.status_code == 401 and "not issued" in got.json()["detail"]


def test_expired_message_is_refused(client: TestClient) -> None:
    now = datetime.now(timezone.utc).timestamp()
    text, sig = fresh_login(client, expiration_time=at(now - 1))
    got = login(client, text, sig)
    assert got.status_code == 401 and "expired" in got.json()["detail"]


def test_expired_nonce_is_refused(client: TestClient, rt: Runtime) -> None:
    now = int(datetime.now(timezone.utc).timestamp())
    old = siwe.issue_nonce(rt.sessions, now=now - 1000, ttl_s=600)  # issued 1000 s ago, valid for 600 s
    text = siwe.format_message(message(nonce=old.nonce, now=now))
    got = login(client, text, sign(text))
    assert got.status_code == 401 and "expired" in got.json()["detail"]


def test_wrong_chain_is_refused(client: TestClient) -> None:
    got = login(client, *fresh_login(client, chain_id=CHAIN + 1))
    assert got.status_code == 401 and f"this marketplace is on chain {CHAIN}" in got.json()["detail"]


def test_wrong_domain_is_refused(client: TestClient) -> None:
    got = login(client, *fresh_login(client, domain="gridmint.evil.example"))
    assert got.status_code == 401 and "domain" in got.json()["detail"]


def test_configured_domain_is_what_counts(tmp_path: Path, db_url: str) -> None:
    """Behind a proxy the Host header is the proxy's business: GRIDMINT_SIWE_DOMAIN names the public domain."""
    client = TestClient(create_app(runtime(tmp_path, db_url, siwe_domain="market.gridmint.example")),
                        base_url=f"http://{DOMAIN}")
    assert client.post("/auth/nonce").json()["domain"] == "market.gridmint.example"
    assert login(client, *fresh_login(client, domain="market.gridmint.example")).status_code == 200
    assert login(client, *fresh_login(client)).status_code == 401  # the Host, localhost, is not it
    # a phishing site's login message, replayed with its own domain in the Host header: not this marketplace's
    got = client.post("/auth/login", json=dict(zip(("message", "signature"), fresh_login(client, domain="evil.example"))),
                      headers={"Host": "evil.example"})
    assert got.status_code == 401 and "domain" in got.json()["detail"]


def test_without_a_configured_domain_only_a_loopback_host_is_trusted(client: TestClient) -> None:
    """Unconfigured, the domain is the Host header, which the client writes: trusted on a loopback address (one
    machine: the demo, a test), refused elsewhere, so a phishing site's login message cannot be replayed here with
    ``Host: evil.example``."""
    text, sig = fresh_login(client, domain="evil.example")
    for host in ("evil.example", "evil.example:8000", "10.0.0.5:8000", "127.evil.example"):
        got = client.post("/auth/login", json={"message": text, "signature": sig}, headers={"Host": host})
        assert got.status_code == 401 and "GRIDMINT_SIWE_DOMAIN" in got.json()["detail"], host
        assert client.post("/auth/nonce", headers={"Host": host}).status_code == 401
    for host in ("localhost:8000", "127.0.0.1:8000", "[::1]:8000", "127.0.0.1"):
        assert client.post("/auth/nonce", headers={"Host": host}).json()["domain"] == host


def test_malformed_login_is_422(client: TestClient) -> None:
    text, sig = fresh_login(client)
    assert login(client, text.replace("Version: 1", "Version: 9"), sig).status_code == 422
    assert login(client, "hello", sig).status_code == 422
    assert login(client, text, "0x1234").status_code == 422  # not a 65-byte signature
    assert client.post("/auth/login", json={"message": text}).status_code == 422
    assert client.post("/auth/login", content=b"not json").status_code == 422


def test_tampered_token_is_refused(client: TestClient) -> None:
    token = login(client, *fresh_login(client)).json()["token"]
    prefix, address, expires, mac = token.split(".")
    for bad in (".".join([prefix, address, str(int(expires) + 3600), mac]),
                ".".join([prefix, address, expires, mac[::-1]]),
                token + "0", "gm1.garbage"):
        got = client.get("/auth/me", headers=bearer(bad))
        assert got.status_code == 401 and got.headers["www-authenticate"] == "Bearer", bad
    assert client.get("/auth/me").status_code == 401
    assert client.get("/auth/me", headers={"Authorization": f"Basic {token}"}).status_code == 401
    latin1 = ".".join([prefix, address, expires, "\u00e9" * 64])  # was a 500: TypeError in hmac.compare_digest
    got = client.get("/auth/me", headers={"Authorization": f"Bearer {latin1}".encode("latin-1")})
    assert got.status_code == 401 and "malformed" in got.json()["detail"], got.text


def test_token_cannot_be_moved_to_another_address(client: TestClient) -> None:
    token = login(client, *fresh_login(client, ALICE)).json()["token"]
    prefix, _, expires, mac = token.split(".")
    stolen = ".".join([prefix, BOB.address, expires, mac])
    assert client.get("/auth/me", headers=bearer(stolen)).status_code == 401
    assert client.get("/customers/me/jobs", headers=bearer(stolen)).status_code == 401


def add_job(rt: Runtime, job_id: int, customer: str, created_at: int) -> str:
    jid = "0x" + f"{job_id:064x}"
    with rt.sessions.begin() as s:
        s.add(Job(id=jid, customer=customer, spec=JobSpec(max_price=1).model_dump(mode="json"), budget=12,
                  global_blob="0" * 64, eval_losses=[], created_at=created_at))
    return jid


def test_customer_sees_only_their_jobs(client: TestClient, rt: Runtime) -> None:
    alice_jobs = [add_job(rt, i, ALICE.address, NOW + i) for i in range(3)]
    add_job(rt, 100, BOB.address, NOW)
    alice = bearer(login(client, *fresh_login(client, ALICE)).json()["token"])
    bob = bearer(login(client, *fresh_login(client, BOB)).json()["token"])
    got = client.get("/customers/me/jobs", headers=alice)
    assert got.status_code == 200, got.text
    assert [j["job_id"] for j in got.json()] == alice_jobs[::-1]  # newest first
    assert all(j["customer"] == ALICE.address for j in got.json())
    assert [j["job_id"] for j in client.get("/customers/me/jobs", headers=bob).json()] == ["0x" + f"{100:064x}"]
    page = client.get("/customers/me/jobs", headers=alice, params={"limit": 2, "offset": 1})
    assert [j["job_id"] for j in page.json()] == alice_jobs[1::-1]
    assert client.get("/customers/me/jobs", headers=alice, params={"limit": 0}).status_code == 422
    # OFFSET is a 64-bit integer in both databases: one past it overflowed the driver (a 500)
    assert client.get("/customers/me/jobs", headers=alice, params={"offset": 2**63 - 1}).json() == []
    assert client.get("/customers/me/jobs", headers=alice, params={"offset": 2**63}).status_code == 422
    assert client.get("/customers/me/jobs").status_code == 401


def test_processes_sharing_data_dir_share_sessions(tmp_path: Path, db_url: str) -> None:
    """Two API processes on one data_dir (and database) agree on the generated secret; another data_dir does not."""
    a, b, other = (TestClient(create_app(runtime(tmp_path / d, db_url)), base_url=f"http://{DOMAIN}")
                   for d in ("shared", "shared", "other"))
    token = login(a, *fresh_login(a)).json()["token"]
    assert b.get("/auth/me", headers=bearer(token)).json()["address"] == ALICE.address
    assert other.get("/auth/me", headers=bearer(token)).status_code == 401
    assert ((tmp_path / "shared" / siwe.SECRET_FILE).stat().st_mode & 0o777) == 0o600


def test_configured_secret_is_used_and_checked(tmp_path: Path, db_url: str) -> None:
    a, b = (TestClient(create_app(runtime(tmp_path / d, db_url, session_secret="s" * 40)), base_url=f"http://{DOMAIN}")
            for d in ("a", "b"))
    token = login(a, *fresh_login(a)).json()["token"]
    assert b.get("/auth/me", headers=bearer(token)).status_code == 200
    assert not (tmp_path / "a" / siwe.SECRET_FILE).exists()
    with pytest.raises(GridMintValueError, match="at least 32"):
        create_app(runtime(tmp_path / "c", db_url, session_secret="short"))


def test_concurrent_logins_with_one_nonce_let_exactly_one_through(rt: Runtime) -> None:
    nonce = siwe.issue_nonce(rt.sessions, now=NOW, ttl_s=600).nonce
    results: list[str] = []

    def use() -> None:
        try:
            siwe.use_nonce(rt.sessions, nonce, ALICE.address, now=NOW + 1)
            results.append("ok")
        except siwe.LoginRejected:
            results.append("refused")

    threads = [threading.Thread(target=use) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["ok"] + ["refused"] * 7


def test_issuing_nonces_drops_expired_ones(rt: Runtime) -> None:
    old = siwe.issue_nonce(rt.sessions, now=NOW, ttl_s=10)
    siwe.issue_nonce(rt.sessions, now=NOW + 11, ttl_s=10)
    with rt.sessions() as s:
        assert s.get(LoginNonce, old.nonce) is None
