"""The customer-facing web page: providers on offer and jobs with their progress (server-rendered, no JS build)."""
from __future__ import annotations

from html import escape
from typing import Any

from protocol.money import format_tokens


def _rows(items: list[dict[str, Any]], cols: list[tuple[str, str]]) -> str:
    head = "".join(f"<th>{escape(t)}</th>" for _, t in cols)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(i.get(k, '')))}</td>" for k, _ in cols) + "</tr>" for i in items)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_index(providers: list[dict[str, Any]], jobs: list[dict[str, Any]]) -> str:
    provs = [{**p, "price": format_tokens(int(p["price"])), "stake": format_tokens(int(p["stake"]), 0)} for p in providers]
    js = [{**j, "progress": f"{j['units_verified']}/{j['units_total']}",
           "loss": f"{j['eval_losses'][-1]:.3f}" if j["eval_losses"] else "-"} for j in jobs]
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>GridMint marketplace</title>
<meta http-equiv="refresh" content="5">
<style>body{{font-family:system-ui,sans-serif;margin:2em;color:#222}}table{{border-collapse:collapse;margin-bottom:2em}}
td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left}}th{{background:#f3f3f3}}</style></head><body>
<h1>GridMint marketplace</h1>
<p>Buy training time on GPUs around the world; pay only for verified work. API docs: <a href="/docs">/docs</a>.</p>
<h2>Providers (cheapest first)</h2>
{_rows(provs, [("address", "Wallet"), ("region", "Region"), ("gpu", "GPU"), ("vram_mb", "VRAM MB"), ("price", "Ask / unit"),
               ("stake", "Stake"), ("completed", "Verified units"), ("status", "Status")])}
<h2>Jobs</h2>
{_rows(js, [("job_id", "Job"), ("status", "Status"), ("progress", "Verified units"), ("loss", "Eval loss")])}
</body></html>"""
