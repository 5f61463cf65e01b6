"""Group commit for the hottest writes: many small requests, one transaction.

Every provider heartbeats every few seconds, each a nonce bump and two UPDATEs. Committing each on its own makes the
database's write lock the bottleneck (one commit at a time; measured ~750 heartbeats/s with 2 API processes on
SQLite, the write lock busy while the writer thread fights the event loop for the GIL). Here one writer thread per
process takes every write queued meanwhile and runs them in ONE transaction (through the ``WriteGate``), then answers
each caller: the cost of BEGIN/COMMIT and of taking the lock is shared by the batch, and a request waits at most for
the batch in flight plus its own.

Contract for a queued function ``fn(conn)``: it runs inside a transaction shared with other requests, so it must not
commit or roll back, and if it raises a ``GridMintError`` (a refusal for this one request) whatever it wrote before
raising is kept: write only what should stand even when refusing (e.g. the used nonce), or raise before writing. Any
other exception fails the whole batch (nothing of it is committed) and is raised to every caller in it. It must do
nothing outside ``conn``: a batch that PostgreSQL aborted as a deadlock (or a serialization failure) is rolled back
and run again, every function of it anew, after a short random wait (``RETRY_BACKOFF_S``).

Lock order: with several API processes on PostgreSQL, each has its own writer, and two batches taking the same rows
in opposite orders deadlock (a caller with keys A and B sends A then B to one process, B then A to the other). Each
request is queued with a ``key`` (the signer: the rows a heartbeat locks, its nonce, provider and units, are all the
signer's), and a batch runs its requests in key order (stable: one signer's requests keep their order), so every
batch takes those locks in one global order. The retry covers what the order cannot: another transaction's locks.
It waits before running again: the deadlock's survivor was queued for the very rows the victim's rollback frees, and
a rerun at once could take them back first (its backend is running, the survivor's has yet to be woken: seen on a
loaded 2-core machine, 3 runs in 65) and cross it again, the second deadlock costing another second
(``deadlock_timeout``) and a retry of ``MAX_RETRIES``.
"""
from __future__ import annotations

import asyncio
import os
import queue
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError

from marketplace.db import per_engine, write_gate
from protocol.errors import GridMintError

T = TypeVar("T")
Job = tuple[Callable[[Connection], Any], "Future[Any]", str]

#: Most requests in one transaction: bounds how long the write lock is held and the last request's wait.
MAX_BATCH = 256
#: A writer with nothing to do for this long exits (so an idle process, or a discarded engine, keeps no thread).
IDLE_EXIT_S = 30.0
#: How often a batch aborted as a deadlock or serialization failure is run again before its callers get the error.
MAX_RETRIES = 3
#: PostgreSQL's deadlock_detected and serialization_failure: the transaction was rolled back and may simply rerun.
_RETRYABLE = frozenset({"40P01", "40001"})
#: Wait before a rerun: this, doubled each attempt, times a random factor in [0.5, 1.5) (two victims of one
#: serialization conflict do not rerun in step). Long enough for the survivor's backend to be scheduled and take the
#: rows it waits for; short beside the ``deadlock_timeout`` (1 s) the abort itself took.
RETRY_BACKOFF_S = 0.05


class GroupCommit:
    """One writer thread per process (started on first use, and again in a forked child)."""

    def __init__(self, engine: Engine, max_batch: int = MAX_BATCH) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._pid = -1
        self._start_lock = threading.Lock()
        self.batches = 0  # transactions committed (or failed), for tests and benchmarks
        self.requests = 0
        self.retries = 0  # batches run again after a deadlock or serialization failure

    def submit(self, fn: Callable[[Connection], T], key: str = "") -> Future[T]:
        """Queue ``fn``; the future holds its result (or its exception) once its batch has committed. ``key``: the
        batch runs its requests in key order (the rows ``fn`` locks should be ordered by it: the signer's)."""
        fut: Future[T] = Future()
        with self._start_lock:  # never queue onto a writer that is just leaving
            if self._pid != os.getpid():  # no writer: first use, idle exit, or a forked child (threads do not fork)
                self._queue = queue.SimpleQueue()
                threading.Thread(target=self._writer, args=(self._queue,), name="gridmint-group-commit",
                                 daemon=True).start()
                self._pid = os.getpid()
            self._queue.put((fn, fut, key))
        return fut

    def run(self, fn: Callable[[Connection], T], key: str = "") -> T:
        """From a thread: queue ``fn`` and wait for its committed result."""
        return self.submit(fn, key).result()

    async def run_async(self, fn: Callable[[Connection], T], key: str = "") -> T:
        """From the event loop: queue ``fn`` and await its committed result without blocking the loop."""
        return await asyncio.wrap_future(self.submit(fn, key))

    def _writer(self, q: queue.SimpleQueue[Job]) -> None:
        gate = write_gate(self.engine)
        while True:
            try:
                batch = [q.get(timeout=IDLE_EXIT_S)]
            except queue.Empty:
                with self._start_lock:
                    if q.empty():  # idle: leave (the next submit starts a writer again)
                        self._pid = -1
                        return
                continue
            while len(batch) < self.max_batch:
                try:
                    batch.append(q.get_nowait())
                except queue.Empty:
                    break
            live = sorted(((fn, fut, key) for fn, fut, key in batch if fut.set_running_or_notify_cancel()),
                          key=lambda job: job[2])  # one lock order for every batch (stable within a key)
            if not live:
                continue
            for attempt in range(MAX_RETRIES + 1):
                outcomes: list[tuple[bool, Any]] = []
                try:
                    with gate.begin() as conn:
                        for fn, _, _ in live:
                            try:
                                outcomes.append((True, fn(conn)))
                            except GridMintError as exc:  # this request refused; the batch goes on
                                outcomes.append((False, exc))
                except DBAPIError as exc:
                    if attempt < MAX_RETRIES and getattr(exc.orig, "sqlstate", None) in _RETRYABLE:
                        self.retries += 1
                        time.sleep(RETRY_BACKOFF_S * 2 ** attempt * (0.5 + random.random()))
                        continue  # rolled back whole: run it again
                    failed: BaseException | None = exc
                except BaseException as exc:  # noqa: BLE001 - the batch failed as a whole: tell every caller
                    failed = exc
                else:
                    failed = None
                break
            if failed is not None:
                for _, fut, _ in live:
                    fut.set_exception(failed)
            else:
                for (_, fut, _), (ok, value) in zip(live, outcomes):
                    if ok:
                        fut.set_result(value)
                    else:
                        fut.set_exception(value)
            self.batches += 1
            self.requests += len(live)


def group_commit(engine: Engine) -> GroupCommit:
    """The ``GroupCommit`` of ``engine`` in this process."""
    return per_engine(engine, "group_commit", GroupCommit)
