"""Group commit and the SQLite write gate, on real databases (SQLite files and PostgreSQL)."""
from __future__ import annotations

import multiprocessing
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from marketplace import groupcommit
from marketplace.auth import consume_nonce_in
from marketplace.db import make_engine, make_sessionmaker, write_gate
from marketplace.groupcommit import GroupCommit
from protocol.errors import GridMintValueError, ReplayError


def _engine(db_url: str):  # type: ignore[no-untyped-def]
    engine = make_sessionmaker(db_url).kw["bind"]
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE IF NOT EXISTS counter (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)"))
        conn.execute(text("DELETE FROM counter"))
        conn.execute(text("INSERT INTO counter VALUES (1, 0)"))
    return engine


def _count(engine) -> int:  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT n FROM counter WHERE id = 1")).scalar_one())


def test_concurrent_requests_share_transactions_and_each_gets_its_own_answer(db_url: str) -> None:
    engine = _engine(db_url)
    gc = GroupCommit(engine)

    def bump(i: int):  # type: ignore[no-untyped-def]
        def fn(conn):  # type: ignore[no-untyped-def]
            conn.execute(text("UPDATE counter SET n = n + 1 WHERE id = 1"))
            time.sleep(0.002)  # long enough that requests queue up behind the batch in flight
            return i * i
        return fn

    results: dict[int, int] = {}

    def client(k: int) -> None:
        for j in range(25):
            i = k * 100 + j
            results[i] = gc.run(bump(i))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: i * i for i in results} and len(results) == 200
    assert _count(engine) == 200
    assert gc.requests == 200 and gc.batches < 100  # batched: far fewer transactions than requests


def test_a_refusal_keeps_its_writes_and_spares_the_batch_and_a_crash_fails_the_batch(db_url: str) -> None:
    engine = _engine(db_url)
    gc = GroupCommit(engine)
    gate_held = threading.Event()
    release = threading.Event()

    def hold(conn):  # type: ignore[no-untyped-def]
        gate_held.set()
        release.wait(10)
        return "first"

    def refuse(conn):  # type: ignore[no-untyped-def]
        conn.execute(text("UPDATE counter SET n = n + 10 WHERE id = 1"))
        raise GridMintValueError("refused, but its write stands")

    def ok(conn):  # type: ignore[no-untyped-def]
        conn.execute(text("UPDATE counter SET n = n + 1 WHERE id = 1"))
        return "ok"

    def crash(conn):  # type: ignore[no-untyped-def]
        raise RuntimeError("disk on fire")

    first = gc.submit(hold)
    assert gate_held.wait(10)
    batch = [gc.submit(refuse), gc.submit(ok)]  # queued while the first batch holds the writer: one batch
    release.set()
    assert first.result(10) == "first"
    with pytest.raises(GridMintValueError):
        batch[0].result(10)
    assert batch[1].result(10) == "ok"
    assert _count(engine) == 11

    gate_held.clear()
    release.clear()
    first = gc.submit(hold)
    assert gate_held.wait(10)
    doomed = [gc.submit(ok), gc.submit(crash), gc.submit(ok)]
    release.set()
    first.result(10)
    for fut in doomed:
        with pytest.raises(RuntimeError, match="disk on fire"):
            fut.result(10)
    assert _count(engine) == 11  # nothing of the failed batch was committed
    assert gc.run(ok) == "ok" and _count(engine) == 12  # and the writer goes on


def test_idle_writer_leaves_and_the_next_request_starts_one(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(groupcommit, "IDLE_EXIT_S", 0.05)
    engine = _engine(f"sqlite:///{tmp_path / 'idle.db'}")
    gc = GroupCommit(engine)
    assert gc.run(lambda conn: 1) == 1
    deadline = time.monotonic() + 5
    while gc._pid != -1 and time.monotonic() < deadline:  # noqa: SLF001
        time.sleep(0.01)
    assert gc._pid == -1  # noqa: SLF001 - the writer left
    assert not [t for t in threading.enumerate() if t.name == "gridmint-group-commit" and t.is_alive()
                and getattr(t, "_args", (None,))[0] is gc._queue]  # noqa: SLF001
    assert gc.run(lambda conn: 2) == 2


def test_nonces_in_a_shared_transaction_are_still_each_used_once(db_url: str) -> None:
    engine = _engine(db_url)
    gc = GroupCommit(engine)
    signer = "0x" + "ab" * 20
    futs = [gc.submit(lambda conn, n=n: consume_nonce_in(conn, signer, n)) for n in (5, 5, 7, 6, 8, 8)]
    outcomes = []
    for f in futs:
        try:
            f.result(10)
            outcomes.append("ok")
        except ReplayError:
            outcomes.append("replay")
    assert outcomes == ["ok", "replay", "ok", "replay", "ok", "replay"]


def _bump_many(url: str, n: int) -> None:
    gate = write_gate(make_engine(url))
    for _ in range(n):
        with gate.begin() as conn:
            value = conn.execute(text("SELECT n FROM counter WHERE id = 1")).scalar_one()
            conn.execute(text("UPDATE counter SET n = :v WHERE id = 1"), {"v": value + 1})  # read-modify-write


def _bump_many_on(engine, n: int) -> None:  # type: ignore[no-untyped-def]
    engine.dispose(close=False)  # a forked child must not use the parent's pooled connections
    gate = write_gate(engine)
    for _ in range(n):
        with gate.begin() as conn:
            value = conn.execute(text("SELECT n FROM counter WHERE id = 1")).scalar_one()
            conn.execute(text("UPDATE counter SET n = :v WHERE id = 1"), {"v": value + 1})


@pytest.mark.parametrize("start", ["spawn", "fork"])
def test_the_sqlite_gate_serialises_writers_across_processes(tmp_path: Path, start: str) -> None:
    """Two processes doing read-modify-write through the gate: no lost update, no 'database is locked'. Forked
    children inherit the parent's gate (already used, its lock file open) and must still exclude each other."""
    url = f"sqlite:///{tmp_path / 'gate.db'}"
    engine = _engine(url)
    with write_gate(engine).begin() as conn:  # the parent has used its gate before the fork
        conn.execute(text("UPDATE counter SET n = 0 WHERE id = 1"))
    ctx = multiprocessing.get_context(start)
    if start == "fork":
        procs = [ctx.Process(target=_bump_many_on, args=(engine, 150)) for _ in range(2)]
    else:
        procs = [ctx.Process(target=_bump_many, args=(url, 150)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert _count(engine) == 300


def test_a_batch_runs_its_requests_in_key_order_and_one_keys_in_arrival_order(tmp_path: Path) -> None:
    engine = _engine(f"sqlite:///{tmp_path / 'order.db'}")
    gc = GroupCommit(engine)
    release = threading.Event()
    held = gc.submit(lambda conn: release.wait(10))  # the next requests queue behind it: one batch
    ran: list[str] = []
    futs = [gc.submit(lambda conn, tag=tag: ran.append(tag), key=key)
            for tag, key in (("c1", "0xc"), ("a1", "0xa"), ("c2", "0xc"), ("b1", "0xb"), ("a2", "0xa"))]
    release.set()
    held.result(10)
    for f in futs:
        f.result(10)
    assert ran == ["a1", "a2", "b1", "c1", "c2"]  # one batch (queued behind the held one), run in key order


def _crossed_batches(url: str, keys: tuple[str, str, str]) -> tuple[list[BaseException | None], list[GroupCommit]]:
    """Two writers on two engines (two API processes) each run one batch: update counter row 1, wait until the other
    batch has done its first update too (or 2 s), update row 2 - the second batch in the opposite row order. ``keys``:
    the first request's, the wait's and the last request's (the second batch's first and last swapped)."""
    engine = _engine(url)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO counter VALUES (2, 0)"))
    gcs = [GroupCommit(engine), GroupCommit(make_engine(url))]
    met = threading.Barrier(2)
    releases = [threading.Event(), threading.Event()]

    def bump(row: int):  # type: ignore[no-untyped-def]
        return lambda conn: conn.execute(text("UPDATE counter SET n = n + 1 WHERE id = :r"), {"r": row})

    def both_hold_their_first_row(conn) -> None:  # type: ignore[no-untyped-def]
        try:
            met.wait(2)
        except threading.BrokenBarrierError:  # the other batch waits for this one's row (or this is a rerun)
            pass

    futs = []
    for i, (gc, release) in enumerate(zip(gcs, releases)):
        gc.submit(lambda conn, r=release: r.wait(10))  # hold each writer so its next batch forms whole
        first, last = (1, 2) if i == 0 else (2, 1)
        key_first, key_wait, key_last = keys if i == 0 else (keys[2], keys[1], keys[0])
        futs += [gc.submit(bump(first), key=key_first), gc.submit(both_hold_their_first_row, key=key_wait),
                 gc.submit(bump(last), key=key_last)]
    for release in releases:
        release.set()
    errors = [f.exception(30) for f in futs]
    return errors, gcs


def test_two_processes_batches_lock_rows_in_one_order_and_never_deadlock(postgres_server: str) -> None:
    """Two API processes' heartbeat batches took two signers' rows in opposite orders (A then B, B then A: a caller
    with two keys can arrange it) and PostgreSQL aborted one as a deadlock, failing every request in it (up to 256
    honest heartbeats: 500s). Keyed by signer, both batches take A's row first: no deadlock, no retry needed."""
    from gridmint.procs import new_database

    url = new_database(postgres_server)
    errors, gcs = _crossed_batches(url, ("0xa", "0xa~", "0xb"))
    assert errors == [None] * 6
    assert [gc.retries for gc in gcs] == [0, 0]
    with make_engine(url).connect() as conn:
        assert conn.execute(text("SELECT n FROM counter ORDER BY id")).scalars().all() == [2, 2]


def test_a_batch_aborted_as_a_deadlock_is_run_again(postgres_server: str) -> None:
    """Requests whose keys cannot order their locks (here: no keys) can still cross another transaction's: the
    batch PostgreSQL aborts is rolled back and run again, and no caller sees the deadlock."""
    from gridmint.procs import new_database

    url = new_database(postgres_server)
    errors, gcs = _crossed_batches(url, ("", "", ""))
    assert errors == [None] * 6
    # one of the two was the deadlock's victim, and ran again once: its rerun waits (RETRY_BACKOFF_S) for the
    # survivor to take the rows it was queued for (rerun at once, it took row 2 back first and crossed the survivor
    # again, 3 times in 65 runs on a loaded 2-core machine; with the wait, none in 70)
    assert sum(gc.retries for gc in gcs) == 1
    with make_engine(url).connect() as conn:
        assert conn.execute(text("SELECT n FROM counter ORDER BY id")).scalars().all() == [2, 2]
