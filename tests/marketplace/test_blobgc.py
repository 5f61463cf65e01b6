"""Deleting checkpoints nothing needs (marketplace.blobgc): an ended job's after the retention (its global model
kept, and what an open ruling needs), uploads nobody names after a day; a running job's, and a blob handed in again,
never."""
from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import torch
from sqlalchemy import update

from marketplace import blobgc
from marketplace.db import Job, Unit, UnitUpload, Verification
from protocol.money import tokens
from protocol.schemas import JobSpec
from tests.marketplace.test_flow import _submitted, drive, provider, staked_verifier, submit_job

SMALL = JobSpec(rounds=1, units_per_round=1, steps_per_unit=10, segment_len=5, batch_size=8, max_price=tokens(2),
                verification="full")


def _unit_blobs(market, job_id: str) -> set[str]:
    with market.rt.sessions() as s:
        return {b for u in s.query(Unit).filter(Unit.job_id == job_id) for b in [*u.segment_blobs, u.final_blob] if b}


def _charged(market, job_id: str) -> int:
    """Upload charges (marketplace.uploads) on the job's units."""
    with market.rt.sessions() as s:
        units = s.query(Unit.id).filter(Unit.job_id == job_id)
        return s.query(UnitUpload).filter(UnitUpload.unit_id.in_(units)).count()


def test_an_ended_jobs_checkpoints_go_after_the_retention_its_model_and_running_work_stay(market, tmp_path: Path):
    node = provider(market, tmp_path, "node", "us-east", "0.9")
    verifier = staked_verifier(market, tmp_path, "verifier")
    done = submit_job(market, SMALL)
    with market.rt.sessions() as s:
        start_model = s.get(Job, done).global_blob  # replaced by the trained model once its round is averaged
    drive(market, [node], verifier, done)
    running = submit_job(market, SMALL)
    _submitted(market, running, [node], 1)  # submitted, not yet checked: its job runs
    store, rt = market.rt.blobs, market.rt
    old, young = store.put_tensors({"junk": torch.zeros(3)}, {}), store.put_tensors({"junk": torch.ones(3)}, {})
    day_ago = time.time() - rt.settings.blob_orphan_s - 60
    os.utime(store.path(old), (day_ago, day_ago))
    os.utime(store.path(young), (day_ago, day_ago))
    store.put_tensors({"junk": torch.ones(3)}, {})  # the same bytes handed in again: young again
    with rt.sessions() as s:
        model = s.get(Job, done).global_blob
    finished, live = _unit_blobs(market, done), _unit_blobs(market, running)
    assert finished and live and model not in finished

    charged = _charged(market, done), _charged(market, running)
    assert charged == (len(finished), len(live))  # one per checkpoint its provider uploaded

    now = int(time.time())
    got = blobgc.collect(rt, now)  # the ended job is within its retention; only the old junk goes
    assert got["deleted"] == 1 and not store.has(old) and store.has(young) and got["upload_charges"] == 0
    assert all(store.has(b) for b in finished | live | {model})

    later = now + rt.settings.blob_retention_s + rt.settings.blob_orphan_s + 120  # past the retention for all
    with rt.sessions.begin() as s:  # a ruling still open on the ended job's unit keeps its checkpoints
        unit_id = s.query(Unit.id).filter(Unit.job_id == done).scalar()
        s.add(Verification(unit_id=unit_id, provider=node.account.address, segment=0, status="disputed"))
    assert blobgc.collect(rt, later)["deleted"] == 2 and not store.has(young)  # and the model it started from
    assert not store.has(start_model) and start_model not in finished | live
    assert all(store.has(b) for b in finished | live | {model})
    with rt.sessions.begin() as s:
        s.execute(update(Verification).where(Verification.status == "disputed").values(status="fraud"))
    assert _charged(market, done) == charged[0]  # the ruling may still ask the provider for states
    got = blobgc.collect(rt, later)
    assert got["deleted"] == len(finished - live) and got["bytes"] > 0
    # before the fix: the ended unit's charges stayed for ever, a row per checkpoint ever uploaded
    assert got["upload_charges"] == charged[0] and (_charged(market, done), _charged(market, running)) == (0, charged[1])
    assert not any(store.has(b) for b in finished - live)
    assert all(store.has(b) for b in live) and store.has(model)  # a running job's, and every job's model, stay
    r = httpx.get(f"{market.url}/jobs/{done}/weights")
    assert r.status_code == 200 and r.content == store.read(model)
    assert blobgc.collect(rt, later)["deleted"] == 0  # nothing more to take
    assert _charged(market, running) == charged[1]


def test_a_stocked_canarys_forged_checkpoints_stay_its_retrained_variants_too(market, tmp_path: Path):
    """A decoy names its forged end, and a bf16 job's its retrained variant's too (marketplace.canary.for_verifier):
    both stay while the unit's job runs. (The variant's was collected as an orphan after a day.)"""
    node = provider(market, tmp_path, "node", "us-east", "0.9")
    job = submit_job(market, SMALL)
    _submitted(market, job, [node], 1)
    store, rt = market.rt.blobs, market.rt
    forged = store.put_tensors({"forged": torch.zeros(3)}, {})
    variant = store.put_tensors({"forged": torch.ones(3)}, {})
    day_ago = time.time() - rt.settings.blob_orphan_s - 60
    for blob in (forged, variant):
        os.utime(store.path(blob), (day_ago, day_ago))
    with rt.sessions.begin() as s:
        unit_id = s.query(Unit.id).filter(Unit.job_id == job).scalar()
        s.add(Verification(unit_id=unit_id, provider=node.account.address, segment=0, status="pending",
                           decoy={"end_blob": forged, "exact": {"end_blob": variant}}))
    blobgc.collect(rt, int(time.time()))
    assert store.has(forged) and store.has(variant)


def test_a_blob_handed_in_again_while_the_collector_takes_it_is_kept(tmp_path: Path) -> None:
    """A standby's deterministic retrain uploads the very bytes of an old orphan blob. The collector could delete the
    file between the upload finding it there and renewing its age: the upload answered its sha, and nothing was
    stored (the submission then failed on a missing checkpoint). Or read its old age, see it renewed, and delete it
    all the same. Now the upload writes it again if it is gone, and the collector reads the age again once the file
    is taken aside, putting back one renewed meanwhile."""
    from marketplace.blobs import BlobStore
    from node import checkpoint
    from node.model import ModelConfig, init_state

    store = BlobStore(tmp_path / "blobs")
    data = checkpoint.serialize(init_state(ModelConfig(d_model=16, n_layer=1, n_head=2, ctx=16), 0), {"kind": "unit"})
    sha = store.put_checkpoint(data)
    old = time.time() - 7200
    os.utime(store.path(sha), (old, old))
    holds = store._holds

    def collected_meanwhile(*args: object) -> bool:  # the collector runs between the look and the renewal
        found = holds(*args)  # type: ignore[arg-type]
        assert store.collect(set(), time.time() - 3600) == (1, len(data))
        return found

    store._holds = collected_meanwhile  # type: ignore[method-assign]
    assert store.put_checkpoint(data) == sha
    store._holds = holds  # type: ignore[method-assign]
    assert store.path(sha).exists() and store.read(sha) == data
    # the other order: the age renewed after the collector read it, before it deleted the file
    os.utime(store.path(sha), (old, old))
    real_replace = os.replace

    def renewed_meanwhile(src: object, dst: object) -> None:
        if str(dst).endswith(".gc"):
            os.utime(str(src))  # an upload of the same bytes renews its age just before the file is taken aside
        real_replace(src, dst)  # type: ignore[arg-type]

    os.replace = renewed_meanwhile  # type: ignore[assignment]
    try:
        assert store.collect(set(), time.time() - 3600) == (0, 0)
    finally:
        os.replace = real_replace
    assert store.read(sha) == data and not list(store.root.glob("*.gc"))
    os.utime(store.path(sha), (old, old))
    assert store.collect(set(), time.time() - 3600) == (1, len(data)) and not store.path(sha).exists()


def _old_orphan(root: Path) -> tuple[str, bytes]:
    """A checkpoint another API process stored two hours ago, named by nothing: the collector's to take."""
    from marketplace.blobs import BlobStore

    writer = BlobStore(root)
    sha = writer.put_tensors({"x": torch.arange(6, dtype=torch.float32)}, {"k": "v"})
    old = time.time() - 7200
    os.utime(writer.path(sha), (old, old))
    return sha, writer.path(sha).read_bytes()


def test_a_blob_handed_in_again_as_the_collector_takes_it_mid_check_is_written_again(tmp_path: Path,
                                                                                   monkeypatch) -> None:
    """An API process that never saw the file hashes it to find it there; the collector (another process) takes it
    between that stat and the hash: the upload writes it again (a review found FileNotFoundError escaped the upload
    as a 500)."""
    from marketplace.blobs import BlobStore

    sha, data = _old_orphan(tmp_path)
    api, gc = BlobStore(tmp_path), BlobStore(tmp_path)
    real = BlobStore.checked_path

    def collected_first(self: BlobStore, s: str) -> Path:
        if self is api:
            assert gc.collect(set(), older_than=time.time() - 60)[0] == 1
        return real(self, s)

    monkeypatch.setattr(BlobStore, "checked_path", collected_first)
    assert api.put_checkpoint(data) == sha
    assert api.path(sha).read_bytes() == data


def test_a_blob_collected_between_the_look_and_the_send_is_a_404(market, monkeypatch) -> None:
    """GET /blobs/{sha} over HTTP: a blob the collector removes after the route found it is a 404, as a moment
    later (a review found a bare 500); one removed once the route has opened it is sent whole."""
    from marketplace.blobs import BlobStore

    store = market.rt.blobs
    sha = store.put_tensors({"x": torch.arange(6, dtype=torch.float32)}, {"k": "v"})
    data = store.path(sha).read_bytes()
    real_has, real_fstat = BlobStore.has, os.fstat

    def collected_after_the_look(self: BlobStore, s: str) -> bool:
        there = real_has(self, s)
        os.unlink(self.path(s))
        return there

    monkeypatch.setattr(BlobStore, "has", collected_after_the_look)
    got = httpx.get(f"{market.url}/blobs/{sha}")
    assert got.status_code == 404 and got.json()["error"] == "NotFound", got.text[:200]
    monkeypatch.undo()
    store.path(sha).write_bytes(data)

    def collected_once_open(fd: int) -> os.stat_result:
        if store.path(sha).exists():
            os.unlink(store.path(sha))
        return real_fstat(fd)

    monkeypatch.setattr("marketplace.blobs.os.fstat", collected_once_open)
    got = httpx.get(f"{market.url}/blobs/{sha}")
    assert got.status_code == 200 and got.content == data


def test_a_stored_blob_is_on_disk_and_named_there_before_the_store_returns(tmp_path: Path, monkeypatch) -> None:
    """The bytes are flushed before the rename and the folder after it: a host crash after the caller recorded the
    blob's name loses neither (a review found the folder was never flushed, so the name could go)."""
    import stat

    from marketplace.blobs import BlobStore

    flushed: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        flushed.append("folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    def replace(src: object, dst: object) -> None:
        flushed.append("rename")
        real_replace(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr("marketplace.blobs.os.fsync", fsync)
    monkeypatch.setattr("marketplace.blobs.os.replace", replace)
    store = BlobStore(tmp_path / "blobs")
    sha = store.put_tensors({"x": torch.arange(6, dtype=torch.float32)}, {"k": "v"})
    assert flushed == ["file", "rename", "folder"] and store.has(sha)
