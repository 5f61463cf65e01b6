"""The marketplace HTTP service. Routes parse, call marketplace.service, and return a schema."""

import json
import secrets
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from pydantic import ValidationError
from sqlalchemy import select

from marketplace import service, settlement
from ledger.values import to_address
from marketplace.auth import PayloadTooLarge, make_signed_dependency, read_body
from marketplace.db import Event, Job, LedgerEntry, Provider, Unit, Verification
from marketplace.pricing import REGIONS
from marketplace.runtime import Runtime
from marketplace.web import render_index
from protocol import verification
from protocol.errors import (
    ChainError,
    CheckpointError,
    GridMintError,
    GridMintValueError,
    InsufficientFundsError,
    ProofError,
    ReplayError,
    SignatureError,
)
from protocol.schemas import Heartbeat, JobSpec, JobSubmit, ProviderRegister, QuoteOut, ResultSubmit, VerdictSubmit
from protocol.signing import SignedRequest

JSON_LIMIT = 1024 * 1024

_STATUS: list[tuple[type[Exception], int]] = [
    (PayloadTooLarge, 413),
    (ReplayError, 409),
    (SignatureError, 401),
    (InsufficientFundsError, 402),
    (service.NotFound, 404),
    (service.Conflict, 409),
    (CheckpointError, 422),
    (ProofError, 422),
    (GridMintValueError, 422),
    (ChainError, 502),
]


def _parse(model: type[Any], body: bytes) -> Any:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise HTTPException(422, detail=json.loads(exc.json(include_url=False))) from None


def create_app(rt: Runtime) -> FastAPI:
    app = FastAPI(title="GridMint marketplace", version="0.1.0",
                  description="Buy and sell GPU training time. Node and verifier requests are EIP-712 signed.")
    signed_json = Depends(make_signed_dependency(rt, JSON_LIMIT))
    signed_blob = Depends(make_signed_dependency(rt, rt.settings.max_upload_bytes))
    Signed = Annotated[SignedRequest, signed_json]
    SignedBlob = Annotated[SignedRequest, signed_blob]

    @app.exception_handler(GridMintError)
    async def _domain_error(_: Request, exc: GridMintError) -> JSONResponse:
        for kind, code in _STATUS:
            if isinstance(exc, kind):
                return JSONResponse({"detail": str(exc), "error": type(exc).__name__}, status_code=code)
        return JSONResponse({"detail": str(exc), "error": type(exc).__name__}, status_code=400)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/config")
    def config() -> dict[str, Any]:
        d = rt.contracts.deployment
        return {"chain_id": rt.chain_id, "token": d.token, "staking": d.staking, "escrow": d.escrow, "treasury": d.treasury,
                "distributor": rt.contracts.distributor.address,
                "min_stake": str(rt.settings.min_stake), "max_upload_bytes": rt.settings.max_upload_bytes,
                "unit_timeout_s": rt.settings.unit_timeout_s,
                "regions": {r.region: {"floor_per_unit": str(r.floor_per_unit), "energy_usd_per_mwh": r.energy_usd_per_mwh}
                            for r in REGIONS.values()}}

    # ------------------------------------------------------------ providers
    @app.post("/providers/register", status_code=201)
    def register(req: Signed, request: Request) -> dict[str, Any]:
        body = _parse(ProviderRegister, request._body)  # noqa: SLF001 - the exact bytes that were signed
        p = service.register_provider(rt, req.signer, body)
        return {"address": p.address, "stake": str(p.stake), "eligible": p.stake >= rt.settings.min_stake}

    @app.post("/providers/heartbeat")
    def provider_heartbeat(req: Signed, request: Request) -> dict[str, Any]:
        """Sign of life while training: a unit whose provider misses ``unit_timeout_s`` of heartbeats is reassigned."""
        body = _parse(Heartbeat, request._body)  # noqa: SLF001
        return service.heartbeat(rt, req.signer, body)

    @app.post("/work/next")
    def work_next(req: Signed) -> Response:
        work = service.next_work(rt, req.signer)
        return Response(status_code=204) if work is None else JSONResponse(work)

    @app.put("/blobs", status_code=201)
    def put_blob(req: SignedBlob, request: Request) -> dict[str, str]:
        return {"sha256": rt.blobs.put_checkpoint(request._body)}  # noqa: SLF001

    @app.get("/blobs/{sha}")
    def get_blob(sha: str) -> FileResponse:
        path = rt.blobs.path(sha)
        if not path.exists():
            raise service.NotFound(f"no checkpoint {sha}")
        return FileResponse(path, media_type="application/octet-stream")

    @app.post("/units/{unit_id}/result", status_code=202)
    def submit(unit_id: str, req: Signed, request: Request) -> dict[str, str]:
        body = _parse(ResultSubmit, request._body)  # noqa: SLF001
        if body.unit_id != unit_id:
            raise GridMintValueError(f"body unit {body.unit_id} != path unit {unit_id}")
        service.submit_result(rt, req.signer, body)
        return {"status": "submitted"}

    # ------------------------------------------------------------ verifiers
    @app.post("/verifiers/register", status_code=201)
    def verifier_register(req: Signed) -> dict[str, str]:
        service.register_verifier(rt, req.signer)
        return {"address": req.signer}

    @app.post("/verify/next")
    def verify_next(req: Signed) -> Response:
        task = service.next_verification(rt, req.signer)
        return Response(status_code=204) if task is None else JSONResponse(task)

    @app.post("/verify/verdict")
    def verdict(req: Signed, request: Request) -> dict[str, str]:
        body = _parse(VerdictSubmit, request._body)  # noqa: SLF001
        return {"status": service.record_verdict(rt, req.signer, body)}

    # ------------------------------------------------------------ customers
    @app.post("/jobs/quote")
    async def quote(request: Request) -> QuoteOut:
        spec = _parse(JobSpec, await read_body(request, JSON_LIMIT))
        d = rt.contracts.deployment
        vq = verification.quote(spec.verification, n_segments=spec.steps_per_unit // spec.segment_len,
                                unit_price=spec.max_price, stake=rt.settings.min_stake)
        return QuoteOut(job_id="0x" + secrets.token_hex(32), budget=spec.budget(),
                        units=spec.rounds * spec.units_per_round, escrow=d.escrow, token=d.token, chain_id=rt.chain_id,
                        verification={"level": vq.level, "replay_share": str(vq.rate),
                                      "replayed_segments_per_unit": vq.replayed_segments, "fee_per_unit": str(vq.fee),
                                      "catch_probability_1pct_per_unit": float(vq.catch_probability_1pct),
                                      "catch_within_stake_1pct": float(vq.catch_within_stake_1pct)})

    @app.post("/jobs", status_code=201)
    def submit_job(req: Signed, request: Request) -> dict[str, Any]:
        body = _parse(JobSubmit, request._body)  # noqa: SLF001
        job = service.create_job(rt, req.signer, body.job_id, body.spec)
        return {"job_id": job.id, "budget": str(job.budget), "status": job.status}

    @app.get("/jobs")
    def jobs() -> list[dict[str, Any]]:
        with rt.sessions() as s:
            return [job_view(s, j) for j in s.scalars(select(Job).order_by(Job.created_at.desc()).limit(100))]

    @app.get("/jobs/{job_id}")
    def job(job_id: str) -> dict[str, Any]:
        with rt.sessions() as s:
            j = s.get(Job, job_id)
            if j is None:
                raise service.NotFound(f"job {job_id} does not exist")
            return job_view(s, j, detail=True)

    @app.get("/jobs/{job_id}/weights")
    def weights(job_id: str) -> FileResponse:
        with rt.sessions() as s:
            j = s.get(Job, job_id)
            if j is None:
                raise service.NotFound(f"job {job_id} does not exist")
            sha = j.global_blob
        return FileResponse(rt.blobs.path(sha), media_type="application/octet-stream",
                            filename=f"gridmint-{job_id[2:10]}.safetensors")

    @app.get("/payouts/{address}")
    def payout(address: str) -> dict[str, Any]:
        """What ``address`` can claim from the PayoutDistributor now: its cumulative leaf and Merkle proof under the
        newest root past its dispute window (``claim(epoch, cumulative, proof)``), and what it has claimed so far."""
        try:
            checksummed = to_address(address)
        except GridMintValueError:
            raise HTTPException(422, detail=f"not an address: {address!r}") from None
        return settlement.payout_for(rt, checksummed)

    @app.get("/providers")
    def providers() -> list[dict[str, Any]]:
        with rt.sessions() as s:
            return [provider_view(p) for p in s.scalars(select(Provider).order_by(Provider.price))]

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        with rt.sessions() as s:
            return render_index([provider_view(p) for p in s.scalars(select(Provider).order_by(Provider.price))],
                                [job_view(s, j) for j in s.scalars(select(Job).order_by(Job.created_at.desc()).limit(20))])

    return app


def provider_view(p: Provider) -> dict[str, Any]:
    return {"address": p.address, "region": p.region, "gpu": p.gpu, "vram_mb": p.vram_mb, "price": str(p.price),
            "tokens_per_s": p.tokens_per_s, "stake": str(p.stake), "status": p.status, "assigned": p.assigned,
            "completed": p.completed, "dropped": p.dropped}


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
        out["units"] = [{"unit_id": u.id, "round": u.round, "shard": u.shard, "status": u.status, "provider": u.provider,
                         "price": None if u.price is None else str(u.price), "rank": u.rank, "attempts": u.attempts,
                         "excluded": u.excluded} for u in units]
        out["payouts"] = [{"unit_id": e.unit_id, "provider": e.provider, "amount": str(e.amount), "released": e.released}
                          for e in s.scalars(select(LedgerEntry).where(LedgerEntry.job_id == j.id))]
        out["verifications"] = [{"id": v.id, "unit_id": v.unit_id, "segment": v.segment, "status": v.status,
                                 "provider": v.provider, "verifier": v.verifier}
                                for v in s.scalars(select(Verification).join(Unit).where(Unit.job_id == j.id))]
        out["events"] = [{"kind": e.kind, "at": e.at, **e.data}
                         for e in s.scalars(select(Event).where(Event.job_id == j.id).order_by(Event.id))]
    return out
