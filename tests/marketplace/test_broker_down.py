"""A broker that is away costs no request its answer. Routes commit their write, then queue the next step on Redis: a
Redis that was down made that a 500 although the write stood (the client's retry then got a 409, or a replayed
nonce), and one that went silent held the request for ever. Now the send is best effort and bounded, and the
periodic sweep queues the lost step once the broker is back.

Through the real HTTP API (uvicorn, a Celery worker, the in-process EVM), on a redis-server of the test's own, which
it stops, pauses and starts again (the suite's shared Redis stays up for every other test)."""
from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from sqlalchemy import select

from gridmint.procs import start_redis
from marketplace import service, tasks
from marketplace.db import Provider, Unit
from node.client import MarketClient
from protocol.money import tokens
from protocol.schemas import JobSpec
from tests.marketplace.test_flow import job_status, provider, submit_job

SPEC = JobSpec(rounds=1, units_per_round=1, steps_per_unit=10, segment_len=5, batch_size=8, max_price=tokens(2),
               verification="none")


class Broker:
    """The test's own redis-server: stopped, paused (SIGSTOP: it takes connections and never answers) and started
    again on the same port."""

    def __init__(self, d: Path) -> None:
        self.dir = d
        self.proc, self.url = start_redis(d, d)
        self.port = urlsplit(self.url).port

    def stop(self) -> None:
        self.proc.stop()

    def start(self) -> None:
        self.proc, _ = start_redis(self.dir, self.dir, self.port)

    def pause(self, paused: bool = True) -> None:
        os.kill(self.proc.popen.pid, signal.SIGSTOP if paused else signal.SIGCONT)


@pytest.fixture()
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path / "redis")
    yield b
    if b.proc.alive():
        b.pause(False)
    b.stop()


@pytest.fixture()
def redis_url(broker: Broker) -> str:
    """Overrides the suite's: this module's ``market`` sends to (and its worker consumes from) the test's broker."""
    return broker.url


def test_writes_stand_and_answer_while_redis_is_down_and_the_sweep_queues_their_steps(
        market, broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    p = provider(market, tmp_path, "p", "eu-north", "0.6")
    broker.stop()
    with caplog.at_level(logging.WARNING, logger="marketplace.tasks"):
        job_id = submit_job(market, SPEC)  # POST /jobs: 201, though its matching round could not be queued
        assert service.run_matching(market.rt)  # what beat's next round would do
        # POST /units/{id}/result: 202. At level "none" the unit is verified at once; its round's advance is not sent
        assert p.work_once()
    with market.rt.sessions() as s:
        [unit] = s.scalars(select(Unit).where(Unit.job_id == job_id))
    assert unit.status == "verified" and job_status(market, job_id) == "running"
    unsent = [r.getMessage() for r in caplog.records if r.name == "marketplace.tasks" and r.levelno == logging.WARNING]
    assert any(m.startswith("task gridmint.match [] not sent") for m in unsent), unsent
    assert any(m.startswith(f"task gridmint.advance ['{job_id}'] not sent") for m in unsent), unsent

    broker.start()  # empty: what was not sent is nowhere but in the database
    assert service.sweep(market.rt)["advance"] == 1
    # the worker, back on the broker, advances the round (the job's last: done) and settles it
    market.wait(lambda: job_status(market, job_id) == "settled", timeout=120, what="the job settled")


def test_a_silent_redis_holds_a_request_a_moment_not_for_ever(market, broker: Broker, tmp_path: Path) -> None:
    """A paused Redis (it takes connections and never answers: a half-open connection after a failover looks the
    same) held each request that queues a step until it answered again. Now the send gives up after
    tasks.BROKER_SOCKET_TIMEOUT_S, and the request answers, its write made."""
    p = provider(market, tmp_path, "p", "eu-north", "0.6")
    client = MarketClient(market.url, p.client.account, timeout=20)
    with market.rt.sessions() as s:
        row = s.get(Provider, p.client.account.address)
        offer = {"region": row.region, "gpu": row.gpu, "vram_mb": row.vram_mb, "price": str(tokens("0.7")),
                 "tokens_per_s": row.tokens_per_s, "capacity": row.capacity}
    broker.pause()
    try:
        start = time.monotonic()
        client.register(**offer)  # a new ask; then a matching round is queued
        took = time.monotonic() - start
    finally:
        broker.pause(False)
    assert took < tasks.BROKER_SOCKET_TIMEOUT_S + 3, took
    with market.rt.sessions() as s:
        assert s.get(Provider, p.client.account.address).price == tokens("0.7")
