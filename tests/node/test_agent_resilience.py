"""The agents keep going through what a real link and a restarting marketplace do to them (each found by a review,
each test failing on the code before its fix): a reveal tried again after a unit was taken back, a verifier meeting
a 5xx, heartbeats while a checkpoint uploads, a reveal request seen twice, two first starts on one wallet path."""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account

from node import checkpoint
from node.agent import AgentConfig, ProviderAgent
from node.client import MarketClient, MarketError
from node.trainer import RECIPE
from node.wallet import load, load_or_create


def refusal(body: dict[str, str], status: int) -> MarketError:
    with pytest.raises(MarketError) as exc:
        MarketClient._check(httpx.Response(status, json=body))
    return exc.value


def make_agent(tmp_path: Path) -> ProviderAgent:
    cfg = AgentConfig(marketplace="http://127.0.0.1:1", chain_url="", region="eu-north", price=1, stake=1,
                      poll_s=0.01, retry_s=0.01)
    agent = ProviderAgent(cfg, Account.create(), tmp_path, contracts=object())  # type: ignore[arg-type]
    agent.client._config = {"unit_timeout_s": 2, "recipe": RECIPE}  # noqa: SLF001
    agent.client.heartbeat = lambda unit_id=None, steps_done=0: {}  # type: ignore[method-assign]
    return agent


def test_a_reveal_after_a_unit_was_taken_back_is_tried_again(  # type: ignore[no-untyped-def]
        tmp_path: Path, spec, global_state) -> None:
    """A unit taken back mid-training, then a reveal (another unit's, in a dispute) whose first send meets a 503:
    the reveal is sent again and the agent goes on (it raised UnitWithdrawn out of the loop: the agent died and the
    dispute's reveal deadline passed, its stake with it)."""
    agent = make_agent(tmp_path)
    start = tmp_path / "global.safetensors"
    checkpoint.save(start, global_state, {})

    # 1. a unit is pulled and taken back mid-training (the heartbeat's 409), as in the real flow
    work = {"spec": spec.to_json(), "spec_hash": spec.spec_hash(), "start_blob": "ab" * 32, "due": time.time() + 600}
    works = [work]
    agent.client.next_work = lambda: works.pop() if works else None  # type: ignore[method-assign]
    agent.client.get_blob = lambda sha, dest: (dest.write_bytes(start.read_bytes()), dest)[1]  # type: ignore[method-assign]
    agent.client.next_reveal = lambda: None  # type: ignore[method-assign]

    def beat(unit_id: str | None = None, steps_done: int = 0) -> Any:
        if unit_id is not None:
            raise refusal({"detail": "unit is not assigned", "error": "Conflict"}, 409)
        return {}

    agent.client.heartbeat = beat  # type: ignore[method-assign]

    def trainer(spec_, start_, workdir_):  # type: ignore[no-untyped-def]
        for step in range(10_000):
            time.sleep(0.05)
            agent._between_steps(step, 1.0)  # raises UnitWithdrawn once the beat saw the 409
        raise AssertionError("never withdrawn")

    agent.trainer = trainer
    assert agent.work_once() is True
    assert agent._withdrawn is not None  # noqa: SLF001 - stale from now on

    # 2. a referee asks for a reveal of an older unit; the first POST /reveals meets a 503 (a restart)
    ask = {"unit_id": "0x" + "b2" * 32, "step": 3, "verification_id": 1, "plan": "cpu", "deadline": time.time() + 60}
    asks = [ask]
    agent.client.next_reveal = lambda: asks.pop() if asks else None  # type: ignore[method-assign]
    agent.answer = lambda a: {"verification_id": 1}  # type: ignore[method-assign]
    answers = [refusal({"detail": "restarting"}, 503)]
    sent: list[dict[str, Any]] = []

    def reveal(body: dict[str, Any]) -> Any:
        if answers:
            raise answers.pop()
        sent.append(body)
        return {"status": "ok"}

    agent.client.reveal = reveal  # type: ignore[method-assign]
    agent.setup = lambda: {}  # type: ignore[method-assign]
    agent.claims = lambda: 0  # type: ignore[assignment]
    agent.cfg.exit_when_idle_s = 0.2
    agent._work_open = lambda: False  # type: ignore[method-assign]
    # expected: the reveal is sent again after 1 s, and the agent ends idle (None)
    result = agent.run()
    assert sent, "the reveal was never sent again"
    assert result is None


def test_a_verifier_goes_on_through_a_5xx(tmp_path: Path) -> None:
    """A proxy's 502 while the marketplace restarts, on /verify/next: tried again, as a dropped link is (it ended
    VerifierAgent.run)."""
    from node.verifier_agent import VerifierAgent

    verifier = VerifierAgent("http://127.0.0.1:1", Account.create(), tmp_path, poll_s=0.01)
    verifier.client._config = {"recipe": RECIPE}  # noqa: SLF001
    verifier.client.register_verifier = lambda plan=None, build="": {}  # type: ignore[method-assign]
    answers = [refusal({"detail": "Bad Gateway"}, 502)]

    def verify_once() -> str | None:
        if answers:
            raise answers.pop()
        return None

    verifier.verify_once = verify_once  # type: ignore[method-assign]
    assert verifier.run(exit_when_idle_s=0.1) is None and not answers


def test_heartbeats_go_on_while_a_checkpoint_uploads(tmp_path: Path) -> None:
    """The marketplace lets an upload take max_upload_bytes / body_min_rate = 128 s (32 MiB at 256 KiB/s), longer
    than unit_timeout_s (120 s): heartbeats (their own nonce lane) go on meanwhile (they waited behind the upload's
    lock, and a slow hand-in lost its unit to the reaper). Scaled down: unit_timeout_s 2 (a beat every 0.5 s), an
    upload of 2.5 s."""
    agent = make_agent(tmp_path)
    beats: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/providers/heartbeat":
            beats.append(time.monotonic())
            return httpx.Response(200, json={"units": [], "deadline": 0, "due": {}})
        if request.url.path == "/reveals/next":
            return httpx.Response(204)
        if request.url.path == "/blobs":
            time.sleep(2.5)  # a slow link: the body trickles in
            return httpx.Response(201, json={"sha256": "ab" * 32})
        return httpx.Response(404, json={"detail": "?"})

    agent.client.http = httpx.Client(base_url="http://m", transport=httpx.MockTransport(handler))
    agent.client._config = {"unit_timeout_s": 2, "recipe": RECIPE, "chain_id": 1,  # noqa: SLF001
                            "staking": "0x" + "11" * 20}
    del agent.client.heartbeat  # the real one
    blob = tmp_path / "x.safetensors"
    blob.write_bytes(b"x" * 100)
    with agent.heartbeats("0x12"):
        time.sleep(0.7)  # a beat or so before the upload
        t0 = time.monotonic()
        agent.client.put_blob(blob)
        t1 = time.monotonic()
        time.sleep(0.7)
    during = [b for b in beats if t0 + 0.1 < b < t1 - 0.1]
    gaps = [b - a for a, b in zip(beats, beats[1:])]
    assert during, f"no heartbeat reached the marketplace during the {t1 - t0:.1f} s upload (gaps {gaps})"
    assert max(gaps) < 2, f"a {max(gaps):.1f} s silence: past unit_timeout_s (2 s), the unit is reaped"


def test_a_reveal_request_seen_by_both_threads_is_answered_once(tmp_path: Path) -> None:
    """A referee's ask the heartbeat thread stored after a unit's last step, which reveal_once then answers from its
    own poll: not answered again at the next unit's first step (it was: a segment replayed and its state uploaded
    in the middle of another unit's training, for a reveal then refused)."""
    agent = make_agent(tmp_path)
    ask = {"unit_id": "0x" + "b2" * 32, "step": 3, "verification_id": 1, "plan": "cpu", "deadline": time.time() + 60}
    answered: list[int] = []
    agent.answer = lambda a: answered.append(1) or {"verification_id": 1}  # type: ignore[method-assign]
    revealed: list[int] = []

    def reveal(body: dict[str, Any]) -> Any:
        if revealed:
            raise refusal({"detail": "no state asked", "error": "Conflict"}, 409)
        revealed.append(1)
        return {"status": "ok"}

    agent.client.reveal = reveal  # type: ignore[method-assign]
    polls = [ask]
    agent.client.next_reveal = lambda: polls.pop() if polls else None  # type: ignore[method-assign]
    agent._ask = ask  # noqa: SLF001 - what beat() stored after the unit's last step
    assert agent.reveal_once() is True and answered == [1]
    agent._between_steps(0, 1.0)  # the next unit's first step
    assert answered == [1], "the answered ask was replayed again during the next unit's training"
    assert agent._ask is None  # noqa: SLF001


def test_two_first_starts_on_one_wallet_path_get_one_key(tmp_path: Path) -> None:
    """Two agents started together on a new wallet path (`node run` and `verifier run`): both run with the key on
    disk (each made one, ~0.1 s of PBKDF2, and the second overwrote the first's keystore: the first staked and
    earned with a key on no disk, lost at its next start)."""
    path = tmp_path / "wallet.json"
    got: list[str] = []
    barrier = threading.Barrier(2)

    def start() -> None:
        barrier.wait()
        got.append(load_or_create(path, "pw").address)

    threads = [threading.Thread(target=start) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    on_disk = load(path, "pw").address
    assert got[0] == got[1] == on_disk, f"running with {got}, only {on_disk} is on disk"


def test_a_verdict_met_by_a_5xx_is_sent_again_and_a_refusal_is_not(tmp_path: Path) -> None:
    """A verdict is a whole segment's replay: a 503 (the marketplace restarting) is tried again until it is taken;
    a refusal (409: the task withdrawn) is not, and neither is a verdict whose task was taken back meanwhile."""
    from node.verifier_agent import VerifierAgent

    verifier = VerifierAgent("http://127.0.0.1:1", Account.create(), tmp_path, poll_s=0.01)
    answers: list[MarketError | None] = [refusal({"detail": "restarting"}, 503), None]
    sent: list[dict[str, Any]] = []

    def verdict(body: dict[str, Any]) -> Any:
        sent.append(body)
        answer = answers.pop(0)
        if answer is not None:
            raise answer
        return {"status": "ok"}

    verifier.client.verdict = verdict  # type: ignore[method-assign]
    verifier._send_verdict({"verification_id": 1}, [])  # noqa: SLF001
    assert len(sent) == 2 and not answers
    answers[:] = [refusal({"detail": "withdrawn", "error": "Conflict"}, 409)]
    with pytest.raises(MarketError) as refused:
        verifier._send_verdict({"verification_id": 2}, [])  # noqa: SLF001
    assert refused.value.status == 409 and len(sent) == 3
    answers[:] = [refusal({"detail": "restarting"}, 502)]
    verifier._send_verdict({"verification_id": 3}, ["unit taken back"])  # noqa: SLF001 - nothing more is sent
    assert len(sent) == 4 and not answers


def test_a_wallet_path_linked_to_a_file_not_made_yet_is_made_there(tmp_path: Path) -> None:
    """`~/.gridmint/wallet.json -> /secure/wallet.json`, the target not made yet: the keystore is written there, once
    (a review found the link's name refused the exclusive create, and each try made a new key, none stored)."""
    from node import wallet

    target = tmp_path / "secure" / "wallet.json"
    target.parent.mkdir()
    link = tmp_path / "wallet.json"
    link.symlink_to(target)
    account = load_or_create(link, "pw")
    assert target.exists() and load(link, "pw").address == account.address == load(target, "pw").address
    assert link.is_symlink() and not list(target.parent.glob(".*part"))
    blocked = tmp_path / "blocked.json"
    blocked.symlink_to(blocked)  # a name that is there and no file: a clear error, not a loop
    with pytest.raises(wallet.GridMintValueError):
        load_or_create(blocked, "pw")
