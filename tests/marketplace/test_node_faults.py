"""The provider node against what goes wrong around it: a refused claim. Real marketplace over HTTP, Celery on
Redis, the in-process EVM (conftest)."""
from __future__ import annotations

import threading
from pathlib import Path

from sqlalchemy import select

from marketplace.db import Unit
from node.agent import AgentConfig, ProviderAgent
from protocol.money import tokens
from protocol.schemas import JobSpec
from tests.marketplace.test_flow import _assigned, job_status, submit_job

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
