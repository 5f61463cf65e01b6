"""The provider agent: benchmark, stake, advertise, pull work, train with proof-of-training, submit, claim pay.

Everything it sends is signed by its wallet. It trains deterministically, so any verifier can replay any segment.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import threading
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, TypeVar

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
from node.trainer import (PROGRESS_FILE, UnitResult, UnitSpec, check_market_recipe, check_recipe, checkpoint_metadata,
                          fit_micro_batches, model_only, state_hash, train_unit)
from protocol.errors import GridMintError, GridMintValueError
from protocol.money import format_tokens
from protocol.proof import TrainingProof
from protocol.schemas import ProviderRegister
from protocol.signing import sign_typed, to_bytes32
from protocol.verification import provider_min_stake

console = Console(stderr=True)
T = TypeVar("T")

#: How long a refused claim (distributor paused, root voided, no gas) or a failed disk write waits before the next try.
RETRY_S = 60.0
#: The most a failed upload or submission waits before its next try (it doubles from 1 s up to this).
MAX_BACKOFF_S = 30.0
#: What a kept, trained unit is named by in its directory (see ProviderAgent._keep).
RESULT_FILE = "result.json"
_UNIT_DIR = re.compile(r"[0-9a-fA-F]{12}")  # a unit's directory: unit_id[2:14]


def _same_ask(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two reveal requests ask for one state (the same dispute's same step)."""
    return (a.get("verification_id"), a.get("step")) == (b.get("verification_id"), b.get("step"))


def default_workdir(address: str) -> Path:
    """Where a wallet's node keeps its units: the same on every start, so a restarted node finds a unit it trained
    and had not handed in yet (and a second start leaves no second directory behind)."""
    return Path.home() / ".gridmint" / "work" / address


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
    retry_s: float = RETRY_S  # wait after a refused claim or a full disk before trying again


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
            say(f"claimed {format_tokens(paid)} from payout epoch {p['epoch']}")
        got += paid
    if contracts.claimable(client.account.address):
        paid = contracts.claim()
        say(f"claimed {format_tokens(paid)} of per-unit escrow credit")
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


class Stopped(GridMintError):
    """The owner asked the node to stop (Ctrl-C, SIGTERM) while it trained or handed in a unit."""


class Stopper:
    """SIGINT and SIGTERM as a flag that an agent reads between training steps, between tries of a hand-in and
    between units, so it stops promptly and cleanly (a trained result stays on disk for the next start). The first
    signal puts the previous handlers back: a second one stops the process at once. Use as a context manager (or
    call :meth:`close`) to put them back when the agent returns."""

    def __init__(self, say: Callable[[str], None] | None = None) -> None:
        self.stop = False
        self._say = say
        self._prev = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, *_: Any) -> None:
        self.stop = True
        self.close()
        if self._say is not None:
            self._say("[yellow]stopping (a second signal stops at once)[/]")

    def close(self) -> None:
        for sig, handler in self._prev.items():
            signal.signal(sig, handler)

    def __enter__(self) -> Stopper:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class ProviderAgent:
    def __init__(self, cfg: AgentConfig, account: LocalAccount, workdir: Path | None = None,
                 contracts: GridMintContracts | None = None) -> None:
        self.cfg = cfg
        self.account = account
        self.client = MarketClient(cfg.marketplace, account)
        self.contracts = contracts or contracts_for(self.client, cfg.chain_url, account)
        self.workdir = workdir or default_workdir(account.address)
        self.stopper: Stopper | None = None  # set while run() runs: read between steps (see _between_steps)
        self.claims = Claims(lambda: self.claim(), self.say, cfg.retry_s)
        self._work_after = 0.0  # time.monotonic() before which no new unit is pulled (after a failed disk write)
        self.plan = local_plan(Plan.parse(cfg.plan))  # a GPU plan names this machine's GPU model
        self.build = plan_build(self.plan)  # with which kernels it trains: its work replays bit for bit on these only
        # on the plan it declares when it submits (self.plan, read at training time)
        # with a progress journal: a unit stopped partway (a kill, a reboot, Ctrl-C) goes on from its last kept
        # segment when the node is started again before the unit's deadline
        self.trainer: Callable[..., UnitResult] = lambda spec, start, workdir: train_unit(
            spec, start, workdir, plan=self.plan_for(spec), on_step=self._between_steps, resume_as=self.build)
        # a referee's request to reveal a state, seen by the heartbeat thread while a unit trains; answered by the
        # training thread between two steps (a long unit must not outlast the reveal deadline)
        self._ask: dict[str, Any] | None = None
        self._ask_lock = threading.Lock()
        # the training thread's progress, reported by the heartbeat thread; and why the marketplace took the unit
        # back, if it did (the training thread stops at the next step)
        self._steps = 0
        self._first_step: int | None = None  # the first step the unit in training trained here (> 0: resumed)
        self._withdrawn: str | None = None
        if cfg.adversary:  # a cheat trains its own way, whatever plan it declares
            from node.adversary import ADVERSARIES, trains_on_its_plan

            cheat = ADVERSARIES[cfg.adversary]
            self.trainer = ((lambda spec, start, workdir: cheat(spec, start, workdir, plan=self.plan_for(spec)))
                            if trains_on_its_plan(cheat) else cheat)

    def say(self, msg: str) -> None:
        console.print(f"[dim]{self.account.address[:10]}[/] {msg}")

    def plan_for(self, spec: UnitSpec) -> Plan:
        """The plan this node trains ``spec`` on, as its result declares it: its own, unless the spec's batch does
        not split into its micro-batches (a customer's batch of 15 on a cpu/mb2 node: training stopped at the first
        step, and the node with it, on every restart, till the unit was reaped as its dropout). Then the micro-batches
        every machine splits that batch into for its plan (:func:`node.trainer.fit_micro_batches`)."""
        return replace(self.plan, micro_batches=fit_micro_batches(self.plan.micro_batches, spec.batch_size))

    def setup(self) -> dict[str, Any]:
        check_market_recipe(self.client.config.get("recipe"))  # before anything is staked
        devices = self.client.config.get("referee_devices", ["cpu"])
        if self.plan.device not in devices:
            raise GridMintValueError(f"plan {self.plan.label!r} trains on {self.plan.device}, but this marketplace's "
                                     f"referee replays on {', '.join(devices)} only: it could not settle a dispute")
        have = self.contracts.stake_of(self.account.address)
        dev = probe()
        if dev.kind == "cuda" and self.plan.device == "cpu":
            self.say(f"[yellow]this machine has a GPU ({dev.name}), but plan {self.plan.label!r} trains on the CPU: "
                     f"start with --plan cuda to train on the GPU[/]")
        tps = benchmark(seconds=0.5, device=self.plan.device)  # what the node will train at, on its plan's device
        mine = dev if dev.kind == self.plan.device else probe(self.plan.device)  # and the device and memory it has
        offer = {"region": self.cfg.region, "gpu": mine.name, "vram_mb": mine.vram_mb, "price": str(self.cfg.price),
                 "tokens_per_s": tps, "capacity": self.cfg.capacity}
        self._check_offer(max(have, self.cfg.stake), offer)  # what the marketplace would refuse: before staking
        if have < self.cfg.stake:
            self.contracts.stake(self.cfg.stake - have)
        reg = self.client.register(**offer)
        on = mine.name if mine.kind == "cuda" else self.plan.device
        self.say(f"registered in {self.cfg.region}: training on {on} (plan {self.plan.label}), {tps:,} tok/s, "
                 f"stake {format_tokens(int(reg['stake']))}")
        self._warn_open_kernels()
        return reg

    def _warn_open_kernels(self) -> list[str]:
        """Say, loudly, which of our units still open (``/providers/me``'s ``unverified_kernels``: a referee may yet
        ask for a state of them) were trained with other kernels than this machine computes their plan's work with
        now (a torch, CUDA or CPU changed since): a state re-derived here for a reveal is not the one committed to,
        and past the referee's one-step threshold it loses the dispute. Returns the warnings."""
        try:
            groups = self.client.provider().get("unverified_kernels") or []
        except (MarketError, *UNREACHABLE) as exc:
            self.say(f"[yellow]cannot tell which kernels our open units were trained with ({exc})[/]")
            return []
        out = []
        for g in groups:
            plan = Plan.parse(g["plan"])
            here = plan_build(plan)
            if g["build"] and g["build"] != here:
                out.append(f"{g['units']} unit(s) of ours on plan {plan.label}, still open (a dispute may ask for a "
                           f"state of them), were trained with kernels {g['build']}; this machine computes "
                           f"{plan.device} work with {here or 'nothing: no such device here'}. A state re-derived "
                           f"here is not the one committed to and can lose the dispute: run the kernels they were "
                           f"trained with (that torch, CUDA, CPU) until `gridmint node status` shows unverified 0")
        for warning in out:
            self.say(f"[red]{warning}[/]")
        return out

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
        units = int(cfg.get("stake_units", 0))  # (an older marketplace: its flat minimum only)
        least = provider_min_stake(self.cfg.price, int(cfg.get("min_stake", 0)), units)
        if stake < least:
            raise GridMintValueError(
                f"stake {format_tokens(stake)} is below the {format_tokens(least)} this marketplace asks of a "
                f"provider at a price of {format_tokens(self.cfg.price)} per unit (its minimum of "
                f"{format_tokens(int(cfg.get('min_stake', 0)))}, and {units} units at the price): providers get work "
                f"only while staking that much")

    def work_once(self) -> bool:
        """Pull, train and submit one unit. Returns False if there was no work.

        A unit trained before a restart (still ours: ``/work/next`` hands it out again) is handed in from its kept
        result (:meth:`_keep`), not trained again. Its files are removed once the marketplace has taken the result
        (a reveal re-derives a state from the segment's start blob, which the marketplace serves) or refused it."""
        work = self.client.next_work()
        if work is None:
            self._forget_units()
            return False
        spec = UnitSpec.from_json(work["spec"])
        check_recipe(spec, work.get("spec_hash"))  # another version's commitments would be refused
        unit_dir = self.workdir / spec.unit_id[2:14]
        # no deadline given (an older marketplace): an hour, the shortest a unit gets
        due = float(work.get("due") or time.time() + 3600)
        self._steps, self._first_step, self._withdrawn = 0, None, None
        kept = self._kept(spec, unit_dir)
        if kept is None:
            result = self._train(spec, work, unit_dir)
            if result is None:
                return True
            kept = self._keep(spec, unit_dir, result)
        else:
            self._steps = spec.steps
            self.say(f"unit {spec.unit_id[:10]} was trained before a restart: handing in its kept result")
        try:
            self._hand_in(spec, unit_dir, kept, due)
        except Stopped:
            self.say(f"[yellow]unit {spec.unit_id[:10]} not handed in yet: its result is kept under {unit_dir}, and a "
                     f"node started again before its deadline hands it in[/]")
            return True
        except UnitWithdrawn as exc:
            shutil.rmtree(unit_dir, ignore_errors=True)
            self.say(f"[yellow]not submitting unit {spec.unit_id[:10]}: {exc}[/]")
            return True
        except MarketError as exc:
            if exc.status < 500:  # refused, or no longer ours: nothing kept can earn anything
                shutil.rmtree(unit_dir, ignore_errors=True)
            raise
        shutil.rmtree(unit_dir, ignore_errors=True)
        losses = kept["losses"]
        resumed = f", resumed at step {self._first_step}" if self._first_step else ""
        self.say(f"submitted unit {spec.unit_id[:10]} (round {spec.round}, shard {spec.shard}{resumed}):"
                 f" loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        return True

    def _train(self, spec: UnitSpec, work: dict[str, Any], unit_dir: Path) -> UnitResult | None:
        """Train ``spec`` into ``unit_dir``; None if it was stopped (taken back, or a signal).

        A unit stopped by a signal keeps its files and progress journal (:data:`node.trainer.PROGRESS_FILE`): a node
        started again before the unit's deadline goes on from its last kept segment the journal vouches for, and so
        does one killed outright (an OOM kill, a reboot). A unit taken back loses its files, and so does one whose
        write failed (a full disk: the OSError goes on to run(), which says so)."""
        if (unit_dir / PROGRESS_FILE).exists():
            self.say(f"unit {spec.unit_id[:10]} was stopped partway before: going on from its last kept segment "
                     f"that checks out")
        else:
            shutil.rmtree(unit_dir, ignore_errors=True)  # a unit's files from before a restart, with no journal
        unit_dir.mkdir(parents=True, exist_ok=True)
        try:
            with self.alive():  # the unit is ours from its assignment: a long download must not lose it
                start_path = self.client.get_blob(work["start_blob"], unit_dir / "start.safetensors")
                start, _ = checkpoint.load(start_path)
            if work.get("due"):
                self.say(f"training unit {spec.unit_id[:10]}: {spec.steps} steps, due in "
                         f"{int(work['due']) - int(time.time())} s")
            if (plan := self.plan_for(spec)) != self.plan:
                self.say(f"[yellow]unit {spec.unit_id[:10]}'s batch of {spec.batch_size} does not split into "
                         f"{self.plan.micro_batches} micro-batches: trained on plan {plan.label}[/]")
            with self.heartbeats(spec.unit_id):
                result = self.trainer(spec, model_only(start), unit_dir)
        except (UnitWithdrawn, Stopped) as exc:
            why = ""
            if isinstance(exc, UnitWithdrawn) or not (unit_dir / PROGRESS_FILE).exists():
                shutil.rmtree(unit_dir, ignore_errors=True)
            if isinstance(exc, Stopped):
                why = (": the unit stays ours until its deadline, and a node started again before then "
                       + ("goes on from its last kept segment" if unit_dir.exists() else "trains it anew"))
            self.say(f"[yellow]stopped training unit {spec.unit_id[:10]} after {self._steps} of {spec.steps} steps:"
                     f" {exc}{why}[/]")
            return None
        except BaseException:
            shutil.rmtree(unit_dir, ignore_errors=True)
            raise
        if self._withdrawn is not None:  # taken back as the last step ended: uploading would earn nothing
            shutil.rmtree(unit_dir, ignore_errors=True)
            self.say(f"[yellow]not submitting unit {spec.unit_id[:10]}: {self._withdrawn}[/]")
            return None
        return result

    def _keep(self, spec: UnitSpec, unit_dir: Path, result: UnitResult) -> dict[str, Any]:
        """Write what handing in ``result`` needs to ``unit_dir/result.json`` (atomically, after its checkpoints):
        a node restarted before the marketplace took the result hands it in from there instead of training the unit
        again. The checkpoints' SHA-256 are kept with it, so a damaged file is found before it is uploaded."""
        files = [Path(p) for p in (*result.segment_paths, result.final_path)]
        kept = {"unit_id": spec.unit_id, "spec_hash": spec.spec_hash(), "plan": self.plan_for(spec).label,
                "build": self.build,
                "proof": result.proof.to_dict(), "losses": [float(x) for x in result.losses],
                "files": [[p.relative_to(unit_dir).as_posix(), checkpoint.file_sha256(p)] for p in files]}
        tmp = unit_dir / (RESULT_FILE + ".tmp")
        try:
            with open(tmp, "w") as f:
                json.dump(kept, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, unit_dir / RESULT_FILE)
        except OSError as exc:  # a full disk: handed in all the same, from memory
            tmp.unlink(missing_ok=True)
            self.say(f"[yellow]unit {spec.unit_id[:10]}'s result not kept on disk ({exc}): a restart before it is "
                     f"handed in would train it again[/]")
        return kept

    def _kept(self, spec: UnitSpec, unit_dir: Path) -> dict[str, Any] | None:
        """The result :meth:`_keep` wrote for ``spec``, if it is there whole and was trained by this node's version
        on its plan and kernels (what the submission declares); else None."""
        path = unit_dir / RESULT_FILE
        if not path.exists():
            return None
        try:
            kept = json.loads(path.read_text())
            why = next((f"its {k} was {kept.get(k)!r}" for k, want in (
                ("unit_id", spec.unit_id), ("spec_hash", spec.spec_hash()), ("plan", self.plan_for(spec).label),
                ("build", self.build)) if kept.get(k) != want), None)
            if why is None:
                bad = [name for name, sha in kept["files"] if checkpoint.file_sha256(unit_dir / name) != sha]
                why = f"{', '.join(bad)} changed on disk" if bad else None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            why = f"it cannot be read ({exc})"
        if why is None:
            return kept
        self.say(f"[yellow]training unit {spec.unit_id[:10]} again: the result kept from before cannot be used ({why})[/]")
        return None

    def _hand_in(self, spec: UnitSpec, unit_dir: Path, kept: dict[str, Any], due: float) -> None:
        """Upload the kept result's checkpoints and submit it, beating all along. A dropped link or a 5xx (the
        marketplace restarting) is tried again with backoff until ``due``: uploads are content-addressed (a repeat
        stores nothing twice) and a result is taken once (a repeat is a 409). A refusal (4xx) is raised at once."""
        names = [name for name, _ in kept["files"]]
        proof = TrainingProof.from_dict(kept["proof"])

        def between() -> None:  # a hand-in retried for long (a slow link) must not run a reveal past its deadline
            self._answer_asked(", while a unit's hand-in waits to be tried again")

        with self.heartbeats(spec.unit_id):
            blobs = [self._retry(f"upload of {name}", lambda name=name: self.client.put_blob(unit_dir / name), due,
                                 between, unit=True) for name in names]
            signature = sign_typed(self.account, "TrainingProof", self.client.domain, proof.signable_fields())
            body = {"unit_id": spec.unit_id, "proof": kept["proof"], "proof_signature": signature,
                    "final_blob": blobs[-1], "segment_blobs": blobs[:-1], "losses": kept["losses"],
                    "plan": kept["plan"], "build": kept["build"]}
            self._retry("submission", lambda: self.client.submit(spec.unit_id, body), due, between, unit=True)

    def _retry(self, what: str, send: Callable[[], T], due: float, between: Callable[[], None] | None = None,
               unit: bool = False) -> T:
        """``send()``, tried again after a dropped link or a 5xx, waiting 1, 2, 4 ... (at most MAX_BACKOFF_S) seconds
        while that leaves time before ``due`` (unix seconds); so is a refused nonce (another process signing with
        this wallet) and a 408 (an upload slower than the marketplace's body deadline: a slow link, maybe faster on
        the next try). Another 4xx, the unit in hand taken back (a heartbeat's 409; only where ``send`` is that
        unit's: ``unit``) or a stop request ends the tries. ``between()`` is called before each wait (a hand-in
        answers a reveal the heartbeats saw meanwhile)."""
        wait = 1.0
        while True:
            try:
                return send()
            except (MarketError, *UNREACHABLE) as exc:
                if isinstance(exc, MarketError) and exc.status < 500 and exc.status != 408 and not exc.replayed:
                    raise
                if unit and self._withdrawn is not None:  # (a reveal is another unit's: a review found a unit
                    # taken back before ended a later reveal's tries, and the agent with them)
                    raise UnitWithdrawn(self._withdrawn) from exc
                if time.time() + wait > due:
                    raise
                self.say(f"[yellow]{what} failed ({exc}); trying again in {wait:g} s[/]")
                if between is not None:
                    between()
                self._pause(wait)
                wait = min(2 * wait, MAX_BACKOFF_S)

    def _pause(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if the owner asks the node to stop (then :class:`Stopped`)."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self._check_stop()
            time.sleep(min(0.1, left))
        self._check_stop()

    def _check_stop(self) -> None:
        if self.stopper is not None and self.stopper.stop:
            raise Stopped("stopped on request (a signal)")

    def _forget_units(self) -> None:
        """Remove the directory of every unit: called when the marketplace assigns this node none, so each is a unit
        it lost (reaped while the node was down, taken back) and none will be handed in. Only unit directories (named
        by 12 hex digits of the unit id) are touched: a mistyped ``--workdir`` of the owner's loses nothing."""
        if self.workdir.is_dir():
            for d in self.workdir.iterdir():
                if d.is_dir() and _UNIT_DIR.fullmatch(d.name):
                    shutil.rmtree(d, ignore_errors=True)

    def reveal_once(self) -> bool:
        """Answer a referee bisecting a dispute over one of our segments: re-derive the training state before the
        asked step from the segment's committed start, on the plan the unit was trained on (deterministic there),
        upload it and sign (unit, step, state hash). Returns False if nothing was asked.

        The replay takes as long as a segment's training: the node beats meanwhile (:meth:`alive`), so a unit the
        marketplace assigns it in that time is not taken back from it as a silent dropout."""
        ask = self.client.next_reveal()
        if ask is None:
            return False
        with self._ask_lock:  # the heartbeats saw it too: answered here, not again between the next unit's steps
            if self._ask is not None and _same_ask(self._ask, ask):
                self._ask = None
        with self.alive():
            self._reveal(ask)
        return True

    def _reveal(self, ask: dict[str, Any], where: str = "") -> None:
        try:
            body = self.answer(ask)
            self._retry("reveal", lambda: self.client.reveal(body), self._reveal_due(ask))
        except MarketError as exc:
            # refused for good: the dispute may have moved on meanwhile (ruled on another segment's check, the unit
            # gone), and then its upload (a state of no unit held) or the reveal itself is refused; nothing is lost
            if exc.status >= 500 or self._still_asked(ask):
                raise
            self.say(f"[dim]unit {ask['unit_id'][:10]}: the state before step {ask['step']} is no longer asked for "
                     f"({exc})[/]")
            return
        self.say(f"revealed unit {ask['unit_id'][:10]} state before step {ask['step']} ({ask['plan']}) for a dispute"
                 f"{where}")

    def _still_asked(self, ask: dict[str, Any]) -> bool:
        """Whether the referee still waits for ``ask`` (the first open ask is it); a poll that fails says yes."""
        try:
            now = self.client.next_reveal()
        except (MarketError, httpx.HTTPError):
            return True
        return now is not None and _same_ask(now, ask)

    @staticmethod
    def _reveal_due(ask: dict[str, Any]) -> float:
        """Until when a reveal is worth sending (unix seconds): the ask's deadline, or a minute from now."""
        return float(ask.get("deadline") or time.time() + 60)

    def answer(self, ask: dict[str, Any]) -> dict[str, Any]:
        """The signed reveal body for a referee's ``ask`` (from ``/reveals/next``); uploads the state's checkpoint."""
        spec, step, seg = UnitSpec.from_json(ask["spec"]), int(ask["step"]), int(ask["segment"])
        check_recipe(spec, ask.get("spec_hash"))  # re-derived on another version, the state would not chain
        plan = Plan.parse(ask["plan"])
        rdir = self.workdir / "reveals"
        rdir.mkdir(parents=True, exist_ok=True)
        fetched, path = rdir / f"{ask['checkpoint_blob']}.safetensors", rdir / f"{spec.unit_id[2:14]}-{step}.safetensors"
        try:  # neither file is kept: the start is fetched and the state re-derived again if asked again
            start, _ = checkpoint.load(self.client.get_blob(ask["checkpoint_blob"], fetched))
            state = crosscheck.Revealer(spec, crosscheck.PlanRunner(spec, start, plan), {seg: start})(step)
            checkpoint.save(path, state, checkpoint_metadata(spec, seg))
            # a busy marketplace (every upload slot taken: 503), a slow link (408) or a dropped one is tried again
            # until the reveal's deadline: a new attempt would replay the segment again first
            blob = self._retry("reveal upload", lambda: self.client.put_blob(path), self._reveal_due(ask))
            h = state_hash(state)
        finally:
            path.unlink(missing_ok=True)
            fetched.unlink(missing_ok=True)
        signature = sign_typed(self.account, "Reveal", self.client.domain,
                               {"unitId": to_bytes32(spec.unit_id), "step": step, "stateHash": to_bytes32(h)})
        return {"verification_id": ask["verification_id"], "step": step, "state_hash": h, "blob": blob,
                "signature": signature}

    def _between_steps(self, step: int, loss: float) -> None:
        """Called by the trainer after every optimizer step, on the training thread: answer a reveal the heartbeat
        thread saw. The replay nests in the trainer's deterministic block (same thread, reentrant lock; torch's
        thread count and flags are restored) and touches none of the unit's tensors: its bits do not change. Stops
        the unit once the marketplace has taken it back (:class:`UnitWithdrawn`) or the owner asked the node to stop
        (:class:`Stopped`: a unit of hours must not hold a Ctrl-C until its end)."""
        self._steps = step + 1
        if self._first_step is None:
            self._first_step = step
        if self._withdrawn is not None:
            raise UnitWithdrawn(self._withdrawn)
        self._check_stop()
        self._answer_asked(f", between steps {step} and {step + 1} of the unit in training")

    def _answer_asked(self, where: str) -> None:
        """Answer the reveal the heartbeat thread saw, if any (between two training steps, or between two tries of a
        hand-in). One that fails is asked again after this unit (reveal_once), if still open."""
        if self._ask is None:  # the common case: no lock taken
            return
        with self._ask_lock:
            ask, self._ask = self._ask, None
        if ask is None:
            return
        try:
            self._reveal(ask, where)
        except (MarketError, httpx.HTTPError) as exc:
            self.say(f"[yellow]reveal{where} failed: {exc}[/]")

    def heartbeats(self, unit_id: str) -> AbstractContextManager[None]:
        """Tell the marketplace we are alive every quarter of its deadline (at most every 15 s) while the block runs;
        a provider that goes silent past ``unit_timeout_s`` loses the unit to a standby, and so does one that has not
        submitted it by its deadline. Each beat reports the steps trained so far; a beat the marketplace refuses
        because the unit is no longer ours (a 409 Conflict) stops the training at its next step. A beat whose nonce
        it refuses (also a 409: another process on this wallet) is only a missed beat."""

        def beat() -> bool:
            try:
                try:
                    self.client.heartbeat(unit_id, self._steps)
                except MarketError as exc:
                    if not exc.conflict:
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

    def alive(self) -> AbstractContextManager[None]:
        """Tell the marketplace we are alive while the block runs, with no unit in training (a reveal, a unit's
        start download, the idle loop's claims): a beat with no unit refreshes every unit assigned to this node,
        so none is taken back as a silent dropout before the node gets to it. A refused or failed beat is said."""

        def beat() -> bool:
            try:
                self.client.heartbeat(None)
            except (MarketError, httpx.HTTPError) as exc:
                self.say(f"[yellow]heartbeat failed: {exc}[/]")
            return True

        return beating(beat_interval(int(self.client.config.get("unit_timeout_s", 120))), beat)

    def claim(self) -> int:
        """Collect everything owed (:func:`claim_owed`). Returns base units received; 0 if none."""
        return claim_owed(self.client, self.contracts, self.say)

    def _work_open(self) -> bool:
        """Whether units of ours are still open (submitted and not yet verified, or verified in a round not averaged
        yet: ``/providers/{address}``'s ``unverified``): a referee may still ask us to reveal a state (a provider
        silent past its deadline loses the dispute), so an idle node does not exit before they are closed."""
        try:
            open_units = int(self.client.provider()["unverified"])
        except (MarketError, *UNREACHABLE) as exc:
            self.say(f"[yellow]cannot tell whether work is still open ({exc}); staying up[/]")
            return True
        if open_units:
            self.say(f"{open_units} unit(s) still open (not verified, or in a round not averaged yet): staying up to "
                     f"answer any dispute")
        return open_units > 0

    def run(self) -> str | None:
        """Work until stopped (a signal), idle (``exit_when_idle_s``, nothing of its own open), or slashed: then
        the marketplace's word is returned (and said), so a caller can exit with a failure status. Nothing else ends
        it: a refused claim or a full disk is said and tried again later (:attr:`AgentConfig.retry_s`), since a
        node gone while its units are unverified cannot answer the reveals that decide its stake."""
        with Stopper(self.say) as self.stopper:
            try:
                return self._run(self.stopper)
            finally:
                self.stopper = None

    def _run(self, stopper: Stopper) -> str | None:
        self.setup()
        idle_since = time.monotonic()
        while not stopper.stop:
            try:
                worked = self.reveal_once() or (time.monotonic() >= self._work_after and self.work_once())
            except MarketError as exc:
                if exc.conflict and "slashed" in str(exc.detail):
                    self.say(f"[red]{exc.detail}[/]")
                    return str(exc.detail)
                self.say(f"[yellow]marketplace refused: {exc}[/]")
                worked = False
            except UNREACHABLE as exc:  # a restart or a dropped link: try again later
                self.say(f"[yellow]unreachable, retrying in {self.cfg.poll_s:g} s: {exc}[/]")
                worked = False
            except OSError as exc:  # a full disk, most likely: the unit's files are gone again (see _train)
                full = exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
                self.say(f"[red]cannot write under {self.workdir}: {exc}"
                         f"{' (the disk is full: free some space there)' if full else ''}; new work waits "
                         f"{self.cfg.retry_s:g} s, claims and reveals go on[/]")
                self._work_after = time.monotonic() + self.cfg.retry_s
                worked = False
            if worked:
                idle_since = time.monotonic()
                continue
            with self.alive():  # claims wait for chain receipts: a unit assigned meanwhile must not be reaped
                self.claims()
            if self.cfg.exit_when_idle_s is not None and time.monotonic() - idle_since > self.cfg.exit_when_idle_s:
                if self._work_open():
                    idle_since = time.monotonic()  # stay up: a dispute may yet ask this node to reveal a state
                else:
                    return None
            time.sleep(self.cfg.poll_s)
        return None
