"""The verifier agent: pull a sampled segment, replay it from the committed checkpoint, sign the verdict."""
from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from eth_account.signers.local import LocalAccount
from rich.console import Console

from node import checkpoint, crosscheck
from node.agent import RETRY_S, Claims, Stopper, claim_owed
from node.client import UNREACHABLE, MarketClient, MarketError
from node.crosscheck import PROVIDER_PLAN, Plan
from node.device import local_plan, plan_build
from node.keepalive import beat_interval, beating
from node.replay import check_segment
from node.trainer import UnitSpec, check_market_recipe, check_recipe, same_bits
from protocol.money import format_tokens
from protocol.errors import CheckpointError
from protocol.proof import TrainingProof
from protocol.signing import sign_accusation, sign_typed, to_bytes32
from protocol.verification import UNDER_REVIEW, fraud_evidence

console = Console(stderr=True)

#: Default bond margins (see VerifierAgent): on the referee's plan (the providers' default, "cpu") and on another.
#: Off the referee's plan no margin is safe: honest drift across plans has been measured at 7.7x, 8.7x and once 107x
#: the calibrated tolerance (`gridmint bench proof --drift-jobs`), and there the referee cannot reproduce the
#: verifier's replay to release the bond of an honest accusation; at the old margin of 4 an honest verifier lost a
#: bond on about 1 segment in 500. Its disputes go unbonded (a cheat is slashed all the same, on the governance path);
#: a verifier whose verdicts are mostly overruled there is benched instead (GRIDMINT_VERIFIER_OVERRULED_*).
REFEREE_BOND_MARGIN = 1.0
OTHER_PLAN_BOND_MARGIN = math.inf
#: How long a verdict is tried again after a dropped link or a 5xx (the marketplace restarting) before the replay it
#: reports is given up (the task is then handed out again).
VERDICT_RETRY_S = 600.0


def calibration_plans(provider_plan: Plan, provider_build: str | None, plan: Plan, build: str,
                      cpu_build: str) -> tuple[Plan, Plan, bool]:
    """Which plans a verifier on ``plan`` (kernels ``build``; ``cpu_build`` its CPU's) calibrates its tolerance for
    work on ``provider_plan`` (kernels ``provider_build``) on: ``(verifier plan, provider plan, foreign)``, for
    :func:`node.crosscheck.tolerance_for`. Calibration runs the provider's side here, so it must be something this
    machine can stand in for. A CPU plan on other kernels: trained on other kernels in a child (``foreign``). A GPU
    plan naming another GPU model, or on other GPU kernels (another torch / CUDA version): this GPU would compute what
    this verifier computes, a drift of zero, and every honest segment would be disputed (and its verifier, overruled
    every time, benched); so the tolerance is the one between this GPU and the CPU, an upper bound on the drift
    between two GPUs running the same deterministic kernels. (``provider_build`` None: this machine's own.)"""
    if provider_plan.device == "cpu":
        return plan, provider_plan, provider_build is not None and provider_build != cpu_build
    if plan.device == "cuda" and (provider_plan.gpu != plan.gpu
                                  or (provider_build is not None and provider_build != build)):
        return PROVIDER_PLAN, Plan("cuda", provider_plan.micro_batches), False
    return plan, provider_plan, False


class VerifierAgent:
    def __init__(self, marketplace: str, account: LocalAccount, workdir: Path | None = None,
                 poll_s: float = 0.5, approve_everything: bool = False, accuse_everything: bool = False,
                 plan: Plan = PROVIDER_PLAN, bond_margin: float | None = None) -> None:
        self.client = MarketClient(marketplace, account)
        self.account = account
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="gridmint-verifier-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.poll_s = poll_s
        self.retry_s = RETRY_S  # wait after a refused claim (distributor paused, root voided, no gas)
        self.approve_everything = approve_everything  # a lazy verifier, for the adversary suite
        self._under_review = False  # benched by a canary the referee has yet to rule on (run() waits)
        self.accuse_everything = accuse_everything  # a malicious verifier, for the adversary suite
        self.accuse = True  # sign an on-chain Accusation with every fraud verdict
        # how this machine replays (a GPU plan names its GPU model); another plan than the provider's checks within
        # a tolerance, the same plan bit for bit where it is exact
        self.plan = local_plan(plan)
        # with which kernels: the provider's plan replays bit for bit only on the same kernels (another CPU kind or
        # torch build computes other bits: checked within a tolerance calibrated against other kernels instead)
        self.build = plan_build(self.plan)
        # Across plans, accuse with a bond only when the disagreement is at least this many times the tolerance; a
        # closer one is still disputed, without a bond: the referee settles it (governance path), no bond at risk.
        # On the referee's own plan every dispute is bonded: the referee reproduces this replay bit for bit and
        # releases the bond of an accusation made in good faith (marketplace.referee.judge_accusation), so honest
        # drift, which has no bound a margin could rely on, costs this verifier nothing; on another plan it cannot,
        # so by default nothing is bonded there (OTHER_PLAN_BOND_MARGIN).
        self.bond_margin = bond_margin if bond_margin is not None else (
            REFEREE_BOND_MARGIN if plan == PROVIDER_PLAN else OTHER_PLAN_BOND_MARGIN)
        self._stake_target: tuple[str, int, Any] | None = None  # what keep_staked keeps topped up (run() re-stakes)
        self._stopper: Stopper | None = None  # run()'s, while it runs: a verdict's tries end on a stop request

    @property
    def cpu_build(self) -> str:
        """The CPU kernels this verifier computes with: its plan's, or this machine's CPU for a GPU verifier."""
        return self.build if self.plan.device == "cpu" else plan_build(PROVIDER_PLAN)

    def keep_staked(self, chain_url: str, amount: int, contracts: Any = None) -> int:
        """Top this verifier's stake up to ``amount`` base units (it backs its accusations). Returns the stake."""
        from node.agent import contracts_for

        check_market_recipe(self.client.config.get("recipe"))  # before anything is staked
        c = contracts or contracts_for(self.client, chain_url, self.account)
        self._stake_target = (chain_url, amount, c)
        have = c.stake_of(self.account.address)
        if have < amount:
            c.stake(amount - have)
        console.print(f"[dim]verifier[/] staked {format_tokens(max(have, amount))}")
        return max(have, amount)

    def _restake(self) -> bool:
        """Top the stake back up to what keep_staked was asked for (e.g. after a bond was forfeit). True if it grew."""
        if self._stake_target is None:
            return False
        chain_url, amount, c = self._stake_target
        before = c.stake_of(self.account.address)
        try:
            return self.keep_staked(chain_url, amount, c) > before
        except Exception as exc:  # noqa: BLE001 - e.g. the wallet cannot cover it: said, and the agent stops
            console.print(f"[dim]verifier[/] [yellow]could not stake back up to {format_tokens(amount)}: {exc}[/]")
            return False

    def claim(self) -> int:
        """Collect the check fees (and bounties) owed to this verifier (:func:`node.agent.claim_owed`); 0 without a
        chain client (one comes with :meth:`keep_staked`)."""
        if self._stake_target is None:
            return 0
        return claim_owed(self.client, self._stake_target[2],
                          lambda msg: console.print(f"[dim]verifier[/] {msg}"))

    def verify_once(self) -> str | None:
        task = self.client.next_verification()
        if task is None:
            return None
        spec = UnitSpec.from_json(task["spec"])
        proof = TrainingProof.from_dict(task["proof"])
        check_recipe(spec, proof.spec_hash)  # the marketplace accepted it: another hash here is this node's version
        seg = int(task["segment"])
        withdrawn: list[str] = []

        def beat() -> bool:  # while replaying: a long segment must not outlast the task's timeout
            try:
                self.client.verification_heartbeat(int(task["verification_id"]))
            except (MarketError, httpx.HTTPError) as exc:
                if isinstance(exc, MarketError) and exc.conflict:
                    withdrawn.append(str(exc.detail))
                    return False
                console.print(f"[yellow]verifier heartbeat failed: {exc}[/]")
            return True

        with beating(beat_interval(int(self.client.config.get("unit_timeout_s", 120))), beat):
            path = self.client.get_blob(task["checkpoint_blob"], self.workdir / f"{task['checkpoint_blob']}.safetensors")
            provider_plan = Plan.parse(task.get("plan", "cpu"))
            build = str(task.get("build") or "")
            # bit for bit on this machine's own plan when that plan is exact (any CPU plan, a GPU plan naming its
            # model) and the provider computed with the same kernels; a low-precision job on the providers' default
            # plan is replayed bit for bit by any CPU verifier with its kernels (its drift across plans is wider
            # than some cheats: float8 arithmetic); the rest within a calibrated tolerance
            same = same_bits(provider_plan, build, self.plan, self.build)
            if same or (provider_plan == PROVIDER_PLAN and spec.precision != "fp32"
                        and same_bits(provider_plan, build, PROVIDER_PLAN, self.cpu_build)):
                verdict = check_segment(spec, proof, seg, path, provider_plan)
                found, reason, replayed_end, margin = verdict.ok, verdict.reason, verdict.replayed_end, math.inf
                if provider_plan != PROVIDER_PLAN:
                    reason = f"[{provider_plan.label} bit for bit] {reason}"
            else:
                end = self.client.get_blob(task["end_blob"], self.workdir / f"{task['end_blob']}.safetensors")
                found, reason, replayed_end, margin = self._check_across(spec, proof, seg, path, end, provider_plan,
                                                                         build)
        if withdrawn:  # taken back while we replayed: a verdict would be refused
            console.print(f"[dim]verifier[/] unit {spec.unit_id[:10]} segment {seg}: withdrawn ({withdrawn[0]})")
            return "withdrawn"
        # a cheat in float8 drifts like honest bf16 on other hardware: disputed, but the referee's one-step replay
        # may not convict it, so a low-precision job checked across plans is never accused with a bond
        # (an infinite bond margin bonds nothing, not even a disagreement past every tolerance: a zero calibrated
        # loss tolerance makes any honest loss drift infinitely far past it)
        unbonded = (margin < self.bond_margin or math.isinf(self.bond_margin)
                    or (spec.precision != "fp32" and math.isfinite(margin)))
        # the referee reproduces a replay (and releases the bond of an honest accusation) only on its own kernels:
        # the task names those of the referee that would judge it (a referee pool's for work on its kernels)
        referee_build = task.get("referee_build", self.client.config.get("referee_build"))
        foreign_referee = self.plan.device == "cpu" and str(referee_build or "") != self.build
        # a bit-for-bit replay on the provider's own plan (not the default) is bonded exactly when the referee
        # replays that plan bit for bit too: it then reproduces this replay and releases the bond of an honest one
        exact_elsewhere = same and provider_plan != PROVIDER_PLAN
        if exact_elsewhere:
            unbonded = not task.get("referee_exact", False)
        unbonded = unbonded or foreign_referee
        ok = True if self.approve_everything else False if self.accuse_everything else found
        claimed = proof.segments[seg].end_hash
        replayed = replayed_end or "0x" + "00" * 32
        replayed = replayed if replayed.startswith("0x") else "0x" + replayed
        claimed = claimed if claimed.startswith("0x") else "0x" + claimed
        message = {"unitId": to_bytes32(spec.unit_id), "segment": seg, "ok": ok,
                   "claimedHash": to_bytes32(claimed), "replayedHash": to_bytes32(replayed)}
        body = {"verification_id": task["verification_id"], "ok": ok, "replayed_hash": replayed,
                "signature": sign_typed(self.account, "Verdict", self.client.domain, message),
                "reason": reason[:500]}
        if not ok and not self.accuse_everything and unbonded:
            why = (f"the referee does not replay plan {provider_plan.label} bit for bit" if exact_elsewhere
                   and not task.get("referee_exact", False)
                   else "the referee computes with other kernels than this verifier" if foreign_referee
                   else f"{margin:.3g} x tolerance < {self.bond_margin:g}" if margin < self.bond_margin
                   else f"no bond on plan {self.plan.label}" if math.isinf(self.bond_margin)
                   else f"a {spec.precision} job across plans")
            body["reason"] = f"{reason} [unbonded: {why}]"[:500]
        elif not ok and self.accuse:
            evidence = fraud_evidence(spec.unit_id, seg, task["provider"])
            body["accusation"] = sign_accusation(self.account, self.client.chain_id, self.client.config["staking"],
                                                 task["provider"], evidence)
        try:
            with beating(beat_interval(int(self.client.config.get("unit_timeout_s", 120))), beat):
                taken = self._send_verdict(body, withdrawn)
        except MarketError as exc:
            if exc.status != 409:
                raise
            # the task was withdrawn while this replayed it (its provider slashed meanwhile, or it timed out)
            console.print(f"[dim]verifier[/] unit {spec.unit_id[:10]} segment {seg}: withdrawn ({exc.detail})")
            return "withdrawn"
        if not taken:  # (a beat's 409 once the verdict was taken is the task closed by it: a review found it said
            # "withdrawn" of a verdict taken)
            console.print(f"[dim]verifier[/] unit {spec.unit_id[:10]} segment {seg}: withdrawn ({withdrawn[0]})")
            return "withdrawn"
        word = "[green]ok[/]" if ok else f"[red]FRAUD[/] ({reason})"
        console.print(f"[dim]verifier[/] unit {spec.unit_id[:10]} segment {seg}: {word}")
        return "ok" if ok else "fraud"

    def _send_verdict(self, body: dict[str, Any], withdrawn: list[str]) -> bool:
        """Send a verdict, trying again after a dropped link or a passing refusal (a 5xx: the marketplace
        restarting; 408, 429), waiting 1, 2, 4 ... 30 s, for at most :data:`VERDICT_RETRY_S`, and while the task is
        still this verifier's (the caller beats meanwhile; ``withdrawn`` says it was taken back): a replay of a whole
        segment is not thrown away on one bad answer (a review found the agent stopped on it). A verdict is taken
        once: one whose answer was lost is refused as withdrawn (409). True once taken; False if the task was taken
        back before (no more tries). A stop request (a signal) ends the tries too."""
        wait, give_up = 1.0, time.monotonic() + VERDICT_RETRY_S
        while True:
            try:
                self.client.verdict(body)
                return True
            except (MarketError, *UNREACHABLE) as exc:
                if isinstance(exc, MarketError) and not exc.transient:
                    raise
                if withdrawn:
                    return False  # taken back meanwhile: the caller says so
                if time.monotonic() + wait > give_up:
                    raise
                console.print(f"[dim]verifier[/] [yellow]verdict not taken ({exc}); trying again in {wait:g} s[/]")
                end = time.monotonic() + wait
                while time.monotonic() < end:
                    if self._stopper is not None and self._stopper.stop:
                        raise
                    time.sleep(min(0.1, end - time.monotonic()))
                wait = min(2 * wait, 30.0)

    def _check_across(self, spec: UnitSpec, proof: TrainingProof, seg: int, start_path: Path,
                      end_path: Path, provider_plan: Plan = PROVIDER_PLAN,
                      build: str | None = None) -> tuple[bool, str, str | None, float]:
        """Replay on this machine's plan and compare with the provider's end state within a calibrated tolerance
        (against other kernels where the provider's CPU ``build`` is not this machine's)."""
        try:
            start, _ = checkpoint.load(start_path)
            end, _ = checkpoint.load(end_path)
        except CheckpointError as exc:
            return False, f"checkpoint rejected: {exc}", None, math.inf
        cal_plan, cal_provider, foreign = calibration_plans(provider_plan, build, self.plan, self.build,
                                                            self.cpu_build)
        tol = crosscheck.tolerance_for(spec, cal_plan, provider_plan=cal_provider, foreign=foreign)
        try:
            runner = crosscheck.PlanRunner(spec, start, self.plan)
        except CheckpointError as exc:
            return False, f"checkpoint is not a training state for this spec: {exc}", None, math.inf
        v = crosscheck.check_segment_across(spec, proof, seg, start, end, tol, runner)
        where = (f"{provider_plan.label} on other kernels" if foreign or cal_plan != self.plan
                 else provider_plan.label)
        return v.ok, f"[{where} on {self.plan.label}] {v.reason}", v.replayed_hash, v.margin

    def run(self, exit_when_idle_s: float | None = None) -> str | None:
        """Verify until stopped (a signal), idle for ``exit_when_idle_s``, or refused for good: then the refusal is
        returned (and said), so a caller can exit with a failure status."""
        with Stopper(lambda msg: console.print(f"[dim]verifier[/] {msg}")) as stopper:
            self._stopper = stopper
            try:
                return self._run(stopper, exit_when_idle_s)
            finally:
                self._stopper = None

    def _run(self, stopper: Stopper, exit_when_idle_s: float | None) -> str | None:
        claims = Claims(lambda: self.claim(), lambda msg: console.print(f"[dim]verifier[/] {msg}"), self.retry_s)
        check_market_recipe(self.client.config.get("recipe"))
        registered = False
        idle_since = time.monotonic()
        while not stopper.stop:
            try:
                if not registered:
                    self.client.register_verifier(self.plan.label, self.build)
                    registered = True
                verified = self.verify_once()
            except UNREACHABLE as exc:  # a restart or a dropped link: try again later
                console.print(f"[dim]verifier[/] [yellow]unreachable, retrying in {self.poll_s:g} s: {exc}[/]")
                verified = None
            except MarketError as exc:
                if exc.transient:  # a restart behind a proxy (502/503), busy: as a dropped link (a review found one
                    # 503 stopped the verifier for good)
                    console.print(f"[dim]verifier[/] [yellow]marketplace answered {exc.status}, retrying in "
                                  f"{self.poll_s:g} s: {exc.detail}[/]")
                    time.sleep(self.poll_s)
                    continue
                if exc.replayed:  # another process signs with this wallet (the lock file keeps out one on this machine)
                    console.print(f"[dim]verifier[/] [yellow]marketplace refused a nonce, retrying: {exc.detail}[/]")
                    time.sleep(self.poll_s)
                    continue
                if exc.status != 409:
                    raise
                # refused tasks: short of the marketplace's minimum stake (a forfeit bond, say: top up and go on,
                # if the wallet can), benched while the referee rules on the canary that benched it (it may void
                # it: wait), or benched (for good)
                if "staking at least" in str(exc.detail) and self._restake():
                    continue
                if UNDER_REVIEW in str(exc.detail):
                    if not self._under_review:
                        console.print(f"[dim]verifier[/] [yellow]waiting: {exc.detail}[/]")
                    self._under_review = True
                    idle_since = time.monotonic()  # not idle: the marketplace owes it a ruling
                    time.sleep(self.poll_s)
                    continue
                console.print(f"[dim]verifier[/] [red]stopped: {exc.detail}[/]")
                return str(exc.detail)
            if self._under_review:
                console.print("[dim]verifier[/] [green]back at work: the referee voided the canary[/]")
                self._under_review = False
            if verified is not None:
                idle_since = time.monotonic()
                continue
            claims()  # idle: collect the fees of checks that passed (once their units' jobs settled)
            if exit_when_idle_s is not None and time.monotonic() - idle_since > exit_when_idle_s:
                return None
            time.sleep(self.poll_s)
        return None
