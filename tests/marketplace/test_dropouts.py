"""Providers that drop out, against the real contracts on the in-process EVM and a real database (SQLite and
PostgreSQL), through the service's own steps (register, match, next_work, submit_result, reap, verify) with the
Celery queue recorded instead of run.

- Only providers seen lately are offered work (``settings.resolved_provider_live_s``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from eth_account.signers.local import LocalAccount
from eth_utils import keccak
from sqlalchemy import select, update

from marketplace import service
from marketplace.db import Event, Provider, Unit, now_s
from marketplace.settings import Settings
from protocol.money import tokens
from protocol.schemas import JobSpec, ModelSpec, ProviderRegister
from tests.marketplace.test_settlement import World, make_world


@pytest.fixture()
def world(tmp_path: Path, db_url: str) -> World:
    w = make_world(tmp_path, db_url)
    w.rt.settings.canary_rate = 0.0  # no planted known-bad tasks: each check handed out is a real one
    return w


def _spec(level: str = "none", units: int = 1) -> JobSpec:
    """A unit of two 2-step segments on a tiny model: trained and replayed in well under a second."""
    return JobSpec(model=ModelSpec(d_model=16, n_layer=1, n_head=2, ctx=16), rounds=1, units_per_round=units,
                   steps_per_unit=4, segment_len=2, batch_size=2, max_price=tokens(5), verification=level)


def _staked(w: World, acct: LocalAccount) -> None:
    w.ops.transfer(acct.address, tokens(100))
    w.ops.as_account(acct).stake(tokens(100))  # the minimum: settings.min_stake, settings.min_verifier_stake


def _provider(w: World, i: int, price: int) -> LocalAccount:
    acct = w.providers[i]
    _staked(w, acct)
    service.register_provider(w.rt, acct.address, ProviderRegister(
        region="eu-north", gpu="cpu", vram_mb=16_000, price=str(price), tokens_per_s=10_000, capacity=1))
    return acct


def _job(w: World, name: str, spec: JobSpec) -> str:
    job_id = "0x" + keccak(text=name).hex()
    w.customer.fund_job(job_id, spec.budget())
    service.create_job(w.rt, w.customer.address, job_id, spec)
    return job_id


def _unit(w: World, job_id: str) -> Unit:
    with w.rt.sessions() as s:
        return s.scalars(select(Unit).where(Unit.job_id == job_id)).one()


def _silent(w: World, job_id: str) -> None:
    """The unit's provider has not been heard from for longer than the heartbeat deadline (a link blip)."""
    ago = now_s() - w.rt.settings.unit_timeout_s - 5
    with w.rt.sessions.begin() as s:
        s.execute(update(Unit).where(Unit.job_id == job_id, Unit.status == "assigned")
                  .values(assigned_at=ago, heartbeat_at=ago))
        s.execute(update(Provider).where(Provider.address.in_(select(Unit.provider).where(Unit.job_id == job_id)))
                  .values(last_seen=ago))


def _events(w: World, job_id: str, kind: str) -> list[dict[str, Any]]:
    with w.rt.sessions() as s:
        return [e.data for e in s.scalars(select(Event).where(Event.job_id == job_id, Event.kind == kind))]


# ---------------------------------------------------------------- D5: a provider gone for good


def test_a_provider_not_seen_lately_is_offered_no_work(world: World) -> None:
    """A cheap provider gone for good used to be handed a unit in every matching round (and picked as a standby),
    each sitting until the reaper took it back. Now only providers seen within ``provider_live_s`` are offered work:
    the dearer live one gets the unit, the gone one is no standby when the live one blips, and it is offered work
    again once it polls."""
    gone, alive = _provider(world, 0, tokens(1)), _provider(world, 1, tokens(3))
    window = world.rt.settings.resolved_provider_live_s()
    with world.rt.sessions.begin() as s:  # just out of the window (a week, in the reviewer's case)
        s.execute(update(Provider).where(Provider.address == gone.address).values(last_seen=now_s() - window - 1))
    job = _job(world, "gone", _spec())
    assert [g.provider for g in service.run_matching(world.rt)] == [alive.address]
    _silent(world, job)  # the live one blips: the gone one is no standby
    assert service.reap(world.rt) == 1
    assert _unit(world, job).status == "pending"
    assert [e["how"] for e in _events(world, job, "unit_assigned")] == ["matching round"]
    assert service.run_matching(world.rt) == []
    assert service.next_work(world.rt, gone.address) is None  # back: it polls for work
    assert [g.provider for g in service.run_matching(world.rt)] == [gone.address]


def test_the_live_window_follows_the_heartbeat_deadline() -> None:
    assert Settings(unit_timeout_s=120).resolved_provider_live_s() == 360  # 3 heartbeat deadlines
    assert Settings(unit_timeout_s=2).resolved_provider_live_s() == 60  # never under 4 beats at 15 s
    assert Settings(unit_timeout_s=120, provider_live_s=900).resolved_provider_live_s() == 900
