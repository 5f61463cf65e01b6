"""Uploads cost the marketplace bounded memory, sockets, time and disk: a body is read only for a signer that may
upload, within a deadline, holding one of a few slots (review A2); what is stored must be a training state of a unit
the signer holds, and each unit takes only the checkpoints its work needs (review A8).

Through the real HTTP API (uvicorn on loopback, the in-process EVM, SQLite), with raw sockets for clients that
stall: the deadlines are the behaviour under test, so they are set short here."""
from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx
import torch
from eth_account import Account
from eth_account.signers.local import LocalAccount

from marketplace.auth import body_deadline_s
from marketplace.common import model_config
from marketplace.db import Job
from node import checkpoint
from node.client import MarketClient
from node.model import init_state
from protocol.money import tokens
from protocol.schemas import JobSpec
from protocol.signing import HEADER_BODY_HASH, HEADER_SIGNER, sign_request
from tests.marketplace.test_api_bad_input import _at_work
from tests.marketplace.test_flow import _assigned, provider, submit_job


def _stalled(market, signer: str | LocalAccount, declared: int, sent: bytes = b"", path: str = "/blobs",
             method: str = "PUT", signed_body: bytes | None = None) -> socket.socket:
    """A connection that declares a ``declared``-byte body, sends ``sent`` of it, then stalls. ``signer``: an address
    the headers name (unsigned), or an account that signs the request over ``signed_body`` (default: ``declared``
    zero bytes), its hash in the headers."""
    host, port = market.url.removeprefix("http://").split(":")
    if isinstance(signer, str):
        headers = {HEADER_SIGNER: signer}
    else:
        body = b"\0" * declared if signed_body is None else signed_body
        headers = sign_request(signer, MarketClient(market.url, signer).domain, method, path, body,
                               time.time_ns() // 1000, int(time.time()) + 300)
    c = socket.create_connection((host, int(port)))
    c.sendall((f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
               + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
               + f"Content-Length: {declared}\r\n\r\n").encode() + sent)
    return c


def _answer(c: socket.socket, timeout_s: float = 20.0) -> tuple[int, bytes, bool]:
    """(status, raw response, whether the server then closed the connection) of what ``c`` got back."""
    c.settimeout(timeout_s)
    raw = b""
    while b"\r\n\r\n" not in raw:
        chunk = c.recv(65536)
        if not chunk:
            break
        raw += chunk
    closed = False
    try:
        while chunk := c.recv(65536):
            raw += chunk
        closed = True
    except TimeoutError:
        pass
    return int(raw.split(b" ", 2)[1]), raw, closed


def test_a_body_gets_longer_the_larger_it_is_but_never_less_than_the_floor() -> None:
    assert body_deadline_s(100, 30.0, 256 * 1024) == 30.0
    assert body_deadline_s(32 * 1024 * 1024, 30.0, 256 * 1024) == 128.0


def test_a_strangers_upload_is_refused_before_its_body_is_read(market) -> None:
    """A signer with no work, a request naming none, and one naming a provider at work but not signed by it are
    answered at once, though their bodies never come: they hold no upload slot and no memory while it would trickle
    in. (Naming a working provider's public address took a slot, and stalled, before the signature was checked
    first, over the body hash the headers carry.) An upload without that hash is refused at once too."""
    market.rt.settings.body_timeout_s = 600.0  # the answer cannot be a body timeout
    stranger = _stalled(market, Account.create(), 1024 * 1024, b"\0" * 1000)
    status, raw, closed = _answer(stranger)
    assert status == 409 and b"no unit assigned" in raw, raw
    host, port = market.url.removeprefix("http://").split(":")
    unsigned = socket.create_connection((host, int(port)))
    unsigned.sendall(b"PUT /blobs HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n")
    status, raw, _ = _answer(unsigned)
    assert status == 401 and b"unsigned request" in raw, raw
    worker = Account.create()
    _at_work(market, worker)
    impostor = _stalled(market, worker.address, 1024 * 1024, b"\0" * 1000)  # names it, cannot sign for it
    status, raw, _ = _answer(impostor)
    assert status == 401 and b"missing headers" in raw, raw
    forged = Account.create()
    headers = sign_request(forged, MarketClient(market.url, forged).domain, "PUT", "/blobs", b"x", 1, 2**40)
    r = httpx.put(market.url + "/blobs", content=b"x", headers={**headers, HEADER_SIGNER: worker.address})
    assert r.status_code == 401 and "not by the claimed signer" in r.text, r.text
    no_hash = {k: v for k, v in sign_request(worker, MarketClient(market.url, worker).domain, "PUT", "/blobs", b"x",
                                             time.time_ns() // 1000, int(time.time()) + 300).items()
               if k != HEADER_BODY_HASH}
    r = httpx.put(market.url + "/blobs", content=b"x", headers=no_hash)
    assert r.status_code == 401 and HEADER_BODY_HASH in r.text, r.text


def test_an_upload_whose_body_is_not_the_one_signed_is_refused(market) -> None:
    """The signature covers the body hash the headers carry; the body that then arrives must hash to it."""
    worker = Account.create()
    _at_work(market, worker)
    c = _stalled(market, worker, 64, b"\1" * 64, signed_body=b"\0" * 64)
    status, raw, _ = _answer(c)
    assert status == 401 and b"does not hash to its signed" in raw, raw


def test_a_stalled_upload_is_cut_off_at_its_deadline_and_a_busy_marketplace_says_when_to_come_back(market) -> None:
    """Stalled uploads from a provider at work take at most max_uploads_in_flight slots; one more is a 503 with
    Retry-After (a node retries a 5xx), not a queue. Each stalled one is answered 408 at its deadline and its
    connection closed; then uploads go through again. A stalled JSON body is cut off alike."""
    settings = market.rt.settings
    settings.body_timeout_s, settings.body_min_rate = 2.0, 2**40  # every body here: 2 s
    settings.max_uploads_per_signer = settings.max_uploads_in_flight  # (one signer fills them here; see the next test)
    acct = Account.create()
    _at_work(market, acct)
    client = MarketClient(market.url, acct)
    blob = checkpoint.serialize({"w": torch.zeros(4)}, {})

    def probe() -> httpx.Response:
        return client.signed("PUT", "/blobs", blob, "application/octet-stream")

    stalled = [_stalled(market, acct, 1024 * 1024, b"\0" * 4096) for _ in range(settings.max_uploads_in_flight)]
    busy = market.wait(lambda: (r := probe()).status_code == 503 and r, timeout=20, what="every slot taken")
    assert busy.headers["retry-after"] == "5" and "try again" in busy.json()["detail"], busy.text
    for c in stalled:
        status, raw, closed = _answer(c)
        assert status == 408 and b"did not arrive in time" in raw and closed, raw
    assert probe().status_code == 422  # a slot again: parsed (and refused, no state of a unit's model)
    json_stall = _stalled(market, acct.address, 100, b"{", path="/providers/register", method="POST")
    status, raw, closed = _answer(json_stall)
    assert status == 408 and closed, raw
    assert httpx.get(market.url + "/healthz").status_code == 200


def test_one_provider_cannot_take_every_upload_slot(market) -> None:
    """A staked provider with a unit stalled 8 signed uploads and every other provider's hand-ins and reveals got
    503 until it let go (the review of this session's change). Now a signer holds at most
    GRIDMINT_MAX_UPLOADS_PER_SIGNER (2) slots: its third is a 503 naming it, and another provider's upload goes
    through meanwhile."""
    market.rt.settings.body_timeout_s = 600.0
    assert market.rt.settings.max_uploads_per_signer == 2
    greedy, other = Account.create(), Account.create()
    _at_work(market, greedy)
    _at_work(market, other)
    stalled = [_stalled(market, greedy, 1024 * 1024, b"\0" * 4096) for _ in range(2)]
    blob = checkpoint.serialize({"w": torch.zeros(4)}, {})
    third = market.wait(lambda: (r := MarketClient(market.url, greedy).signed(
        "PUT", "/blobs", blob, "application/octet-stream")).status_code == 503 and r, timeout=20,
        what="the greedy signer's slots taken")
    assert "has 2 uploads in progress already" in third.json()["detail"] and third.headers["retry-after"] == "5"
    r = MarketClient(market.url, other).signed("PUT", "/blobs", blob, "application/octet-stream")
    assert r.status_code == 422, r.text  # a slot: read, parsed (and refused: no state of its unit's model)
    for c in stalled:
        c.close()


def _training_state(spec: JobSpec, k: int) -> bytes:
    """A full fp32 training state of ``spec``'s model (what a provider uploads), told apart by ``k``."""
    tensors = {}
    for name, value in init_state(model_config(spec), spec.seed).items():
        tensors[f"model.{name}"] = value.float()
        tensors[f"optim.{name}.exp_avg"] = torch.zeros_like(value, dtype=torch.float32)
        tensors[f"optim.{name}.exp_avg_sq"] = torch.zeros_like(value, dtype=torch.float32)
        tensors[f"optim.{name}.step"] = torch.tensor(float(k))
    return checkpoint.serialize(tensors, {})


def test_a_unit_takes_the_checkpoints_its_work_needs_and_no_junk(market, tmp_path: Path) -> None:
    """A provider holding one unit stored 40 junk uploads of up to 32 MiB each: an upload must be a training state
    of the model of a unit it holds (422), and a unit of 2 segments takes twice 2 + its final state (a node
    restarted on another plan trains it again) + 2 distinct ones (429 past that). The same bytes again are free (a node retries an upload after a dropped link), and what was
    refused is not stored."""
    p = provider(market, tmp_path, "p", "us-east", "0.9")
    spec = JobSpec(rounds=1, units_per_round=1, steps_per_unit=10, segment_len=5, batch_size=8, max_price=tokens(2))
    job_id = submit_job(market, spec)
    market.wait(lambda: _assigned(market, job_id) == 1, what="the unit matched")

    def put(data: bytes) -> httpx.Response:
        return p.client.signed("PUT", "/blobs", data, "application/octet-stream")

    junk = put(checkpoint.serialize({"junk": torch.rand(64 * 1024)}, {}))
    assert junk.status_code == 422 and "not a training state of the model of any unit" in junk.json()["detail"], \
        junk.text
    other = spec.model_copy(update={"model": spec.model.model_copy(update={"n_layer": 1})})
    assert put(_training_state(other, 0)).status_code == 422  # another model's state
    shas = [put(_training_state(spec, k)).json()["sha256"] for k in range(8)]
    assert put(_training_state(spec, 0)).json()["sha256"] == shas[0]  # sent again: not charged again
    over = put(_training_state(spec, 8))
    assert over.status_code == 429 and "as many checkpoints as its work needs" in over.json()["detail"], over.text
    assert put(_training_state(spec, 3)).status_code == 201  # a retry of one it took is still taken
    with market.rt.sessions() as s:
        global_blob = s.get(Job, job_id).global_blob
    stored = {f.name.removesuffix(".safetensors") for f in market.rt.blobs.root.glob("*.safetensors")}
    assert stored == set(shas) | {global_blob}
