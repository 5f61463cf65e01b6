"""The marketplace HTTP service. Routes parse, call marketplace.service, and return a schema."""

import json
import math
import re
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi import Query, Security
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from sqlalchemy import and_, func, or_, select
from starlette.concurrency import run_in_threadpool

from marketplace import checking, referee, service, settlement
from marketplace import siwe
from marketplace.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, Metrics, MetricsMiddleware
from ledger.values import to_address
from marketplace.auth import (BodyTimeout, PayloadTooLarge, UploadSlots, UploadsBusy, body_deadline, check_envelope,
                              consume_nonce_in, make_signed_dependency, read_body)
from marketplace.common import REVEALING, Conflict, NotFound, check_uploader
from marketplace.db import Event, Job, LedgerEntry, Provider, Unit, Verification
from marketplace.db import now_s
from marketplace.groupcommit import group_commit
from marketplace.pricing import REGIONS, check_max_price
from marketplace.runtime import Runtime
from marketplace.uploads import UploadQuotaExceeded, charge_upload
from marketplace.settings import pool_builds
from marketplace.sizing import JSON_LIMIT, check_unit_fits
from marketplace.web import render_index, render_job
from node.crosscheck import PROVIDER_PLAN
from node.trainer import RECIPE
from protocol import verification
from protocol.errors import (
    BlobCorruptError,
    ChainError,
    CheckpointError,
    GridMintError,
    GridMintValueError,
    InsufficientFundsError,
    ProofError,
    ReplayError,
    SignatureError,
)
from protocol.jobs import RANDOM_BYTES, new_job_id
from protocol.schemas import (INT64_MAX, Heartbeat, JobSpec, JobSubmit, ProviderRegister, QuoteOut, ResultSubmit,
                              RevealSubmit, VerdictSubmit, VerificationBeat, VerifierRegister)
from protocol.signing import SignedRequest, nonce_key

_JOB_ID = re.compile(r"0x[0-9a-f]{64}")  # protocol.schemas.Bytes32Hex: job ids are the escrow's bytes32 keys

_STATUS: list[tuple[type[Exception], int]] = [
    (PayloadTooLarge, 413),
    (BodyTimeout, 408),
    (UploadQuotaExceeded, 429),
    (UploadsBusy, 503),
    (ReplayError, 409),
    (SignatureError, 401),
    (InsufficientFundsError, 402),
    (NotFound, 404),
    (Conflict, 409),
    (CheckpointError, 422),
    (ProofError, 422),
    (GridMintValueError, 422),
    (ChainError, 502),
    (BlobCorruptError, 500),  # the marketplace's own storage failed it: not the caller's fault (logged by the store)
]


class ErrorOut(BaseModel):
    """Body of every 4xx/5xx answer: what was wrong, and the error's class (``SignatureError``, ``NotFound``...)."""

    detail: str | list[dict[str, Any]]
    error: str | None = None


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for these error status codes (bodies are ``ErrorOut``)."""
    text = {401: "Signature or session refused", 402: "Escrow does not hold the budget", 404: "Not found",
            408: "The body did not arrive within its deadline",
            429: "Every unit the uploader holds has taken the checkpoints its work needs",
            409: "Conflicts with the current state, or a replayed nonce", 413: "Body over the size limit",
            422: "Malformed body or values",
            500: "A stored checkpoint is corrupt (named in the detail): not served until the operator restores it",
            502: "The chain refused the transaction",
            503: "Every upload slot is taken: try again after Retry-After seconds"}
    return {code: {"model": ErrorOut, "description": text[code]} for code in codes}


_BINARY = {"schema": {"type": "string", "format": "binary"}}
SIGNED_DOC = ("EIP-712 `Request(signer, method, path, bodyHash, nonce, deadline)` under the domain "
              "`GridMint/2/chainId/verifyingContract` (the `staking` contract of `/config`; protocol/signing.py), sent as headers `x-gm-signer`, `x-gm-nonce` (strictly "
              "increasing per signer), `x-gm-deadline` (unix seconds) and `x-gm-signature`.")


def _parse(model: type[Any], body: bytes) -> Any:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        # not exc.json(): it raises on a body that is not UTF-8, and NaN would not serialize into the answer
        raise HTTPException(422, detail=[_bounded(_plain(e)) for e in exc.errors(include_url=False)]) from None


#: the most of an offending value a 422 echoes (JSON characters): invalid JSON's "input" is the whole body, a
#: missing field's the whole object; echoing a body up to the upload limit back doubles the traffic it costs
ECHO_LIMIT = 200


def _bounded(error: dict[str, Any]) -> dict[str, Any]:
    for key in ("input", "ctx"):
        if key in error:
            text = json.dumps(error[key])
            if len(text) > ECHO_LIMIT:
                error[key] = f"<{type(error[key]).__name__} of {len(text)} JSON characters, not echoed>"
    return error


def _plain(value: Any) -> Any:
    """``value`` as JSON can hold it: what a validation error echoes back (the input, its context) may be bytes
    that are not UTF-8, NaN or infinity, or an exception; those become text."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "backslashreplace")
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (str, int, float)):
        return value
    return str(value)


def create_app(rt: Runtime) -> FastAPI:
    app = FastAPI(title="GridMint marketplace", version="0.1.0",
                  description="Buy and sell GPU training time. Node and verifier requests are EIP-712 signed.")
    signed_json = Depends(make_signed_dependency(rt, JSON_LIMIT))
    # an upload's body is read only once its signature (over the body hash it carries) and nonce hold and its signer
    # may upload, holding one of max_uploads_in_flight slots: stalled or slow uploads cannot take the memory of more
    # than that many bodies, and only a signer with work can take a slot
    signed_blob = Depends(make_signed_dependency(rt, rt.settings.max_upload_bytes,
                                                 UploadSlots(rt.settings.max_uploads_in_flight,
                                                             lambda: rt.settings.max_uploads_per_signer),
                                                 precheck=lambda signer: check_uploader(rt, signer), sign_first=True))
    metrics = Metrics(rt.sessions, active_window_s=rt.settings.unit_timeout_s,
                      pools=pool_builds(rt.settings.referee_pools))
    app.state.metrics = metrics
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    documented: list[type[BaseModel]] = [ErrorOut]
    self_signed: set[str] = set()  # routes that check the signed envelope themselves (not through the dependency)

    def body_doc(model: type[BaseModel]) -> dict[str, Any]:
        """``openapi_extra`` for a route that reads its own JSON body (a signed route must hash the exact bytes)."""
        documented.append(model)
        return {"requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}

    fastapi_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        """FastAPI's schema plus what it cannot see: bodies read by hand, and which routes need a signed envelope."""
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = fastapi_openapi()
        components = schema.setdefault("components", {})
        _, defs = models_json_schema([(m, "validation") for m in documented],
                                     ref_template="#/components/schemas/{model}")
        for name, sub in defs.get("$defs", {}).items():
            components.setdefault("schemas", {}).setdefault(name, sub)
        components.setdefault("securitySchemes", {})["GridMintRequest"] = {
            "type": "apiKey", "in": "header", "name": "x-gm-signature", "description": SIGNED_DOC}
        signed_calls = {signed_json.dependency, signed_blob.dependency}
        for route in app.routes:
            if isinstance(route, APIRoute) and (route.path in self_signed or any(
                    d.call in signed_calls for d in route.dependant.dependencies)):
                for method in route.methods:
                    op = schema["paths"][route.path_format][method.lower()]
                    op["security"] = [{"GridMintRequest": []}]
                    for code, doc in _errors(401, 408, 409, 413).items():
                        op["responses"].setdefault(str(code), {
                            "description": doc["description"],
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}})
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    Signed = Annotated[SignedRequest, signed_json]
    SignedBlob = Annotated[SignedRequest, signed_blob]

    @app.exception_handler(GridMintError)
    async def _domain_error(_: Request, exc: GridMintError) -> JSONResponse:
        for kind, code in _STATUS:
            if isinstance(exc, kind):
                # a body that timed out was not read whole: the connection cannot carry another request
                headers = ({"Retry-After": str(exc.retry_after_s)} if isinstance(exc, UploadsBusy)
                           else {"Connection": "close"} if isinstance(exc, BodyTimeout) else None)
                return JSONResponse({"detail": str(exc), "error": type(exc).__name__}, status_code=code,
                                    headers=headers)
        return JSONResponse({"detail": str(exc), "error": type(exc).__name__}, status_code=400)

    @app.get("/healthz", summary="Liveness check")
    def healthz() -> dict[str, str]:
        """200 while the process serves requests. Touches neither the database nor the chain."""
        return {"status": "ok"}

    @app.get("/config", summary="Chain, contracts and market parameters")
    def config() -> dict[str, Any]:
        """What clients sign and fund against: chain id, token/staking/escrow/distributor addresses, the minimum
        stake, upload limit, unit timeout and each region's price floor. Money is a decimal string of base units."""
        d = rt.contracts.deployment
        return {"chain_id": rt.chain_id, "token": d.token, "staking": d.staking, "escrow": d.escrow, "treasury": d.treasury,
                "distributor": rt.contracts.distributor.address,
                "min_stake": str(rt.settings.min_stake), "max_upload_bytes": rt.settings.max_upload_bytes,
                # a provider's stake covers this many units at its ask too (protocol.verification.STAKE_UNITS)
                "stake_units": verification.STAKE_UNITS,
                "unit_timeout_s": rt.settings.unit_timeout_s, "reveal_timeout_s": rt.settings.reveal_timeout_s,
                # how units are trained and committed (model, optimizer, data order, state hash): a node or verifier
                # on another recipe runs another GridMint version and stops before it stakes
                "recipe": RECIPE,
                # devices the referee replays on: a provider's execution plan must use one of them
                "referee_devices": referee.devices(),
                # plans the referee replays bit for bit: work trained on one is judged exactly, and a verifier on it
                # bonds its disputes
                "referee_plans": sorted(p.label for p in rt.referee_plans()),
                # the CPU kernels it replays with: bit for bit only for work (and verifiers) on the same kernels
                "referee_build": rt.referee_build(),
                # referee pools: other CPU kernels some referee workers compute with (work on them is judged there,
                # bit for bit; a task names the kernels of the referee that would judge it, `referee_build`)
                "referee_pools": sorted(set(pool_builds(rt.settings.referee_pools))),
                # the CUDA kernels its GPU workers replay the GPU plans above with (bit for bit only on those)
                "referee_gpu_builds": sorted(rt.referee_gpu_builds()),
                # how long a pool may be away before its disputes go to the default referee (0: never), which judges
                # them across kernels and releases the bond of a dispute it does not uphold
                "referee_pool_wait_s": rt.settings.referee_pool_wait_s,
                "regions": {r.region: {"floor_per_unit": str(r.floor_per_unit), "energy_usd_per_mwh": r.energy_usd_per_mwh}
                            for r in REGIONS.values()}}

    # ------------------------------------------------------------ providers
    @app.post("/providers/register", status_code=201, summary="Register or update a provider (signed)",
              openapi_extra=body_doc(ProviderRegister), responses=_errors(422, 502))
    def register(req: Signed, request: Request) -> dict[str, Any]:
        """Body: ``ProviderRegister``. The signer becomes (or updates) a provider with its GPU, region, ask and
        benchmark. Its stake is read from GridStaking; it is matched only while ``eligible``: its stake covers
        ``stake_units`` units at its ask, and ``min_stake`` (``/config``)."""
        body = _parse(ProviderRegister, request._body)  # noqa: SLF001 - the exact bytes that were signed
        p = service.register_provider(rt, req.signer, body)
        floor = service.provider_floor(rt, p.price)
        return {"address": p.address, "stake": str(p.stake), "eligible": p.stake >= floor, "min_stake": str(floor)}

    committer = group_commit(rt.sessions.kw["bind"])

    @app.post("/providers/heartbeat", summary="Heartbeat while training (signed)", openapi_extra=body_doc(Heartbeat),
              responses=_errors(404, 422))
    async def provider_heartbeat(request: Request) -> dict[str, Any]:
        """Sign of life while training, with the unit's progress: a unit whose provider misses ``unit_timeout_s`` of
        heartbeats is reassigned, and so is one not submitted by its deadline (``due``) however alive its provider is.

        The hottest route (every provider, every few seconds), so it checks its envelope itself (the same rules as
        every signed route; ~0.15 ms of CPU, on the event loop) and group-commits: the nonce and the heartbeat of
        every request that arrived meanwhile go into one transaction (``marketplace.groupcommit``). A refused
        heartbeat (unknown provider, unit not its own) still uses up its nonce."""
        body = await read_body(request, JSON_LIMIT, body_deadline(rt.settings))
        req = check_envelope(rt, request.headers, "POST", request.url.path, body)
        beat = _parse(Heartbeat, body)

        def write(conn: Any) -> dict[str, Any]:
            consume_nonce_in(conn, nonce_key(req.signer, request.url.path), req.nonce)
            return service.heartbeat_in(conn, rt, req.signer, beat)

        return await committer.run_async(write, key=req.signer)  # lock order: groupcommit's docstring

    self_signed.add("/providers/heartbeat")

    @app.post("/work/next", summary="Poll for assigned work (signed)", responses={
        200: {"description": "The unit assigned to the signer: spec, unit id and start checkpoint",
              "content": {"application/json": {"schema": {"type": "object"}}}},
        204: {"description": "Nothing assigned now; poll again"}, **_errors(404)})
    def work_next(req: Signed) -> Response:
        """The next unit the matching engine assigned to the signing provider, or 204. Polling also counts as a sign
        of life for the provider."""
        work = service.next_work(rt, req.signer)
        return Response(status_code=204) if work is None else JSONResponse(work)

    @app.put("/blobs", status_code=201, summary="Upload a checkpoint (signed)", responses=_errors(422, 429, 503),
             openapi_extra={"requestBody": {"required": True, "content": {"application/octet-stream": _BINARY}}})
    def put_blob(req: SignedBlob, request: Request) -> dict[str, str]:
        """Body: a safetensors file of at most ``max_upload_bytes`` (no pickle). Stored by content; answers its
        sha256, which result submissions then name. Only from a provider with a unit assigned to it or a state asked
        of it in a dispute (409 otherwise), a training state of such a unit's model (422), within what that unit's
        work needs (its segments, its final state, the states its disputes asked, and two more; distinct blobs, so
        the same bytes again are free: 429 past it): an upload is for work, never free storage."""
        body = request._body  # noqa: SLF001
        # who may store it first (409), then what it is (422: junk, pickle, a hostile header, no state of the model
        # of a unit the signer holds), then whether that unit may take one more (429)
        return {"sha256": rt.blobs.put_checkpoint(
            body, admit=lambda: check_uploader(rt, req.signer),
            claim=lambda sha, tensors, meta: charge_upload(rt, req.signer, sha, tensors, meta))}

    @app.get("/blobs/{sha}", summary="Download a checkpoint", response_class=StreamingResponse,
             responses={200: {"description": "The safetensors bytes", "content": {"application/octet-stream": _BINARY}},
                        **_errors(404, 500)})
    def get_blob(sha: str) -> StreamingResponse:
        """The checkpoint stored under sha256 ``sha`` (start checkpoints, unit results, global models). Checked
        against its name as it is sent (BlobStore.send): a copy corrupted on the marketplace's disk is a 500 naming
        it, never served."""
        if not rt.blobs.has(sha):
            raise NotFound(f"no checkpoint {sha}")
        return _send_blob(sha)

    def _send_blob(sha: str, filename: str | None = None) -> StreamingResponse:
        try:
            size, chunks = rt.blobs.send(sha)  # BlobCorruptError (500) before the first byte where it can tell then
        except FileNotFoundError:  # (collected since the caller looked)
            raise NotFound(f"no checkpoint {sha}") from None
        headers = {"content-length": str(size)}  # a body cut off (corruption found on the way) is seen to be short
        if filename is not None:
            headers["content-disposition"] = f'attachment; filename="{filename}"'
        return StreamingResponse(chunks, media_type="application/octet-stream", headers=headers)

    @app.post("/units/{unit_id}/result", status_code=202, summary="Submit a unit's result (signed)",
              openapi_extra=body_doc(ResultSubmit), responses=_errors(404, 409, 422))
    def submit(unit_id: str, req: Signed, request: Request) -> dict[str, str]:
        """Body: ``ResultSubmit``: the final checkpoint, the proof-of-training commitments and the signed Merkle root.
        Structural checks run now (root, hash chain, start = global model, every checkpoint's hash); a sampled
        segment is then replayed by a verifier."""
        body = _parse(ResultSubmit, request._body)  # noqa: SLF001
        if body.unit_id != unit_id:
            raise GridMintValueError(f"body unit {body.unit_id} != path unit {unit_id}")
        service.submit_result(rt, req.signer, body)
        return {"status": "submitted"}

    @app.post("/reveals/next", summary="Poll for a state a referee wants revealed (signed)", responses={
        200: {"description": "A dispute (or an audit) over one of the signer's segments waits for its state "
                             "before a step",
              "content": {"application/json": {"schema": {"type": "object"}}}},
        204: {"description": "Nothing asked now; poll again"}, **_errors(404)})
    def reveal_next(req: Signed) -> Response:
        """In a dispute over a segment the signer trained on another execution plan (or kernels) than the referee's,
        or an audit of one whose replay is past the tolerance, the referee bisects it and asks for the provider's
        training state before one step; it re-derives it from the segment's start checkpoint on its own plan.
        Unanswered by the deadline, the dispute (or audit) is lost."""
        ask = checking.next_reveal(rt, req.signer)
        return Response(status_code=204) if ask is None else JSONResponse(ask)

    @app.post("/reveals", summary="Reveal a training state in a dispute (signed)", openapi_extra=body_doc(RevealSubmit),
              responses=_errors(404, 409, 422))
    def reveal(req: Signed, request: Request) -> dict[str, str]:
        """Body: ``RevealSubmit``: the uploaded checkpoint of the asked state and the provider's EIP-712 ``Reveal``
        signature over (unit, step, state hash). The referee then takes the next bisection step."""
        body = _parse(RevealSubmit, request._body)  # noqa: SLF001
        return {"status": checking.record_reveal(rt, req.signer, body)}

    # ------------------------------------------------------------ verifiers
    @app.post("/verifiers/register", status_code=201, summary="Join the verifier pool (signed)",
              openapi_extra=body_doc(VerifierRegister), responses=_errors(422))
    def verifier_register(req: Signed, request: Request) -> dict[str, str]:
        """Body (optional): ``VerifierRegister``, the verifier's execution plan. The signer becomes (or stays) a
        verifier and may poll ``/verify/next``; it is handed only segments whose plan its devices can replay."""
        raw = request._body  # noqa: SLF001
        body = _parse(VerifierRegister, raw) if raw else None
        service.register_verifier(rt, req.signer, body)
        return {"address": req.signer}

    @app.post("/verify/next", summary="Poll for a verification task (signed)", responses={
        200: {"description": "A segment to replay: unit, segment index, checkpoints and claimed hash",
              "content": {"application/json": {"schema": {"type": "object"}}}},
        204: {"description": "No task now; poll again"}, **_errors(404)})
    def verify_next(req: Signed) -> Response:
        """A server-chosen segment of a submitted unit for the signing verifier to replay, or 204."""
        task = checking.next_verification(rt, req.signer)
        return Response(status_code=204) if task is None else JSONResponse(task)

    @app.post("/verify/heartbeat", summary="Heartbeat while replaying a task (signed)",
              openapi_extra=body_doc(VerificationBeat), responses=_errors(404, 409, 422))
    def verify_heartbeat(req: Signed, request: Request) -> dict[str, Any]:
        """Body: ``VerificationBeat``. Sign of life while replaying a task: one whose verifier misses
        ``unit_timeout_s`` of heartbeats is handed out again, as is one held ``verify_deadline_s`` (``due``)
        whatever its heartbeats. 409 once the task is no longer the signer's: stop replaying it."""
        body = _parse(VerificationBeat, request._body)  # noqa: SLF001
        return checking.verification_heartbeat(rt, req.signer, body)

    @app.post("/verify/verdict", summary="Submit a verdict (signed)", openapi_extra=body_doc(VerdictSubmit),
              responses=_errors(404, 409, 422))
    def verdict(req: Signed, request: Request) -> dict[str, str]:
        """Body: ``VerdictSubmit``. ok: the unit is verified and credited once. A fraud claim is re-checked by a
        referee replay; if it holds, the provider is slashed and the unit goes back to the pool."""
        body = _parse(VerdictSubmit, request._body)  # noqa: SLF001
        return {"status": checking.record_verdict(rt, req.signer, body)}

    # ------------------------------------------------------------ customers
    def quote_for(body: bytes, customer: str | None) -> QuoteOut:
        """The quote of a ``JobSpec`` body; a fresh job id bound to ``customer`` (None: no id). CPU work (the spec's
        sizes and the level's catch odds, exact fractions): run in the threadpool, never on the event loop, where
        every request of the process would wait behind it."""
        spec = _parse(JobSpec, body)
        check_max_price(spec.max_price)
        check_unit_fits(spec, max_upload_bytes=rt.settings.max_upload_bytes)
        d = rt.contracts.deployment
        n = spec.steps_per_unit // spec.segment_len
        # (a provider asking the cap stakes at least provider_min_stake of it: the horizon the odds are counted on)
        vq = verification.quote(spec.verification, n_segments=n, unit_price=spec.max_price,
                                stake=verification.provider_min_stake(spec.max_price, rt.settings.min_stake))
        trusted_stake = verification.trusted_min_stake(spec.verification, n_segments=n, unit_price=spec.max_price)
        return QuoteOut(job_id=None if customer is None else new_job_id(customer), budget=spec.budget(),
                        units=spec.rounds * spec.units_per_round, escrow=d.escrow, token=d.token, chain_id=rt.chain_id,
                        verification={"level": vq.level, "replay_share": str(vq.rate),
                                      "replayed_segments_per_unit": vq.replayed_segments, "fee_per_unit": str(vq.fee),
                                      "catch_probability_1pct_per_unit": float(vq.catch_probability_1pct),
                                      "catch_within_stake_1pct": float(vq.catch_within_stake_1pct),
                                      # a trusted host (a record of verified units) is sampled at this share instead,
                                      # only while staking this much (None: never), where a 1% cheat still loses
                                      "trusted_replay_share": str(verification.level_rate(spec.verification,
                                                                                          verification.TRUST_AFTER_UNITS)),
                                      "trusted_min_stake": None if trusted_stake is None else str(trusted_stake)})

    @app.post("/jobs/quote", summary="Quote a job", openapi_extra=body_doc(JobSpec), responses=_errors(413, 422))
    async def quote(request: Request, customer: Annotated[str | None, Query(
            description="The address that will fund the job: the quote's job_id is bound to it (protocol.jobs)")] = None,
    ) -> QuoteOut:
        """Body: ``JobSpec``. The escrow budget (every unit at ``max_price``), the contracts to fund, the verification
        level's replay share, fee and catch odds, and, given ``?customer=0x...``, a fresh job id bound to that address
        (its first 20 bytes; JobEscrow lets no one else fund it; without ``customer``, ``job_id`` is null: make one
        with ``protocol.jobs.new_job_id``). Nothing is stored. 422 for a job whose units could not be handed in
        (checkpoints over ``max_upload_bytes``, a result body over the JSON limit), saying what to stay under, or for a
        ``customer`` that is not an address."""
        who = None if customer is None else _address(customer)
        # the body is read here (its limit holds as it streams in, async), the quote computed in the threadpool
        return await run_in_threadpool(quote_for, await read_body(request, JSON_LIMIT, body_deadline(rt.settings)), who)

    @app.post("/jobs", status_code=201, summary="Submit a funded job (signed by the customer)",
              openapi_extra=body_doc(JobSubmit), responses=_errors(402, 409, 422))
    def submit_job(req: Signed, request: Request) -> dict[str, Any]:
        """Body: ``JobSubmit``. Accepted only if ``job_id`` is the signer's (its first 20 bytes are the signer's
        address: 422 otherwise) and JobEscrow already holds the full budget for it, funded by the signer; units are
        then matched to providers."""
        body = _parse(JobSubmit, request._body)  # noqa: SLF001
        job = service.create_job(rt, req.signer, body.job_id, body.spec)
        return {"job_id": job.id, "budget": str(job.budget), "status": job.status}

    @app.get("/jobs", summary="Recent jobs")
    def jobs() -> list[dict[str, Any]]:
        """The 100 newest jobs, newest first: status, round, units verified, budget, eval losses, refund."""
        with rt.sessions() as s:
            return [job_view(s, j) for j in s.scalars(select(Job).order_by(Job.created_at.desc()).limit(100))]

    @app.get("/jobs/{job_id}", summary="One job in detail", responses=_errors(404))
    def job(job_id: str) -> dict[str, Any]:
        """A job with its units, payouts, verifications and event history."""
        with rt.sessions() as s:
            return job_view(s, _job_row(s, job_id), detail=True)

    @app.get("/jobs/{job_id}/weights", summary="Download a job's global model", response_class=StreamingResponse,
             responses={200: {"description": "safetensors", "content": {"application/octet-stream": _BINARY}},
                        **_errors(404, 500)})
    def weights(job_id: str) -> StreamingResponse:
        """The job's current global checkpoint (the final model once the job is done), as safetensors; checked
        against its name as it is sent, like ``GET /blobs/{sha}``."""
        with rt.sessions() as s:
            sha = _job_row(s, job_id).global_blob
        # named by the id's random tail: its head is the customer's address, the same for every job of theirs (a
        # review found two jobs' models downloaded under one name)
        return _send_blob(sha, f"gridmint-{job_id[-2 * RANDOM_BYTES:][:12]}.safetensors")

    @app.get("/payouts/{address}", summary="What an address can claim, with its Merkle proof", responses=_errors(422))
    def payout(address: str) -> dict[str, Any]:
        """What ``address`` can claim from the PayoutDistributor now: its cumulative leaf and Merkle proof under the
        newest root past its dispute window (``claim(epoch, cumulative, proof)``), and what it has claimed so far."""
        return settlement.payout_for(rt, _address(address))

    @app.get("/providers", summary="Providers, cheapest ask first")
    def providers(limit: int = Query(200, ge=1, le=1000), offset: int = Query(0, ge=0, le=10**9)) -> list[dict[str, Any]]:
        """Registered providers, staked ones first, each cheapest ask first (a page: ``limit`` from ``offset``):
        region, GPU, VRAM, ask, benchmark, stake, status and reliability counts."""
        with rt.sessions() as s:
            return [provider_view(p) for p in s.scalars(_provider_order(select(Provider)).limit(limit).offset(offset))]

    @app.get("/providers/{address}", summary="One provider, with its work still open", responses=_errors(404, 422))
    def provider_one(address: str) -> dict[str, Any]:
        """A provider as listed under ``/providers``, plus ``unverified``: its units submitted and not yet verified,
        those of cancelled jobs still under dispute or audit, and those verified in a running job's round not
        averaged yet (a verifier that passed one, benched, sends it back to be checked again): any of them may still
        ask it to reveal a state, so a node should stay up until this is 0; and ``unverified_kernels``: how many of
        them were trained on each plan with each kernel build (a state is re-derived for a reveal on the kernels it
        was trained with only)."""
        checksummed = _address(address)
        with rt.sessions() as s:
            p = s.get(Provider, checksummed)
            if p is None:
                raise HTTPException(404, detail=f"provider {checksummed} is not registered")
            disputed = (select(Verification.id).where(Verification.unit_id == Unit.id,
                                                      Verification.status.in_(["disputed", *REVEALING])).exists())
            open_round = select(Job.id).where(Job.id == Unit.job_id, Job.status == "running",
                                              Job.round == Unit.round).exists()
            kernels = s.execute(select(Unit.plan, Unit.build, func.count()).where(
                Unit.provider == checksummed,
                or_(Unit.status == "submitted", and_(Unit.status == "cancelled", disputed),
                    and_(Unit.status == "verified", open_round)))
                .group_by(Unit.plan, Unit.build).order_by(Unit.plan, Unit.build)).all()
            return {**provider_view(p), "unverified": sum(int(n) for _, _, n in kernels),
                    "unverified_kernels": [{"plan": plan or PROVIDER_PLAN.label, "build": build or "", "units": int(n)}
                                           for plan, build, n in kernels]}

    @app.get("/", response_class=HTMLResponse, summary="Web page")
    def index() -> str:
        """A human-readable page of providers and recent jobs."""
        with rt.sessions() as s:
            return render_index([provider_view(p) for p in s.scalars(_provider_order(select(Provider)).limit(100))],
                                [job_view(s, j) for j in s.scalars(select(Job).order_by(Job.created_at.desc()).limit(20))])

    @app.get("/web/jobs/{job_id}", response_class=HTMLResponse, summary="Web page of one job", responses=_errors(404))
    def job_page(job_id: str) -> str:
        """One job as it runs: its units, every check of its work (verifications, disputes, slashes), its payouts
        and its history, with the model to download."""
        return render_job(job(job_id))

    # ------------------------------------------------------------ customer login (SIWE, EIP-4361)
    session_secret = siwe.load_secret(rt.settings)
    bearer = HTTPBearer(auto_error=False, description="Session token from POST /auth/login")

    def customer(creds: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]) -> siwe.CustomerSession:
        try:
            if creds is None:
                raise siwe.LoginRejected("send 'Authorization: Bearer <token>'; log in at POST /auth/login")
            return siwe.verify_token(creds.credentials, secret=session_secret, chain_id=rt.chain_id, now=now_s())
        except siwe.LoginRejected as exc:
            raise HTTPException(401, detail=str(exc), headers={"WWW-Authenticate": "Bearer"}) from None

    Customer = Annotated[siwe.CustomerSession, Depends(customer)]

    @app.post("/auth/nonce", status_code=201, summary="Get a login nonce")
    def auth_nonce(request: Request) -> siwe.NonceOut:
        """A fresh random nonce for an EIP-4361 login message, usable once within ``login_nonce_ttl_s``. Also says
        which domain and chain id the message must name."""
        row = siwe.issue_nonce(rt.sessions, now=now_s(), ttl_s=rt.settings.login_nonce_ttl_s)
        return siwe.NonceOut(nonce=row.nonce, expires_at=row.expires_at, chain_id=rt.chain_id,
                             domain=siwe.request_domain(rt.settings, request.headers.get("host"), request.url.netloc))

    @app.post("/auth/login", summary="Log in by signing an EIP-4361 message", openapi_extra=body_doc(siwe.LoginIn),
              responses=_errors(401, 413, 422))
    async def auth_login(request: Request) -> siwe.SessionOut:
        """Body: ``{message, signature}``: an EIP-4361 (Sign-In with Ethereum) message holding a nonce from
        ``/auth/nonce``, this marketplace's domain and chain id, signed with EIP-191 ``personal_sign``. Answers a
        bearer token for the message's address. 401 if the signature, chain, domain, times or nonce do not check
        out (each nonce logs in once); 422 if the message is not EIP-4361."""
        login = _parse(siwe.LoginIn, await read_body(request, JSON_LIMIT, body_deadline(rt.settings)))
        return siwe.login(rt.sessions, login, secret=session_secret, chain_id=rt.chain_id,
                          domain=siwe.request_domain(rt.settings, request.headers.get("host"), request.url.netloc),
                          now=now_s(), skew_s=rt.settings.clock_skew_s, ttl_s=rt.settings.session_ttl_s)

    @app.get("/auth/me", summary="Who the session token belongs to", responses=_errors(401))
    def auth_me(who: Customer) -> siwe.MeOut:
        """The address a valid ``Authorization: Bearer`` token was issued to, and when it expires."""
        return siwe.MeOut(address=who.address, expires_at=who.expires_at)

    @app.get("/customers/me/jobs", summary="The logged-in customer's jobs", responses=_errors(401))
    def my_jobs(who: Customer, limit: Annotated[int, Query(ge=1, le=100)] = 50,
                offset: Annotated[int, Query(ge=0, le=INT64_MAX)] = 0) -> list[dict[str, Any]]:
        """Jobs whose customer is the session's address, newest first, ``limit`` at a time from ``offset``."""
        with rt.sessions() as s:
            rows = s.scalars(select(Job).where(Job.customer == who.address)
                             .order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset))
            return [job_view(s, j) for j in rows]

    # ------------------------------------------------------------ operations
    @app.get("/metrics", response_class=Response, summary="Prometheus metrics",
             responses={200: {"description": "Prometheus text exposition format",
                              "content": {METRICS_CONTENT_TYPE: {"schema": {"type": "string"}}}}})
    def prometheus_metrics(request: Request) -> Response:
        """Requests and latency by route template and status (this process), and market gauges read from the
        database now: units, jobs and providers by status, active providers, newest posted payout epoch."""
        data, content_type = metrics.render(request.headers.get("accept"))
        return Response(data, headers={"Content-Type": content_type})

    return app


def _address(text: str) -> str:
    """A path's address, checksummed; 422 if it is not one."""
    try:
        return to_address(text)
    except GridMintValueError:
        raise HTTPException(422, detail=f"not an address: {text!r}") from None


def _job_row(s: Any, job_id: str) -> Job:
    """The job a path names, or 404. Only a bytes32 hex id is looked up: any other text names no job, and one with a
    NUL byte would be a 500 on PostgreSQL, which cannot compare it."""
    if not _JOB_ID.fullmatch(job_id):
        raise NotFound(f"job {job_id[:80]!r} does not exist: a job id is 0x and 64 lowercase hex digits")
    j = s.get(Job, job_id)
    if j is None:
        raise NotFound(f"job {job_id} does not exist")
    return j


def provider_view(p: Provider) -> dict[str, Any]:
    return {"address": p.address, "region": p.region, "gpu": p.gpu, "vram_mb": p.vram_mb, "price": str(p.price),
            "tokens_per_s": p.tokens_per_s, "stake": str(p.stake), "status": p.status, "assigned": p.assigned,
            "completed": p.completed, "dropped": p.dropped, "verified_streak": p.verified_streak,
            "trusted": p.verified_streak >= verification.TRUST_AFTER_UNITS}


def _provider_order(q: Any) -> Any:
    """Staked providers (those that can take work) first, each cheapest ask first: a page of the list is never
    filled by unstaked registrations, which cost nothing to make."""
    # (money is a decimal string: shorter is smaller, then digit by digit)
    return q.order_by(Provider.stake == 0, func.length(Provider.price), Provider.price, Provider.address)


#: Check states the public job view shows as "open" (not yet answered: waiting for its canaries or a verifier, or out)
UNANSWERED = ("stocking", "pending", "assigned")


def job_view(s: Any, j: Job, detail: bool = False) -> dict[str, Any]:
    units = list(s.scalars(select(Unit).where(Unit.job_id == j.id).order_by(Unit.round, Unit.shard)))
    spec = JobSpec.model_validate(j.spec)
    out: dict[str, Any] = {
        "job_id": j.id, "customer": j.customer, "status": j.status, "round": j.round, "rounds": spec.rounds,
        "units_total": spec.rounds * spec.units_per_round,
        "units_verified": sum(u.status == "verified" for u in units), "budget": str(j.budget),
        "eval_losses": j.eval_losses, "refund": None if j.refund is None else str(j.refund),
    }
    if detail:
        out["spec"] = spec.model_dump(mode="json")  # what was submitted (a customer's re-run compares its own)
        out["units"] = [{"unit_id": u.id, "round": u.round, "shard": u.shard, "status": u.status, "provider": u.provider,
                         "price": None if u.price is None else str(u.price), "rank": u.rank, "attempts": u.attempts,
                         "excluded": u.excluded, "dropped_by": u.dropped_by,
                         **({"steps_done": u.steps_done, "due": u.deadline_at} if u.status == "assigned" else {})}
                        for u in units]
        # a unit's pay to its provider, or (with its check's id) a verifier's fee for one replay that passed
        out["payouts"] = [{"unit_id": e.unit_id, "provider": e.provider, "amount": str(e.amount), "released": e.released,
                           **({"verification_id": e.verification_id} if e.verification_id is not None else {})}
                          for e in s.scalars(select(LedgerEntry).where(LedgerEntry.job_id == j.id))]
        # a check not yet answered is "open", its verifier unsaid: "pending" beside "assigned" told a lazy verifier
        # which check of its unit waited behind the canary it held (canary.telling), the others handed out past it
        out["verifications"] = [{"id": v.id, "unit_id": v.unit_id, "segment": v.segment,
                                 "status": "open" if v.status in UNANSWERED else v.status, "provider": v.provider,
                                 "verifier": None if v.status in UNANSWERED else v.verifier}
                                for v in s.scalars(select(Verification).join(Unit).where(
                                    Unit.job_id == j.id, Verification.status != "held",
                                    # a canary shows as the task it is while out, then is gone: it was never a check
                                    or_(Verification.canary.is_(None), Verification.status == "assigned"))
                                    # by unit and segment (a unit's checks are queued in a random order)
                                    .order_by(Unit.round, Unit.shard, Unit.id, Verification.segment, Verification.id))]
        out["events"] = [{"kind": e.kind, "at": e.at, **e.data}
                         for e in s.scalars(select(Event).where(Event.job_id == j.id).order_by(Event.id))]
    return out
