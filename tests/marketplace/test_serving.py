"""``gridmint marketplace serve``'s HTTP protocols (marketplace.serving): a connection that sends no request head in
time is closed, so idle connections cannot hold every place under ``limit_concurrency``; a request whose head is in
is not cut off by that timer; one peer address holds at most its cap of connections. A real uvicorn server on loopback, raw sockets for the clients that stall."""
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


def test_one_address_holds_at_most_its_cap_of_connections_and_others_still_get_in(server, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Cap 2 per peer: a third connection from 127.0.0.2 is answered 429 and closed at once, another address (and
    the trusted proxy address, loopback's 127.0.0.1) still gets in, and once one of the two closes the address may
    open another."""
    url, port, name = server
    monkeypatch.setenv(serving.PER_PEER_ENV, "2")

    def from_(ip: str) -> socket.socket:
        return socket.create_connection(("127.0.0.1", port), source_address=(ip, 0))

    held = [from_("127.0.0.2") for _ in range(2)]
    third = from_("127.0.0.2")
    if name is None:  # uvicorn alone: no cap (what `serve` did before): the third is let in and held like the rest
        assert not _closed_by_server(third, 1.0)
        for c in [*held, third]:
            c.close()
        return
    third.settimeout(2.0)
    first = third.recv(4096)
    assert first.startswith(b"HTTP/1.1 429 ") and b"too many connections from this address" in first
    assert _closed_by_server(third, 2.0)
    other = from_("127.0.0.3")
    other.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    other.settimeout(2.0)
    assert other.recv(4096).startswith(b"HTTP/1.1 200 ")
    trusted = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]  # loopback: uvicorn's proxy address
    assert not any(_closed_by_server(c, 0.3) for c in trusted)
    for c in trusted:
        c.close()
    held.pop().close()
    time.sleep(0.3)
    again = from_("127.0.0.2")
    again.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    again.settimeout(2.0)
    assert again.recv(4096).startswith(b"HTTP/1.1 200 ")
    for c in [*held, third, other, again]:
        c.close()


def test_trusted_proxy_addresses_parse_as_uvicorn_names_them() -> None:
    assert serving._trusted("127.0.0.1", "127.0.0.1,::1") and serving._trusted("::1", "127.0.0.1,::1")  # noqa: SLF001
    assert not serving._trusted("127.0.0.2", "127.0.0.1,::1")  # noqa: SLF001
    assert serving._trusted("10.1.2.3", "10.0.0.0/8") and serving._trusted("8.8.8.8", "*")  # noqa: SLF001
    assert serving._trusted("10.1.2.3", ["192.168.0.1", "10.1.2.3"])  # noqa: SLF001
    assert not serving._trusted("10.1.2.3", "unix:/run/proxy.sock")  # noqa: SLF001
