"""uvicorn's HTTP protocols with a header timeout: a connection with no request in progress (one just opened, or idle
after a response) is closed once it has waited ``GRIDMINT_SERVE_HEADER_TIMEOUT_S`` (10 s) for a whole request head.

uvicorn (0.55) times out only an idle connection after a response (``timeout_keep_alive``); one that never sends a
request, or sends half a request line and stops, is kept open forever. Such connections count toward
``limit_concurrency``, so a stranger holding that many (512 per worker here) made every request, heartbeats
included, a 503 until it let go; without the limit they ran the process out of file descriptors instead. A slow
*body* is the app's to time out (``GRIDMINT_BODY_TIMEOUT_S``): once a request's head is in, this timer stops.

Connections are also capped per peer address (``GRIDMINT_SERVE_CONNECTIONS_PER_PEER``, 64 per worker; 0: no cap):
one more from that address is answered 429 and closed before anything is read, so one client cannot hold every place
under ``limit_concurrency`` again and again, each for a header timeout. Peers uvicorn trusts as proxies
(``forwarded_allow_ips``: ``FORWARDED_ALLOW_IPS``, loopback by default) are not capped: every client of a proxy shares
its address.

``gridmint marketplace serve`` passes :func:`protocol_class`'s import path as uvicorn's ``http``.
"""
from __future__ import annotations

import asyncio
import functools
import ipaddress
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


PER_PEER_ENV = "GRIDMINT_SERVE_CONNECTIONS_PER_PEER"
DEFAULT_PER_PEER = 64

#: connections open per capped peer address in this worker (its one event loop: no lock needed)
_open: dict[str, int] = {}

_TOO_MANY = (b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\nconnection: close\r\n"
             b"retry-after: 1\r\ncontent-length: %d\r\n\r\n%s")


def per_peer_limit() -> int:
    return int(os.environ.get(PER_PEER_ENV, DEFAULT_PER_PEER))


def _too_many(limit: int) -> bytes:
    body = (b'{"detail":"too many connections from this address (%d at once): reuse one, or wait for one to close"}'
            % limit)
    return _TOO_MANY % (len(body), body)


@functools.lru_cache(maxsize=8)
def trusted_proxies(spec: str) -> tuple[bool, tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]]:
    """(every peer trusted, the trusted networks) of uvicorn's ``forwarded_allow_ips`` (comma-separated addresses or
    networks, ``*`` for all). An entry that is neither (a unix socket's path) names no IP peer."""
    nets = []
    for item in (x.strip() for x in spec.split(",")):
        if item == "*":
            return True, ()
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            continue
    return False, tuple(nets)


def _trusted(host: str, spec: str | list[str]) -> bool:
    every, nets = trusted_proxies(spec if isinstance(spec, str) else ",".join(spec))
    if every:
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(ip in net for net in nets)


class _HeaderTimeout:
    """Mixin for uvicorn's H11Protocol / HttpToolsProtocol (both keep ``cycle``, ``transport`` and ``loop``)."""

    cycle: Any
    config: Any
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    _gm_timer: asyncio.TimerHandle | None = None
    _gm_peer: str | None = None  # the capped peer address this connection counts against

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
        peer = transport.get_extra_info("peername")
        host = peer[0] if isinstance(peer, (tuple, list)) and peer and isinstance(peer[0], str) else None
        limit = per_peer_limit()
        if host is not None and limit > 0 and not _trusted(host, self.config.forwarded_allow_ips):
            if _open.get(host, 0) >= limit:
                transport.write(_too_many(limit))
                transport.close()  # (after the write is flushed)
                return
            _open[host] = _open.get(host, 0) + 1
            self._gm_peer = host
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
        if self._gm_peer is not None:
            left = _open.get(self._gm_peer, 1) - 1
            if left > 0:
                _open[self._gm_peer] = left
            else:
                _open.pop(self._gm_peer, None)
            self._gm_peer = None
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
