"""ASGI entry point for process managers: ``uvicorn marketplace.asgi:create --factory --workers N`` (what
``gridmint marketplace serve --workers N`` runs), gunicorn with uvicorn workers, and so on.

Each worker process builds its own Runtime (database engine, chain client, Celery producer) from the same
``GRIDMINT_*`` environment: nothing is shared in memory between workers, and per-signer nonces live in the database,
so any worker (or any API machine) can take any request.
"""
from __future__ import annotations

import gc

from fastapi import FastAPI

from marketplace.app import create_app
from marketplace.bootstrap import runtime_from_settings
from marketplace.runtime import set_runtime
from marketplace.settings import Settings


def create() -> FastAPI:
    """Build this process's runtime from its settings and the app around it."""
    rt = runtime_from_settings(Settings())
    set_runtime(rt)
    app = create_app(rt)
    freeze_startup_heap()
    return app


def freeze_startup_heap() -> None:
    """Move everything allocated at start-up (torch, web3, SQLAlchemy, the app: millions of objects) out of the
    garbage collector's reach. Otherwise every full collection walks all of them and stalls the process for tens to
    hundreds of ms, mid-request (seen as p99 spikes in ``gridmint bench api``). Start-up objects live as long as the
    process anyway."""
    gc.collect()
    gc.freeze()
