"""``gridmint bench api``: signed heartbeats against the real marketplace service vs a bare FastAPI + SQLite endpoint.

What runs, all on loopback, in one run:

1. A Hardhat node with the contracts deployed, a redis-server, and the real service as it is deployed:
   ``gridmint marketplace serve --workers 2`` (uvicorn with uvloop/httptools, SQLite, the embedded default),
   ``GRIDMINT_MIN_STAKE=0`` so providers register without staking. ``--connections`` providers register with
   signed requests.
2. The baseline: the same uvicorn, 2 workers, a bare FastAPI endpoint on the same path that parses the same body and
   does one ``UPDATE`` per request on its own SQLite file (WAL, like the service). It receives byte-identical
   requests (it ignores the signature headers).
3. Load: every request is pre-signed before the clock starts (``gridmint.loadgen.FastSigner``), and ``wrk`` replays
   them from Lua with one connection per signer (one ``wrk`` thread each), so each signer's nonces arrive strictly
   increasing, as the service demands. Runs alternate baseline / service (``--repeats``), each after a warm-up.
   Service runs must get no error status: a replayed or refused request would measure the wrong path.
4. Where the time goes: CPU seconds per request of the server processes and of ``wrk`` (from /proc), and an
   in-process timing of each step of a signed heartbeat on the same database (EIP-712 encoding, ECDSA recovery,
   nonce transaction, heartbeat transaction, and both in one transaction as the group-commit writer runs them).
   ``steps_us.ecdsa_backend`` and ``steps_us.keccak_backend`` say which libraries did the hashing and recovery.

Last line: JSON with ``rps``, ``p99_ms``, ``baseline_rps``, ``ratio`` (rps / baseline_rps) and the details.
Targets: ``ratio`` >= 0.6, ``p99_ms`` <= 50.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Header, HTTPException, Request
from pydantic import BaseModel

TARGETS = {"ratio": 0.6, "p99_ms": 50.0}
PATH = "/providers/heartbeat"
BODY = b'{"unit_id": null, "steps_done": 0}'
BASELINE_DB_ENV = "GRIDMINT_BENCH_BASELINE_DB"
DEADLINE_S = 280  # signed deadlines: inside the service's default 300 s clock skew; every run ends well before

Log = Callable[[str], None]


# ---------------------------------------------------------------- the baseline app (its own uvicorn processes)

class Beat(BaseModel):
    unit_id: str | None = None
    steps_done: int = 0


def baseline_app() -> FastAPI:
    """Bare FastAPI + SQLite: parse the heartbeat body, one UPDATE of the signer's row, answer. Factory for
    ``uvicorn gridmint.bench.api:baseline_app --factory``; the database path comes from $GRIDMINT_BENCH_BASELINE_DB."""
    db = os.environ[BASELINE_DB_ENV]
    local = threading.local()

    def conn() -> sqlite3.Connection:
        c = getattr(local, "conn", None)
        if c is None:
            c = local.conn = sqlite3.connect(db, timeout=30, check_same_thread=False)
            c.execute("PRAGMA journal_mode=WAL")  # the same pragmas the service sets (marketplace.db.make_engine)
            c.execute("PRAGMA busy_timeout=30000")
            c.execute("PRAGMA synchronous=NORMAL")
        return c

    app = FastAPI(title="bench baseline: bare FastAPI + SQLite")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post(PATH)
    def heartbeat(body: Beat, x_gm_signer: Annotated[str, Header()]) -> dict[str, Any]:
        now = int(time.time())
        c = conn()
        with c:  # one transaction: one UPDATE, commit
            cur = c.execute("UPDATE beats SET beats = beats + 1, steps = ?, last_seen = ? WHERE address = ?",
                            (body.steps_done, now, x_gm_signer))
        if cur.rowcount != 1:
            raise HTTPException(404, f"unknown signer {x_gm_signer}")
        return {"units": [], "deadline": now + 120}

    return app


def make_baseline_db(path: Path, signers: list[str]) -> None:
    with sqlite3.connect(path) as c:
        c.execute("PRAGMA journal_mode=WAL")
        c.execute("CREATE TABLE beats (address TEXT PRIMARY KEY, beats INTEGER NOT NULL, steps INTEGER NOT NULL,"
                  " last_seen INTEGER NOT NULL)")
        c.executemany("INSERT INTO beats VALUES (?, 0, 0, 0)", [(a,) for a in signers])


# ---------------------------------------------------------------- pre-signing

def _sign_batch(key: int, domain: Any, first_nonce: int, count: int, deadline: int) -> list[tuple[int, int, str]]:
    from gridmint.loadgen import FastSigner, request_digest

    signer = FastSigner(key)
    out = []
    for nonce in range(first_nonce, first_nonce + count):
        sig = signer.sign_digest(request_digest(domain, signer.address, "POST", PATH, BODY, nonce, deadline))
        out.append((nonce, deadline, "0x" + sig.hex()))
    return out


class Signers:
    """One FastSigner per connection, each with its own strictly increasing nonce counter."""

    def __init__(self, n: int, domain: Any) -> None:
        from gridmint.loadgen import FastSigner

        self.domain = domain  # protocol.signing.Domain: the deployment the requests are signed for
        self.signers = [FastSigner() for _ in range(n)]
        self.next_nonce = [1] * n

    def self_check(self) -> None:
        """The fast signer's envelopes must pass ``protocol.signing.verify_request`` (the service's own check)."""
        from protocol.signing import verify_request

        now = int(time.time())
        for s in self.signers[:4]:
            headers = s.request_headers(self.domain, "POST", PATH, BODY, 2**62, now + 60)
            got = verify_request(headers, self.domain, "POST", PATH, BODY, now)
            if got.signer != s.address:
                raise RuntimeError(f"FastSigner envelope recovers to {got.signer}, not {s.address}")

    @property
    def addresses(self) -> list[str]:
        return [s.address for s in self.signers]

    def presign(self, per_connection: int, out_dir: Path, pool: ProcessPoolExecutor) -> int:
        """Write ``per_connection`` fresh signed heartbeats per connection into ``out_dir`` (for the Lua script)."""
        from gridmint.loadgen import write_connection_file

        out_dir.mkdir(parents=True, exist_ok=True)
        deadline = int(time.time()) + DEADLINE_S
        futures = [pool.submit(_sign_batch, s.key, self.domain, self.next_nonce[i], per_connection, deadline)
                   for i, s in enumerate(self.signers)]
        for i, fut in enumerate(futures):
            write_connection_file(out_dir / f"conn-{i + 1}.txt", self.signers[i].address, fut.result())
            self.next_nonce[i] += per_connection
        return per_connection * len(self.signers)


# ---------------------------------------------------------------- CPU accounting from /proc

def group_cpu_s(pgid: int) -> float:
    """User + system CPU seconds of every live process in process group ``pgid`` (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after "pid (comm)": state ppid pgrp ... utime(11) stime(12)
            total += int(fields[11]) + int(fields[12])
    return total / tick


# ---------------------------------------------------------------- in-process step timing

def _time_us(fn: Callable[[int], Any], n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - start) / n * 1e6


def step_breakdown(settings: Any, signers: Signers, n: int) -> dict[str, Any]:
    """Time each step of one signed heartbeat in this process, on the service's own database (idle by now)."""
    from eth_account import Account

    import protocol
    from eth_account.messages import _hash_eip191_message

    from gridmint.loadgen import FastSigner, request_digest
    from marketplace import service
    from marketplace.auth import consume_nonce, consume_nonce_in
    from marketplace.db import write_gate
    from marketplace.bootstrap import runtime_from_settings
    from protocol import signing
    from protocol.schemas import Heartbeat

    rt = runtime_from_settings(settings)
    signer: FastSigner = signers.signers[0]
    deadline = int(time.time()) + DEADLINE_S
    base = signers.next_nonce[0]
    signed = _sign_batch(signer.key, rt.domain, base, n, deadline)
    signers.next_nonce[0] += n
    headers = [{signing.HEADER_SIGNER: signer.address, signing.HEADER_NONCE: str(nonce),
                signing.HEADER_DEADLINE: str(dl), signing.HEADER_SIGNATURE: sig} for nonce, dl, sig in signed]
    messages = [{"signer": signer.address, "method": "POST", "path": PATH, "bodyHash": signing.body_hash(BODY),
                 "nonce": nonce, "deadline": dl} for nonce, dl, _ in signed]
    now = int(time.time())
    typed = signing._typed  # noqa: SLF001 - the exact encoding verify_request uses
    encoded = [typed("Request", rt.domain, m) for m in messages]
    sigs = [bytes.fromhex(sig[2:]) for _, _, sig in signed]
    hb = Heartbeat.model_validate_json(BODY)
    fused = list(range(signers.next_nonce[0], signers.next_nonce[0] + n))
    signers.next_nonce[0] += n
    gate = write_gate(rt.sessions.kw["bind"])

    def one_txn(nonce: int) -> None:  # what one request costs the service's group-commit writer, batch of one
        with gate.begin() as conn:
            consume_nonce_in(conn, signer.address, nonce)
            service.heartbeat_in(conn, rt, signer.address, hb)
    out = {
        "ecdsa_backend": "coincurve (libsecp256k1)" if signing._PublicKey is not None else "eth-account (Python)",  # noqa: SLF001
        "keccak_backend": protocol.KECCAK_BACKEND,
        "verify_request_us": _time_us(
            lambda i: signing.verify_request(headers[i], rt.domain, "POST", PATH, BODY, now), n),
        "eip712_encode_us": _time_us(lambda i: typed("Request", rt.domain, messages[i]), n),
        "eip712_digest_by_hand_us": _time_us(
            lambda i: request_digest(rt.domain, signer.address, "POST", PATH, BODY, messages[i]["nonce"], deadline), n),
        "ecdsa_recover_us": _time_us(lambda i: Account._recover_hash(_hash_eip191_message(encoded[i]),  # noqa: SLF001
                                                                     signature=sigs[i]), n),
        "nonce_txn_us": _time_us(lambda i: consume_nonce(rt, signer.address, messages[i]["nonce"]), n),
        "heartbeat_txn_us": _time_us(lambda i: service.heartbeat(rt, signer.address, hb), n),
        "nonce_and_heartbeat_one_txn_us": _time_us(lambda i: one_txn(fused[i]), n),
        "samples": n,
    }
    rt.sessions.kw["bind"].dispose()
    return {k: (round(v, 1) if isinstance(v, float) else v) for k, v in out.items()}


# ---------------------------------------------------------------- orchestration

@contextmanager
def _services(root: Path, workers: int, log: Log) -> Iterator[dict[str, Any]]:
    """Chain + deployment, redis, the service (``gridmint marketplace serve --workers``) and the baseline."""
    import httpx
    from eth_account import Account

    from gridmint.procs import Proc, free_port, start_redis
    from ledger.devchain import HardhatNode
    from ledger.evm import Chain, deploy
    from protocol.money import tokens
    from protocol.signing import Domain

    logs = root / "logs"
    procs: list[Proc] = []
    node = HardhatNode()
    try:
        node.start()
        chain = Chain.http(node.url)
        operator = chain.dev_accounts()[0]
        deployment = deploy(chain, operator, supply=tokens(1_000_000), treasury=Account.create().address)
        deployment_file = root / "deployment.json"
        deployment.to_json(deployment_file)
        log(f"chain {node.url} (chain id {chain.chain_id}), contracts deployed")
        redis, redis_url = start_redis(root / "redis", logs)
        procs.append(redis)
        env = {
            "GRIDMINT_DATA_DIR": str(root / "market"),
            "GRIDMINT_CHAIN_URL": node.url,
            "GRIDMINT_DEPLOYMENT_FILE": str(deployment_file),
            "GRIDMINT_OPERATOR_KEY": "0x" + bytes(operator.key).hex(),
            "GRIDMINT_REDIS_URL": redis_url,
            "GRIDMINT_MIN_STAKE": "0",
            "GRIDMINT_LOG_LEVEL": "warning",
        }
        port, base_port = free_port(), free_port()
        api = Proc("api", [sys.executable, "-m", "gridmint.cli", "marketplace", "serve", "--port", str(port),
                           "--workers", str(workers)], logs, env)
        procs.append(api)
        baseline_db = root / "baseline.db"
        baseline = Proc("baseline", [sys.executable, "-m", "uvicorn", "gridmint.bench.api:baseline_app", "--factory",
                                     "--workers", str(workers), "--host", "127.0.0.1", "--port", str(base_port),
                                     "--log-level", "warning", "--no-access-log"], logs, {BASELINE_DB_ENV: str(baseline_db)})
        procs.append(baseline)
        url, base_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{base_port}"
        api.wait_until(lambda: httpx.get(f"{url}/healthz", timeout=1).status_code == 200, 120, "API answering")
        baseline.wait_until(lambda: httpx.get(f"{base_url}/healthz", timeout=1).status_code == 200, 60,
                            "baseline answering")
        log(f"service {url} (gridmint marketplace serve --workers {workers}, SQLite), baseline {base_url}; "
            f"redis {redis_url}")
        yield {"url": url, "base_url": base_url, "api": api, "baseline": baseline, "domain": Domain(chain.chain_id, deployment.staking),
               "env": env, "baseline_db": baseline_db}
    finally:
        for p in reversed(procs):
            p.stop()
        node.stop()


def _register(url: str, signers: Signers) -> None:
    import httpx

    from marketplace.pricing import REGIONS

    floor = REGIONS["eu-north"].floor_per_unit
    with httpx.Client(base_url=url, timeout=30) as http:
        for i, s in enumerate(signers.signers):
            body = json.dumps({"region": "eu-north", "gpu": "bench", "vram_mb": 24_000, "price": str(floor),
                               "tokens_per_s": 1_000, "capacity": 1}).encode()
            headers = s.request_headers(signers.domain, "POST", "/providers/register", body, signers.next_nonce[i],
                                        int(time.time()) + 60)
            signers.next_nonce[i] += 1
            r = http.post("/providers/register", content=body, headers={**headers, "content-type": "application/json"})
            if r.status_code != 201:
                raise RuntimeError(f"registering {s.address} failed: {r.status_code} {r.text}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gridmint bench api", description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=16, help="wrk connections = signers (one thread each)")
    parser.add_argument("--seconds", type=int, default=10, help="length of each measured run (whole seconds: wrk's unit)")
    parser.add_argument("--warmup", type=int, default=3, help="length of the warm-up before each measured run (s)")
    parser.add_argument("--repeats", type=int, default=2, help="baseline/service measured pairs, alternating")
    parser.add_argument("--workers", type=int, default=2, help="uvicorn worker processes for each server")
    parser.add_argument("--profile-samples", type=int, default=300, help="in-process timings per step")
    parser.add_argument("--keep", type=Path, default=None, help="keep logs and databases in this directory")
    args = parser.parse_args(argv)
    if args.connections < 1 or args.seconds < 1 or args.warmup < 1 or args.repeats < 1 or args.seconds + args.warmup > DEADLINE_S / 2:
        parser.error("need connections >= 1, repeats >= 1, seconds >= 1, warmup >= 1 and seconds + warmup <= 140")

    def log(msg: str) -> None:
        print(msg, flush=True)

    from gridmint.loadgen import run_wrk, write_lua, wrk_path

    wrk_path()  # fail before starting anything if wrk is missing
    load_before = os.getloadavg()[0]
    root = args.keep or Path(tempfile.mkdtemp(prefix="gridmint-bench-api-"))
    root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        with _services(root, args.workers, log) as svc, ProcessPoolExecutor(os.cpu_count() or 2) as pool:
            signers = Signers(args.connections, svc["domain"])
            signers.self_check()
            _register(svc["url"], signers)
            make_baseline_db(svc["baseline_db"], signers.addresses)
            log(f"{args.connections} providers registered (signed); one signer per wrk connection")
            api_pg, base_pg = svc["api"].popen.pid, svc["baseline"].popen.pid

            # The baseline ignores signatures and nonces: it replays one pre-signed set over and over.
            base_dir = root / "baseline-reqs"
            signers.presign(200, base_dir, pool)
            base_script = write_lua(base_dir, "POST", PATH, BODY, cycle=True)

            def measure(name: str, url: str, script: Path, seconds: float, pgid: int) -> dict[str, Any]:
                cpu0 = group_cpu_s(pgid)
                res = run_wrk(url, script, args.connections, seconds)
                cpu = group_cpu_s(pgid) - cpu0
                d = res.as_dict()
                d["server_cpu_ms_per_req"] = round(cpu * 1e3 / max(1, res.requests), 3)
                d["client_cpu_ms_per_req"] = round(res.client_cpu_s * 1e3 / max(1, res.requests), 3)
                log(f"  {name}: {res.rps:,.0f} req/s ok, p50 {res.p50_ms:.1f} ms, p99 {res.p99_ms:.1f} ms, "
                    f"max {res.max_ms:.0f} ms, errors {sum(res.errors.values())}, server CPU "
                    f"{d['server_cpu_ms_per_req']:.2f} ms/req, wrk CPU {d['client_cpu_ms_per_req']:.3f} ms/req"
                    + (f", {res.exhausted_connections} connections ran out of signed requests"
                       if res.exhausted_connections else "")
                    + (f"; first error: {res.first_errors[0][:200]}" if res.first_errors else ""))
                return d

            def service_run(name: str, seconds: float, expect_rps: float, url: str = svc["url"],
                            pgid: int = api_pg) -> dict[str, Any]:
                # 3x what was last measured, and never under 500 requests/s: a short or cold run can measure the
                # baseline far below what the service then does, and a connection that runs out of signed requests
                # is counted as an error (it would understate the rps)
                per_conn = max(100, math.ceil(max(expect_rps, 500) * seconds * 3 / args.connections))
                t0 = time.perf_counter()
                d = root / f"reqs-{name.replace(' ', '-')}"
                total = signers.presign(per_conn, d, pool)
                log(f"  pre-signed {total:,} requests in {time.perf_counter() - t0:.1f} s")
                res = measure(name, url, write_lua(d, "POST", PATH, BODY), seconds, pgid)
                shutil.rmtree(d, ignore_errors=True)
                return res

            base_runs: list[dict[str, Any]] = []
            svc_runs: list[dict[str, Any]] = []
            log(f"wrk: {args.connections} connections, {args.connections} threads, {args.seconds:g} s per measured run")
            for rep in range(args.repeats):
                measure(f"baseline warm-up {rep + 1}", svc["base_url"], base_script, args.warmup, base_pg)
                base_runs.append(measure(f"baseline run {rep + 1}", svc["base_url"], base_script, args.seconds, base_pg))
                # size the signed pools from what was measured last: the baseline first, then the service's warm-up
                warm = service_run(f"service warm-up {rep + 1}", args.warmup,
                                   max(r["rps"] for r in svc_runs) if svc_runs else base_runs[-1]["rps"])
                svc_runs.append(service_run(f"service run {rep + 1}", args.seconds,
                                            max([warm["rps"], *(r["rps"] for r in svc_runs)])))

            log("in-process timing of each step of a signed heartbeat (service database, no load):")
            from marketplace.settings import Settings

            settings = Settings(**{k[len("GRIDMINT_"):].lower(): v for k, v in svc["env"].items()
                                   if k != "GRIDMINT_LOG_LEVEL"})
            steps = step_breakdown(settings, signers, args.profile_samples)
            for k, v in steps.items():
                log(f"  {k}: {v}")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)

    rps = statistics.mean(r["rps"] for r in svc_runs)
    baseline_rps = statistics.mean(r["rps"] for r in base_runs)
    p99 = max(r["p99_ms"] for r in svc_runs)
    errors = sum(sum(r["errors"].values()) + r["exhausted_connections"] for r in svc_runs)
    result = {
        "rps": round(rps, 1),
        "p99_ms": round(p99, 2),
        "baseline_rps": round(baseline_rps, 1),
        "ratio": round(rps / baseline_rps, 4),
        "baseline_p99_ms": round(max(r["p99_ms"] for r in base_runs), 2),
        "service_errors": errors,
        "client": "wrk 4.1 (Lua replay of pre-signed requests, one signer per connection)",
        "connections": args.connections,
        "wrk_threads": args.connections,
        "uvicorn_workers": args.workers,
        "seconds_per_run": args.seconds,
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "loadavg_1m_before": round(load_before, 2),  # other work on the machine skews every figure
        "loadavg_1m_after": round(os.getloadavg()[0], 2),
        "service_runs": svc_runs,
        "baseline_runs": base_runs,
        "steps_us": steps,
        "wall_s": round(time.monotonic() - started, 1),
        "targets": TARGETS,
        "meets_targets": rps / baseline_rps >= TARGETS["ratio"] and p99 <= TARGETS["p99_ms"] and errors == 0,
    }
    print(json.dumps(result), flush=True)
    return 0
