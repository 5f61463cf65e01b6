"""``gridmint bench planting``: what share of the checks handed out are canaries, against the canary rate set.

A canary (:mod:`marketplace.canary`) is planted in a check as it is handed out, with odds set so that ``canary_rate``
of the checks go out as canaries. It is planted only where the rules allow it: no verifier was handed,
before it, a segment that tells the forgery (its ``telling``: the segment itself and the next, for the default job's
retrained canary), neither the verifier it goes to nor any other it might compare notes with, and a verifier gets one
canary of a unit at most (``checking.next_verification``). Where those rules refuse a drawn canary, it is lost: the
more of a unit's segments are checked, the likelier. So the odds count the rules in: a canary of a segment whose
telling checks number ``k`` besides its own is allowed only if it goes out first of them, 1 in ``1 + k`` in the
random order a unit's checks are queued in, and is planted that many times likelier when allowed
(:func:`marketplace.canary.plant_odds`). The one-canary-of-a-unit rule is not counted in: at a high rate (0.2, the
default here, so that a short run counts tens of canaries) a verifier's later checks of a unit often follow a canary
of it, and that costs a share of the rate; at the market's 0.02, little.

This bench measures the share planted with the real marketplace in this process: SQLite, an in-process EVM, a
redis-server and a Celery worker (the canaries are forged there), the HTTP API on loopback; ``--providers`` provider
agents train the units of one job per scenario (``--units`` units of ``--segments`` segments of 5 steps), and
``--verifiers`` honest verifier agents replay every task they are handed (each scenario has its own new verifiers).
Scenarios: each verification level of ``--levels`` (``full`` by default: every segment checked, where the order
refuses most; under ``standard`` and ``paranoid`` a unit of a few segments has one check, and nothing is refused),
with the odds as above (``counted``) and, as the baseline in the same run, without the order counted in
(``uncounted``: ``rate / share``, how it was before).

Figures per scenario: ``checks`` (the job's checks queued), ``handed`` (hand-outs: the real checks that canaries
stood in for, handed out again as themselves, included), ``canaries`` (planted), ``realized`` (canaries / checks:
the share of checks that went out first as a canary, what the rate sets; a real check handed out again behind its
canary is never one) and ``realized_vs_rate`` (realized / ``--rate``). ``counted_vs_uncounted`` per level: the
ratio of the two realized shares. Tens of canaries per scenario: the count scatters by about its square root from
run to run (+-7 at 50).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from gridmint.inprocess import InProcessMarket
from gridmint.procs import start_redis
from marketplace import canary
from marketplace.db import Handed, Job, Unit, Verification
from node.agent import AgentConfig, ProviderAgent
from node.client import MarketClient
from node.verifier_agent import VerifierAgent
from protocol.jobs import new_job_id
from protocol.money import tokens
from protocol.schemas import JobSpec

SEGMENT_LEN = 5


def _providers(m: InProcessMarket, url: str, n: int) -> list[ProviderAgent]:
    """``n`` staked provider agents, for every scenario (one that stopped polling would hold its units until
    reaped; none nears a trusted host's record, ``TRUST_AFTER_UNITS``, which would sample it less)."""
    providers = []
    for i in range(n):
        acct = m.account(tokens(500))
        cfg = AgentConfig(marketplace=url, chain_url="", region="us-east", price=tokens("0.9"), stake=tokens(200))
        agent = ProviderAgent(cfg, acct, m.root / f"provider{i}", contracts=m.contracts(acct))
        agent.setup()
        providers.append(agent)
    return providers


def _scenario(m: InProcessMarket, url: str, name: str, level: str, providers: list[ProviderAgent],
              args: argparse.Namespace) -> dict[str, Any]:
    verifiers = []
    for i in range(args.verifiers):
        acct = m.account(tokens(100))
        v = VerifierAgent(url, acct, m.root / name / f"verifier{i}")
        v.client.register_verifier(v.plan.label, v.build)
        v.keep_staked("", tokens(100), contracts=m.contracts(acct))
        verifiers.append(v)
    spec = JobSpec(rounds=1, units_per_round=args.units, steps_per_unit=args.segments * SEGMENT_LEN,
                   segment_len=SEGMENT_LEN, batch_size=8, max_price=tokens(2), verification=level)
    customer = m.account(tokens(10_000))
    client = MarketClient(url, customer)
    quote = client.quote(spec.model_dump(mode="json"))
    job_id = new_job_id(customer.address)
    m.contracts(customer).fund_job_with_permit(job_id, int(quote["budget"]))
    client.submit_job(job_id, spec.model_dump(mode="json"))
    started = said = time.monotonic()
    while True:
        with m.rt.sessions() as s:
            job = s.get(Job, job_id)
            if job is not None and job.status in ("settled", "failed", "cancelled"):
                break
            if time.monotonic() - said > 30:
                said = time.monotonic()
                by_unit = dict(s.execute(select(Unit.status, func.count()).where(Unit.job_id == job_id)
                                         .group_by(Unit.status)).all())
                by_check = dict(s.execute(select(Verification.status, func.count())
                                          .join(Unit, Unit.id == Verification.unit_id).where(Unit.job_id == job_id)
                                          .group_by(Verification.status)).all())
                print(f"  {name}: job {job.status if job else None}, units {by_unit}, checks {by_check}", flush=True)
        if time.monotonic() - started > args.timeout_s:
            raise RuntimeError(f"{name}: job not settled within {args.timeout_s} s")
        busy = False
        for a in providers:
            busy |= bool(a.work_once())
        for v in verifiers:
            busy |= v.verify_once() is not None
        if not busy:
            time.sleep(0.05)
    with m.rt.sessions() as s:
        units = select(Unit.id).where(Unit.job_id == job_id)
        handed = s.scalar(select(func.count()).select_from(Handed).where(Handed.unit_id.in_(units))) or 0
        planted = s.scalar(select(func.count()).select_from(Verification).where(
            Verification.unit_id.in_(units), Verification.canary.is_not(None))) or 0
        checks = s.scalar(select(func.count()).select_from(Verification).where(  # (a canary's real check: held)
            Verification.unit_id.in_(units), Verification.canary.is_(None))) or 0
        status = s.get(Job, job_id).status  # type: ignore[union-attr]
    realized = planted / checks if checks else 0.0
    out = {"checks": checks, "handed": handed, "canaries": planted, "realized": round(realized, 4),
           "realized_vs_rate": round(realized / args.rate, 3), "job": status,
           "seconds": round(time.monotonic() - started, 1)}
    print(f"  {name}: {json.dumps(out)}", flush=True)
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="gridmint bench planting", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=0.2, help="the canary rate set (default 0.2: enough canaries "
                    "to count in a short run; the market's default is 0.02)")
    ap.add_argument("--levels", default="full", help="verification levels, comma-separated (paranoid checks one "
                    "segment of a unit of 8: nothing for the order to refuse; a control that needs far more units)")
    ap.add_argument("--units", type=int, default=48)
    ap.add_argument("--segments", type=int, default=8, help="segments per unit (of 5 steps)")
    ap.add_argument("--providers", type=int, default=4)
    ap.add_argument("--verifiers", type=int, default=3)
    ap.add_argument("--timeout-s", type=float, default=900)
    args = ap.parse_args(argv)
    if not 0 < args.rate * canary.STOCK_FACTOR <= 1:
        raise SystemExit(f"--rate must be in (0, {1 / canary.STOCK_FACTOR}]: above, every check is stocked and the "
                         "odds cap at 1 (the rate cannot hold)")
    print(f"bench planting: rate {args.rate}, {args.units} units x {args.segments} segments, {args.providers} "
          f"providers, {args.verifiers} honest verifiers per scenario", flush=True)
    figures: dict[str, Any] = {"rate": args.rate}
    counted_odds = canary.plant_odds
    with tempfile.TemporaryDirectory(prefix="gridmint-bench-planting-") as tmp:
        root = Path(tmp)
        (root / "redis").mkdir()
        redis, redis_url = start_redis(root / "redis", root / "redis")
        try:
            # the market's defaults but the canary rate (and the stake a provider needs, as the tests')
            m = InProcessMarket(root, tokens(10_000_000), min_stake=tokens(100), redis_url=redis_url,
                                canary_rate=args.rate)
            with m.serving() as url:
                providers = _providers(m, url, args.providers)
                for level in [x.strip() for x in args.levels.split(",") if x.strip()]:
                    for counted in (True, False):
                        name = f"{level}_{'counted' if counted else 'uncounted'}"
                        # the baseline: the odds without the hand-out order counted in (rate / share)
                        canary.plant_odds = (counted_odds if counted  # type: ignore[assignment]
                                             else lambda rate, decoy, seg=None: counted_odds(rate, decoy))
                        try:
                            figures[name] = _scenario(m, url, name, level, providers, args)
                        finally:
                            canary.plant_odds = counted_odds  # type: ignore[assignment]
                    a, b = figures[f"{level}_counted"]["realized"], figures[f"{level}_uncounted"]["realized"]
                    figures[f"{level}_counted_vs_uncounted"] = round(a / b, 3) if b else None
        finally:
            redis.stop()
    print(json.dumps(figures))
    return 0
