"""What a customer does, as ``gridmint job ...`` runs it: quote a job, fund its escrow and submit it, watch it,
download its model, cancel it and close the escrow for the refund. Money is integer base units throughout.

``submit`` can be run again with the same ``job_id`` after a failure half way (the escrow funded, the submission
lost): it funds only what the escrow still lacks, and takes a job the marketplace already holds for this customer
as submitted (refusing, before anything is funded, one it holds with another spec). The job id is said before the
money moves."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from ledger.evm import GridMintContracts
from node.client import MarketClient, MarketError
from protocol.errors import GridMintValueError
from protocol.jobs import check_job_id, new_job_id
from protocol.money import format_tokens
from protocol.schemas import JobSpec


def read_spec(path: Path) -> JobSpec:
    """A ``JobSpec`` from a JSON file (the body ``POST /jobs/quote`` takes; money in base units, as strings)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GridMintValueError(f"cannot read job spec {path}: {exc}") from exc
    return JobSpec.model_validate(data)


def submit(client: MarketClient, contracts: GridMintContracts, spec: JobSpec, job_id: str | None = None,
           say: Callable[[str], None] = print) -> dict[str, Any]:
    """Quote ``spec``, fund what its escrow still lacks (one ERC-2612 permit transaction) and submit it (signed).
    ``job_id``: the id to use (to finish a submission that failed half way; it must be this wallet's, see
    ``protocol.jobs``); else a fresh one bound to this wallet (``new_job_id``)."""
    me = client.account.address
    wire = spec.model_dump(mode="json")
    if job_id is not None:
        check_job_id(job_id, me)
        job_id = job_id.lower()  # (an id written with the checksummed address: the marketplace takes lowercase hex,
        # and a mixed-case one was refused after its escrow was funded)
        held = _held(client, job_id)
        if held is not None:  # submitted before: fund nothing more (a review found a re-run with an edited spec
            # funded the difference and said the edited job was submitted, while the marketplace held the first)
            if "spec" in held and JobSpec.model_validate(held["spec"]) != spec:
                raise GridMintValueError(
                    f"the marketplace holds job {job_id} with another spec ({held['rounds']} rounds, budget "
                    f"{format_tokens(int(held['budget']))}): nothing funded; submit the edited spec under a new job id")
            say(f"job {job_id} was submitted already (status {held['status']})")
            return {"job_id": job_id, "budget": str(held["budget"]), "funded_now": "0",
                    "page": f"{client.base_url}/web/jobs/{job_id}"}
    quote = client.quote(wire)
    job_id = job_id or new_job_id(me)
    budget = int(quote["budget"])
    escrow = contracts.get_job(job_id)
    funded_by_other = int(escrow.customer, 16) != 0 and escrow.customer.lower() != me.lower()
    if funded_by_other or escrow.closed or escrow.closable_at:
        why = (f"funded by {escrow.customer}" if funded_by_other else
               "closed" if escrow.closed else "cancelled")
        raise GridMintValueError(f"the escrow of job {job_id} is {why}: submit under a new job id")
    short = max(0, budget - escrow.remaining)
    if short:
        have = contracts.balance_of(me)
        if have < short:
            raise GridMintValueError(f"the job's budget is {format_tokens(budget)} ({budget} base units); "
                                     f"{me} holds {format_tokens(have)}, {format_tokens(short - have)} short")
        # named before the money moves: a run that stops after the fund landed (a lost receipt, a Ctrl-C) is
        # finished with this id, not funded again under a new one (a review found the id was never said)
        say(f"funding the escrow of job {job_id}; if this stops half way, finish it with --job-id {job_id}")
        contracts.fund_job_with_permit(job_id, short)
        say(f"funded the escrow of job {job_id} with {format_tokens(short)} (budget {format_tokens(budget)})")
    try:
        client.submit_job(job_id, wire)
    except MarketError as exc:
        held = exc.status == 409 and "already exists" in str(exc.detail)
        if not (held and str(client.job(job_id).get("customer", "")).lower() == me.lower()):
            raise
        say(f"job {job_id} was submitted already")
    say(f"submitted job {job_id}: {spec.rounds} rounds x {spec.units_per_round} units; watch it at "
        f"{client.base_url}/web/jobs/{job_id}")
    return {"job_id": job_id, "budget": str(budget), "funded_now": str(short),
            "page": f"{client.base_url}/web/jobs/{job_id}"}


def _held(client: MarketClient, job_id: str) -> dict[str, Any] | None:
    """The marketplace's view of job ``job_id``, or None if it holds no such job."""
    try:
        return dict(client.job(job_id))
    except MarketError as exc:
        if exc.status == 404:
            return None
        raise


def download_weights(client: MarketClient, job_id: str, dest: Path) -> dict[str, Any]:
    """The job's global model (its final model once ``done``) as safetensors at ``dest``; says which it is."""
    job_id = job_id.lower()
    job = client.job(job_id)
    resp = client.http.get(f"/jobs/{job_id}/weights")
    if resp.status_code != 200:
        client._check(resp)  # noqa: SLF001 - raises MarketError with the marketplace's words
    dest.write_bytes(resp.content)
    return {"job_id": job_id, "status": job["status"], "final": job["status"] in ("done", "settled"),
            "path": str(dest), "bytes": len(resp.content)}
