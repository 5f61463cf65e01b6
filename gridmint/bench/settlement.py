"""``gridmint bench settlement``: what epoch settlement costs on chain, and whether the contracts keep their invariants.

Everything is measured in this run on a local Hardhat node (EVM cancun bytecode, optimizer 200); nothing is
hard-coded. Gas is each receipt's ``gasUsed`` (the 21,000 base and calldata included).

1. **Claims and roots** (``claim_gas``, ``root_post_gas``, ``erc20_transfer_gas``): a ``--leaves`` tree (1,024) of
   cumulative earnings; every account's leaf grows in each of ``--epochs`` + 1 posted roots. Three accounts claim
   once at the last root:
   - *repeat*: claimed at epoch 1, then waited ``--epochs`` (10) epochs: the steady state of a provider that
     claims now and then. This is the headline ``claim_gas``.
   - *first*: its first claim ever, already holding GMT (e.g. a provider that staked).
   - *first, new holder*: its first claim ever with no GMT yet (the ERC-20 balance slot is created too).
   A first claim costs more only because two storage slots go from zero to non-zero (EIP-2200: 20,000 gas vs
   2,900 for an update); the claim covers any number of epochs for the same gas (the leaf is cumulative).
   ``erc20_transfer_gas``: a plain GMT transfer between two existing holders, in the same run.
2. **An epoch's settlement** (``gas_per_work_unit``): ``--providers`` (1,000) providers each do ``--units`` (100)
   work units per epoch for ``--jobs`` (100) jobs (each provider works on one job; each job moves one batch per
   epoch with ``releaseToPool``); the ledger posts one root; every provider is paid every epoch. Measured twice,
   each on a fresh deployment over two epochs (epoch 1: everyone's first payout as a new holder; epoch 2: the
   steady state):
   - *batched push* (the headline, how the marketplace pays): the operator pays every provider with
     ``claimMany``, ``--batch`` (200) providers per transaction;
   - *individual claims* (``gas_per_work_unit_individual_claims``): every provider sends its own ``claim``.
   ``gas_per_work_unit = (releaseToPool x jobs + postRoot + claim transactions) / (providers x units)``, epoch 2.
   Funding the jobs is the customer's transaction, not settlement, and is not counted.
3. **The invariant campaign** (``invariant_ops``, ``invariant_violations``): ``ledger.campaign.run_campaign`` for
   ``--ops`` random operations against the real contracts, every invariant checked after every operation. It runs
   on the Hardhat node through ``RpcDriver`` (measured ~10-15x faster than py-evm; ``--probe-ops`` measures the
   in-process rate in the same run).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

from eth_utils import keccak, to_checksum_address

from ledger.campaign import Harness, calldata, run_campaign
from ledger.chain import Chain
from ledger.client import GridMintContracts
from ledger.deploy import Deployment, deploy
from ledger.devchain import HardhatNode
from ledger.jsonrpc import JsonRpcSocket
from ledger.payout_tree import build_payout_tree
from protocol.errors import ChainError, GridMintValueError
from protocol.jobs import RANDOM_BYTES, job_id_bytes

TARGETS = {"claim_gas": 60_000, "root_post_gas": 80_000, "gas_per_work_unit": 500, "invariant_violations": 0}
SUPPLY = 10**30
DISPUTE_WINDOW_S = 3_600
PRICE_PER_UNIT = 10**15  # 0.001 GMT per work unit; the price only changes a few calldata bytes, not the storage work
TX_GAS = 500_000
#: EIP-7825 (Osaka) caps one transaction at 2**24 gas; a claimMany batch must fit under it and the block limit.
TX_GAS_CAP = 2**24
#: Accounts per claimMany transaction in the batched push payout (``--batch``).
CLAIM_BATCH = 200

Log = Callable[[str], None]


def synthetic_accounts(n: int, salt: str) -> list[str]:
    """``n`` distinct addresses with no key (they are only leaves, or impersonated on the node)."""
    return [to_checksum_address(keccak(text=f"{salt}-{i}")[:20]) for i in range(n)]


def gas_of(client: GridMintContracts) -> int:
    receipt = client.last_receipt
    if receipt is None:  # pragma: no cover - only after a send
        raise ChainError("no transaction was sent")
    return int(receipt["gasUsed"])


# ---------------------------------------------------------------- 1. claims and roots


def measure_claims(chain: Chain, leaves: int, epochs: int, log: Log) -> dict[str, Any]:
    operator, repeat, first, first_new, treasury = chain.dev_accounts(5)
    deployment = deploy(chain, operator, supply=SUPPLY, treasury=treasury.address, dispute_window_s=DISPUTE_WINDOW_S)
    op = GridMintContracts(chain, deployment, operator)
    claimers = {"repeat": op.as_account(repeat), "first": op.as_account(first), "first_new": op.as_account(first_new)}
    accounts = [repeat.address, first.address, first_new.address, *synthetic_accounts(leaves - 3, "bench-leaf")]
    per_epoch = {a: PRICE_PER_UNIT * (100 + i % 97) for i, a in enumerate(accounts)}

    op.transfer(first.address, 10**18)  # "first" holds GMT before its first claim; "first_new" holds none
    op.transfer(first.address, 10**18)
    erc20_transfer_gas = gas_of(op)  # both sides already hold GMT: the baseline a claim's transfer compares with

    last = epochs + 1
    op.deposit_to_pool(sum(v * last for v in per_epoch.values()))
    post_gas: list[int] = []
    trees = {}
    for epoch in range(1, last + 1):
        trees[epoch] = build_payout_tree({a: v * epoch for a, v in per_epoch.items()})
        op.post_tree(epoch, trees[epoch])
        post_gas.append(gas_of(op))
        chain.advance_time(DISPUTE_WINDOW_S)
        if epoch == 1:
            claimers["repeat"].claim_from_tree(1, trees[1])
            log(f"  epoch 1 posted ({gas_of(op):,} gas); 'repeat' claimed it ({gas_of(claimers['repeat']):,} gas)")
    log(f"  posted epochs 2..{last} of a {leaves:,}-leaf tree (depth {trees[last].depth}): "
        f"{min(post_gas):,}-{max(post_gas):,} gas each")

    figures: dict[str, int] = {}
    for name, client in claimers.items():
        paid = client.claim_from_tree(last, trees[last])
        already = per_epoch[client.address] if name == "repeat" else 0
        if paid != per_epoch[client.address] * last - already:  # pragma: no cover - a contract bug
            raise ChainError(f"{name} claim paid {paid}, expected {per_epoch[client.address] * last - already}")
        figures[name] = gas_of(client)
        log(f"  claim at epoch {last} by '{name}': {figures[name]:,} gas")
    return {
        "claim_gas": figures["repeat"],
        "claim_gas_case": (
            f"headline: an account that claimed before (epoch 1) and holds GMT claims once at epoch {last}, "
            f"covering {epochs} epochs of cumulative growth, in a {leaves:,}-leaf tree (proof of "
            f"{len(trees[last].proof(repeat.address))} hashes); the steady state of every claim after a "
            f"provider's first. A first claim pays once for creating storage (claimed-so-far, and the GMT balance "
            f"for a new holder): see claim_gas_first_claim*"
        ),
        "claim_gas_first_claim": figures["first"],
        "claim_gas_first_claim_new_holder": figures["first_new"],
        "claim_epochs_covered": epochs,
        "claim_tree_leaves": leaves,
        "root_post_gas": max(post_gas),
        "root_post_gas_median": int(statistics.median(post_gas)),
        "erc20_transfer_gas": erc20_transfer_gas,
    }


# ---------------------------------------------------------------- 2. one epoch's settlement at scale


class Impersonator:
    """Sends transactions as any address on a Hardhat node (``hardhat_impersonateAccount``), in batches."""

    def __init__(self, rpc: JsonRpcSocket) -> None:
        self.rpc = rpc

    def fund_gas(self, addresses: list[str]) -> None:
        calls: list[tuple[str, list[Any]]] = []
        for a in addresses:
            calls += [("hardhat_setBalance", [a, hex(10**20)]), ("hardhat_impersonateAccount", [a])]
        self._check(self.rpc.batch(calls), "impersonate")

    def send(self, txs: list[tuple[str, str, bytes]], what: str, gas: int = TX_GAS) -> list[int]:
        """Send ``(from, to, data)`` transactions in order (one block each) with gas limit ``gas``; returns each
        one's gasUsed."""
        used: list[int] = []
        for start in range(0, len(txs), 250):
            chunk = txs[start : start + 250]
            sent = self.rpc.batch([
                ("eth_sendTransaction", [{"from": f, "to": t, "data": "0x" + d.hex(), "gas": hex(gas)}])
                for f, t, d in chunk
            ])
            hashes = self._check(sent, what)
            receipts = self._check(self.rpc.batch([("eth_getTransactionReceipt", [h]) for h in hashes]), what)
            for receipt in receipts:
                if int(receipt["status"], 16) != 1:  # pragma: no cover - a failed settlement transaction
                    raise ChainError(f"{what}: transaction {receipt['transactionHash']} failed")
                used.append(int(receipt["gasUsed"], 16))
        return used

    @staticmethod
    def _check(replies: list[dict[str, Any]], what: str) -> list[Any]:
        errors = [r["error"] for r in replies if "error" in r]
        if errors:
            raise ChainError(f"{what}: {len(errors)} of {len(replies)} failed, first: {errors[0]}")
        return [r["result"] for r in replies]


def _batch_gas_limit(entries: int) -> int:
    """Gas limit for a claimMany of ``entries`` (a first claim by a new holder measures ~60k per entry)."""
    return 70_000 * entries + 200_000


def settle_epochs(
    chain: Chain, rpc: JsonRpcSocket, providers: int, units: int, jobs: int, batch: int | None, log: Log
) -> tuple[dict[int, dict[str, int]], int]:
    """One fresh deployment settling two epochs at scale; returns each epoch's measured gas and the tree's depth.

    ``batch``: the operator pushes every provider's pay with ``claimMany`` in batches of ``batch`` accounts; None:
    every provider sends its own ``claim``. Epoch 1 is everyone's first claim (new holders); epoch 2 the steady
    state."""
    operator, customer, treasury = chain.dev_accounts(3)
    deployment: Deployment = deploy(
        chain, operator, supply=SUPPLY, treasury=treasury.address, dispute_window_s=DISPUTE_WINDOW_S
    )
    distributor, escrow = deployment.distributor, deployment.escrow
    assert distributor is not None
    op = GridMintContracts(chain, deployment, operator)
    op.transfer(customer.address, 10**27)
    people = synthetic_accounts(providers, "bench-provider")
    # each bound to its customer, as JobEscrow requires of a new job id (protocol.jobs)
    job_ids = [job_id_bytes(customer.address, keccak(text=f"bench-job-{j}")[:RANDOM_BYTES]) for j in range(jobs)]
    job_of = {p: i % jobs for i, p in enumerate(people)}  # each provider works on one job
    earned = {p: PRICE_PER_UNIT * units for p in people}  # per epoch
    batch_of_job = [sum(v for p, v in earned.items() if job_of[p] == j) for j in range(jobs)]

    sender = Impersonator(rpc)
    if batch is None:
        sender.fund_gas(people)  # each provider sends its own claim
    # The customer funds every job for both epochs (not settlement gas).
    sender.send([(customer.address, deployment.token, calldata("approve(address,uint256)", escrow, 2**256 - 1))],
                "approve")
    sender.send([(customer.address, escrow, calldata("fund(bytes32,uint256)", job, 2 * amount))
                 for job, amount in zip(job_ids, batch_of_job)], "fund")
    how = "individual claims" if batch is None else f"claimMany pushes of {batch}"
    log(f"  [{how}] {providers:,} providers x {units} units on {jobs} jobs funded; settling two epochs")

    cumulative: dict[str, int] = {}
    out: dict[int, dict[str, int]] = {}
    for epoch in (1, 2):
        batch_id = keccak(text=f"bench-batch-{epoch}")
        releases = sender.send([(operator.address, escrow, calldata("releaseToPool(bytes32,bytes32,uint256)", job,
                                                                    batch_id, amount))
                                for job, amount in zip(job_ids, batch_of_job)], "releaseToPool")
        cumulative = {p: cumulative.get(p, 0) + v for p, v in earned.items()}
        tree = build_payout_tree(cumulative)
        (post,) = sender.send([(operator.address, distributor, calldata("postRoot(uint256,bytes32,uint256)", epoch,
                                                                        tree.root, tree.total))], "postRoot")
        chain.advance_time(DISPUTE_WINDOW_S)
        if batch is None:
            claims = sender.send([(p, distributor, calldata("claim(uint256,uint256,bytes32[])", epoch, cumulative[p],
                                                            tree.proof(p)))
                                  for p in people], "claim")
        else:
            chunks = [people[i : i + batch] for i in range(0, len(people), batch)]
            claims = [
                sender.send([(operator.address, distributor, calldata(
                    "claimMany(uint256,address[],uint256[],bytes32[][])", epoch, chunk,
                    [cumulative[p] for p in chunk], [tree.proof(p) for p in chunk]))], "claimMany",
                    gas=_batch_gas_limit(len(chunk)))[0]
                for chunk in chunks
            ]
        total = sum(releases) + post + sum(claims)
        out[epoch] = {"releases": sum(releases), "release_each": int(statistics.mean(releases)), "post": post,
                      "claims": sum(claims), "claim_txs": len(claims), "claim_tx_max": max(claims),
                      "claim_per_account": int(sum(claims) / providers), "total": total}
        log(f"  epoch {epoch}: {jobs} releaseToPool {sum(releases):,} + postRoot {post:,} + {len(claims):,} claim "
            f"transactions {sum(claims):,} ({out[epoch]['claim_per_account']:,} per provider) = {total:,} gas "
            f"= {total / (providers * units):,.1f} per work unit")
    if op.balance_of(distributor) != 0:  # pragma: no cover - every deposited token was claimed
        raise ChainError(f"distributor still holds {op.balance_of(distributor)} after every claim")
    return out, tree.depth


def measure_epochs(
    chain: Chain, rpc: JsonRpcSocket, providers: int, units: int, jobs: int, batch: int, log: Log
) -> dict[str, Any]:
    block_gas_limit = int(rpc.call("eth_getBlockByNumber", ["latest", False])["gasLimit"], 16)
    cap = min(block_gas_limit, TX_GAS_CAP)
    if _batch_gas_limit(batch) > cap:
        raise GridMintValueError(f"--batch {batch} needs a {_batch_gas_limit(batch):,} gas limit per transaction "
                                 f"in the worst case (first claims), above {cap:,}")
    pushed, depth = settle_epochs(chain, rpc, providers, units, jobs, batch, log)
    pulled, _ = settle_epochs(chain, rpc, providers, units, jobs, None, log)
    work = providers * units
    steady, ind = pushed[2], pulled[2]

    def per_unit(figures: dict[str, int]) -> dict[str, float]:
        return {k: round(figures[k] / work, 1) for k in ("claims", "releases", "post")}

    every_10 = ind["releases"] + ind["post"] + ind["claims"] // 10
    push, pull = per_unit(steady), per_unit(ind)
    return {
        "gas_per_work_unit": round(steady["total"] / work, 1),
        "gas_per_work_unit_mode": f"batched push payout: the operator pays every provider with claimMany, "
                                  f"{batch} accounts per transaction",
        "gas_per_work_unit_breakdown": push,
        "gas_per_work_unit_first_epoch": round(pushed[1]["total"] / work, 1),
        "gas_per_work_unit_individual_claims": round(ind["total"] / work, 1),
        "gas_per_work_unit_individual_claims_breakdown": pull,
        "gas_per_work_unit_individual_claims_first_epoch": round(pulled[1]["total"] / work, 1),
        "gas_per_work_unit_claim_every_10_epochs": round(every_10 / work, 1),
        "claim_batch_size": batch,
        "claim_batch_txs_per_epoch": steady["claim_txs"],
        "claim_batch_gas": steady["claim_tx_max"],
        "claim_batch_gas_first_epoch": pushed[1]["claim_tx_max"],
        "claim_batch_gas_per_account": steady["claim_per_account"],
        "claim_batch_gas_per_account_first_epoch": pushed[1]["claim_per_account"],
        "block_gas_limit": block_gas_limit,
        "gas_per_work_unit_note": (
            f"gas_per_work_unit is the batched push payout, how the marketplace pays: per epoch {jobs} "
            f"releaseToPool ({push['releases']} gas per unit), one postRoot ({push['post']}), and "
            f"{steady['claim_txs']} claimMany transactions of up to {batch} providers each ({push['claims']}; "
            f"{steady['claim_per_account']:,} gas per provider paid, the 21,000 base shared by the batch: the proof's "
            f"{depth} hashes in calldata, the claimed-so-far update, the token transfer and two events). The largest "
            f"batch used {steady['claim_tx_max']:,} gas in the steady state and {pushed[1]['claim_tx_max']:,} in "
            f"the first epoch (every account a new holder), against a {block_gas_limit:,} block gas limit. "
            f"gas_per_work_unit_individual_claims is the same epoch with every provider sending its own claim "
            f"({pull['claims']} per unit for claims: {ind['claim_per_account']:,} gas each, 21,000 of it the "
            f"transaction base, so {providers:,} claims per {work:,} units cannot go below "
            f"~{21_000 * providers / work:.0f} per unit); claim_every_10_epochs derives from it with a tenth of the "
            f"providers claiming per epoch."
        ),
        "epoch_gas": steady,
        "epoch_gas_first": pushed[1],
        "epoch_gas_individual_claims": ind,
        "epoch_gas_individual_claims_first": pulled[1],
        "gas_per_work_unit_assumptions": (
            f"{providers:,} providers x {units} work units per epoch = {work:,} units; {jobs} jobs per epoch, "
            f"each releasing one batch (releaseToPool) per epoch; one postRoot over a {providers:,}-leaf tree; every "
            f"provider paid every epoch. Headline = epoch 2 of a deployment where the operator pushes with claimMany "
            f"(providers were paid before and hold GMT); first_epoch = epoch 1 (every provider a new holder). "
            f"individual_claims = the same two epochs on a second deployment where each provider claims itself. "
            f"Job funding is the customer's, not counted. All gas is measured receipts' gasUsed."
        ),
    }


# ---------------------------------------------------------------- 3. the invariant campaign


def run_invariants(chain: Chain, ops: int, seed: int, probe_ops: int, log: Log) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    if probe_ops > 0:
        log(f"  probing the in-process (py-evm) rate with {probe_ops} ops...")
        probe = Harness(Chain.in_process())
        started = time.perf_counter()
        probe_stats = run_campaign(probe, probe_ops, seed=seed + 1)
        rate = probe_stats.ops / (time.perf_counter() - started)
        figures["invariant_ops_per_s_in_process"] = round(rate, 1)
        figures["invariant_probe_violations"] = len(probe_stats.violations)
        log(f"  py-evm: {rate:.1f} ops/s")

    h = Harness(chain)
    started = time.perf_counter()
    step = max(ops // 10, 1)

    def progress(done: int) -> None:
        if done % step == 0:
            elapsed = time.perf_counter() - started
            log(f"  {done:,}/{ops:,} ops, {len(h.stats.violations)} violations, {done / elapsed:.0f} ops/s")

    stats = run_campaign(h, ops, seed=seed, on_progress=progress)
    wall = time.perf_counter() - started
    figures.update({
        "invariant_ops": stats.ops,
        "invariant_violations": len(stats.violations),
        "invariant_backend": "hardhat (RpcDriver)",
        "invariant_ops_per_s": round(stats.ops / wall, 1),
        "invariant_wall_s": round(wall, 1),
        "invariant_seed": seed,
        "invariant_transactions": stats.transactions,
        "invariant_reverts_predicted": stats.reverts_expected,
        "invariant_full_checks": stats.checks,
        "invariant_succeeded": dict(sorted(stats.succeeded.items())),
    })
    if stats.violations:
        figures["invariant_first_violations"] = stats.violations[:5]
    return figures


def main(argv: list[str]) -> int:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(
        prog="gridmint bench settlement", description=doc.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc.split("\n\n", 1)[-1],
    )
    p.add_argument("--ops", type=int, default=20_000, help="invariant campaign operations (the issue's bar: 100,000)")
    p.add_argument("--seed", type=int, default=0, help="campaign RNG seed")
    p.add_argument("--probe-ops", type=int, default=150, help="ops for the in-process rate probe (0: skip)")
    p.add_argument("--leaves", type=int, default=1024, help="leaves of the claim tree")
    p.add_argument("--epochs", type=int, default=10, help="epochs one claim covers")
    p.add_argument("--providers", type=int, default=1000, help="providers per epoch (one leaf and claim each)")
    p.add_argument("--units", type=int, default=100, help="work units per provider per epoch")
    p.add_argument("--jobs", type=int, default=100, help="jobs per epoch (one releaseToPool batch each)")
    p.add_argument("--batch", type=int, default=CLAIM_BATCH,
                   help="providers paid per claimMany transaction in the batched push payout (the headline)")
    p.add_argument("--node-url", help="use this running Hardhat node (its dev accounts unlocked) instead of starting one")
    a = p.parse_args(argv)
    if a.leaves < 4 or a.epochs < 1 or a.providers < 1 or a.jobs < 1 or a.units < 1 or a.batch < 1:
        p.error("--leaves >= 4 and --epochs, --providers, --jobs, --units, --batch >= 1")
    if _batch_gas_limit(a.batch) > TX_GAS_CAP:
        p.error(f"--batch {a.batch} could need {_batch_gas_limit(a.batch):,} gas per transaction, above {TX_GAS_CAP:,}")

    def log(text: str) -> None:
        print(text, flush=True)

    started = time.perf_counter()
    figures: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        url = a.node_url
        if url is None:
            log("starting a Hardhat node...")
            url = stack.enter_context(HardhatNode()).url
        chain = Chain.http(url)
        rpc = JsonRpcSocket(url)
        stack.callback(rpc.close)
        log(f"1. claims and roots ({a.leaves:,} leaves, one claim covering {a.epochs} epochs)")
        figures.update(measure_claims(chain, a.leaves, a.epochs, log))
        log(f"2. an epoch's settlement ({a.providers:,} providers x {a.units} units, {a.jobs} jobs): pushed with "
            f"claimMany in batches of {a.batch}, then claimed one by one")
        figures.update(measure_epochs(chain, rpc, a.providers, a.units, a.jobs, a.batch, log))
        log(f"3. invariant campaign ({a.ops:,} ops, seed {a.seed})")
        figures.update(run_invariants(chain, a.ops, a.seed, a.probe_ops, log))
    figures["targets"] = TARGETS
    figures["meets_targets"] = {
        "claim_gas": figures["claim_gas"] <= TARGETS["claim_gas"],
        "root_post_gas": figures["root_post_gas"] <= TARGETS["root_post_gas"],
        "gas_per_work_unit": figures["gas_per_work_unit"] <= TARGETS["gas_per_work_unit"],
        "invariant_violations": figures["invariant_violations"] == 0,
        "invariant_ops_100k": figures["invariant_ops"] >= 100_000,
    }
    figures["gas_measured_on"] = "Hardhat node (EDR), contracts compiled for cancun, optimizer 200 runs"
    figures["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(figures))
    return 0 if figures["invariant_violations"] == 0 else 1
