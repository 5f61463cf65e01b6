"""Leases (marketplace.leases) on both databases: one holder at a time, extended by its holder, free again once
given back or lapsed; of many workers racing for one, exactly one wins."""
from __future__ import annotations

import threading

import pytest
from sqlalchemy import update

from marketplace import leases
from marketplace.db import Lease


@pytest.mark.parametrize("market", ["sqlite", "postgres"], indirect=True)
def test_a_lease_has_one_holder_till_it_is_given_back_or_lapses(market) -> None:  # type: ignore[no-untyped-def]
    rt = market.rt
    assert leases.take(rt, "step", "a", 60)  # the first time: the row is made
    assert not leases.take(rt, "step", "b", 60)
    assert leases.take(rt, "step", "a", 60)  # its holder extends it
    leases.give_back(rt, "step", "b")  # not b's: nothing changes
    assert not leases.take(rt, "step", "b", 60)
    leases.give_back(rt, "step", "a")
    assert leases.take(rt, "step", "b", 60) and not leases.take(rt, "step", "a", 60)
    with rt.sessions.begin() as s:  # b's worker died: its lease lapses
        s.execute(update(Lease).where(Lease.name == "step").values(until=Lease.until - 61))
    assert leases.take(rt, "step", "a", 60)
    assert leases.take(rt, "other", "b", 60)  # another step's lease is its own


@pytest.mark.parametrize("market", ["sqlite", "postgres"], indirect=True)
def test_a_workers_own_clock_neither_takes_a_held_lease_nor_keeps_a_lapsed_one(  # type: ignore[no-untyped-def]
        market, monkeypatch) -> None:
    """Leases run on the database's clock: a worker whose clock is an hour fast cannot take a lease another holds
    for a minute, and one whose clock is an hour slow takes a lease that lapsed (with the worker's clock, the first
    took the held lease and the second waited an hour)."""
    import time

    rt, real = market.rt, time.time
    assert leases.take(rt, "step", "a", 60)
    monkeypatch.setattr(time, "time", lambda: real() + 3600)
    assert not leases.take(rt, "step", "fast", 60)
    with rt.sessions.begin() as s:  # a's worker died a minute ago: its lease has lapsed
        s.execute(update(Lease).where(Lease.name == "step").values(until=Lease.until - 61))
    monkeypatch.setattr(time, "time", lambda: real() - 3600)
    assert leases.take(rt, "step", "slow", 60)
    assert not leases.take(rt, "step", "a", 60)


@pytest.mark.parametrize("market", ["sqlite", "postgres"], indirect=True)
def test_of_workers_racing_for_a_lease_exactly_one_wins(market) -> None:  # type: ignore[no-untyped-def]
    """Eight threads, each its own holder, take a lease at once: when it does not exist yet (racing inserts) and
    when it has lapsed (racing updates)."""
    rt = market.rt

    def race() -> list[bool]:
        start, won = threading.Barrier(8), [False] * 8

        def one(i: int) -> None:
            start.wait()
            won[i] = leases.take(rt, "race", f"worker-{i}", 60)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return won

    assert sum(race()) == 1
    with rt.sessions.begin() as s:
        s.execute(update(Lease).where(Lease.name == "race").values(until=0))
    assert sum(race()) == 1


def test_a_database_too_busy_leaves_the_redos_for_the_next_sweep_and_raises_nothing(  # type: ignore[no-untyped-def]
        market, caplog) -> None:
    """SQLite held by another writer past the busy timeout (300 ms here; 30 s in the runtime): the sweep's redos
    take no lease and are left for the next sweep, and giving a lease back leaves it to lapse; nothing raises into
    the sweep (found by a review: the give-back's own write raised the busy error out of the sweep)."""
    import sqlite3
    from types import SimpleNamespace

    from sqlalchemy import create_engine
    from sqlalchemy.orm import sessionmaker

    from marketplace import slashes

    path = market.rt.sessions.kw["bind"].url.database
    busy = SimpleNamespace(sessions=sessionmaker(create_engine(f"sqlite:///{path}", connect_args={"timeout": 0.3})))
    holder = sqlite3.connect(path, timeout=0.3)
    holder.execute("BEGIN IMMEDIATE")
    try:
        slashes._redos(busy, ["0x" + "ab" * 32])  # type: ignore[arg-type]
        leases.give_back(busy, slashes.REDO_LEASE, "someone")  # type: ignore[arg-type]
    finally:
        holder.rollback()
        holder.close()
    assert "not taken" in caplog.text and "not given back" in caplog.text
    assert leases.take(market.rt, slashes.REDO_LEASE, "after", 60)  # the database free again: taken
