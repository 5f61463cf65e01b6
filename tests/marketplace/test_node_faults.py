"""The provider node against what goes wrong around a unit: a refused claim, a marketplace blip or a restart after
training, a full disk, a Ctrl-C. Real marketplace over HTTP, Celery on Redis, the in-process EVM (conftest)."""
from __future__ import annotations

import os
import resource
import signal
import threading
import time
from pathlib import Path

import httpx
from sqlalchemy import select

from marketplace.db import Unit, Verification
from node.agent import AgentConfig, ProviderAgent
from protocol.money import tokens
from protocol.schemas import JobSpec
from tests.marketplace.test_flow import _assigned, drive, job_status, slashed, staked_verifier, submit_job

SMALL = JobSpec(rounds=1, units_per_round=1, steps_per_unit=10, segment_len=5, batch_size=8, max_price=tokens(2),
                verification="none")


def node(market, workdir: Path, acct=None, **cfg) -> ProviderAgent:  # type: ignore[no-untyped-def]
    """A registered provider node working in ``workdir`` (``acct``: the wallet of a node started before)."""
    acct = acct or market.account(gmt=tokens(500))
    c = AgentConfig(marketplace=market.url, chain_url="", region="eu-north", price=tokens("0.6"), stake=tokens(200),
                    poll_s=0.05, **cfg)
    agent = ProviderAgent(c, acct, workdir, contracts=market.contracts(acct))
    agent.setup()
    return agent


def unit_status(market, job_id: str) -> str:
    with market.rt.sessions() as s:
        return s.scalars(select(Unit).where(Unit.job_id == job_id)).one().status


def said(capsys) -> str:  # type: ignore[no-untyped-def]
    """What the node printed, as one line (rich wraps long lines at the terminal's width)."""
    return " ".join(capsys.readouterr().err.split())


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_a_refused_claim_is_said_and_tried_again_and_never_ends_the_node(market, tmp_path: Path, capsys) -> None:
    """The guardian pauses the PayoutDistributor while the node has pay to claim: each idle claim reverts. The node
    says so, stays up (its units may yet need a reveal) and claims once the distributor is unpaused."""
    p = node(market, tmp_path / "p", retry_s=0.3, exit_when_idle_s=2.5)
    job_id = submit_job(market, SMALL)
    market.wait(lambda: _assigned(market, job_id) == 1, what="the unit matched")
    assert p.work_once()
    market.wait(lambda: job_status(market, job_id) == "settled", what="the job settled")
    market.wait(lambda: p.client.payout()["epoch"], what="its pay under a posted root")  # Celery posts it
    owed = int(p.client.payout()["cumulative"])
    assert owed > 0 and int(p.client.payout()["claimed"]) == 0
    market.ops._send(market.ops.distributor, "pause")  # noqa: SLF001 - the operator is the distributor's guardian
    unpause = threading.Timer(1.0, market.ops.unpause_all)
    before = market.ops.balance_of(p.account.address)
    unpause.start()
    try:
        assert p.run() is None  # before the fix: PausedError out of run(), the node gone
    finally:
        unpause.join()
    assert "claim failed, trying again in 0.3 s" in said(capsys)
    assert market.ops.balance_of(p.account.address) - before == owed


def test_a_blip_at_upload_or_submission_is_tried_again_without_training_again(market, tmp_path: Path,
                                                                             capsys) -> None:
    """A dropped link and then a 408 (a body slower than the marketplace's deadline) at the first upload, and a 503
    at the submission (a marketplace restarting): the unit is trained once, handed in on a later try, and its files
    are gone once it is taken."""
    p = node(market, tmp_path / "p")
    job_id = submit_job(market, SMALL)
    market.wait(lambda: _assigned(market, job_id) == 1, what="the unit matched")
    trained: list[str] = []
    train = p.trainer
    p.trainer = lambda spec, start, wd: (trained.append(spec.unit_id), train(spec, start, wd))[1]
    put, submit = p.client.put_blob, p.client.submit
    from node.client import MarketError
    blips = {"put": [MarketError(408, "request body took longer than 30 s"), httpx.ConnectError("connection refused")],
             "submit": [503]}

    def flaky_put(path: Path) -> str:
        if blips["put"]:
            raise blips["put"].pop()
        return put(path)

    def flaky_submit(unit_id: str, body: dict) -> object:
        if blips["submit"]:  # what the client raises for a 503 from a proxy in front of a restarting marketplace
            from node.client import MarketError
            raise MarketError(blips["submit"].pop(), "service unavailable")
        return submit(unit_id, body)

    p.client.put_blob, p.client.submit = flaky_put, flaky_submit
    assert p.work_once()  # before the fix: ConnectError out of work_once, and the next call trained again
    assert len(trained) == 1 and unit_status(market, job_id) in ("submitted", "verified")
    err = said(capsys)
    assert "(connection refused); trying again in 1 s" in err and "submission failed" in err
    assert "took longer than 30 s" in err and "trying again in 2 s" in err
    assert files(p.workdir) == []  # taken: nothing of the unit is kept
    # with nothing assigned, a unit's directory left by an earlier start is stale; nothing else there is touched
    (p.workdir / "0123456789ab").mkdir()
    (p.workdir / "notes").mkdir()
    (p.workdir / "notes" / "mine.txt").write_text("the owner's")
    assert not p.work_once()
    assert files(p.workdir) == ["notes/mine.txt"] and not (p.workdir / "0123456789ab").exists()


def test_a_node_restarted_after_training_hands_in_the_kept_result_instead_of_training_again(market,
                                                                                          tmp_path: Path) -> None:
    """The node dies between training and the submission (an OOM kill, a reboot). The next start, on the same
    wallet and work directory, is handed the unit again and submits the result it kept; a kept result whose files
    changed on disk is not trusted: that unit is trained again."""
    class Killed(BaseException):
        pass

    def die(*_: object) -> None:
        raise Killed

    acct = market.account(gmt=tokens(500))  # one wallet: a second one, idle, could be matched the second job
    for damaged in (False, True):
        first = node(market, tmp_path / f"work-{damaged}", acct=acct)
        job_id = submit_job(market, SMALL)
        market.wait(lambda: _assigned(market, job_id) == 1, what="the unit matched")
        first.client.submit = die  # type: ignore[assignment]
        try:
            first.work_once()
        except Killed:
            pass
        kept = files(first.workdir)
        assert any(name.endswith("result.json") for name in kept), kept  # before the fix: nothing names the result
        if damaged:
            seg = next(first.workdir.rglob("segment-0001.safetensors"))
            seg.write_bytes(seg.read_bytes()[:-1] + b"\x01")
        again = node(market, first.workdir, acct=first.account)  # `gridmint node run` again: same --workdir
        trained: list[str] = []
        train = again.trainer
        again.trainer = lambda spec, start, wd: (trained.append(spec.unit_id), train(spec, start, wd))[1]
        assert again.work_once()
        assert len(trained) == (1 if damaged else 0) and unit_status(market, job_id) in ("submitted", "verified")
        assert files(again.workdir) == []


def test_a_full_disk_is_said_and_leaves_no_partial_files_and_the_node_up(market, tmp_path: Path, capsys) -> None:
    """Checkpoints cannot be written (RLIMIT_FSIZE: past 1 MiB a write fails with EFBIG, as ENOSPC on a full
    disk). The node says so, removes the unit's partial files, keeps answering and claiming, and pulls new work
    only after ``retry_s``."""
    p = node(market, tmp_path / "p", retry_s=30.0, exit_when_idle_s=1.0)
    job_id = submit_job(market, SMALL)
    market.wait(lambda: _assigned(market, job_id) == 1, what="the unit matched")
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    prev = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, old[1]))
    try:
        assert p.run() is None  # before the fix: OSError out of run(), *.safetensors.tmp left behind
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, prev)
    assert files(p.workdir) == []
    assert f"cannot write under {p.workdir}: [Errno 27] File too large" in said(capsys)
    assert unit_status(market, job_id) == "assigned"  # still ours: a node with room trains it (or it is reaped)


def test_ctrl_c_stops_the_node_between_training_steps(market, tmp_path: Path, capsys) -> None:
    """SIGINT while a long unit trains stops the node at the next step, not at the unit's end, and puts the
    previous signal handlers back; the unit stays assigned (a node started again before its deadline trains it)."""
    p = node(market, tmp_path / "p")
    spec = SMALL.model_copy(update={"steps_per_unit": 3000, "segment_len": 500})
    job_id = submit_job(market, spec)
    market.wait(lambda: _assigned(market, job_id) == 1, what="the unit matched")
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)

    def press() -> None:
        market.wait(lambda: p._steps >= 5, what="training under way")  # noqa: SLF001
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=press, daemon=True).start()
    t0 = time.monotonic()
    assert p.run() is None
    # before the fix: every one of the 3000 steps trained and the unit submitted first
    assert p._steps < 1000 and time.monotonic() - t0 < 30  # noqa: SLF001
    assert unit_status(market, job_id) == "assigned" and files(p.workdir) == []
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    assert "stopped training unit" in said(capsys)


def test_a_node_stopped_partway_goes_on_from_its_last_kept_segment_and_its_unit_is_verified(market, tmp_path: Path,
                                                                                          capsys) -> None:
    """Ctrl-C partway through a unit of 8 segments: the node keeps the unit's checkpoints and progress journal, and
    the node started again on the same wallet and work directory trains only the steps from its last kept segment
    on. What it hands in passes a full replay of every segment, and the job settles with no one slashed."""
    acct = market.account(gmt=tokens(500))
    p = node(market, tmp_path / "p", acct=acct)
    spec = SMALL.model_copy(update={"steps_per_unit": 40, "segment_len": 5, "verification": "full"})
    job_id = submit_job(market, spec)
    market.wait(lambda: _assigned(market, job_id) == 1, what="the unit matched")

    def press() -> None:
        market.wait(lambda: p._steps >= 22, what="training past segment 4")  # noqa: SLF001
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=press, daemon=True).start()
    assert p.run() is None
    stopped_at = p._steps  # noqa: SLF001
    assert stopped_at < 40 and unit_status(market, job_id) == "assigned"
    # before the fix: every file removed, and the next start trains from step 0
    assert any(name.endswith("progress.json") for name in files(p.workdir)), files(p.workdir)
    assert "goes on from its last kept segment" in said(capsys)

    again = node(market, p.workdir, acct=acct)
    verifier = staked_verifier(market, tmp_path, "verifier")
    drive(market, [again], verifier, job_id)
    first = again._first_step  # noqa: SLF001
    # from the start of the segment it stopped in (its last step trained: stopped_at - 1)
    assert first is not None and first == (stopped_at - 1) // 5 * 5 >= 20, (first, stopped_at)
    assert f"resumed at step {first}" in said(capsys)
    with market.rt.sessions() as s:
        checks = list(s.scalars(select(Verification)))
    assert len(checks) == 8 and all(v.status == "passed" for v in checks), [(v.segment, v.status) for v in checks]
    assert unit_status(market, job_id) == "verified" and not slashed(market)
    assert files(again.workdir) == []
