"""Epoch settlement against the real contracts on the in-process EVM and a real SQLite ledger:
settle a job into the payout pool, post cumulative roots, claim with proofs; crashes and retries pay nothing twice."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import keccak
from fastapi.testclient import TestClient
from sqlalchemy import event, select

from ledger.evm import Chain, GridMintContracts, deploy
from ledger.payout_tree import verify_proof
from marketplace import checking, service, settlement
from marketplace.app import create_app
from marketplace.blobs import BlobStore
from marketplace.db import Event, Job, LedgerEntry, PayoutEpoch, Unit, Verification, make_sessionmaker, now_s
from marketplace.runtime import Runtime
from marketplace.settings import Settings
from protocol.jobs import RANDOM_BYTES, new_job_id
from protocol.money import tokens
from tests.marketplace.snapshots import reverted

SUPPLY = tokens(1_000_000)


@dataclass
class World:
    chain: Chain
    ops: GridMintContracts
    rt: Runtime
    queued: list[tuple[str, list[Any]]]
    customer: GridMintContracts
    providers: list[LocalAccount]

    def fund_done_job(self, name: str, pay: list[tuple[int, int]], budget: int = tokens(10)) -> str:
        """A job funded on chain and finished off chain, with one verified unit per (provider index, price)."""
        job_id = new_job_id(self.customer.address, keccak(text=name)[:RANDOM_BYTES])
        self.customer.fund_job(job_id, budget)
        with self.rt.sessions.begin() as s:
            s.add(Job(id=job_id, customer=self.customer.address, spec={}, budget=budget, global_blob="0" * 64,
                      status="done"))
            s.flush()
            for i, (who, price) in enumerate(pay):
                s.add(LedgerEntry(job_id=job_id, unit_id="0x" + keccak(text=f"{name}-{i}").hex(),
                                  provider=self.providers[who].address, amount=price))
        return job_id

    def as_provider(self, i: int) -> GridMintContracts:
        return self.ops.as_account(self.providers[i])


def _deployed(dispute_window_s: int) -> tuple[Chain, Any]:
    chain = Chain.in_process()
    operator, cust = chain.dev_accounts(2)
    deployment = deploy(chain, operator, supply=SUPPLY, treasury=Account.create().address,
                        dispute_window_s=dispute_window_s)
    GridMintContracts(chain, deployment, operator).transfer(cust.address, tokens(1_000))
    return chain, deployment


def make_world(tmp_path: Path, db_url: str, dispute_window_s: int = 0) -> World:
    """A deployment per dispute window, made once per test process; each test starts from its snapshot."""
    chain, deployment = reverted(("world", dispute_window_s), lambda: _deployed(dispute_window_s))
    operator, cust, *provs = chain.dev_accounts(5)
    ops = GridMintContracts(chain, deployment, operator)
    # no audits of passes unless a test asks: this world runs no worker, so an audited pass would wait for ever
    settings = Settings(data_dir=tmp_path, db_url=db_url, audit_rate=0.0)
    queued: list[tuple[str, list[Any]]] = []
    rt = Runtime(settings=settings, sessions=make_sessionmaker(settings.resolved_db_url()),
                 blobs=BlobStore(settings.blob_dir()), chain_id=chain.chain_id, contracts=ops,
                 enqueue=lambda name, args, queue=None: queued.append((name, args)))
    return World(chain, ops, rt, queued, ops.as_account(cust), provs)


@pytest.fixture()
def world(tmp_path: Path, db_url: str) -> World:
    """Runs each test on SQLite and on PostgreSQL (``db_url`` in tests/conftest.py)."""
    return make_world(tmp_path, db_url)


def test_settle_moves_pay_to_pool_once_and_refunds_the_rest(world: World) -> None:
    job = world.fund_done_job("a", [(0, tokens(1)), (0, tokens(1)), (1, tokens("1.5"))])
    before = world.ops.balance_of(world.customer.address)
    refund = settlement.settle_job(world.rt, job)
    assert refund == tokens(10) - tokens("3.5")
    assert world.ops.balance_of(world.customer.address) == before + refund
    assert world.ops.total_deposited() == tokens("3.5")
    assert ("gridmint.epoch", []) in world.queued
    with world.rt.sessions() as s:
        batches = {e.batch for e in s.scalars(select(LedgerEntry))}
    assert len(batches) == 1 and world.ops.batch_released(job, batches.pop())
    # a re-run (a retried task) moves nothing and refunds nothing
    assert settlement.settle_job(world.rt, job) == refund
    assert world.ops.total_deposited() == tokens("3.5")


def test_crash_after_release_before_recording_is_finished_by_the_rerun(world: World) -> None:
    job = world.fund_done_job("b", [(0, tokens(2)), (1, tokens(1))])
    with world.rt.sessions() as s:
        units = [e.unit_id for e in s.scalars(select(LedgerEntry))]
    # the crashed run got the batch on chain but never wrote it to the ledger
    world.ops.release_to_pool(job, settlement.batch_id_for(job, units), tokens(3))
    settlement.settle_job(world.rt, job)
    assert world.ops.total_deposited() == tokens(3)  # not 6
    assert world.ops.get_job(job).released == tokens(3)


def test_epochs_are_cumulative_and_one_claim_pays_every_epoch(world: World) -> None:
    settlement.settle_job(world.rt, world.fund_done_job("e1", [(0, tokens(1)), (1, tokens(2))]))
    assert settlement.post_epoch(world.rt) == 1
    assert settlement.post_epoch(world.rt) is None  # nothing changed: no new root
    p1 = world.as_provider(1)
    assert p1.claim_from_tree(1, settlement.tree_of(_epoch(world, 1))) == tokens(2)
    for n in range(2, 5):
        settlement.settle_job(world.rt, world.fund_done_job(f"e{n}", [(0, tokens(1)), (1, tokens(1))]))
        assert settlement.post_epoch(world.rt) == n
    assert world.ops.latest_epoch() == 4
    # provider 0 waited four epochs: one claim pays all 4 tokens; provider 1 gets what it did not claim yet
    for i, owed in ((0, tokens(4)), (1, tokens(3))):
        view = settlement.payout_for(world.rt, world.providers[i].address)
        proof = [bytes.fromhex(x[2:]) for x in view["proof"]]
        assert view["epoch"] == 4 and verify_proof(world.ops.root_of(4), world.providers[i].address,
                                                   int(view["cumulative"]), proof)
        assert world.as_provider(i).claim_payout(4, int(view["cumulative"]), proof) == owed
        assert world.as_provider(i).claim_payout(4, int(view["cumulative"]), proof) == 0
    assert world.ops.balance_of(world.ops.distributor.address) == 0


def test_crash_between_posting_and_recording_does_not_post_a_second_root(world: World) -> None:
    settlement.settle_job(world.rt, world.fund_done_job("c", [(0, tokens(1))]))
    row = settlement._claim_epoch(world.rt, 0)  # written ahead ...
    assert row is not None and row.status == "posting"
    world.ops.post_root(1, bytes.fromhex(row.root[2:]), row.total)  # ... sent, then the worker died
    # meanwhile more work was pooled: the rerun must finish epoch 1 as written, not post a new root over it
    settlement.settle_job(world.rt, world.fund_done_job("d", [(1, tokens(1))]))
    assert settlement.post_epoch(world.rt) == 1
    assert _epoch(world, 1).status == "posted" and world.ops.latest_epoch() == 1
    assert settlement.post_epoch(world.rt) == 2  # the new work goes into the next epoch


def test_root_waits_for_the_dispute_window_and_a_voided_root_is_reposted(tmp_path: Path, db_url: str) -> None:
    w = make_world(tmp_path, db_url, dispute_window_s=600)
    settlement.settle_job(w.rt, w.fund_done_job("v1", [(0, tokens(1))]))
    assert settlement.post_epoch(w.rt) == 1
    addr = w.providers[0].address
    assert settlement.payout_for(w.rt, addr)["epoch"] == 0  # nothing claimable inside the window
    settlement.settle_job(w.rt, w.fund_done_job("v2", [(0, tokens(1))]))
    assert settlement.post_epoch(w.rt) is None  # previous root still in dispute
    w.ops.void_root(1)  # the guardian vetoes epoch 1
    assert settlement.post_epoch(w.rt) == 1  # re-posted, now covering both jobs
    with w.rt.sessions() as s:
        assert [e.kind for e in s.scalars(select(Event).where(Event.kind.like("epoch_%")))] == [
            "epoch_posted", "epoch_voided", "epoch_posted"]
    w.chain.advance_time(601)
    view = settlement.payout_for(w.rt, addr)
    assert view["epoch"] == 1 and view["cumulative"] == str(tokens(2))


def test_a_stale_epoch_read_does_not_forget_another_workers_root(world: World,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Two epoch tasks at once (the beat's and the one a settlement queues; several workers): worker X reads the
    chain's latest epoch, then worker Y posts and records the next root before X opens its transaction. X took Y's
    row for a voided root, deleted it, wrote another epoch over it, and every later run failed for good ("epoch 2
    on chain has root ..."), the root already on chain unserved. Now X leaves it, and the next run goes on."""
    w = world
    settlement.settle_job(w.rt, w.fund_done_job("j1", [(0, tokens(1))]))
    assert settlement.post_epoch(w.rt) == 1
    settlement.settle_job(w.rt, w.fund_done_job("j2", [(1, tokens(2))]))
    c = w.rt.contracts
    real_latest, interleaved = type(c).latest_epoch, []

    def stale(self: Any) -> int:  # X's read, then Y's whole run and another settlement before X goes on
        got = real_latest(self)
        if not interleaved:
            interleaved.append(got)
            assert settlement.post_epoch(w.rt) == 2  # worker Y
            settlement.settle_job(w.rt, w.fund_done_job("j3", [(0, tokens(3))]))
        return got

    monkeypatch.setattr(type(c), "latest_epoch", stale)
    assert settlement.post_epoch(w.rt) is None  # worker X: its read is stale, it leaves the epoch to the next run
    monkeypatch.setattr(type(c), "latest_epoch", real_latest)
    assert interleaved == [1] and _epoch(w, 2).status == "posted" and "0x" + c.root_of(2).hex() == _epoch(w, 2).root
    with w.rt.sessions() as s:
        assert [e.kind for e in s.scalars(select(Event).where(Event.kind.like("epoch_%")))] == ["epoch_posted"] * 2
    assert settlement.post_epoch(w.rt) == 3  # j3's pay goes into the next root
    view = settlement.payout_for(w.rt, w.providers[1].address)
    assert view["epoch"] == 3 and view["cumulative"] == str(tokens(2))
    assert settlement.payout_for(w.rt, w.providers[0].address)["cumulative"] == str(tokens(4))


def test_a_root_voided_after_a_crash_before_recording_is_rebuilt_not_resent(tmp_path: Path, db_url: str) -> None:
    """The run that sent epoch 1's root died before recording it, and the guardian voided that root inside its
    dispute window: the next run re-sent the very root the guardian had vetoed, and logged nothing. Now it logs the
    veto and posts a root built from the ledger as it is."""
    w = make_world(tmp_path, db_url, dispute_window_s=600)
    settlement.settle_job(w.rt, w.fund_done_job("a", [(0, tokens(1))]))
    row = settlement._claim_epoch(w.rt, 0)  # written ahead ...
    assert row is not None
    w.ops.post_root(1, bytes.fromhex(row.root[2:]), row.total)  # ... sent; the worker dies here
    w.ops.void_root(1)  # the guardian's veto
    settlement.settle_job(w.rt, w.fund_done_job("b", [(1, tokens(5))]))
    assert settlement.post_epoch(w.rt) == 1
    assert "0x" + w.ops.root_of(1).hex() != row.root and _epoch(w, 1).root == "0x" + w.ops.root_of(1).hex()
    assert _epoch(w, 1).entries == {w.providers[0].address: str(tokens(1)), w.providers[1].address: str(tokens(5))}
    with w.rt.sessions() as s:
        events = [(e.kind, e.data.get("root")) for e in s.scalars(select(Event).where(Event.kind.like("epoch_%")))]
    assert events == [("epoch_voided", row.root), ("epoch_posted", _epoch(w, 1).root)]
    # a root written ahead and never sent (the crash came first) is still sent as written
    settlement.settle_job(w.rt, w.fund_done_job("c", [(0, tokens(1))]))
    w.chain.advance_time(601)
    ahead = settlement._claim_epoch(w.rt, 1)
    assert ahead is not None and settlement.post_epoch(w.rt) == 2 and _epoch(w, 2).root == ahead.root


def test_a_vetoed_root_is_not_sent_again_till_the_ledger_changes(tmp_path: Path, db_url: str) -> None:
    """The guardian voids epoch 1 and nothing is settled since: the same root is not posted again (a review found
    the very root vetoed sent again at once, with a new dispute window); once the ledger changes, the next root is."""
    w = make_world(tmp_path, db_url, dispute_window_s=600)
    settlement.settle_job(w.rt, w.fund_done_job("v1", [(0, tokens(1))]))
    assert settlement.post_epoch(w.rt) == 1
    vetoed = w.ops.root_of(1)
    w.ops.void_root(1)
    assert settlement.post_epoch(w.rt) is None and settlement.post_epoch(w.rt) is None
    assert w.ops.latest_epoch() == 0
    settlement.settle_job(w.rt, w.fund_done_job("v2", [(1, tokens(2))]))
    assert settlement.post_epoch(w.rt) == 1 and w.ops.root_of(1) not in (vetoed, b"\x00" * 32)


def test_a_root_voided_as_it_lands_is_never_served_as_claimable(tmp_path: Path, db_url: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The guardian voids the root between its post and the poster's read of when it is claimable: the epoch is not
    recorded as posted (a review found it recorded claimable at once, and its proofs served for a root the chain
    no longer has); the next run logs the veto."""
    w = make_world(tmp_path, db_url, dispute_window_s=600)
    settlement.settle_job(w.rt, w.fund_done_job("p1", [(0, tokens(1))]))
    c = w.rt.contracts
    real = type(c).latest_claimable_at

    def voided_first(self: Any) -> int:
        if w.ops.latest_epoch() == 1:  # (read after the post: the guardian got there first)
            w.ops.void_root(1)
        return real(self)

    monkeypatch.setattr(type(c), "latest_claimable_at", voided_first)
    assert settlement.post_epoch(w.rt) is None
    monkeypatch.setattr(type(c), "latest_claimable_at", real)
    assert settlement.payout_for(w.rt, w.providers[0].address)["epoch"] == 0
    assert settlement.post_epoch(w.rt) is None  # (the vetoed root, not sent again)
    with w.rt.sessions() as s:
        assert [e.kind for e in s.scalars(select(Event).where(Event.kind.like("epoch_%")))] == ["epoch_voided"]
        assert s.scalars(select(PayoutEpoch)).all() == []


def test_posting_roots_reads_no_chain_logs(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The veto check reads the ledger's own record of voided roots, never the chain's logs: a node refusing log
    reads (a rate limit, a pruned range) does not stop the roots (a review found the first version read every
    RootVoided log from the deployment on, for every root, and failed the post with it)."""
    w = world
    c = w.rt.contracts

    def refused(*_a: Any, **_k: Any) -> list[Any]:
        raise ChainError("logs unreadable: 429 Too Many Requests")

    monkeypatch.setattr(type(c), "_logs", refused)
    for i, epoch in enumerate((1, 2)):
        settlement.settle_job(w.rt, w.fund_done_job(f"j{i}", [(0, tokens(1))]))
        assert settlement.post_epoch(w.rt) == epoch


def test_a_root_another_run_sent_first_is_recorded_once(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker B reads the chain; worker A writes epoch 1's row and sends its root; B finds A's row and would send it
    too: it records it instead, once (a review found B's send refused, SettlementWrongEpoch, its task failed)."""
    w = world
    settlement.settle_job(w.rt, w.fund_done_job("c1", [(0, tokens(1))]))
    c = w.rt.contracts
    real = type(c).latest_epoch
    sent: list[int] = []

    def stale(self: Any) -> int:
        got = real(self)
        if not sent:
            sent.append(got)
            row = settlement._claim_epoch(w.rt, got)  # worker A writes ahead ...
            assert row is not None
            w.ops.post_root(row.epoch, bytes.fromhex(row.root[2:]), row.total)  # ... and sends, not yet recorded
        return got

    monkeypatch.setattr(type(c), "latest_epoch", stale)
    assert settlement.post_epoch(w.rt) == 1  # worker B
    monkeypatch.setattr(type(c), "latest_epoch", real)
    assert _epoch(w, 1).status == "posted" and "0x" + c.root_of(1).hex() == _epoch(w, 1).root
    with w.rt.sessions() as s:
        assert [e.kind for e in s.scalars(select(Event).where(Event.kind.like("epoch_%")))] == ["epoch_posted"]


def test_payout_endpoint(world: World) -> None:
    settlement.settle_job(world.rt, world.fund_done_job("h", [(0, tokens(1))]))
    settlement.post_epoch(world.rt)
    api = TestClient(create_app(world.rt))
    got = api.get(f"/payouts/{world.providers[0].address.lower()}")
    assert got.status_code == 200
    assert got.json()["cumulative"] == str(tokens(1)) and got.json()["epoch"] == 1
    assert api.get(f"/payouts/{world.providers[1].address}").json()["cumulative"] == "0"
    bad = api.get("/payouts/0x1234")
    assert bad.status_code == 422 and "not an address" in bad.text


def test_a_payout_view_reads_only_the_addresss_ledger_entries(world: World) -> None:
    """``GET /payouts/{address}`` is anonymous: it used to add up every released ledger entry of every provider
    (1.1 s at 300,000 entries) to answer for one. Now each of its ledger reads goes through the provider index
    (the query plan says so; PostgreSQL is asked with sequential scans off, as a large table would plan it), and
    the answer is the same as the full sum's."""
    for n in range(3):
        settlement.settle_job(world.rt, world.fund_done_job(f"p{n}", [(0, tokens(1)), (1, tokens(2)), (0, 5)]))
    world.fund_done_job("unreleased", [(0, tokens(7))])
    engine = world.rt.sessions.kw["bind"]
    seen: list[tuple[str, Any]] = []

    def grab(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        if "ledger_entries" in statement:
            seen.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", grab)
    try:
        views = {a.address: settlement.payout_for(world.rt, a.address) for a in world.providers}
    finally:
        event.remove(engine, "before_cursor_execute", grab)
    with world.rt.sessions() as s:
        full = settlement.cumulative_earnings(s)
    assert {a: int(v["pooled"]) for a, v in views.items()} == {a.address: full.get(a.address, 0)
                                                               for a in world.providers}
    assert int(views[world.providers[0].address]["pooled"]) == 3 * (tokens(1) + 5)
    assert len(seen) == len(world.providers)
    with engine.connect() as conn:
        for statement, parameters in seen:
            if engine.dialect.name == "postgresql":
                conn.exec_driver_sql("SET enable_seqscan = off")
                plan = conn.exec_driver_sql("EXPLAIN " + statement, parameters).all()
            else:
                plan = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters).all()
            assert "ix_ledger_entries_provider" in str(plan), (statement, plan)


def _epoch(world: World, n: int) -> PayoutEpoch:
    with world.rt.sessions() as s:
        row = s.get(PayoutEpoch, n)
        assert row is not None
        return row


def test_sweep_requeues_lost_steps_and_nothing_else(world: World) -> None:
    """A settle task that ran out of retries (chain node down), a lost advance, a lost adjudication, a lost stocking
    of canaries, a lost audit: the periodic sweep queues each again; finished work (a settled job, a round still
    training), checks queued a moment ago (their stocking step still on its way) and a pass audited a moment ago
    are left alone."""
    lost = world.fund_done_job("lost-settle", [(0, tokens(1))])
    settled = world.fund_done_job("settled", [(1, tokens(1))])
    settlement.settle_job(world.rt, settled)
    with world.rt.sessions.begin() as s:
        for name, statuses in (("ready", ["verified", "verified"]), ("training", ["verified", "assigned"])):
            job_id = "0x" + keccak(text=name).hex()
            s.add(Job(id=job_id, customer=world.customer.address, spec={}, budget=1, global_blob="0" * 64,
                      status="running", round=1))
            s.flush()
            s.add(Unit(id="0x" + keccak(text=name + "-old").hex(), job_id=job_id, round=0, shard=0, status="assigned"))
            for shard, status in enumerate(statuses):
                s.add(Unit(id="0x" + keccak(text=f"{name}-{shard}").hex(), job_id=job_id, round=1, shard=shard,
                           status=status))
        s.flush()
        disputed_unit = "0x" + keccak(text="training-1").hex()
        s.add(Verification(unit_id=disputed_unit, provider=world.providers[0].address, segment=0, status="disputed"))
        s.add(Verification(unit_id=disputed_unit, provider=world.providers[0].address, segment=1, status="fraud"))
        # a verifier caught approving a canary, its slash lost; and one whose slash went through
        for status, slash_tx in (("canary_missed", None), ("canary_missed", "0x" + "11" * 32)):
            s.add(Verification(unit_id=disputed_unit, provider=world.providers[1].address, segment=2, status=status,
                               slash_tx=slash_tx, canary={"unit_id": "0x" + "22" * 32}))
        # a unit's checks waiting for canaries a stocking step (lost) was to forge; another's, just queued
        for unit, age in (("ready-0", service.STOCK_LOST_S + 5), ("ready-1", 0)):
            for seg in (0, 1):
                s.add(Verification(unit_id="0x" + keccak(text=unit).hex(), provider=world.providers[2].address,
                                   segment=seg, status="stocking", created_at=now_s() - age))
        # a pass whose audit (lost) was to be replayed by the referee; another's, passed a moment ago
        audits = [Verification(unit_id=disputed_unit, provider=world.providers[0].address, segment=seg,
                               status="auditing", verdict_at=now_s() - age)
                  for seg, age in ((3, checking.AUDIT_LOST_S + 5), (4, 0))]
        s.add_all(audits)
        s.flush()
        lost_audit = audits[0].id
    world.queued.clear()
    assert service.sweep(world.rt) == {"adjudicate": 1, "punish_verifier": 1, "advance": 1, "settle": 1,
                                       "cancelled": 0, "stock_canaries": 1, "audit_check": 1, "slashes_paid": 0}
    with world.rt.sessions() as s:
        dispute = s.scalars(select(Verification.id).where(Verification.status == "disputed")).one()
        lazy = s.scalars(select(Verification.id).where(Verification.status == "canary_missed",
                                                       Verification.slash_tx.is_(None))).one()
    assert sorted(world.queued) == sorted([("gridmint.adjudicate", [dispute]), ("gridmint.punish_verifier", [lazy]),
                                           ("gridmint.advance", ["0x" + keccak(text="ready").hex()]),
                                           ("gridmint.settle", [lost]),
                                           ("gridmint.stock_canaries", ["0x" + keccak(text="ready-0").hex()]),
                                           ("gridmint.audit_check", [lost_audit])])
    # the re-queued settle settles it, and the next sweep finds nothing more to settle
    settlement.settle_job(world.rt, lost)
    world.queued.clear()
    assert service.sweep(world.rt)["settle"] == 0


def _bonded_pair(w: World) -> tuple[Any, Any]:
    """A verifier bond of 50 GMT, and two of the world's providers staking 120 GMT each: a provider and a verifier."""
    w.ops.govern([("staking", "setVerifierBond", (tokens(50),))], "bond")
    prov, ver = w.providers[0], w.providers[1]
    for a in (prov, ver):
        w.ops.transfer(a.address, tokens(120))
        w.ops.as_account(a).stake(tokens(120))
    return prov, ver


def test_an_accusation_in_a_form_the_staking_contract_refuses_is_refused_with_the_verdict_and_never_jams_a_dispute(
        world: World) -> None:
    """eth_account recovers a signer from v 0/1 and from a high s (the same signature, malleated); GridStaking.accuse
    (OpenZeppelin ECDSA) reverts on both. A verdict whose accusation came in such a form was taken (200), and the
    relay of its dispute then reverted on every try (the task's retries, every sweep): the dispute was never ruled,
    the provider never paid, the liar never benched. Now recover_accusation refuses them (record_verdict calls it
    before it writes anything: the verdict is a 401); and a relay the contract refuses for its signature rules the
    dispute unbonded."""
    from marketplace import checking
    from protocol.errors import SignatureError
    from protocol.signing import _SECP256K1_N, ACCUSE_ALL, recover_accusation
    from protocol.verification import fraud_evidence

    w = world
    prov, ver = _bonded_pair(w)
    evidence = fraud_evidence("0x" + "01" * 32, 0, prov.address)
    good = w.ops.as_account(ver).sign_accusation(prov.address, evidence, ACCUSE_ALL)
    r, s_, v = good[:32], int.from_bytes(good[32:64], "big"), good[64]
    staking, chain = w.rt.contracts.staking.address, w.rt.chain_id
    assert recover_accusation(chain, staking, prov.address, evidence, "0x" + good.hex()) == ver.address
    low_v = r + good[32:64] + bytes([v - 27])
    high_s = r + (_SECP256K1_N - s_).to_bytes(32, "big") + bytes([55 - v])  # (27 <-> 28)
    for bad in (low_v, high_s, good[:64], good + b"\x00"):
        with pytest.raises(SignatureError, match="not in the form the staking contract takes"):
            recover_accusation(chain, staking, prov.address, evidence, "0x" + bad.hex())
    # one taken before this: the relay rules the dispute unbonded instead of raising on every try
    assert not checking._open_dispute(w.rt, prov.address, ver.address, evidence, "0x" + low_v.hex())  # noqa: SLF001
    assert not w.ops.dispute_of(evidence).is_open and w.ops.stake_state(ver.address).bonded == 0
    assert checking._open_dispute(w.rt, prov.address, ver.address, evidence, "0x" + good.hex())  # noqa: SLF001
    assert w.ops.dispute_of(evidence).is_open


def test_a_verifiers_second_open_accusation_is_bonded_too(world: World) -> None:
    """The relay asked GridStaking.freeStakeOf whether a verifier could back an accusation; that is 0 while any of
    its accusations is open, so a second one at once went unbonded (a false one then cost nothing) although accuse
    bonds from the stake beyond locks and bonds. Now each is bonded while that stake lasts."""
    from marketplace import checking
    from protocol.signing import ACCUSE_ALL
    from protocol.verification import fraud_evidence

    w = world
    prov, ver = _bonded_pair(w)
    vc = w.ops.as_account(ver)
    evidence = [fraud_evidence("0x" + f"{i:064x}", 0, prov.address) for i in (1, 2, 3)]
    signed = ["0x" + vc.sign_accusation(prov.address, e, ACCUSE_ALL).hex() for e in evidence]
    assert checking._open_dispute(w.rt, prov.address, ver.address, evidence[0], signed[0])  # noqa: SLF001
    assert w.ops.free_stake_of(ver.address) == 0  # what the relay used to read
    assert checking._open_dispute(w.rt, prov.address, ver.address, evidence[1], signed[1])  # noqa: SLF001
    assert w.ops.dispute_of(evidence[1]).is_open and w.ops.stake_state(ver.address).bonded == tokens(100)
    # 20 GMT left beyond its bonds: a third is not bonded (the referee still rules on it, nothing moves)
    assert not checking._open_dispute(w.rt, prov.address, ver.address, evidence[2], signed[2])  # noqa: SLF001
    assert not w.ops.dispute_of(evidence[2]).is_open and w.ops.stake_state(ver.address).bonded == tokens(100)
