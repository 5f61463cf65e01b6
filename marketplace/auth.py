"""Request authentication: EIP-712 envelope (protocol.signing) plus a per-signer nonce kept in the database."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError

from marketplace.db import SignerNonce, now_s
from marketplace.runtime import Runtime
from protocol.errors import GridMintValueError, ReplayError, SignatureError
from protocol.signing import SignedRequest, verify_request

MAX_NONCE = 2**63 - 1


class PayloadTooLarge(GridMintValueError):
    """Request body over the configured limit (HTTP 413)."""


async def read_body(request: Request, limit: int) -> bytes:
    """Read the body, refusing it as soon as it passes ``limit`` bytes (also when Content-Length lies or is absent)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body of {declared} bytes is over the {limit}-byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body is over the {limit}-byte limit")
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # noqa: SLF001 - let later readers (request.json()) see the same bytes
    return body


def consume_nonce(rt: Runtime, signer: str, nonce: int) -> None:
    """Accept ``nonce`` only if it is larger than every nonce ``signer`` used before (atomic, multi-process safe)."""
    if nonce > MAX_NONCE:
        raise SignatureError(f"nonce {nonce} is over {MAX_NONCE}")
    for _ in range(3):
        with rt.sessions.begin() as s:
            res = s.execute(update(SignerNonce).where(SignerNonce.address == signer, SignerNonce.last_nonce < nonce)
                            .values(last_nonce=nonce))
            if res.rowcount == 1:  # type: ignore[attr-defined]
                return
            row = s.get(SignerNonce, signer)
            if row is not None:
                raise ReplayError(f"nonce {nonce} from {signer} was already used (last accepted {row.last_nonce})")
        try:
            with rt.sessions.begin() as s:
                s.add(SignerNonce(address=signer, last_nonce=nonce))
            return
        except IntegrityError:
            continue  # a concurrent first request from the same signer: retry the update path
    raise ReplayError(f"could not record nonce {nonce} for {signer}")


def make_signed_dependency(rt: Runtime, limit: int):  # type: ignore[no-untyped-def]
    def check(headers: Mapping[str, str], method: str, path: str, body: bytes) -> SignedRequest:
        now = now_s()
        req = verify_request(headers, rt.chain_id, method, path, body, now)
        if req.deadline > now + rt.settings.clock_skew_s:
            raise SignatureError(f"deadline {req.deadline} is too far ahead (now {now}, skew {rt.settings.clock_skew_s}s)")
        consume_nonce(rt, req.signer, req.nonce)
        return req

    async def signed(request: Request) -> SignedRequest:
        body = await read_body(request, limit)
        # signature recovery and the nonce write block: keep them off the event loop
        return await run_in_threadpool(check, request.headers, request.method, request.url.path, body)

    return signed


SignedDep = Annotated[SignedRequest, Depends]
