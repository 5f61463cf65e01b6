"""``gridmint marketplace serve``'s HTTP protocols (marketplace.serving): a connection that sends no request head in
time is closed, so idle connections cannot hold every place under ``limit_concurrency``; a request whose head is in
is not cut off by that timer. A real uvicorn server on loopback, raw sockets for the clients that stall."""
from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request

from marketplace import serving

LIMIT = 4


@pytest.fixture(params=["H11HeaderTimeout", "HttpToolsHeaderTimeout", None])
def server(request, monkeypatch):  # type: ignore[no-untyped-def]
    """(url, port) of a server with ``limit_concurrency`` 4 and a 1 s header timeout, on one of serving's protocols
    (None: uvicorn's own, the behaviour before)."""
    name = request.param
    if name == "HttpToolsHeaderTimeout" and serving.HttpToolsProtocol is None:
        pytest.skip("httptools is not installed")
    monkeypatch.setenv(serving.ENV, "1")
    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict[str, int]:
        return {"ok": 1}

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        return {"bytes": len(await request.body())}

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    http = getattr(serving, name) if name else "h11"
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                        limit_concurrency=LIMIT, timeout_keep_alive=5, http=http))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", port, name
    srv.should_exit = True
    thread.join(timeout=10)


def _closed_by_server(c: socket.socket, within_s: float) -> bool:
    c.settimeout(within_s)
    try:
        return c.recv(1) == b""
    except TimeoutError:
        return False


def test_idle_connections_are_closed_in_time_and_cannot_hold_every_place(server) -> None:  # type: ignore[no-untyped-def]
    url, port, name = server
    assert httpx.get(url + "/healthz").status_code == 200
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(LIMIT)]
    idle[0].sendall(b"GET /healthz HTTP/1.1\r\nHo")  # half a request head, then nothing
    time.sleep(0.3)
    assert httpx.get(url + "/healthz").status_code == 503  # every place held
    if name is None:  # uvicorn alone: held for good (what `serve` did before)
        time.sleep(2.5)
        assert httpx.get(url + "/healthz").status_code == 503
        assert not _closed_by_server(idle[1], 0.2)
    else:
        assert all(_closed_by_server(c, 3.0) for c in idle)
        assert httpx.get(url + "/healthz").status_code == 200
    for c in idle:
        c.close()


def test_a_request_whose_head_is_in_is_not_cut_off_by_the_header_timer(server) -> None:  # type: ignore[no-untyped-def]
    url, port, name = server
    if name is None:
        pytest.skip("the header timer is serving's")
    c = socket.create_connection(("127.0.0.1", port))
    c.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nContent-Length: 10\r\n\r\n"
              b"12345")
    assert not _closed_by_server(c, 2.0)  # past the 1 s header timeout: still open, the body still awaited
    c.sendall(b"67890")
    c.settimeout(3.0)
    assert b'{"bytes":10}' in c.recv(4096)
    # and idle after that response, the connection is closed in time (the next request's head never comes)
    assert _closed_by_server(c, 3.0)
    c.close()
