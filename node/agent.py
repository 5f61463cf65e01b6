"""The provider agent: benchmark, stake, advertise, pull work, train with proof-of-training, submit, claim pay.

Everything it sends is signed by its wallet. It trains deterministically, so any verifier can replay any segment.
"""
from __future__ import annotations

import signal
import tempfile
import threading
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import httpx
from eth_account.signers.local import LocalAccount
from pydantic import ValidationError
from rich.console import Console

from ledger.evm import Chain, Deployment, GridMintContracts
from node import checkpoint, crosscheck
from node.client import UNREACHABLE, MarketClient, MarketError
from node.crosscheck import Plan
from node.device import benchmark, local_plan, plan_build, probe
from node.keepalive import beat_interval, beating
from node.trainer import (UnitResult, UnitSpec, check_market_recipe, check_recipe, checkpoint_metadata, model_only,
                          state_hash, train_unit)
from protocol.errors import GridMintError, GridMintValueError
from protocol.money import format_tokens
from protocol.schemas import ProviderRegister
from protocol.signing import sign_typed, to_bytes32

console = Console(stderr=True)

#: How long a refused claim (distributor paused, root voided, no gas) waits before the next try.
RETRY_S = 60.0


@dataclass
class AgentConfig:
    marketplace: str
    chain_url: str
    region: str
    price: int  # ask per work unit, base units
    stake: int  # base units to keep staked
    capacity: int = 1
    poll_s: float = 0.5
    exit_when_idle_s: float | None = None  # stop after this long with no work (demo / batch use)
    adversary: str | None = None  # dishonest training strategy, for demos and the adversary suite only
    plan: str = "cpu"  # execution plan (node.crosscheck.Plan): "cpu" replays bit for bit anywhere; "cuda", "cpu/mb2" ...
    retry_s: float = RETRY_S  # wait after a refused claim before trying again


def contracts_for(client: MarketClient, chain_url: str, account: LocalAccount) -> GridMintContracts:
    cfg = client.config
    deployment = Deployment(chain_id=int(cfg["chain_id"]), token=cfg["token"], staking=cfg["staking"],
                            escrow=cfg["escrow"], treasury=cfg["treasury"], distributor=cfg.get("distributor"))
    return GridMintContracts(Chain.http(chain_url), deployment, account)


def claim_owed(client: MarketClient, contracts: GridMintContracts, say: Callable[[str], None]) -> int:
    """Collect everything ``client``'s account is owed — a provider's units, a verifier's check fees: the epoch
    payout pool (one claim with the newest claimable root's proof pays every epoch since the last claim) and any
    per-unit escrow credit. Returns base units received; 0 if none.

    Idempotent: the distributor pays ``cumulative - claimed``, so a repeated claim sends nothing."""
    got = 0
    p = client.payout()
    cumulative = int(p["cumulative"])
    if p["epoch"] and cumulative > int(p["claimed"]):
        proof = [bytes.fromhex(x[2:]) for x in p["proof"]]
        paid = contracts.claim_payout(int(p["epoch"]), cumulative, proof)
        if paid:
            say(f"claimed {paid} base units from payout epoch {p['epoch']}")
        got += paid
    if contracts.claimable(client.account.address):
        paid = contracts.claim()
        say(f"claimed {paid} base units of per-unit escrow credit")
        got += paid
    return got


class Claims:
    """An idle agent's claims (:func:`claim_owed`), made so that none ends the agent: a claim the chain refuses (the
    distributor paused by the guardian, a root voided, a wallet out of gas) or cannot be sent is said and tried again
    after ``retry_s``. The agent must stay up: a dispute over its work may yet ask it to reveal a state, and one left
    unanswered costs its stake. Nothing is lost by waiting: the distributor pays ``cumulative - claimed``."""

    def __init__(self, claim: Callable[[], int], say: Callable[[str], None], retry_s: float = RETRY_S) -> None:
        self.claim, self.say, self.retry_s = claim, say, retry_s
        self._next = 0.0  # time.monotonic() of the next try

    def __call__(self) -> int:
        """Claim now unless the last try failed less than ``retry_s`` ago; base units received (0 if none or failed)."""
        if time.monotonic() < self._next:
            return 0
        try:
            return self.claim()
        except (GridMintError, *UNREACHABLE) as exc:
            self.say(f"[yellow]claim failed, trying again in {self.retry_s:g} s: {exc}[/]")
            self._next = time.monotonic() + self.retry_s
            return 0


class UnitWithdrawn(GridMintError):
    """The marketplace took back the unit being trained (its deadline passed, or a heartbeat was missed): training it
    further would earn nothing."""


class Stopper:
    def __init__(self) -> None:
        self.stop = False
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, *_: Any) -> None:
        self.stop = True


class ProviderAgent:
    def __init__(self, cfg: AgentConfig, account: LocalAccount, workdir: Path | None = None,
                 contracts: GridMintContracts | None = None) -> None:
        self.cfg = cfg
        self.account = account
        self.client = MarketClient(cfg.marketplace, account)
        self.contracts = contracts or contracts_for(self.client, cfg.chain_url, account)
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="gridmint-node-"))
        self.claims = Claims(lambda: self.claim(), self.say, cfg.retry_s)
        self.plan = local_plan(Plan.parse(cfg.plan))  # a GPU plan names this machine's GPU model
        self.build = plan_build(self.plan)  # with which kernels it trains: its work replays bit for bit on these only
        # on the plan it declares when it submits (self.plan, read at training time)
        self.trainer: Callable[..., UnitResult] = lambda spec, start, workdir: train_unit(
            spec, start, workdir, plan=self.plan, on_step=self._between_steps)
        # a referee's request to reveal a state, seen by the heartbeat thread while a unit trains; answered by the
        # training thread between two steps (a long unit must not outlast the reveal deadline)
        self._ask: dict[str, Any] | None = None
        self._ask_lock = threading.Lock()
        # the training thread's progress, reported by the heartbeat thread; and why the marketplace took the unit
        # back, if it did (the training thread stops at the next step)
        self._steps = 0
        self._withdrawn: str | None = None
        if cfg.adversary:  # a cheat trains its own way, whatever plan it declares
            from node.adversary import ADVERSARIES, trains_on_its_plan

            cheat = ADVERSARIES[cfg.adversary]
            self.trainer = ((lambda spec, start, workdir: cheat(spec, start, workdir, plan=self.plan))
                            if trains_on_its_plan(cheat) else cheat)

    def say(self, msg: str) -> None:
        console.print(f"[dim]{self.account.address[:10]}[/] {msg}")

    def setup(self) -> dict[str, Any]:
        check_market_recipe(self.client.config.get("recipe"))  # before anything is staked
        devices = self.client.config.get("referee_devices", ["cpu"])
        if self.plan.device not in devices:
            raise GridMintValueError(f"plan {self.plan.label!r} trains on {self.plan.device}, but this marketplace's "
                                     f"referee replays on {', '.join(devices)} only: it could not settle a dispute")
        have = self.contracts.stake_of(self.account.address)
        dev = probe()
        tps = benchmark(seconds=0.5)
        offer = {"region": self.cfg.region, "gpu": dev.name, "vram_mb": dev.vram_mb, "price": str(self.cfg.price),
                 "tokens_per_s": tps, "capacity": self.cfg.capacity}
        self._check_offer(max(have, self.cfg.stake), offer)  # what the marketplace would refuse: before staking
        if have < self.cfg.stake:
            self.contracts.stake(self.cfg.stake - have)
        reg = self.client.register(**offer)
        self.say(f"registered in {self.cfg.region}: {dev.kind} {dev.name}, {tps:,} tok/s, stake {reg['stake']}")
        return reg

    def _check_offer(self, stake: int, offer: dict[str, Any]) -> None:
        """The registration ``offer`` as the marketplace's schema takes it (capacity 1-64, ...), and its region, ask
        and ``stake`` (what it will have staked) against the marketplace's ``/config``: a typo found after staking
        would leave the stake locked for the unbonding delay."""
        try:
            ProviderRegister.model_validate(offer)
        except ValidationError as exc:
            bad = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False))
            raise GridMintValueError(f"the marketplace would refuse this offer ({bad})") from None
        cfg = self.client.config
        regions = cfg.get("regions") or {}
        if regions and self.cfg.region not in regions:
            raise GridMintValueError(f"unknown region {self.cfg.region!r}: this marketplace has {', '.join(sorted(regions))}")
        floor = int(regions.get(self.cfg.region, {}).get("floor_per_unit", 0))
        if self.cfg.price < floor:
            raise GridMintValueError(f"price {format_tokens(self.cfg.price)} per unit is below the "
                                     f"{self.cfg.region} floor of {format_tokens(floor)}")
        least = int(cfg.get("min_stake", 0))
        if stake < least:
            raise GridMintValueError(f"stake {format_tokens(stake)} is below this marketplace's minimum of "
                                     f"{format_tokens(least)}: providers get work only while staking that much")

    def work_once(self) -> bool:
        """Pull, train and submit one unit. Returns False if there was no work."""
        work = self.client.next_work()
        if work is None:
            return False
        spec = UnitSpec.from_json(work["spec"])
        check_recipe(spec, work.get("spec_hash"))  # another version's commitments would be refused
        unit_dir = self.workdir / spec.unit_id[2:14]
        unit_dir.mkdir(parents=True, exist_ok=True)
        start_path = self.client.get_blob(work["start_blob"], unit_dir / "start.safetensors")
        start, _ = checkpoint.load(start_path)
        self._steps, self._withdrawn = 0, None
        if work.get("due"):
            self.say(f"training unit {spec.unit_id[:10]}: {spec.steps} steps, due in {int(work['due']) - int(time.time())} s")
        with self.heartbeats(spec.unit_id):
            try:
                result = self.trainer(spec, model_only(start), unit_dir)
            except UnitWithdrawn as exc:
                self.say(f"[yellow]stopped training unit {spec.unit_id[:10]} after {self._steps} steps: {exc}[/]")
                return True
            if self._withdrawn is not None:  # taken back as the last step ended: uploading would earn nothing
                self.say(f"[yellow]not submitting unit {spec.unit_id[:10]}: {self._withdrawn}[/]")
                return True
            segment_blobs = [self.client.put_blob(p) for p in result.segment_paths]
            final_blob = self.client.put_blob(result.final_path)
        signature = sign_typed(self.account, "TrainingProof", self.client.domain, result.proof.signable_fields())
        self.client.submit(spec.unit_id, {
            "unit_id": spec.unit_id, "proof": result.proof.to_dict(), "proof_signature": signature,
            "final_blob": final_blob, "segment_blobs": segment_blobs, "losses": [float(x) for x in result.losses],
            "plan": self.plan.label, "build": self.build})
        self.say(f"submitted unit {spec.unit_id[:10]} (round {spec.round}, shard {spec.shard}):"
                 f" loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}")
        return True

    def reveal_once(self) -> bool:
        """Answer a referee bisecting a dispute over one of our segments: re-derive the training state before the
        asked step from the segment's committed start, on the plan the unit was trained on (deterministic there),
        upload it and sign (unit, step, state hash). Returns False if nothing was asked."""
        ask = self.client.next_reveal()
        if ask is None:
            return False
        self._reveal(ask)
        return True

    def _reveal(self, ask: dict[str, Any], where: str = "") -> None:
        self.client.reveal(self.answer(ask))
        self.say(f"revealed unit {ask['unit_id'][:10]} state before step {ask['step']} ({ask['plan']}) for a dispute"
                 f"{where}")

    def answer(self, ask: dict[str, Any]) -> dict[str, Any]:
        """The signed reveal body for a referee's ``ask`` (from ``/reveals/next``); uploads the state's checkpoint."""
        spec, step, seg = UnitSpec.from_json(ask["spec"]), int(ask["step"]), int(ask["segment"])
        check_recipe(spec, ask.get("spec_hash"))  # re-derived on another version, the state would not chain
        plan = Plan.parse(ask["plan"])
        rdir = self.workdir / "reveals"
        rdir.mkdir(parents=True, exist_ok=True)
        start, _ = checkpoint.load(self.client.get_blob(ask["checkpoint_blob"], rdir / f"{ask['checkpoint_blob']}.safetensors"))
        state = crosscheck.Revealer(spec, crosscheck.PlanRunner(spec, start, plan), {seg: start})(step)
        path = rdir / f"{spec.unit_id[2:14]}-{step}.safetensors"
        checkpoint.save(path, state, checkpoint_metadata(spec, seg))
        blob, h = self.client.put_blob(path), state_hash(state)
        signature = sign_typed(self.account, "Reveal", self.client.domain,
                               {"unitId": to_bytes32(spec.unit_id), "step": step, "stateHash": to_bytes32(h)})
        return {"verification_id": ask["verification_id"], "step": step, "state_hash": h, "blob": blob,
                "signature": signature}

    def _between_steps(self, step: int, loss: float) -> None:
        """Called by the trainer after every optimizer step, on the training thread: answer a reveal the heartbeat
        thread saw. The replay nests in the trainer's deterministic block (same thread, reentrant lock; torch's
        thread count and flags are restored) and touches none of the unit's tensors: its bits do not change. Stops
        the unit (:class:`UnitWithdrawn`) once the marketplace has taken it back."""
        self._steps = step + 1
        if self._withdrawn is not None:
            raise UnitWithdrawn(self._withdrawn)
        if self._ask is None:  # the common case: no lock taken
            return
        with self._ask_lock:
            ask, self._ask = self._ask, None
        if ask is None:
            return
        try:
            self._reveal(ask, f", between steps {step} and {step + 1} of the unit in training")
        except (MarketError, httpx.HTTPError) as exc:  # asked again after this unit (reveal_once), if still open
            self.say(f"[yellow]reveal during training failed: {exc}[/]")

    def heartbeats(self, unit_id: str) -> AbstractContextManager[None]:
        """Tell the marketplace we are alive every quarter of its deadline (at most every 15 s) while the block runs;
        a provider that goes silent past ``unit_timeout_s`` loses the unit to a standby, and so does one that has not
        submitted it by its deadline. Each beat reports the steps trained so far; a beat the marketplace refuses
        because the unit is no longer ours (409) stops the training at its next step."""

        def beat() -> bool:
            try:
                try:
                    self.client.heartbeat(unit_id, self._steps)
                except MarketError as exc:
                    if exc.status != 409:
                        raise
                    self._withdrawn = f"the marketplace took it back ({exc.detail})"
                    return False
                if self._ask is None:
                    ask = self.client.next_reveal()
                    with self._ask_lock:
                        self._ask = self._ask or ask
            except (MarketError, httpx.HTTPError) as exc:  # the next beat (or the submission) will tell
                self.say(f"[yellow]heartbeat failed: {exc}[/]")
            return True

        return beating(beat_interval(int(self.client.config.get("unit_timeout_s", 120))), beat)

    def claim(self) -> int:
        """Collect everything owed (:func:`claim_owed`). Returns base units received; 0 if none."""
        return claim_owed(self.client, self.contracts, self.say)

    def _work_open(self) -> bool:
        """Whether units of ours are submitted and not yet verified: a referee may still ask us to reveal a state
        (a provider silent past its deadline loses the dispute), so an idle node does not exit before they are."""
        try:
            open_units = int(self.client.provider()["unverified"])
        except (MarketError, *UNREACHABLE) as exc:
            self.say(f"[yellow]cannot tell whether work is still open ({exc}); staying up[/]")
            return True
        if open_units:
            self.say(f"{open_units} unit(s) not yet verified: staying up to answer any dispute")
        return open_units > 0

    def run(self) -> str | None:
        """Work until stopped (a signal), idle (``exit_when_idle_s``, nothing of its own open), or slashed: then
        the marketplace's word is returned (and said), so a caller can exit with a failure status. A refused claim
        does not end it (:class:`Claims`): a node gone while its units are unverified cannot answer the reveals that
        decide its stake."""
        stopper = Stopper()
        self.setup()
        idle_since = time.monotonic()
        while not stopper.stop:
            try:
                worked = self.reveal_once() or self.work_once()
            except MarketError as exc:
                if exc.status == 409 and "slashed" in str(exc.detail):
                    self.say(f"[red]{exc.detail}[/]")
                    return str(exc.detail)
                self.say(f"[yellow]marketplace refused: {exc}[/]")
                worked = False
            except UNREACHABLE as exc:  # a restart or a dropped link: try again later
                self.say(f"[yellow]unreachable, retrying in {self.cfg.poll_s:g} s: {exc}[/]")
                worked = False
            if worked:
                idle_since = time.monotonic()
                continue
            self.claims()
            if self.cfg.exit_when_idle_s is not None and time.monotonic() - idle_since > self.cfg.exit_when_idle_s:
                if self._work_open():
                    idle_since = time.monotonic()  # stay up: a dispute may yet ask this node to reveal a state
                else:
                    return None
            time.sleep(self.cfg.poll_s)
        return None
