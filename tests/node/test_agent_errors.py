"""How the node reads the marketplace's refusals: a refused nonce (another process on the wallet, a clock behind)
is not a take-back of the unit in training, and is sent again past the nonce the marketplace accepted last."""
from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from eth_account import Account

from node.agent import AgentConfig, ProviderAgent
from node.client import MarketClient, MarketError, _last_accepted
from protocol.signing import NonceSource

REPLAYED = {"detail": "nonce 5 from 0xabc was already used (last accepted 1796491361328414)", "error": "ReplayError"}
TAKEN = {"detail": "unit 0x12 is not assigned to 0xabc", "error": "Conflict"}


def refusal(body: dict[str, str], status: int = 409) -> MarketError:
    with pytest.raises(MarketError) as exc:
        MarketClient._check(httpx.Response(status, json=body))
    return exc.value


def test_a_refusal_keeps_the_servers_error_kind() -> None:
    replayed, taken = refusal(REPLAYED), refusal(TAKEN)
    assert (replayed.error, replayed.replayed, replayed.conflict) == ("ReplayError", True, False)
    assert (taken.error, taken.replayed, taken.conflict) == ("Conflict", False, True)
    old = refusal({"detail": "no longer yours"})  # a server that names no kind: a 409 is a conflict, as before
    assert old.error is None and old.conflict
    assert _last_accepted(httpx.Response(409, json=REPLAYED)) == 1796491361328414
    assert _last_accepted(httpx.Response(409, json={**REPLAYED, "detail": "request expired: deadline 1 < now 2"})) is None
    assert _last_accepted(httpx.Response(409, json=TAKEN)) is None


def test_nonces_skip_past_the_last_accepted_one() -> None:
    nonces = NonceSource()
    ahead = time.time_ns() // 1000 + 30_000_000
    nonces.skip_past(ahead)
    assert nonces.next() == ahead + 1 and nonces.next() == ahead + 2
    nonces.skip_past(5)  # never back
    assert nonces.next() == ahead + 3


@pytest.mark.parametrize("body, withdrawn", [(REPLAYED, False), (TAKEN, True)])
def test_only_a_conflict_stops_the_unit_in_training(tmp_path: Path, body: dict[str, str], withdrawn: bool) -> None:
    """A beat refused for its nonce even when sent again (a third process kept drawing higher ones) is a missed
    beat; a beat refused because the unit is no longer ours stops the training."""
    cfg = AgentConfig(marketplace="http://127.0.0.1:1", chain_url="", region="eu-north", price=1, stake=1)
    agent = ProviderAgent(cfg, Account.create(), tmp_path, contracts=object())  # type: ignore[arg-type]
    agent.client._config = {"unit_timeout_s": 2}  # noqa: SLF001 - a beat every 0.5 s
    beats: list[int] = []

    def heartbeat(unit_id: str | None = None, steps_done: int = 0) -> None:
        beats.append(steps_done)
        raise refusal(body)

    agent.client.heartbeat = heartbeat  # type: ignore[method-assign]
    agent.client.next_reveal = lambda: None  # type: ignore[method-assign]
    with agent.heartbeats("0x12"):
        end = time.monotonic() + 10
        while len(beats) < 2 and agent._withdrawn is None and time.monotonic() < end:  # noqa: SLF001
            time.sleep(0.05)
        time.sleep(1.0)  # two more beat intervals
    assert (agent._withdrawn is not None) == withdrawn  # noqa: SLF001
    assert len(beats) == 1 if withdrawn else len(beats) >= 3  # a take-back ends the beating; a missed beat does not


def test_a_verifier_refused_a_nonce_goes_on(tmp_path: Path) -> None:
    """A verifier's request refused for its nonce even when sent again is not a refusal for good (benched): it
    goes on, and here ends idle, as asked, rather than returning the refusal (the CLI's exit status 2)."""
    from node.trainer import RECIPE
    from node.verifier_agent import VerifierAgent

    verifier = VerifierAgent("http://127.0.0.1:1", Account.create(), tmp_path, poll_s=0.01)
    verifier.client._config = {"recipe": RECIPE}  # noqa: SLF001
    verifier.client.register_verifier = lambda plan=None, build="": {}  # type: ignore[method-assign]
    refusals = [refusal(REPLAYED)]

    def verify_once() -> str | None:
        if refusals:
            raise refusals.pop()
        return None

    verifier.verify_once = verify_once  # type: ignore[method-assign]
    assert verifier.run(exit_when_idle_s=0.1) is None and not refusals
