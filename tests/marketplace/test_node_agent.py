"""The provider node at the marketplace: heartbeats while it does something other than train (a reveal, a unit's
start download, claims), a nonce refused because another process signs with its wallet, and the line it starts
with. Real marketplace over HTTP, Celery on Redis, the in-process EVM (conftest)."""
from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest
from sqlalchemy import select

from marketplace import service
from marketplace.db import Event, Job, Provider, Unit
from node.agent import ProviderAgent
from node.client import MarketClient, MarketError
from node.device import DeviceInfo, benchmark
from protocol.money import tokens
from protocol.schemas import JobSpec
from tests.marketplace.test_flow import _assigned, _handed_in, submit_job
from tests.marketplace.test_node_faults import SMALL, node, said, unit_status

#: Longer than the marketplace's unit_timeout_s in these tests (3 s): what a segment's replay, a large start
#: checkpoint's download or a claim waiting for its receipts takes on a real unit (minutes, against 120 s).
SLOW_S = 4.5


def timed_out(market) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    with market.rt.sessions() as s:
        return [e.data for e in s.scalars(select(Event).where(Event.kind == "unit_timed_out"))]


def test_a_reveal_keeps_the_unit_assigned_meanwhile_alive(market, tmp_path: Path) -> None:
    """A referee asks the node to re-derive a state (a replay as long as a segment's training) while the matcher
    hands it a unit: the node beats all along, so the unit is not reaped as a silent dropout. (The ask and the
    replay are stubbed: a real one needs a bisecting dispute; only their duration matters here.)"""
    market.rt.settings.unit_timeout_s = 3
    p = node(market, tmp_path / "p")
    job_id = submit_job(market, SMALL)
    market.wait(lambda: _assigned(market, job_id) == 1, what="the unit matched")
    asks = [{"unit_id": "0x" + "ab" * 32, "step": 7, "plan": "cpu"}]
    reaped: list[int] = []

    def replay(ask: dict[str, Any]) -> dict[str, Any]:
        time.sleep(SLOW_S)
        reaped.append(service.reap(market.rt))  # what the marketplace's periodic reaper does meanwhile
        return {}

    p.client.next_reveal = lambda: asks.pop() if asks else None  # type: ignore[method-assign]
    p.client.reveal = lambda body: {"status": "ok"}  # type: ignore[method-assign]
    p.answer = replay  # type: ignore[method-assign]
    assert p.reveal_once()
    assert reaped == [0] and timed_out(market) == []  # before the fix: 1, "no heartbeat", a dropout
    assert p.work_once() and unit_status(market, job_id) in ("submitted", "verified")


def _submitted_unit_ask(market, tmp_path: Path) -> tuple[ProviderAgent, dict[str, Any]]:  # type: ignore[no-untyped-def]
    """A node that trained and handed in a unit, and a referee's ask for the state before step 1 of that unit (what
    /reveals/next answers in a bisection of segment 0; a real one needs a bisecting dispute)."""
    from marketplace.common import unit_spec
    from marketplace.db import Job, Unit

    p = node(market, tmp_path / "p")
    job_id = submit_job(market, SMALL)
    market.wait(lambda: _assigned(market, job_id) == 1, what="the unit matched")
    assert p.work_once()
    with market.rt.sessions() as s:
        unit = s.scalars(select(Unit).where(Unit.job_id == job_id)).one()
        spec = unit_spec(s.get(Job, job_id), unit)
        return p, {"verification_id": 1, "unit_id": unit.id, "segment": 0, "step": 1, "spec": spec.to_json(),
                   "spec_hash": spec.spec_hash(), "plan": "cpu", "checkpoint_blob": unit.segment_blobs[0],
                   "deadline": int(time.time()) + 120}


def test_a_reveal_no_longer_asked_for_is_dropped_and_one_still_asked_is_not(market, tmp_path: Path, capsys) -> None:
    """A dispute can move on while the node re-derives a state (another check of the unit ruled, the unit gone): its
    upload is then refused (a state of no unit it holds: 422) or the reveal is (409). That error ended reveal_once,
    and with it the node's loop turn; now the node asks whether the state is still wanted and, if not, says so and
    goes on. Still asked, the refusal is raised as before."""
    p, ask = _submitted_unit_ask(market, tmp_path)
    refusal = MarketError(422, f"checkpoint ab is not a training state of the model of any unit {p.account.address} "
                               "holds", "CheckpointError")
    polls = [None, ask]  # popped from the end: first the ask itself, then (asked again) nothing open

    def put_blob(path: Path) -> str:
        raise refusal

    p.client.next_reveal = lambda: polls.pop() if polls else None  # type: ignore[method-assign]
    p.client.put_blob = put_blob  # type: ignore[method-assign]
    p.client.reveal = lambda body: pytest.fail("nothing to reveal")  # type: ignore[method-assign]
    assert p.reveal_once()
    assert "is no longer asked for" in said(capsys)
    polls[:] = [ask, ask]  # still open when asked again: the refusal stands
    with pytest.raises(MarketError):
        p.reveal_once()


def test_a_reveal_upload_refused_by_a_busy_marketplace_is_tried_again_without_replaying_again(
        market, tmp_path: Path, capsys) -> None:
    """A reveal's upload that meets a busy marketplace (every upload slot taken: 503) is tried again until the
    reveal's deadline. It was not: the reveal failed, and the next attempt downloaded the start and replayed the
    segment again first. (The ask is built from the node's own submitted unit, its start downloaded and the state
    re-derived for real; only the upload and reveal routes are stubbed: a real reveal needs a bisecting dispute.)"""
    p, ask = _submitted_unit_ask(market, tmp_path)
    start_blob, asks = ask["checkpoint_blob"], [ask]
    downloads, puts, sent = [], [], []
    get_blob = p.client.get_blob

    def put_blob(path: Path) -> str:
        puts.append(path.read_bytes())
        if len(puts) == 1:
            raise MarketError(503, "the marketplace is taking 8 uploads already; try again in 5 s", "UploadsBusy")
        return "cd" * 32

    p.client.next_reveal = lambda: asks.pop() if asks else None  # type: ignore[method-assign]
    p.client.get_blob = lambda sha, dest: downloads.append(sha) or get_blob(sha, dest)  # type: ignore[method-assign]
    p.client.put_blob = put_blob  # type: ignore[method-assign]
    p.client.reveal = lambda body: sent.append(body) or {"status": "ok"}  # type: ignore[method-assign]
    assert p.reveal_once()
    assert downloads == [start_blob] and len(puts) == 2 and puts[0] == puts[1]  # one replay, sent twice
    assert len(sent) == 1 and sent[0]["blob"] == "cd" * 32 and sent[0]["step"] == 1
    assert "reveal upload failed" in said(capsys)


def test_a_slow_start_download_does_not_lose_the_unit(market, tmp_path: Path, capsys) -> None:
    market.rt.settings.unit_timeout_s = 3
    p = node(market, tmp_path / "p")
    job_id = submit_job(market, SMALL)
    market.wait(lambda: _assigned(market, job_id) == 1, what="the unit matched")
    get_blob, reaped = p.client.get_blob, []

    def slow_get_blob(sha: str, dest: Path) -> Path:
        time.sleep(SLOW_S)
        reaped.append(service.reap(market.rt))
        return get_blob(sha, dest)

    p.client.get_blob = slow_get_blob  # type: ignore[method-assign]
    assert p.work_once()
    assert reaped == [0] and timed_out(market) == []
    assert unit_status(market, job_id) in ("submitted", "verified")
    assert "submitted unit" in said(capsys)


def test_a_unit_assigned_while_the_idle_node_claims_is_not_lost(market, tmp_path: Path) -> None:
    """The idle loop's claims wait for chain receipts; a unit matched meanwhile stays the node's."""
    market.rt.settings.unit_timeout_s = 3
    p = node(market, tmp_path / "p")
    jobs: list[str] = []
    reaped: list[int] = []

    def slow_claim() -> int:
        if not jobs:
            jobs.append(submit_job(market, SMALL))
            market.wait(lambda: _assigned(market, jobs[0]) == 1, what="the unit matched")
            time.sleep(SLOW_S)
            reaped.append(service.reap(market.rt))
            assert p.stopper is not None
            p.stopper.stop = True  # the owner stops the node: run() returns at the top of its loop
        return 0

    p.claims.claim = slow_claim
    assert p.run() is None
    assert reaped == [0] and timed_out(market) == []


def test_a_nonce_refused_because_another_process_signs_is_not_a_take_back(market, tmp_path: Path, capsys) -> None:
    """A second process on the node's wallet (another machine, its clock 30 s ahead) sends one request while the
    node trains: the node's next beat carries a nonce below the one accepted last, and is refused (409, like a
    take-back). The node sends it again under a nonce past that one and trains on; the unit is handed in. A node
    restarted on that wallet with its clock behind starts (its registration is sent again the same way)."""
    market.rt.settings.unit_timeout_s = 2  # a beat every 0.5 s
    acct = market.account(gmt=tokens(500))
    one = node(market, tmp_path / "one", acct=acct)
    two = MarketClient(market.url, acct)
    spec = JobSpec(rounds=1, units_per_round=1, steps_per_unit=40, segment_len=20, batch_size=8,
                   max_price=tokens(2), verification="none")
    job_id = submit_job(market, spec)
    market.wait(lambda: _assigned(market, job_id) == 1, what="the unit matched")
    beats: list[str] = []
    heartbeat = one.client.heartbeat

    def counted(*args: Any) -> Any:
        try:
            out = heartbeat(*args)
        except MarketError as exc:
            beats.append(f"refused: {exc.error} {exc.detail}")
            raise
        beats.append("ok")
        return out

    one.client.heartbeat = counted  # type: ignore[method-assign]
    inner = one._between_steps
    jump: dict[str, int] = {}

    def between(step: int, loss: float) -> None:
        inner(step, loss)
        if step == 5:
            jump["nonce"] = time.time_ns() // 1000 + 30_000_000
            two.nonces.skip_past(jump["nonce"])
            two.beat_nonces.skip_past(jump["nonce"])
            # accepted, in each nonce lane: the wallet's last nonces are now 30 s ahead of one's clock
            assert two.next_reveal() is None  # (the beats' lane)
            assert two.next_work() is not None  # (the other: the unit one trains)
            jump["beats"] = len(beats)
            market.wait(lambda: len(beats) > jump["beats"], timeout=10, what="a beat after the jump")

    one._between_steps = between  # type: ignore[method-assign]
    assert one.work_once()
    assert beats[jump["beats"]] == "ok", beats  # before the fix: "refused: ReplayError nonce ... already used"
    assert one._withdrawn is None and unit_status(market, job_id) in ("submitted", "verified")
    assert "took it back" not in said(capsys)
    later = node(market, tmp_path / "later", acct=acct)  # before the fix: MarketError 409 out of setup()
    assert later.client.nonces.next() > jump["nonce"] + 1  # its own clock is behind: it moved past the refused one
    # a real take-back is still one: a 409 Conflict
    try:
        later.client.heartbeat("0x" + "cd" * 32, 1)
    except MarketError as exc:
        assert exc.status == 409 and exc.error == "Conflict" and exc.conflict and not exc.replayed
    else:
        raise AssertionError("a heartbeat for a unit not ours was accepted")


def test_the_start_line_says_what_the_node_trains_on_and_the_stake_in_gmt(market, tmp_path: Path, capsys) -> None:
    """On a GPU machine without --plan (``probe()`` as it answers on an H100: no GPU here), the node warns that it
    trains on the CPU and names --plan cuda; it benchmarks and advertises the CPU it trains on (its name and memory:
    it registered the H100 and its 80 GB, so matching counted on memory it does not train with)."""
    devices: list[str | None] = []

    def measured(*, seconds: float, device: str | None = None) -> int:
        devices.append(device)
        return benchmark(seconds=seconds, device=device or "cpu")

    def h100(device: str | None = None) -> DeviceInfo:
        return DeviceInfo("cpu", "cpu x8", 64_000) if device == "cpu" else DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", 81559)

    with mock.patch("node.agent.probe", h100), mock.patch("node.agent.benchmark", measured):
        p = node(market, tmp_path / "p")
    out = said(capsys)
    with market.rt.sessions() as s:
        row = s.get(Provider, p.account.address)
        assert (row.gpu, row.vram_mb) == ("cpu x8", 64_000)
    assert devices == ["cpu"]  # named: the plan's (before the fix, none: benchmark's default, the CPU, whatever the plan)
    assert "has a GPU (NVIDIA H100 80GB HBM3), but plan 'cpu' trains on the CPU: start with --plan cuda" in out
    assert "training on cpu (plan cpu)" in out and "stake 200.0000 GMT" in out


def test_a_submission_refused_for_its_nonce_is_sent_again_and_the_unit_kept(market, tmp_path: Path) -> None:
    """A hand-in whose nonce is refused even when sent again (another process on the wallet kept drawing higher
    ones) is tried again like a blip; before, the trained unit's files were thrown away as if refused for good."""
    p = node(market, tmp_path / "p")
    job_id = submit_job(market, SMALL)
    market.wait(lambda: _assigned(market, job_id) == 1, what="the unit matched")
    submit, refused = p.client.submit, [MarketError(409, "nonce 5 was already used (last accepted 9)", "ReplayError")]

    def refused_once(unit_id: str, body: dict) -> object:  # what the client raises for that 409
        if refused:
            raise refused.pop()
        return submit(unit_id, body)

    p.client.submit = refused_once  # type: ignore[method-assign]
    assert p.work_once()
    assert not refused and unit_status(market, job_id) in ("submitted", "verified")


def test_a_node_whose_kernels_changed_since_it_trained_a_unit_still_open_says_so(market, tmp_path: Path,
                                                                                   capsys) -> None:
    """A state asked for a reveal is re-derived on the kernels the node computes with now: after a torch (or CUDA,
    or CPU) change it is not the one committed to, and can lose the dispute. ``/providers/{address}`` says which
    kernels its open units were trained with; a node on others says so, loudly, as it starts (here: the unit's
    build as another torch's). A unit verified in a round not averaged yet counts as open too."""
    p = node(market, tmp_path / "p")
    job_id = submit_job(market, SMALL.model_copy(update={"verification": "standard"}))  # (checked: it stays open)
    [unit_id] = _handed_in(market, job_id, [p], 1)
    mine = {"plan": "cpu", "build": p.build, "units": 1}
    assert p.client.provider()["unverified_kernels"] == [mine] and p._warn_open_kernels() == []
    other = "torch-2.0.0.example/x86_64.genuineintel.avx2/aten-avx2"
    with market.rt.sessions.begin() as s:
        unit = s.get(Unit, unit_id)
        assert unit is not None
        unit.build = other
    record = p.client.provider()
    assert record["unverified"] == 1 and record["unverified_kernels"] == [{**mine, "build": other}]
    said(capsys)
    again = node(market, tmp_path / "p", acct=p.account)  # the node started again, on this machine's kernels
    [warning] = again._warn_open_kernels()
    assert "1 unit(s) of ours on plan cpu, still open" in warning and other in warning and p.build in warning
    assert "were trained with kernels" in said(capsys)
    # verified, in a round not averaged yet: still open (a bench of the verifier that passed it would send it back
    # to be checked again, maybe disputed); once the round is averaged, not
    with market.rt.sessions.begin() as s:
        unit = s.get(Unit, unit_id)
        assert unit is not None
        unit.status = "verified"
    assert p.client.provider()["unverified"] == 1
    with market.rt.sessions.begin() as s:
        job = s.get(Job, job_id)
        assert job is not None
        job.round = 1
    assert p.client.provider()["unverified"] == 0 and p.client.provider()["unverified_kernels"] == []


def test_a_reveal_asked_while_a_hand_in_waits_to_be_tried_again_is_answered_meanwhile(market, tmp_path: Path,
                                                                                        capsys) -> None:
    """A unit's hand-in tried again for long (a marketplace restarting: 503s, up to the unit's due time, an hour
    or more) while a referee asks the node for a state of another of its units (the heartbeats see the ask): it was
    answered only once training went on, or the next loop turn, past a reveal deadline of minutes. Now it is
    answered between the tries. (The ask is built from the node's own submitted unit, its state re-derived and
    uploaded for real; the submission's 503s and the reveal route are stubbed: a real ask needs a bisecting
    dispute.)"""
    market.rt.settings.unit_timeout_s = 3  # a heartbeat (and a look for asks) every ~0.75 s
    p, ask = _submitted_unit_ask(market, tmp_path)
    job_id = submit_job(market, SMALL)
    market.wait(lambda: _assigned(market, job_id) == 1, what="a second unit matched")
    handing_in: list[Path] = []
    sent: list[dict[str, Any]] = []
    tries: list[str] = []
    submit, put_blob = p.client.submit, p.client.put_blob

    def uploading(path: Path) -> str:
        handing_in.append(path)
        return put_blob(path)

    def restarting(unit_id: str, body: dict[str, Any]) -> dict[str, Any]:
        tries.append(unit_id)
        if not sent and len(tries) < 6:
            raise MarketError(503, "the marketplace is restarting", "Unavailable")
        return submit(unit_id, body)

    p.client.next_reveal = lambda: ask if handing_in and not sent else None  # type: ignore[method-assign]
    p.client.reveal = lambda body: sent.append(body) or {"status": "ok"}  # type: ignore[method-assign]
    p.client.put_blob = uploading  # type: ignore[method-assign]
    p.client.submit = restarting  # type: ignore[method-assign]
    assert p.work_once()
    assert len(sent) == 1 and sent[0]["step"] == 1 and 1 < len(tries) < 6, (sent, tries)
    assert "while a unit's hand-in waits to be tried again" in said(capsys)
    assert unit_status(market, job_id) == "verified"  # handed in once the marketplace answered


def test_a_node_whose_micro_batches_do_not_split_a_jobs_batch_trains_it_on_a_plan_that_does(market, tmp_path: Path,
                                                                                             capsys) -> None:
    """A customer's batch of 15 matched to a node on cpu/mb2 (its registration says nothing of its plan): training
    stopped at the first step with "does not split into 2 micro-batches", the node's loop with it (not a marketplace
    error), and again on every restart, till the unit was reaped as its dropout. Now the node trains it on the
    fewest micro-batches above its own that split the batch (3: smaller ones, no more memory) and says so; the
    marketplace takes the result, on the plan it declares. A verifier on cpu/mb2 stopped the same way on its check
    (its replay, and its tolerance's calibration, ran its own plan): every machine now splits such a batch alike
    (node.trainer.fit_micro_batches), and it passes the honest work."""
    from node.crosscheck import Plan
    from tests.marketplace.test_flow import provider, staked_verifier

    spec = JobSpec(rounds=1, units_per_round=1, steps_per_unit=4, segment_len=2, batch_size=15, max_price=tokens(2),
                   verification="full")
    market.rt.settings.canary_rate = 0.0
    p = provider(market, tmp_path, "mb2", "us-east", "0.9", plan="cpu/mb2")
    job_id = submit_job(market, spec)
    market.wait(lambda: _assigned(market, job_id) == 1, what="the unit matched")
    assert p.work_once()
    assert "batch of 15 does not split into 2 micro-batches: trained on plan cpu/mb3" in said(capsys)
    v = staked_verifier(market, tmp_path, "v-mb2", plan=Plan.parse("cpu/mb2"))
    assert [v.verify_once(), v.verify_once(), v.verify_once()] == ["ok", "ok", None]  # both segments, then none
    with market.rt.sessions() as s:
        [unit] = s.scalars(select(Unit).where(Unit.job_id == job_id))
        assert unit.status == "verified" and unit.plan == "cpu/mb3"
    # its own where it splits; a batch with no divisor from 3 to 64 (a prime past 64; one sample): one micro-batch
    assert [p.plan_for(SimpleNamespace(batch_size=b)).micro_batches  # type: ignore[arg-type]
            for b in (16, 15, 67, 1)] == [2, 3, 1, 1]


def test_a_verdict_taken_while_its_answer_is_slow_is_not_said_withdrawn(market, tmp_path: Path, monkeypatch) -> None:
    """The verifier beats while its verdict is sent (it may be tried again for minutes); the answer of one the
    marketplace took comes back slowly, and a beat meanwhile is refused (409: the task is decided): the verifier
    still reports the verdict it gave (a review found it said "withdrawn")."""
    from marketplace import checking
    from tests.marketplace.test_flow import provider, staked_verifier

    one = JobSpec(rounds=1, units_per_round=1, steps_per_unit=10, segment_len=5, batch_size=8, max_price=tokens(2))
    worker = provider(market, tmp_path, "node", "eu-north", "0.5")
    verifier = staked_verifier(market, tmp_path, "verifier")
    _handed_in(market, submit_job(market, one), [worker], 1)
    verifier.client.config["unit_timeout_s"] = 2  # a beat every 0.5 s (scaled down: 15 s in production)
    real = checking.record_verdict

    def slow_answer(rt, signer, body):  # type: ignore[no-untyped-def]
        status = real(rt, signer, body)  # taken
        time.sleep(1.2)  # its answer on its way back
        return status

    monkeypatch.setattr(checking, "record_verdict", slow_answer)
    assert verifier.verify_once() == "ok"
