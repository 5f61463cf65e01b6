"""A marketplace runtime for tests of what reads and writes the database only: no chain, and a queue that sends
nothing unless the test passes its own ``enqueue`` (to see what would be sent)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from marketplace.blobs import BlobStore
from marketplace.db import make_sessionmaker
from marketplace.runtime import Runtime
from marketplace.settings import Settings


def chainless_runtime(settings: Settings, *, chain_id: int = 1, sessions: Any = None,
                      enqueue: Callable[..., Any] | None = None) -> Runtime:
    """``settings``' database (``sessions`` where the test shares one) and blob store, ``contracts`` None."""
    return Runtime(settings=settings, sessions=sessions or make_sessionmaker(settings.resolved_db_url()),
                   blobs=BlobStore(settings.blob_dir()), chain_id=chain_id, contracts=None,
                   enqueue=enqueue or (lambda name, args, queue=None: None))
