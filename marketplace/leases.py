"""Leases: a step that must not run twice at once, whichever worker runs it (Celery's beat sends the sweep every
minute, and a sweep held up by a slow chain overlaps the next one). One row per step name in the database every
worker shares: taking it is one conditional UPDATE (atomic on SQLite and PostgreSQL alike), so of two workers
racing for it exactly one wins; a holder that dies leaves it to lapse after its ``ttl_s``. Time is the database's
clock, never a worker's: a worker whose clock runs fast would take a lease still held, one that runs slow would wait
on a lapsed one."""
from __future__ import annotations

import logging
import uuid

from typing import Any

from sqlalchemy import BigInteger, insert, or_, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

from marketplace.db import Lease
from marketplace.runtime import Runtime

logger = logging.getLogger(__name__)


class db_now_s(FunctionElement[int]):
    """The database server's clock, in whole seconds since the epoch (PostgreSQL's ``clock_timestamp()``; SQLite's,
    which is the host's that every worker of one SQLite file shares)."""

    type = BigInteger()
    inherit_cache = True


@compiles(db_now_s)
def _postgres_now_s(element: db_now_s, compiler: Any, **kw: Any) -> str:
    return "CAST(FLOOR(EXTRACT(EPOCH FROM clock_timestamp())) AS BIGINT)"


@compiles(db_now_s, "sqlite")
def _sqlite_now_s(element: db_now_s, compiler: Any, **kw: Any) -> str:
    return "CAST(strftime('%s', 'now') AS INTEGER)"


def holder() -> str:
    """A fresh holder name (one per run of a step)."""
    return uuid.uuid4().hex


def take(rt: Runtime, name: str, who: str, ttl_s: int) -> bool:
    """Take the lease ``name`` for ``who`` till ``ttl_s`` seconds from now, or extend it if ``who`` holds it already.
    False if another holds it and it has not lapsed."""
    try:
        with rt.sessions.begin() as s:
            free = or_(Lease.until <= db_now_s(), Lease.holder == who)
            taken = s.execute(update(Lease).where(Lease.name == name, free).values(holder=who, until=db_now_s() + ttl_s)
                              .execution_options(synchronize_session=False))
            if taken.rowcount == 1:  # type: ignore[attr-defined]
                return True
            if s.get(Lease, name) is not None:
                return False
            # the first time: of two racing inserts, one wins
            s.execute(insert(Lease).values(name=name, holder=who, until=db_now_s() + ttl_s))
    except IntegrityError:
        return False
    except OperationalError as exc:  # (SQLite: another writer held the database past its busy timeout)
        logger.warning("lease %s not taken: %s", name, exc)
        return False
    return True


def give_back(rt: Runtime, name: str, who: str) -> None:
    """End ``who``'s lease ``name`` now (nothing if another holds it: ``who``'s lapsed and was taken). A database
    too busy to take the write leaves it to lapse."""
    try:
        with rt.sessions.begin() as s:
            s.execute(update(Lease).where(Lease.name == name, Lease.holder == who).values(until=0)
                      .execution_options(synchronize_session=False))
    except OperationalError as exc:
        logger.warning("lease %s not given back (it lapses): %s", name, exc)
