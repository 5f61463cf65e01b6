"""A checkpoint is named by its sha256, and a copy corrupted on the marketplace's disk (or shared storage) is neither
served nor decided on: each read checks the bytes against the name.

Downloads go through the real HTTP API (uvicorn, a Celery worker on Redis, the in-process EVM); the round step runs
the service's own ``advance`` against the real contracts on the in-process EVM and a real database (SQLite and
PostgreSQL), as tests/marketplace/test_uploads.py does."""
from __future__ import annotations

import logging
import os
import struct
import time
from pathlib import Path

import httpx
import pytest
from eth_utils import keccak
from sqlalchemy import select

from marketplace import service
from marketplace.common import model_config
from marketplace.db import Event, Job, LedgerEntry, Provider, Unit
from node import checkpoint
from node.model import init_state
from protocol.errors import BlobCorruptError
from protocol.jobs import RANDOM_BYTES, new_job_id
from protocol.money import tokens
from protocol.schemas import JobSpec
from tests.marketplace.test_flow import submit_job
from tests.marketplace.test_settlement import World, make_world

PRICE = tokens(2)
SPEC = JobSpec(rounds=2, units_per_round=2, steps_per_unit=10, segment_len=5, max_price=PRICE)


def rot(path: Path, keep_mtime: bool = False) -> None:
    """Flip the lowest bit of the first byte of tensor data, in place (same inode, same size): the file still loads
    as a sound checkpoint, only its hash tells. ``keep_mtime``: its mtime put back too, as a disk's bit rot leaves
    it."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[8 + struct.unpack("<Q", data[:8])[0]] ^= 0x01  # past the u64 header length and the JSON header
    with path.open("r+b") as fh:
        fh.write(data)
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    checkpoint.load(path)


def test_a_corrupt_checkpoint_is_never_served_and_the_answer_names_it(market, caplog: pytest.LogCaptureFixture,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """GET /blobs/{sha} sent whatever file bore the name: a node then trained from (or a verifier replayed, and
    accused an honest provider over) bytes nobody uploaded. Now a corrupt copy is a 500 naming the blob, logged; the
    same bytes uploaded again repair it; and one that rots in place after it was checked (its size and mtime
    untouched, so not checked again before it is sent) is cut off before its last byte: no client ever receives all
    of a corrupt blob. The same for a job's weights."""
    blobs = market.rt.blobs
    data = checkpoint.serialize(init_state(model_config(SPEC), 7), {"kind": "test"})
    sha = blobs.put_checkpoint(data)
    url = f"{market.url}/blobs/{sha}"
    got = httpx.get(url)
    assert got.status_code == 200 and got.content == data and got.headers["content-length"] == str(len(data))

    rot(blobs.path(sha))
    with caplog.at_level(logging.ERROR, logger="marketplace.blobs"):
        got = httpx.get(url)
    assert got.status_code == 500, got.status_code
    assert got.json()["error"] == "BlobCorruptError"
    assert f"blob {sha} is corrupt: its content hashes to " in got.json()["detail"]
    assert [r for r in caplog.records if r.levelno == logging.ERROR and sha in r.getMessage()]
    for read in (blobs.read, blobs.checked_path):  # what the marketplace decides on (a round, a referee's replay)
        with pytest.raises(BlobCorruptError, match=sha):
            read(sha)

    assert blobs.put_checkpoint(data) == sha  # the same bytes again: the corrupt copy is replaced
    assert httpx.get(url).content == data

    rot(blobs.path(sha), keep_mtime=True)
    monkeypatch.setattr("marketplace.blobs.CHUNK", 1024)  # sent in many chunks: all but the last go out
    received = bytearray()
    with pytest.raises(httpx.RemoteProtocolError), httpx.stream("GET", url) as resp:
        for chunk in resp.iter_raw():  # headers went, then the connection is cut: the body is short
            received += chunk
    assert resp.status_code == 200 and len(received) < len(data)
    assert httpx.get(url).status_code == 500  # and from then on it is refused outright

    job_id = submit_job(market, SPEC)
    with market.rt.sessions() as s:
        global_blob = s.get(Job, job_id).global_blob
    assert httpx.get(f"{market.url}/jobs/{job_id}/weights").content == blobs.read(global_blob)
    rot(blobs.path(global_blob))
    got = httpx.get(f"{market.url}/jobs/{job_id}/weights")
    assert got.status_code == 500 and global_blob in got.json()["detail"]


@pytest.fixture()
def world(tmp_path: Path, db_url: str) -> World:
    return make_world(tmp_path, db_url)


def test_a_round_is_not_averaged_from_a_corrupt_checkpoint_nor_its_job_failed(world: World) -> None:
    """advance loaded the units' final checkpoints by name, unchecked: a copy corrupted on disk that still parsed was
    averaged into the customer's model (and one that did not parse failed the job for good, as if its providers'
    work were bad). Now advance raises BlobCorruptError: nothing is averaged, the job stays running and unfailed, the
    sweep queues the advance again, and once the blob is restored the round is averaged from the bytes uploaded."""
    w = world
    job_id = new_job_id(w.customer.address, keccak(text="corrupt-final")[:RANDOM_BYTES])
    w.customer.fund_job(job_id, SPEC.budget())
    service.create_job(w.rt, w.customer.address, job_id, SPEC)
    finals: list[bytes] = []
    with w.rt.sessions.begin() as s:  # round 0 verified and credited, as maybe_verified leaves it
        for shard, who in enumerate(w.providers[:2]):
            s.add(Provider(address=who.address, region="eu-north", gpu="test", vram_mb=8000, price=PRICE,
                           tokens_per_s=1000, capacity=1, stake=tokens(100)))
            u = s.scalars(select(Unit).where(Unit.job_id == job_id, Unit.shard == shard)).one()
            u.status, u.provider, u.price, u.assigned_at = "verified", who.address, PRICE, int(time.time())
            finals.append(checkpoint.serialize(init_state(model_config(SPEC), shard), {"kind": "unit"}))
            u.final_blob = w.rt.blobs.put_checkpoint(finals[-1])
            s.add(LedgerEntry(job_id=job_id, unit_id=u.id, provider=who.address, amount=PRICE))
            corrupt = u.final_blob
    rot(w.rt.blobs.path(corrupt))

    with pytest.raises(BlobCorruptError, match=f"blob {corrupt} is corrupt"):
        service.advance(w.rt, job_id)
    with w.rt.sessions() as s:
        job = s.get(Job, job_id)
        assert (job.status, job.round, len(job.eval_losses)) == ("running", 0, 1)
        assert not list(s.scalars(select(Event).where(Event.job_id == job_id,
                                                      Event.kind.in_(["round_done", "job_failed"]))))
    w.queued.clear()
    assert service.sweep(w.rt)["advance"] == 1 and w.queued == [("gridmint.advance", [job_id])]

    assert w.rt.blobs.put_checkpoint(finals[-1]) == corrupt  # restored by uploading its bytes again
    assert service.advance(w.rt, job_id) == "running"
    with w.rt.sessions() as s:
        assert s.get(Job, job_id).round == 1


def test_a_round_whose_checkpoint_is_missing_from_the_store_waits_for_it_and_its_job_is_not_failed(
        world: World) -> None:
    """A verified unit's final checkpoint briefly not in the store (a share not mounted, a restore under way): advance
    took the missing blob for bad bytes and failed the job for good (the customer kept the last round's model, its
    rounds to come refunded), as a corrupt copy no longer does. Now it raises FileNotFoundError: the job stays
    running, the sweep queues the advance again, and the round is averaged once the file is back."""
    w = world
    job_id = new_job_id(w.customer.address, keccak(text="missing-final")[:RANDOM_BYTES])
    w.customer.fund_job(job_id, SPEC.budget())
    service.create_job(w.rt, w.customer.address, job_id, SPEC)
    with w.rt.sessions.begin() as s:
        for shard, who in enumerate(w.providers[:2]):
            s.add(Provider(address=who.address, region="eu-north", gpu="test", vram_mb=8000, price=PRICE,
                           tokens_per_s=1000, capacity=1, stake=tokens(100)))
            u = s.scalars(select(Unit).where(Unit.job_id == job_id, Unit.shard == shard)).one()
            u.status, u.provider, u.price, u.assigned_at = "verified", who.address, PRICE, int(time.time())
            u.final_blob = w.rt.blobs.put_checkpoint(checkpoint.serialize(init_state(model_config(SPEC), shard),
                                                                          {"kind": "unit"}))
            s.add(LedgerEntry(job_id=job_id, unit_id=u.id, provider=who.address, amount=PRICE))
            missing = u.final_blob
    path = w.rt.blobs.path(missing)
    away = path.with_name("away")
    path.rename(away)
    with pytest.raises(FileNotFoundError, match="a checkpoint is missing from the blob store"):
        service.advance(w.rt, job_id)
    with w.rt.sessions() as s:
        assert (s.get(Job, job_id).status, s.get(Job, job_id).round) == ("running", 0)  # type: ignore[union-attr]
        assert not list(s.scalars(select(Event).where(Event.job_id == job_id, Event.kind == "job_failed")))
    w.queued.clear()
    assert service.sweep(w.rt)["advance"] == 1 and w.queued == [("gridmint.advance", [job_id])]
    away.rename(path)
    assert service.advance(w.rt, job_id) == "running"
    with w.rt.sessions() as s:
        assert s.get(Job, job_id).round == 1  # type: ignore[union-attr]
