"""A bare JSON-RPC client over one kept-alive HTTP/1.1 socket, for bulk work against a development node.

web3.py spends ~20 ms of Python per call here (request middleware, ABI mapping, proxy lookups); for a campaign of
100,000 transactions or a benchmark that sends thousands of claims, this client sends the JSON itself, batches
requests in one round trip, and sets TCP_NODELAY (without it Nagle + delayed ACKs add up to ~40 ms to some small
requests). It does no signing: it is for nodes with unlocked or impersonated accounts (Hardhat, Anvil).
"""
from __future__ import annotations

import json
import socket
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlparse

from protocol.errors import ChainError, GridMintValueError


class JsonRpcSocket:
    """``call(method, params)`` and ``batch([(method, params), ...])`` to the node at ``url`` (``http://host:port``)."""

    def __init__(self, url: str, *, timeout: float = 60.0) -> None:
        parsed = urlparse(url)
        if parsed.scheme != "http" or not parsed.hostname or not parsed.port:
            raise GridMintValueError(f"JsonRpcSocket needs an http://host:port URL, got {url!r}")
        self._host = f"{parsed.hostname}:{parsed.port}"
        self._sock = socket.create_connection((parsed.hostname, parsed.port), timeout=timeout)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = b""

    def close(self) -> None:
        self._sock.close()

    def post(self, payload: Any) -> Any:
        """Send one JSON-RPC request object (or a batch list) and return the decoded reply."""
        body = json.dumps(payload).encode()
        head = f"POST / HTTP/1.1\r\nHost: {self._host}\r\nContent-Type: application/json\r\n"
        self._sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        while b"\r\n\r\n" not in self._buffer:
            self._buffer += self._recv()
        header, rest = self._buffer.split(b"\r\n\r\n", 1)
        length = next(
            int(line.split(b":", 1)[1]) for line in header.split(b"\r\n")[1:]
            if line.lower().startswith(b"content-length:")
        )
        while len(rest) < length:
            rest += self._recv()
        self._buffer = rest[length:]
        return json.loads(rest[:length])

    def call(self, method: str, params: Sequence[Any] = ()) -> Any:
        """One request; its ``result``, or ChainError with the node's error."""
        reply = self.post({"jsonrpc": "2.0", "id": 1, "method": method, "params": list(params)})
        if "error" in reply:
            raise ChainError(f"{method} failed: {reply['error']}")
        return reply.get("result")

    def batch(self, requests: Sequence[tuple[str, Sequence[Any]]]) -> list[dict[str, Any]]:
        """Many requests in one round trip; the raw reply objects in request order (each has ``result`` or
        ``error``). The node runs them in order, so a batch of transactions is mined in that order."""
        if not requests:
            return []
        payload = [{"jsonrpc": "2.0", "id": i, "method": m, "params": list(p)} for i, (m, p) in enumerate(requests)]
        replies = self.post(payload)
        if not isinstance(replies, list):
            raise ChainError(f"batch of {len(requests)} failed: {replies}")
        return sorted(replies, key=lambda r: int(r.get("id", 0)))

    def _recv(self) -> bytes:
        chunk = self._sock.recv(1 << 16)
        if not chunk:
            raise ChainError(f"node at {self._host} closed the connection")
        return chunk
