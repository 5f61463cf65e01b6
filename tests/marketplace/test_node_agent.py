"""The provider node at the marketplace: a nonce refused because another process signs with its wallet is not a
take-back. Real marketplace over HTTP, Celery on Redis, the in-process EVM (conftest)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from node.client import MarketClient, MarketError
from protocol.money import tokens
from protocol.schemas import JobSpec
from tests.marketplace.test_flow import _assigned, submit_job
from tests.marketplace.test_node_faults import SMALL, node, said, unit_status


def test_a_nonce_refused_because_another_process_signs_is_not_a_take_back(market, tmp_path: Path, capsys) -> None:
    """A second process on the node's wallet (another machine, its clock 30 s ahead) sends one request while the
    node trains: the node's next beat carries a nonce below the one accepted last, and is refused (409, like a
    take-back). The node sends it again under a nonce past that one and trains on; the unit is handed in. A node
    restarted on that wallet with its clock behind starts (its registration is sent again the same way)."""
    market.rt.settings.unit_timeout_s = 2  # a beat every 0.5 s
    acct = market.account(gmt=tokens(500))
    one = node(market, tmp_path / "one", acct=acct)
    two = MarketClient(market.url, acct)
    spec = JobSpec(rounds=1, units_per_round=1, steps_per_unit=40, segment_len=20, batch_size=8,
                   max_price=tokens(2), verification="none")
    job_id = submit_job(market, spec)
    market.wait(lambda: _assigned(market, job_id) == 1, what="the unit matched")
    beats: list[str] = []
    heartbeat = one.client.heartbeat

    def counted(*args: Any) -> Any:
        try:
            out = heartbeat(*args)
        except MarketError as exc:
            beats.append(f"refused: {exc.error} {exc.detail}")
            raise
        beats.append("ok")
        return out

    one.client.heartbeat = counted  # type: ignore[method-assign]
    inner = one._between_steps
    jump: dict[str, int] = {}

    def between(step: int, loss: float) -> None:
        inner(step, loss)
        if step == 5:
            jump["nonce"] = time.time_ns() // 1000 + 30_000_000
            two.nonces.skip_past(jump["nonce"])
            assert two.next_reveal() is None  # accepted: the wallet's last nonce is now 30 s ahead of one's clock
            jump["beats"] = len(beats)
            market.wait(lambda: len(beats) > jump["beats"], timeout=10, what="a beat after the jump")

    one._between_steps = between  # type: ignore[method-assign]
    assert one.work_once()
    assert beats[jump["beats"]] == "ok", beats  # before the fix: "refused: ReplayError nonce ... already used"
    assert one._withdrawn is None and unit_status(market, job_id) in ("submitted", "verified")
    assert "took it back" not in said(capsys)
    later = node(market, tmp_path / "later", acct=acct)  # before the fix: MarketError 409 out of setup()
    assert later.client.nonces.next() > jump["nonce"] + 1  # its own clock is behind: it moved past the refused one
    # a real take-back is still one: a 409 Conflict
    try:
        later.client.heartbeat("0x" + "cd" * 32, 1)
    except MarketError as exc:
        assert exc.status == 409 and exc.error == "Conflict" and exc.conflict and not exc.replayed
    else:
        raise AssertionError("a heartbeat for a unit not ours was accepted")


def test_a_submission_refused_for_its_nonce_is_sent_again_and_the_unit_kept(market, tmp_path: Path) -> None:
    """A hand-in whose nonce is refused even when sent again (another process on the wallet kept drawing higher
    ones) is tried again like a blip; before, the trained unit's files were thrown away as if refused for good."""
    p = node(market, tmp_path / "p")
    job_id = submit_job(market, SMALL)
    market.wait(lambda: _assigned(market, job_id) == 1, what="the unit matched")
    submit, refused = p.client.submit, [MarketError(409, "nonce 5 was already used (last accepted 9)", "ReplayError")]

    def refused_once(unit_id: str, body: dict) -> object:  # what the client raises for that 409
        if refused:
            raise refused.pop()
        return submit(unit_id, body)

    p.client.submit = refused_once  # type: ignore[method-assign]
    assert p.work_once()
    assert not refused and unit_status(market, job_id) in ("submitted", "verified")
