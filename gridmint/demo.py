"""``gridmint demo``: the whole marketplace loop on one machine, with real parts.

A Hardhat chain, a Redis, the marketplace API and a Celery worker, four provider agents in three regions
(one of them a cheat that skips training steps), one verifier, and a customer with one training job.
Every party is its own process and talks over loopback HTTP / JSON-RPC, signing what it sends.
"""
from __future__ import annotations

import os

import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from eth_account import Account
from eth_account.signers.local import LocalAccount
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from gridmint.customer import submit
from gridmint.procs import Proc, ServiceError, free_port, start_redis
from ledger.devchain import HardhatNode
from ledger.evm import Chain, GridMintContracts, deploy
from node.client import MarketClient
from node.wallet import save as save_wallet
from protocol.money import format_tokens, tokens
from protocol.schemas import JobSpec

console = Console()
if not console.is_terminal and "COLUMNS" not in os.environ:
    console = Console(width=120)  # piped to a file or CI log: do not squeeze the tables into 80 columns

SUPPLY = tokens(1_000_000)
STAKE = tokens(200)


@dataclass(frozen=True)
class ProviderPlan:
    name: str
    region: str
    price: str  # GMT per unit
    adversary: str | None = None
    plan: str = "cpu"  # execution plan: another one than the verifier's is checked within a calibrated tolerance


PROVIDERS = [
    ProviderPlan("cheapcheat", "eu-north", "0.55", "skip-steps"),
    ProviderPlan("nordic", "eu-north", "0.60"),
    ProviderPlan("virginia", "us-east", "0.90", plan="cpu/mb2"),  # other "hardware": gradients in two micro-batches
    ProviderPlan("dublin", "eu-west", "1.20"),
]


def _fmt(base: int) -> str:
    return format_tokens(base, 2)


class Demo:
    def __init__(self, data_dir: Path, rounds: int) -> None:
        self.dir = data_dir
        self.logs = data_dir / "logs"
        self.rounds = rounds
        self.procs: list[Proc] = []
        self.hardhat: HardhatNode | None = None
        self.cheat_procs = {f"node-{plan.name}" for plan in PROVIDERS if plan.adversary}

    # ---------------------------------------------------------------- infrastructure
    def start_chain(self) -> None:
        with console.status("Starting a local Hardhat chain and deploying the contracts..."):
            self.hardhat = HardhatNode()
            self.hardhat.start()
            self.chain = Chain.http(self.hardhat.url)
            self.operator = self.chain.dev_accounts()[0]
            self.treasury = Account.create()
            # verifiers bond 50 GMT per accusation: a false one costs them that, a true one earns half the cheat's stake
            self.deployment = deploy(self.chain, self.operator, supply=SUPPLY, treasury=self.treasury.address,
                                     verifier_bond=tokens(50))
            self.deployment_file = self.dir / "deployment.json"
            self.deployment.to_json(self.deployment_file)
            self.ops = GridMintContracts(self.chain, self.deployment, self.operator)
        console.print(f"[bold]Chain[/] {self.hardhat.url} (chain id {self.chain.chain_id}); token {self.deployment.token}")

    def wallet(self, name: str, eth: int, gmt: int) -> tuple[LocalAccount, Path]:
        acct = Account.create()
        path = self.dir / "wallets" / f"{name}.json"
        save_wallet(acct, path, password="")
        self.chain.send_eth(self.operator, acct.address, eth)
        if gmt:
            self.ops.transfer(acct.address, gmt)
        return acct, path

    def start_market(self) -> None:
        redis, self.redis_url = start_redis(self.dir / "redis", self.logs)
        self.procs.append(redis)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            "GRIDMINT_DATA_DIR": str(self.dir / "market"),
            "GRIDMINT_CHAIN_URL": self.hardhat.url if self.hardhat else "",
            "GRIDMINT_DEPLOYMENT_FILE": str(self.deployment_file),
            "GRIDMINT_OPERATOR_KEY": "0x" + bytes(self.operator.key).hex(),
            "GRIDMINT_REDIS_URL": self.redis_url,
            "GRIDMINT_MIN_STAKE": str(tokens(100)),
            "GRIDMINT_UNIT_TIMEOUT_S": "60",
            "GRIDMINT_WALLET_PASSWORD": "",
        }
        gm = [sys.executable, "-m", "gridmint.cli"]
        api = Proc("marketplace", [*gm, "marketplace", "serve", "--port", str(self.port)], self.logs, self.env)
        worker = Proc("worker", [*gm, "marketplace", "worker"], self.logs, self.env)
        self.procs += [api, worker]
        api.wait_until(lambda: httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200, 60, "API answering")
        console.print(f"[bold]Marketplace[/] {self.url} (API + Celery worker on Redis {self.redis_url})")

    def start_agents(self) -> None:
        gm = [sys.executable, "-m", "gridmint.cli"]
        self.providers: dict[str, tuple[ProviderPlan, LocalAccount]] = {}
        for plan in PROVIDERS:
            acct, path = self.wallet(plan.name, 10**18, tokens(1_000))
            self.providers[acct.address] = (plan, acct)
            argv = [*gm, "node", "run", "--marketplace", self.url, "--chain", self.hardhat.url if self.hardhat else "",
                    "--wallet", str(path), "--region", plan.region, "--price", plan.price, "--stake", "200"]
            if plan.adversary:
                argv += ["--adversary", plan.adversary]
            if plan.plan != "cpu":
                argv += ["--plan", plan.plan]
            self.procs.append(Proc(f"node-{plan.name}", argv, self.logs, self.env))
        self.verifier, vpath = self.wallet("verifier", 10**18, tokens(100))
        self.procs.append(Proc("verifier", [*gm, "verifier", "run", "--marketplace", self.url, "--wallet", str(vpath),
                                            "--chain", self.hardhat.url if self.hardhat else "", "--stake", "100"],
                               self.logs, self.env))
        deadline = time.monotonic() + 90
        with console.status("Providers benchmarking, staking and registering..."):
            while time.monotonic() < deadline:
                self.check_alive()
                regs = httpx.get(f"{self.url}/providers", timeout=5).json()
                if len(regs) == len(PROVIDERS):
                    break
                time.sleep(0.3)
            else:
                raise ServiceError("providers did not all register within 90 s")
        table = Table(title="Providers on offer (the matcher takes the cheapest first)")
        for col in ("provider", "region", "region floor", "ask / unit", "stake", "device"):
            table.add_column(col)
        cfg = httpx.get(f"{self.url}/config").json()
        for p in regs:
            plan = self.providers[p["address"]][0]
            table.add_row(f"{plan.name}{' (cheat)' if plan.adversary else ''}", p["region"],
                          _fmt(int(cfg["regions"][p["region"]]["floor_per_unit"])), _fmt(int(p["price"])),
                          _fmt(int(p["stake"])), f"{p['gpu']}, {p['tokens_per_s']:,} tok/s, plan {plan.plan}")
        console.print(table)

    def check_alive(self) -> None:
        for p in self.procs:
            # a node that stops cleanly is done by choice; the cheat stops refused for good (status 2), told it was
            # slashed; anything else is a death
            if p.alive() or p.name == "redis":
                continue
            code = p.popen.returncode
            if not (p.name.startswith("node-") and (code == 0 or (code == 2 and p.name in self.cheat_procs))):
                raise ServiceError(f"{p.name} died (exit {p.popen.returncode}):\n{p.tail()}")

    # ---------------------------------------------------------------- the customer's job
    def run_job(self) -> dict[str, Any]:
        self.customer, _ = self.wallet("customer", 10**18, tokens(100))
        client = MarketClient(self.url, self.customer)
        spec = JobSpec(rounds=self.rounds, units_per_round=3, steps_per_unit=60, segment_len=15, max_price=tokens("1.5"))
        cust = GridMintContracts(self.chain, self.deployment, self.customer)
        sent = submit(client, cust, spec, say=lambda _: None)  # what `gridmint job submit` does
        budget, self.job_id = int(sent["budget"]), sent["job_id"]
        console.print(f"[bold]Customer[/] funded escrow with {_fmt(budget)} (permit, no approve tx) and submitted job "
                      f"{self.job_id[:12]}: {spec.rounds} rounds x {spec.units_per_round} units x {spec.steps_per_unit} steps")
        console.print(f"  watch it run: {self.url}/web/jobs/{self.job_id}")
        seen = 0
        deadline = time.monotonic() + 300
        cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*cols, console=console) as progress:
            bar = progress.add_task("units verified", total=spec.rounds * spec.units_per_round)
            while True:
                self.check_alive()
                job = client.job(self.job_id)
                for ev in job["events"][seen:]:
                    self.narrate(ev, progress)
                seen = len(job["events"])
                progress.update(bar, completed=job["units_verified"])
                if job["status"] == "settled":
                    return job
                if time.monotonic() > deadline:
                    raise ServiceError(f"job not settled within 300 s (status {job['status']})")
                time.sleep(0.3)

    def name(self, address: str | None) -> str:
        if address in self.providers:
            return self.providers[address][0].name
        return "verifier" if self.verifier and address == self.verifier.address else str(address)[:10]

    def narrate(self, ev: dict[str, Any], progress: Progress) -> None:
        k = ev["kind"]
        out = progress.console.print
        if k == "unit_assigned":
            out(f"  match  round {ev['round']} shard {ev['shard']} -> [cyan]{self.name(ev['provider'])}[/] "
                f"({ev['region']}, {_fmt(int(ev['price']))}, price rank {ev['rank']})")
        elif k == "segment_disputed":
            out(f"  [red]verifier disputes[/] {self.name(ev['provider'])}'s unit {ev['unit'][:10]} segment {ev['segment']}")
        elif k == "provider_slashed":
            how = {"fraud-proof": "the verifier's signed accusation, upheld by the referee",
                   "audit": "the referee's audit of a verifier's pass"}.get(ev.get("path", ""), "governance slash")
            out(f"  [bold red]SLASHED[/] {self.name(ev['provider'])}: referee replay of segment {ev['segment']} gives "
                f"{ev['replayed'][:12]}.., committed {ev['claimed'][:12]}..; {_fmt(int(ev['amount']))} stake taken via "
                f"{how}; unit goes back to the pool")
        elif k == "unit_redone":
            out(f"  {self.name(ev['provider'])}'s verified unit {ev['unit'][:10]} of the open round goes back to the "
                f"pool too: trained again by another, its {_fmt(int(ev['forfeit']))} forfeit")
        elif k == "pay_withheld":
            out(f"  {self.name(ev['provider'])}'s unit {ev['unit'][:10]} of round {ev['round']} is in the model "
                f"already: it stays, unpaid ({_fmt(int(ev['forfeit']))} back to the customer)")
        elif k == "passes_audited":
            out(f"  referee audits the {ev['checks']} pass(es) of {self.name(ev['provider'])}'s earlier work that "
                f"still stand: a verifier that passed its fakes pays for it")
        elif k == "audit_passed":
            out(f"  referee audits the pass of unit {ev['unit'][:10]} segment {ev['segment']}: it replays bit for bit")
        elif k == "false_accusation":
            out(f"  [yellow]referee overrules the verifier[/] on unit {ev['unit'][:10]}")
        elif k == "reveal_requested":
            out(f"  referee bisects: asks {self.name(ev['provider'])} for its state before step {ev['step']}")
        elif k == "state_revealed":
            out(f"  {self.name(ev['provider'])} reveals its state before step {ev['step']} (signed)")
        elif k == "round_done":
            out(f"  round {ev['round']} averaged (DiLoCo outer step): held-out loss [bold]{ev['eval_loss']:.3f}[/]")
        elif k == "job_settled":
            out(f"  settled on chain: {_fmt(int(ev['paid']))} moved from escrow to the payout pool in one transfer, "
                f"{_fmt(int(ev['refund']))} refunded")

    # ---------------------------------------------------------------- the ending
    def finish(self, job: dict[str, Any]) -> int:
        paid = {e["provider"] for e in job["payouts"]}  # providers for their units, the verifier for its checks
        earned: dict[str, int] = {}
        units: dict[str, int] = {}
        for e in job["payouts"]:
            earned[e["provider"]] = earned.get(e["provider"], 0) + int(e["amount"])
            if "verification_id" not in e:
                units[e["provider"]] = units.get(e["provider"], 0) + 1
        deadline = time.monotonic() + 90
        with console.status("Epoch root going on chain; providers claiming their pay with Merkle proofs..."):
            while any(self.ops.claimed(a) < earned[a] for a in paid) and time.monotonic() < deadline:
                self.check_alive()
                time.sleep(0.3)
        epoch = self.ops.latest_epoch()
        if epoch:
            console.print(f"  payout epoch {epoch}: root 0x{self.ops.root_of(epoch).hex()[:16]}.. over cumulative "
                          f"earnings; each provider claimed with one proof")
        ops = self.ops
        accounts = {"operator": self.operator.address, "treasury": self.treasury.address,
                    "customer": self.customer.address, "verifier": self.verifier.address,
                    **{plan.name: a for a, (plan, _) in self.providers.items()}}
        table = Table(title=f"Job {self.job_id[:12]}: who did what, who got paid")
        for col in ("party", "region", "ask", "units paid", "earned", "stake now", "wallet now", "status"):
            table.add_column(col)
        providers = {p["address"]: p for p in httpx.get(f"{self.url}/providers").json()}
        for addr, (plan, _) in self.providers.items():
            p = providers[addr]
            table.add_row(plan.name, plan.region, _fmt(int(p["price"])), str(units.get(addr, 0)), _fmt(earned.get(addr, 0)),
                          _fmt(ops.stake_of(addr)), _fmt(ops.balance_of(addr)),
                          "[red]slashed[/]" if p["status"] == "slashed" else "[green]honest[/]")
        table.add_row("verifier", "", "", "", _fmt(earned.get(self.verifier.address, 0)),
                      _fmt(ops.stake_of(self.verifier.address)), _fmt(ops.balance_of(self.verifier.address)),
                      "check fees + bounty")
        table.add_row("treasury", "", "", "", "", "", _fmt(ops.balance_of(self.treasury.address)), "slash share")
        table.add_row("customer", "", "", "", "", "", _fmt(ops.balance_of(self.customer.address)),
                      f"refund {_fmt(int(job['refund']))}")
        console.print(table)
        held = {name: ops.balance_of(addr) for name, addr in accounts.items()}
        contracts = ops.contract_balances()
        total = sum(held.values()) + sum(contracts.values())
        totals = Table(title="Token totals (base units): nothing created, nothing lost")
        totals.add_column("holder")
        totals.add_column("GMT", justify="right")
        for k, v in [*held.items(), *((f"contract {k}", v) for k, v in contracts.items())]:
            totals.add_row(k, _fmt(v))
        totals.add_row("[bold]sum[/]", f"[bold]{_fmt(total)}[/]")
        totals.add_row("total supply", _fmt(ops.total_supply()))
        console.print(totals)
        losses = job["eval_losses"]
        cheats = [a for a, (plan, _) in self.providers.items() if plan.adversary]
        others = [a for a, (plan, _) in self.providers.items() if plan.plan != "cpu" and not plan.adversary]
        checks = {
            "token totals conserved": total == ops.total_supply() == SUPPLY,
            "escrow paid == ledger": sum(earned.values()) + int(job["refund"]) == int(job["budget"]),
            "cheat slashed": all(providers[c]["status"] == "slashed" and ops.stake_of(c) == 0 for c in cheats),
            "cheat slashed through the verifier's on-chain fraud proof":
                bool(cheats) and all(ev.get("path") == "fraud-proof" for ev in job["events"] if ev["kind"] == "provider_slashed")
                and any(ev["kind"] == "provider_slashed" for ev in job["events"]),
            "cheat paid nothing": all(earned.get(c, 0) == 0 for c in cheats),
            "honest providers paid and claimed": all(ops.claimed(a) == earned.get(a, 0) > 0 for a in paid)
            and len(paid - {self.verifier.address}) >= 2,
            "verifier paid for its checks and claimed": ops.claimed(self.verifier.address)
            == earned.get(self.verifier.address, 0) > 0,
            "loss went down": len(losses) >= 2 and losses[-1] < losses[0],
            "provider on another execution plan checked within tolerance and paid":
                bool(others) and all(earned.get(a, 0) > 0 for a in others),
            "the job's web page shows it settled, and the cheat slashed": self._page_shows(len(cheats)),
        }
        console.print(f"Held-out loss by round: {' -> '.join(f'{x:.3f}' for x in losses)}")
        for name, ok in checks.items():
            console.print(f"  {'[green]ok[/]  ' if ok else '[red]FAIL[/]'} {name}")
        console.print(f"Weights: {self.url}/jobs/{self.job_id}/weights (safetensors)")
        return 0 if all(checks.values()) else 1

    def _page_shows(self, cheats: int) -> bool:
        """Whether the customer's page of the job (``/web/jobs/{id}``) says what the chain says."""
        page = httpx.get(f"{self.url}/web/jobs/{self.job_id}", timeout=10)
        return (page.status_code == 200 and "Status <b>settled</b>" in page.text
                and f"Providers slashed for cheating: {cheats}" in page.text)

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        if self.hardhat:
            self.hardhat.stop()


def run_demo(serve: bool = False, data_dir: Path | None = None, rounds: int = 4) -> int:
    tmp = data_dir is None
    root = Path(tempfile.mkdtemp(prefix="gridmint-demo-")) if data_dir is None else data_dir
    root.mkdir(parents=True, exist_ok=True)
    demo = Demo(root, rounds)
    started = time.monotonic()
    code = 2
    try:
        demo.start_chain()
        demo.start_market()
        demo.start_agents()
        job = demo.run_job()
        code = demo.finish(job)
        console.print(f"Demo finished in {time.monotonic() - started:.0f} s; logs in {demo.logs}")
        if serve:
            console.print(f"[bold]Serving[/] {demo.url} — Ctrl-C to stop")
            try:
                while True:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
        return code
    except ServiceError as exc:
        console.print(f"[red]demo failed:[/] {exc}")
        for p in demo.procs:
            console.print(f"[dim]--- {p.name} (last lines of {p.log_path})[/]\n{p.tail(15)}")
        return 2
    finally:
        demo.stop()
        if tmp and not serve and code == 0:
            shutil.rmtree(root, ignore_errors=True)
