"""Celery tasks: background steps of the job lifecycle. Each takes ids only and is idempotent (acks_late)."""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis.exceptions
from celery import Celery
from kombu.exceptions import OperationalError

from marketplace import blobgc, checking, service, settlement
from protocol.errors import ChainError
from marketplace.runtime import Runtime, get_runtime
from marketplace.settings import pool_beat_s

log = logging.getLogger(__name__)

#: the longest a send waits on a broker that accepts connections but does not answer (a paused or overloaded Redis,
#: a half-open connection after a failover), or on connecting to one; a broker that refuses connections fails at once
BROKER_SOCKET_TIMEOUT_S = 1.5
BROKER_CONNECT_TIMEOUT_S = 1.0
#: what a send to a broker that cannot be reached raises (kombu wraps the transport's errors in OperationalError)
BROKER_DOWN = (OperationalError, OSError, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)

celery_app = Celery("gridmint")
celery_app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    result_backend=None,
    task_ignore_result=True,
    task_acks_late=True,  # every task below is idempotent, so a re-delivery after a worker crash is safe
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    # Redis hands an unacknowledged task to another worker after this long, though its worker lives on: it must
    # outlast the longest task (a referee's replay of a long segment; 120 s put a second, third... worker on the same
    # dispute). A worker that died loses nothing meanwhile: the sweep queues every lost step again within a minute
    # (the socket timeouts bound every command on a broker that went silent; without them a send waited for ever)
    broker_transport_options={"visibility_timeout": 4 * 3600, "socket_timeout": BROKER_SOCKET_TIMEOUT_S,
                              "socket_connect_timeout": BROKER_CONNECT_TIMEOUT_S},
    # a send is tried once (Celery's default retried it 3 times): the API sends after its write committed, so a
    # broker that is away must cost a request ~2 s at most (a silent socket, and a wait for one of the pooled
    # connections, all busy on a silent broker), never a hang; what was not sent is sent again by the sweep (enqueue)
    task_publish_retry_policy={"max_retries": 0},
    broker_pool_acquire_timeout=0.5,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    beat_schedule={
        "reap-stale-units": {"task": "gridmint.reap", "schedule": 5.0},
        "matching-round": {"task": "gridmint.match", "schedule": 5.0},
        "payout-epoch": {"task": "gridmint.epoch", "schedule": 30.0},
        "sweep-lost-steps": {"task": "gridmint.sweep", "schedule": 60.0},
        "collect-blobs": {"task": "gridmint.blob_gc", "schedule": 3600.0},
    },
)


# Steps that send transactions retry on a chain error (a node restarting, a gas race, a dropped RPC connection: the
# chain client turns transport failures into ChainUnavailable, a ChainError): each is idempotent on chain (per-unit
# releases, per-evidence slashes, close-once), so a retry never pays twice. A step that exhausts its retries is
# picked up again by the periodic sweep.
_CHAIN_RETRY: dict[str, object] = {
    "autoretry_for": (ChainError,), "retry_backoff": 1, "retry_backoff_max": 30, "retry_jitter": False, "max_retries": 8,
}


def configure(broker_url: str) -> Celery:
    """Send to and consume from ``broker_url``. Pooled connections to another broker are dropped: the pool is built
    on first use, from the URL then, and kept sending there after the URL changed."""
    if celery_app.conf.broker_url != broker_url:
        celery_app._after_fork()  # noqa: SLF001 - forgets the connection and producer pools, as a forked child does
    celery_app.conf.broker_url = broker_url
    return celery_app


@celery_app.task(name="gridmint.match")
def match_task() -> int:
    return len(service.run_matching(get_runtime()))


@celery_app.task(name="gridmint.stock_canaries")
def stock_canaries_task(unit_id: str) -> int:
    return checking.stock_canaries(get_runtime(), unit_id)


@celery_app.task(name="gridmint.adjudicate", **_CHAIN_RETRY)
def adjudicate_task(verification_id: int) -> str:
    return checking.adjudicate(get_runtime(), verification_id)


@celery_app.task(name="gridmint.punish_verifier", **_CHAIN_RETRY)
def punish_verifier_task(verification_id: int) -> str:
    return checking.punish_verifier(get_runtime(), verification_id)


@celery_app.task(name="gridmint.audit_check", **_CHAIN_RETRY)
def audit_check_task(verification_id: int) -> str:
    return checking.audit_check(get_runtime(), verification_id)


@celery_app.task(name="gridmint.advance", **_CHAIN_RETRY)
def advance_task(job_id: str) -> str:
    return service.advance(get_runtime(), job_id)


@celery_app.task(name="gridmint.settle", **_CHAIN_RETRY)
def settle_task(job_id: str) -> int:
    return service.settle(get_runtime(), job_id)


@celery_app.task(name="gridmint.epoch", **_CHAIN_RETRY)
def epoch_task() -> int:
    return settlement.post_epoch(get_runtime()) or 0


@celery_app.task(name="gridmint.sweep")
def sweep_task() -> dict[str, int]:
    return service.sweep(get_runtime())


@celery_app.task(name="gridmint.blob_gc")
def blob_gc_task() -> dict[str, Any]:
    return blobgc.collect(get_runtime())


@celery_app.task(name="gridmint.reap")
def reap_task() -> int:
    return service.reap(get_runtime())


def keep_pool_alive(rt: Runtime, build: str) -> threading.Thread:
    """On a referee pool's worker: write the pool's sign of life now, then every settings.pool_beat_s from a
    daemon thread (a solo worker replaying a long dispute still says it is there). A failed write (the database
    restarting) is logged and retried at the next beat."""
    checking.pool_alive(rt, build)
    every = pool_beat_s(rt.settings.referee_pool_wait_s)

    def beat() -> None:
        while True:
            time.sleep(every)
            try:
                checking.pool_alive(rt, build)
            except Exception:  # noqa: BLE001 - a beat missed is retried; the worker must not die of it
                log.exception("referee pool %s: could not write its sign of life", build)

    t = threading.Thread(target=beat, name="referee-pool-alive", daemon=True)
    t.start()
    return t


def enqueue(name: str, args: list[object], queue: str | None = None) -> None:
    """Send task ``name``; ``queue`` None: the default queue (a referee pool's queue: Runtime.referee_queue).

    Best effort, and never raises for a broker that cannot be reached: every caller sends after its write committed,
    so an exception here answered a 500 for a write that stood (and the client's retry a 409 or a replayed nonce).
    A send fails at once on a broker that refuses connections, within ``BROKER_SOCKET_TIMEOUT_S`` (and half a second
    more for a pooled connection) on one that went silent; it is logged (a warning naming the task) and nothing is
    lost: the periodic sweep (service.sweep, every minute) queues each step that may be lost so again (advance,
    settle, adjudicate, punish_verifier, audit_check), and beat's schedule runs the others (match, reap, epoch) every few seconds
    whatever was sent."""
    try:
        celery_app.send_task(name, args=args, queue=queue)
    except BROKER_DOWN as exc:
        log.warning("task %s %s not sent, the broker is unreachable (%s): the sweep or the beat schedule runs it "
                    "later", name, args, exc)
