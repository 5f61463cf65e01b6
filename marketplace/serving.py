"""uvicorn's HTTP protocols with a header timeout: a connection with no request in progress (one just opened, or idle
after a response) is closed once it has waited ``GRIDMINT_SERVE_HEADER_TIMEOUT_S`` (10 s) for a whole request head.

uvicorn (0.55) times out only an idle connection after a response (``timeout_keep_alive``); one that never sends a
request, or sends half a request line and stops, is kept open forever. Such connections count toward
``limit_concurrency``, so a stranger holding that many (512 per worker here) made every request, heartbeats
included, a 503 until it let go; without the limit they ran the process out of file descriptors instead. A slow
*body* is the app's to time out (``GRIDMINT_BODY_TIMEOUT_S``): once a request's head is in, this timer stops.

``gridmint marketplace serve`` passes :func:`protocol_class`'s import path as uvicorn's ``http``.
"""
from __future__ import annotations

import asyncio
import os
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools is optional: uvicorn then serves with h11
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

ENV = "GRIDMINT_SERVE_HEADER_TIMEOUT_S"
DEFAULT_S = 10.0


def header_timeout_s() -> float:
    return float(os.environ.get(ENV, DEFAULT_S))


class _HeaderTimeout:
    """Mixin for uvicorn's H11Protocol / HttpToolsProtocol (both keep ``cycle``, ``transport`` and ``loop``)."""

    cycle: Any
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    _gm_timer: asyncio.TimerHandle | None = None

    def _gm_between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _gm_arm(self) -> None:
        if self._gm_timer is None:
            self._gm_timer = self.loop.call_later(header_timeout_s(), self._gm_expire)

    def _gm_disarm(self) -> None:
        if self._gm_timer is not None:
            self._gm_timer.cancel()
            self._gm_timer = None

    def _gm_expire(self) -> None:
        self._gm_timer = None
        if self._gm_between_requests() and not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[misc]
        self._gm_arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)  # type: ignore[misc]
        if self._gm_between_requests():
            self._gm_arm()  # (already running since the last response, or since the connection opened)
        else:
            self._gm_disarm()  # a request's head is in: its body, and the app, take it from here

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        self._gm_disarm()
        if self._gm_between_requests() and not self.transport.is_closing():
            self._gm_arm()  # the next request's head must come in time too

    def connection_lost(self, exc: Exception | None) -> None:
        self._gm_disarm()
        super().connection_lost(exc)  # type: ignore[misc]


class H11HeaderTimeout(_HeaderTimeout, H11Protocol):
    pass


if HttpToolsProtocol is not None:
    class HttpToolsHeaderTimeout(_HeaderTimeout, HttpToolsProtocol):
        pass


def protocol_class() -> str:
    """The import path of the protocol to serve with: httptools' where it is installed (uvicorn's own choice), else
    h11's."""
    return f"{__name__}:{'HttpToolsHeaderTimeout' if HttpToolsProtocol is not None else 'H11HeaderTimeout'}"
