"""Leases: a step that must not run twice at once, whichever worker runs it (Celery's beat sends the sweep every
minute, and a sweep held up by a slow chain overlaps the next one). One row per step name in the database every
worker shares: taking it is one conditional UPDATE (atomic on SQLite and PostgreSQL alike), so of two workers
racing for it exactly one wins; a holder that dies leaves it to lapse after its ``ttl_s``."""
from __future__ import annotations

import logging
import uuid

from sqlalchemy import or_, update
from sqlalchemy.exc import IntegrityError, OperationalError

from marketplace.db import Lease, now_s
from marketplace.runtime import Runtime

logger = logging.getLogger(__name__)


def holder() -> str:
    """A fresh holder name (one per run of a step)."""
    return uuid.uuid4().hex


def take(rt: Runtime, name: str, who: str, ttl_s: int) -> bool:
    """Take the lease ``name`` for ``who`` till ``ttl_s`` seconds from now, or extend it if ``who`` holds it already.
    False if another holds it and it has not lapsed."""
    now = now_s()
    try:
        with rt.sessions.begin() as s:
            taken = s.execute(update(Lease).where(Lease.name == name, or_(Lease.until <= now, Lease.holder == who))
                              .values(holder=who, until=now + ttl_s).execution_options(synchronize_session=False))
            if taken.rowcount == 1:  # type: ignore[attr-defined]
                return True
            if s.get(Lease, name) is not None:
                return False
            s.add(Lease(name=name, holder=who, until=now + ttl_s))  # the first time: one of two racing inserts wins
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
