"""Celery tasks: background steps of the job lifecycle. Each takes ids only and is idempotent (acks_late)."""
from __future__ import annotations

import logging
import threading
import time

from celery import Celery

from marketplace import checking, service, settlement
from protocol.errors import ChainError
from marketplace.runtime import Runtime, get_runtime
from marketplace.settings import pool_beat_s

log = logging.getLogger(__name__)

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
    broker_transport_options={"visibility_timeout": 4 * 3600},
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    beat_schedule={
        "reap-stale-units": {"task": "gridmint.reap", "schedule": 5.0},
        "matching-round": {"task": "gridmint.match", "schedule": 5.0},
        "payout-epoch": {"task": "gridmint.epoch", "schedule": 30.0},
        "sweep-lost-steps": {"task": "gridmint.sweep", "schedule": 60.0},
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
    celery_app.conf.broker_url = broker_url
    return celery_app


@celery_app.task(name="gridmint.match")
def match_task() -> int:
    return len(service.run_matching(get_runtime()))


@celery_app.task(name="gridmint.adjudicate", **_CHAIN_RETRY)
def adjudicate_task(verification_id: int) -> str:
    return checking.adjudicate(get_runtime(), verification_id)


@celery_app.task(name="gridmint.punish_verifier", **_CHAIN_RETRY)
def punish_verifier_task(verification_id: int) -> str:
    return checking.punish_verifier(get_runtime(), verification_id)


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
    """Send task ``name``; ``queue`` None: the default queue (a referee pool's queue: Runtime.referee_queue)."""
    celery_app.send_task(name, args=args, queue=queue)
