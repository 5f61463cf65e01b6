"""A node never uses a downloaded checkpoint whose bytes do not hash to its name (node.client.get_blob)."""
from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from eth_account import Account

from node.client import UNREACHABLE, BlobMismatch, MarketClient

GOOD = b"the checkpoint as uploaded"
SHA = hashlib.sha256(GOOD).hexdigest()


def _serve(body: bytes) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):  # a marketplace whose copy (or link) flipped bytes
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize("body", [GOOD, b"the checkpoint as uploadeD", GOOD[:-1]])
def test_a_download_is_used_only_if_it_hashes_to_its_name(tmp_path: Path, body: bytes) -> None:
    server = _serve(body)
    try:
        client = MarketClient(f"http://127.0.0.1:{server.server_address[1]}", Account.create())
        dest = tmp_path / f"{SHA}.safetensors"
        if body == GOOD:
            assert client.get_blob(SHA, dest).read_bytes() == GOOD
            return
        with pytest.raises(BlobMismatch, match="hashes to") as err:
            client.get_blob(SHA, dest)
        assert isinstance(err.value, UNREACHABLE)  # an agent waits and asks again; it never exits or accuses
        assert list(tmp_path.iterdir()) == []  # nothing left to be read as the checkpoint
    finally:
        server.shutdown()
