"""The customer-facing web pages: providers on offer and jobs with their progress, and one job as it runs: its
units, how its work was checked (every verification, dispute and slash), its payouts and its history, with the model to
download (server-rendered, no JS build; every value escaped)."""
from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from html import escape
from typing import Any

from protocol.money import format_tokens


def _rows(items: list[dict[str, Any]], cols: list[tuple[str, str]],
          links: dict[str, Callable[[dict[str, Any]], str]] | None = None) -> str:
    """A table of ``items`` by ``cols`` (key, heading), every value escaped; ``links``: key -> the URL its cell links."""
    links = links or {}

    def cell(i: dict[str, Any], k: str) -> str:
        text = escape(str(i.get(k, "")))
        return f'<a href="{escape(links[k](i))}">{text}</a>' if k in links else text

    head = "".join(f"<th>{escape(t)}</th>" for _, t in cols)
    body = "".join("<tr>" + "".join(f"<td>{cell(i, k)}</td>" for k, _ in cols) + "</tr>" for i in items)
    return f"<table><tr>{head}</tr>{body}</table>"


_STYLE = """<style>body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin-bottom:2em}
td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}th{background:#f3f3f3}</style>"""


def _page(title: str, body: str, refresh: bool) -> str:
    meta = '<meta http-equiv="refresh" content="5">' if refresh else ""
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>{escape(title)}</title>{meta}{_STYLE}</head>'
            f"<body>{body}</body></html>")


def _short(h: Any) -> str:
    """A hash or an address, shortened for a table (the full value is in the JSON)."""
    h = str(h or "")
    return h if len(h) <= 14 else f"{h[:8]}…{h[-4:]}"


def _gmt(base: Any) -> str:
    return "-" if base is None else format_tokens(int(base))


#: what an event says, beyond its kind (units, providers and verifiers shortened; the rest as given)
_EVENT_KEYS = ("unit", "segment", "provider", "verifier", "amount", "path", "round", "eval_loss", "reason")


def _event_detail(e: dict[str, Any]) -> str:
    parts = []
    for k in _EVENT_KEYS:
        if e.get(k) is None:
            continue
        v = e[k]
        v = _short(v) if k in ("unit", "provider", "verifier") else _gmt(v) if k == "amount" else v
        v = f"{v:.4f}" if isinstance(v, float) else str(v)
        parts.append(f"{k} {v[:400]}")
    return "; ".join(parts)


def render_job(job: dict[str, Any]) -> str:
    """One job (``GET /jobs/{job_id}``'s view) as a page: refreshed every 5 s until it is settled (or cancelled, or
    failed)."""
    jid = job["job_id"]
    losses = job["eval_losses"] or []
    checks = Counter(v["status"] for v in job["verifications"])
    slashed = [e for e in job["events"] if e["kind"] == "provider_slashed"]
    summary = ", ".join(f"{n} {status}" for status, n in sorted(checks.items())) or "none yet"
    cheats = f" ({', '.join(_short(e.get('provider')) for e in slashed)})" if slashed else ""
    redone = sum(e["kind"] == "unit_redone" for e in job["events"])  # a slashed cheat's verified units, not averaged
    cheats += f"; {redone} of their verified units trained again by others, unpaid" if redone else ""
    withheld = sum(e["kind"] == "pay_withheld" for e in job["events"])  # theirs averaged into the model already
    cheats += f"; {withheld} of their units averaged already, unpaid" if withheld else ""
    at = f"round {job['round'] + 1} of {job['rounds']}" if job["status"] == "running" else f"{job['rounds']} rounds"
    status = " · ".join([f"Status <b>{escape(job['status'])}</b>", escape(at),
                         f"{job['units_verified']}/{job['units_total']} units verified",
                         f"budget {escape(_gmt(job['budget']))}", f"refund {escape(_gmt(job['refund']))}",
                         f"eval loss {losses[-1]:.4f}" if losses else "eval loss -"])
    units = [{**u, "unit_id": _short(u["unit_id"]), "provider": _short(u["provider"]), "price": _gmt(u["price"]),
              "round": u["round"] + 1} for u in job["units"]]  # rounds counted from 1, as in the heading
    verifications = [{**v, "unit_id": _short(v["unit_id"]), "provider": _short(v["provider"]),
                      "verifier": _short(v["verifier"])} for v in job["verifications"]]
    payouts = [{**p, "unit_id": _short(p["unit_id"]), "provider": _short(p["provider"]), "amount": _gmt(p["amount"]),
                "released": "yes" if p["released"] else "never: job cancelled" if job["status"] == "cancelled"
                else "not yet"} for p in job["payouts"]]
    history = [{"at": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e["at"])), "kind": e["kind"],
                "detail": _event_detail(e)} for e in job["events"]]
    body = f"""<p><a href="/">GridMint marketplace</a></p>
<h1>Job {escape(_short(jid))}</h1>
<p>{status}</p>
<p><a href="/jobs/{escape(jid)}/weights">Download the model</a> (safetensors: the final model once the job is done) ·
<a href="/jobs/{escape(jid)}">this job as JSON</a></p>
<h2>Evaluation loss</h2>
{_rows([{"when": f"after round {i}" if i else "the starting model", "loss": f"{x:.4f}"} for i, x in enumerate(losses)],
       [("when", "Model"), ("loss", "Eval loss")])}
<h2>Units</h2>
{_rows(units, [("unit_id", "Unit"), ("round", "Round"), ("shard", "Shard"), ("status", "Status"),
               ("provider", "Provider"), ("price", "Price"), ("attempts", "Attempts")])}
<h2>Verification</h2>
<p>Segments checked by re-execution: {escape(summary)}.
Providers slashed for cheating: {len(slashed)}{escape(cheats)}.</p>
{_rows(verifications, [("id", "Check"), ("unit_id", "Unit"), ("segment", "Segment"), ("status", "Status"),
                       ("provider", "Provider"), ("verifier", "Verifier")])}
<h2>Payouts</h2>
{_rows(payouts, [("unit_id", "Unit"), ("provider", "Provider"), ("amount", "Amount"), ("released", "Released to the pool")])}
<h2>History</h2>
{_rows(history, [("at", "UTC"), ("kind", "Event"), ("detail", "Detail")])}"""
    return _page(f"GridMint job {_short(jid)}", body, refresh=job["status"] not in ("settled", "cancelled", "failed"))


def render_index(providers: list[dict[str, Any]], jobs: list[dict[str, Any]]) -> str:
    provs = [{**p, "price": format_tokens(int(p["price"])), "stake": format_tokens(int(p["stake"]), 0)} for p in providers]
    js = [{**j, "progress": f"{j['units_verified']}/{j['units_total']}",
           "loss": f"{j['eval_losses'][-1]:.3f}" if j["eval_losses"] else "-"} for j in jobs]
    body = f"""<h1>GridMint marketplace</h1>
<p>Buy training time on GPUs around the world; pay only for verified work. API docs: <a href="/docs">/docs</a>.</p>
<h2>Providers (cheapest first)</h2>
{_rows(provs, [("address", "Wallet"), ("region", "Region"), ("gpu", "GPU"), ("vram_mb", "VRAM MB"), ("price", "Ask / unit"),
               ("stake", "Stake"), ("completed", "Verified units"), ("status", "Status")])}
<h2>Jobs</h2>
{_rows(js, [("job_id", "Job"), ("status", "Status"), ("progress", "Verified units"), ("loss", "Eval loss")],
       links={"job_id": lambda j: f"/web/jobs/{j['job_id']}"})}"""
    return _page("GridMint marketplace", body, refresh=True)
