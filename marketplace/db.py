"""Database rows (SQLAlchemy 2). Money columns hold integer base units as exact decimal strings."""
from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from eth_utils import keccak
from sqlalchemy import JSON, BigInteger, Boolean, Engine, ForeignKey, Integer, String, UniqueConstraint, create_engine, event
from sqlalchemy import Index, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.types import TypeDecorator


class Money(TypeDecorator[int]):
    """Integer base units stored as a decimal string: exact on SQLite and PostgreSQL alike, up to 2**256."""

    impl = String(80)
    cache_ok = True

    def process_bind_param(self, value: int | None, dialect: Any) -> str | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"money must be int base units, got {value!r}")
        return str(value)

    def process_result_value(self, value: str | None, dialect: Any) -> int | None:
        return None if value is None else int(value)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


def now_s() -> int:
    return int(time.time())


class SignerNonce(Base):
    """Highest nonce seen per signer and lane: a signed request is accepted only with a larger one. ``address`` is
    the signer's, or the signer's + "/beat" for its heartbeats' lane (``protocol.signing.nonce_key``)."""

    __tablename__ = "signer_nonces"
    address: Mapped[str] = mapped_column(String(48), primary_key=True)
    last_nonce: Mapped[int] = mapped_column(BigInteger)


class Provider(Base):
    __tablename__ = "providers"
    address: Mapped[str] = mapped_column(String(42), primary_key=True)
    region: Mapped[str] = mapped_column(String(32))
    gpu: Mapped[str] = mapped_column(String(128))
    vram_mb: Mapped[int] = mapped_column(Integer)
    price: Mapped[int] = mapped_column(Money)
    tokens_per_s: Mapped[int] = mapped_column(BigInteger)  # the node's own benchmark (shown; not used to rank)
    observed_tps: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # delivered on real units (ranks)
    capacity: Mapped[int] = mapped_column(Integer, default=1)
    stake: Mapped[int] = mapped_column(Money, default=0)  # last read from chain
    status: Mapped[str] = mapped_column(String(16), default="active")  # active | slashed
    assigned: Mapped[int] = mapped_column(Integer, default=0)
    completed: Mapped[int] = mapped_column(Integer, default=0)
    dropped: Mapped[int] = mapped_column(Integer, default=0)
    # units verified in a row with at least one segment replayed (reset by a timeout): the trusted-host record
    verified_streak: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    registered_at: Mapped[int] = mapped_column(BigInteger, default=now_s)
    last_seen: Mapped[int] = mapped_column(BigInteger, default=now_s)
    # when the reaper last took a unit from it for silence: offered no work (matching, standby) till seen since
    silent_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # its busy stretch: since when it has held a unit without a break, and the tokens it handed in since (its
    # delivered throughput is measured over the stretch: service._observe_delivery)
    busy_since: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    busy_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class Verifier(Base):
    __tablename__ = "verifiers"
    address: Mapped[str] = mapped_column(String(42), primary_key=True)
    checked: Mapped[int] = mapped_column(Integer, default=0)
    fraud_found: Mapped[int] = mapped_column(Integer, default=0)
    wrong: Mapped[int] = mapped_column(Integer, default=0)
    last_seen: Mapped[int] = mapped_column(BigInteger, default=now_s)
    # when a poll for tasks last found its stake enough (checking.next_verification): only a verifier seen so lately
    # holds back checks on its plan; a registration, which needs no stake, does not set it
    staked_seen_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    plan: Mapped[str] = mapped_column(String(40), default="cpu", server_default="cpu")  # how it replays
    build: Mapped[str | None] = mapped_column(String(160), nullable=True)  # with which kernels (kernel_build)
    # active | benched: it gets no more tasks, for approving a planted known-bad segment (its stake is slashed too)
    # or for an accusation the referee proved false on the verifier's own plan (its bond, if any, is forfeit)
    status: Mapped[str] = mapped_column(String(16), default="active", server_default="active")
    benched_for: Mapped[str | None] = mapped_column(String(300), nullable=True)  # why, in words


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(66), primary_key=True)  # bytes32 hex, also the escrow key
    customer: Mapped[str] = mapped_column(String(42))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)  # JobSpec as JSON
    budget: Mapped[int] = mapped_column(Money)  # what the escrow must hold: units x price cap
    # running | done | settled; running | cancelling | cancelled once the customer cancels the escrow on chain
    # (marketplace.cancellation); running | failing | failed when a round cannot be averaged into a finite model
    # (service.advance)
    status: Mapped[str] = mapped_column(String(16), default="running")
    round: Mapped[int] = mapped_column(Integer, default=0)
    global_blob: Mapped[str] = mapped_column(String(64))  # sha256 of the current global checkpoint
    eval_losses: Mapped[list[Any]] = mapped_column(JSON, default=list)
    refund: Mapped[int | None] = mapped_column(Money, nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now_s)
    settled_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class Unit(Base):
    __tablename__ = "units"
    __table_args__ = (UniqueConstraint("job_id", "round", "shard"),)
    id: Mapped[str] = mapped_column(String(66), primary_key=True)  # bytes32 hex
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    round: Mapped[int] = mapped_column(Integer)
    shard: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    # pending -> assigned -> submitted -> verified | (fraud -> pending again, cheat excluded);
    # assigned -> pending again when reaped (dropped_by) or its provider's stake fell short;
    # cancelled: not verified when its job's escrow was cancelled (never paid)
    provider: Mapped[str | None] = mapped_column(String(42), nullable=True)
    price: Mapped[int | None] = mapped_column(Money, nullable=True)
    rank: Mapped[int | None] = mapped_column(Integer, nullable=True)
    assigned_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    heartbeat_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # provider's last sign of life
    # when the unit is taken back however alive its provider looks (BOINC's report deadline): set at assignment
    deadline_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    steps_done: Mapped[int] = mapped_column(Integer, default=0)
    # providers excluded from the unit for good: convicted of fraud on it (or on any unit of theirs not yet verified)
    excluded: Mapped[list[Any]] = mapped_column(JSON, default=list)
    # providers the unit was taken back from (no heartbeat, or past its deadline): {address: unix s when}. Excluded
    # only while another provider can take the unit: a matching round that finds no free slot elsewhere gives it
    # back to one seen since it dropped it (service.run_matching), so a small market's blips never strand a job
    dropped_by: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict, server_default="{}")
    proof: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    proof_signature: Mapped[str | None] = mapped_column(String(132), nullable=True)
    final_blob: Mapped[str | None] = mapped_column(String(64), nullable=True)
    segment_blobs: Mapped[list[Any]] = mapped_column(JSON, default=list)
    losses: Mapped[list[Any]] = mapped_column(JSON, default=list)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    plan: Mapped[str] = mapped_column(String(40), default="cpu", server_default="cpu")  # how the provider trained
    build: Mapped[str | None] = mapped_column(String(160), nullable=True)  # with which kernels (kernel_build)


class Verification(Base):
    __tablename__ = "verifications"
    # a provider's latest verdicts, and the market's: who gave them (checking.audit_odds)
    __table_args__ = (Index("ix_verifications_provider_verdict", "provider", "verdict_at"),
                      Index("ix_verifications_verdict_at", "verdict_at"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    unit_id: Mapped[str] = mapped_column(ForeignKey("units.id"), index=True)
    provider: Mapped[str] = mapped_column(String(42))  # whose submission is checked
    segment: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    # [stocking ->] pending -> assigned -> passed | auditing (the referee replays the pass, drawn at its verdict or at
    # its provider's conviction: -> passed | audit_failed) | disputed [-> bisecting] -> fraud (referee agreed)
    # | verifier_wrong | dismissed (its referee pool was away: the default referee found nothing, and blames no one);
    # held: the check of a segment whose task is out as a canary (pending again once the canary is answered);
    # stocking: queued while its unit's canaries are forged (checking.stock_canaries), never handed out
    verifier: Mapped[str | None] = mapped_column(String(42), nullable=True)
    assigned_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # the verifier's last sign of life; while stocking, when a stocking step claimed it (checking.stock_canaries)
    heartbeat_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    verdict_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # when its verdict came in
    # when the referee's audit of its pass was drawn (at its verdict, or at its provider's conviction: a pass is
    # audited once; the sweep re-sends an audit lost a while after this)
    audit_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # when the check was queued: a unit trained on an exact plan waits a while for a verifier on that plan
    created_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True, default=now_s)
    replayed_hash: Mapped[str | None] = mapped_column(String(66), nullable=True)
    # how its verifier replayed when it gave its verdict (its registration then: plan, kernels); the referee judges
    # the verdict by these, not by a registration the verifier changed since (None: a verdict before migration 0024)
    verifier_plan: Mapped[str | None] = mapped_column(String(40), nullable=True)
    verifier_build: Mapped[str | None] = mapped_column(String(160), nullable=True)
    signature: Mapped[str | None] = mapped_column(String(132), nullable=True)
    slash_tx: Mapped[str | None] = mapped_column(String(66), nullable=True)  # the evidence id used on chain
    accusation: Mapped[str | None] = mapped_column(String(132), nullable=True)  # verifier's signed Accusation
    # A dispute over a segment trained on another plan than the referee's: the bisection's open question and the
    # provider's signed answers, {"asked": step, "deadline": unix s, "reveals": {step: {blob, hash, signature}}}
    bisect: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # A planted known-bad segment (marketplace.canary): this task, handed out with a forged claim for its segment
    # ({proof, end_blob, true_end, held: id of the real check waiting meanwhile; confirmed: the referee's replay
    # found the forgery wrong}). assigned -> canary_flagged (the verifier was right) | canary_missed (it approved:
    # lazy, once the referee confirms) | void (abandoned); canary_missed -> canary_void (the referee's replay reached
    # the forged claim: the approval was right, nothing slashed)
    canary: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # when a dispute over work on a referee pool's kernels was handed to the default referee, the pool not seen for
    # settings.referee_pool_wait_s (None: judged by the referee its kernels name)
    fallback_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # A canary forged ahead, when the check was queued (marketplace.canary.stock), so that planting one when the
    # task is handed out costs no checkpoint I/O a verifier could time: {proof, end_blob, true_end, telling, prefix,
    # root (of the proof it was forged from), share (the share of checks stocked), source_unit (where one was
    # borrowed from), exact (a bf16 job's retrained variant, for a bit-for-bit replay: canary.for_verifier)};
    # None: this check is never a canary
    decoy: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class Handed(Base):
    """Which segments of which unit a verifier was handed (a row per hand-out): a canary is never planted where
    what it, or any other verifier, saw before tells the forgery (marketplace.canary.plantable, telling), and a
    verifier gets units it has not seen first."""

    __tablename__ = "handed"
    __table_args__ = (Index("ix_handed_verifier_unit", "verifier", "unit_id"),
                      Index("ix_handed_unit_segment", "unit_id", "segment"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    verifier: Mapped[str] = mapped_column(String(42))
    unit_id: Mapped[str] = mapped_column(String(66))
    segment: Mapped[int] = mapped_column(Integer)


class UnitUpload(Base):
    """A checkpoint a provider uploaded, charged to one unit it held (marketplace.uploads): a unit's uploads are
    bounded by what its result and its disputes need. One row per distinct blob: the same bytes again are free."""

    __tablename__ = "unit_uploads"
    __table_args__ = (UniqueConstraint("unit_id", "provider", "sha256"),
                      Index("ix_unit_uploads_provider_sha", "provider", "sha256"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    unit_id: Mapped[str] = mapped_column(String(66))
    provider: Mapped[str] = mapped_column(String(42))
    sha256: Mapped[str] = mapped_column(String(64))
    at: Mapped[int] = mapped_column(BigInteger, default=now_s)


class RefereePool(Base):
    """A referee pool's last sign of life (settings.referee_pools): its workers write it every few seconds."""

    __tablename__ = "referee_pools"
    build: Mapped[str] = mapped_column(String(160), primary_key=True)  # the pool's kernels
    seen_at: Mapped[int] = mapped_column(BigInteger)


def pools_seen(s: Any, pools: Sequence[str]) -> dict[str, int]:
    """Each of ``pools`` (kernel builds) that was ever seen: its last sign of life, unix s."""
    if not pools:
        return {}
    return {b: int(t) for b, t in s.execute(select(RefereePool.build, RefereePool.seen_at)
                                            .where(RefereePool.build.in_(list(pools))))}


class LedgerEntry(Base):
    """What a job owes a provider for one verified unit, or a verifier for one passed replay of it
    (``verification_id``; its ``unit_id`` is then :func:`check_fee_key`, not the unit's). Unique per key: credited
    exactly once."""

    __tablename__ = "ledger_entries"
    __table_args__ = (UniqueConstraint("job_id", "unit_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    unit_id: Mapped[str] = mapped_column(String(66))
    provider: Mapped[str] = mapped_column(String(42), index=True)
    amount: Mapped[int] = mapped_column(Money)
    released: Mapped[bool] = mapped_column(Boolean, default=False)  # moved from escrow to the payout pool
    batch: Mapped[str | None] = mapped_column(String(66), nullable=True)  # JobEscrow.releaseToPool batch id
    verification_id: Mapped[int | None] = mapped_column(Integer, nullable=True)  # a verifier's fee: for that check


def check_fee_key(verification_id: int) -> str:
    """The ledger key of the fee for check ``verification_id`` (bytes32 hex, in the unit ids' column: the one
    unique key, so a fee is credited once)."""
    return "0x" + keccak(b"GridMint/check-fee/v1" + verification_id.to_bytes(32, "big")).hex()


class PayoutEpoch(Base):
    """One posted (or being posted) payout root: every provider's cumulative pooled earnings at that epoch.

    Written ahead with status ``posting`` before the transaction is sent, ``posted`` once it is on chain."""

    __tablename__ = "payout_epochs"

    epoch: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    root: Mapped[str] = mapped_column(String(66))
    total: Mapped[int] = mapped_column(Money)
    entries: Mapped[dict[str, Any]] = mapped_column(JSON)  # {address: cumulative base units as a decimal string}
    status: Mapped[str] = mapped_column(String(16))  # posting | posted
    posted_at: Mapped[int] = mapped_column(BigInteger)
    claimable_at: Mapped[int] = mapped_column(BigInteger)


class Slash(Base):
    """A slash this marketplace sent or must send again, under GridStaking's ``slashDelay`` (marketplace.slashes).

    ``kind`` "payout": a slash that waits out the delay; the sweep pays it out (``finalizeSlash``) once ``ready_at``
    (chain time, as of when it was noted: a pause pushes it back) has passed, unless the guardian voided it first.
    ``kind`` "redo": a slash or verdict (under ``basis["after"]``) that found ``account``'s stake held by its own
    pending slashes (``basis["held"]``: evidence -> amount; sent with a stolen operator key, say) took less than it
    should have; once none of those can be voided any more, what their voids gave back, less what slashes of the
    account took from block ``since_block`` on (at most ``want``, or for ``basis["bond"]`` the part of a false
    accuser's bond its verdict could not take; None: all of it), is slashed again under ``evidence`` (derived from the
    first one's), its bounty to ``beneficiary``; the row then waits as that slash's "payout". A redo is noted before
    its first slash is sent, ``basis["armed"]`` false till that slash is (only an armed redo is sent). ``done_at``: when
    it was closed; ``outcome`` "paid" (this marketplace finalized it), "gone" (voided, or paid by someone else),
    "slashed" (a redo paid at once), "nothing" (a redo with nothing given back)."""

    __tablename__ = "slashes"
    evidence: Mapped[str] = mapped_column(String(66), primary_key=True)
    kind: Mapped[str] = mapped_column(String(8), default="payout")
    account: Mapped[str] = mapped_column(String(42))
    amount: Mapped[int] = mapped_column(Money)
    ready_at: Mapped[int] = mapped_column(BigInteger)
    beneficiary: Mapped[str | None] = mapped_column(String(42), nullable=True)
    want: Mapped[int | None] = mapped_column(Money, nullable=True)
    since_block: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    basis: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    noted_at: Mapped[int] = mapped_column(BigInteger, default=now_s)
    done_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True, index=True)
    outcome: Mapped[str | None] = mapped_column(String(8), nullable=True)


class Lease(Base):
    """A step that must not run twice at once, across every worker (marketplace.leases): held by ``holder`` till
    ``until`` (the database's clock, seconds); lapsed, anyone may take it."""

    __tablename__ = "leases"
    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    holder: Mapped[str] = mapped_column(String(32))
    until: Mapped[int] = mapped_column(BigInteger)


class Event(Base):
    """Human-readable history of a job (shown by the web page and the demo)."""

    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str | None] = mapped_column(String(66), nullable=True, index=True)
    kind: Mapped[str] = mapped_column(String(32))
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    at: Mapped[int] = mapped_column(BigInteger, default=now_s)


class LoginNonce(Base):
    """A customer-login (SIWE) nonce this server issued: accepted once, before ``expires_at`` (marketplace.siwe)."""

    __tablename__ = "login_nonces"
    nonce: Mapped[str] = mapped_column(String(64), primary_key=True)
    issued_at: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[int] = mapped_column(BigInteger, index=True)
    used_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    used_by: Mapped[str | None] = mapped_column(String(42), nullable=True)


# A customer's own jobs (GET /customers/me/jobs) without a scan of every job.
Index("ix_jobs_customer", Job.customer)


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(conn: Any, _record: Any) -> None:
            # WAL lets the API and the Celery worker (separate processes) read while one writes.
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def alembic_config(connection: Any = None) -> Any:
    """Alembic's config for ``marketplace/migrations``, bound to ``connection``."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).with_name("migrations")))
    cfg.attributes["connection"] = connection
    return cfg


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest migration. Safe when several processes start at once: PostgreSQL takes an
    advisory lock, SQLite a file lock beside the database."""
    from alembic import command

    with _migration_lock(engine), engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7368290521)")
        command.upgrade(alembic_config(conn), "head")


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    path = engine.url.database if engine.dialect.name == "sqlite" else None
    if not path or path == ":memory:":
        yield
        return
    import fcntl

    with open(f"{path}.migrate-lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


class WriteGate:
    """Begins the hot write transactions (a signed request's nonce, a heartbeat) on ``engine``.

    On a SQLite file, writers queue on a lock instead of on SQLite's busy handler. The busy handler polls with
    growing sleeps (up to 100 ms between tries), so under many concurrent writers a waiting transaction sleeps long
    after the lock is free: measured p99 in the hundreds of ms with 2 API processes. Here one thread per process waits
    on a ``threading.Lock`` and one process at a time holds an ``flock`` on ``<db>.writers``; the kernel wakes the
    next waiter as soon as the holder unlocks. Writers that skip the gate (ORM sessions, the Celery worker) still meet
    it at SQLite's lock, so correctness never depends on the gate, only latency. On PostgreSQL (row locks) and
    in-memory SQLite it is just ``engine.begin()``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        path = engine.url.database if engine.dialect.name == "sqlite" else None
        self._path = f"{path}.writers" if path and path != ":memory:" else None
        self._lock = threading.Lock()
        self._file: Any = None
        self._pid = os.getpid()

    @contextmanager
    def begin(self) -> Iterator[Any]:
        if self._path is None:
            with self.engine.begin() as conn:
                yield conn
            return
        import fcntl

        if self._pid != os.getpid():  # first use, or a forked child: an inherited lock may be held by a thread that
            # does not exist here, and an inherited file shares the parent's flock, so neither would exclude anything
            self._lock, self._file, self._pid = threading.Lock(), None, os.getpid()
        with self._lock:
            if self._file is None:
                self._file = open(self._path, "a")  # noqa: SIM115 - held for the life of the process
            fcntl.flock(self._file, fcntl.LOCK_EX)
            try:
                with self.engine.begin() as conn:
                    yield conn
            finally:
                fcntl.flock(self._file, fcntl.LOCK_UN)


_per_engine_guard = threading.Lock()
T = TypeVar("T")


def per_engine(engine: Engine, name: str, factory: Callable[[Engine], T]) -> T:
    """The one ``factory(engine)`` called ``name`` for ``engine`` in this process, made on first use and kept on the
    engine itself (so both go away together)."""
    attr = f"_gridmint_{name}"
    obj: T | None = getattr(engine, attr, None)
    if obj is None:
        with _per_engine_guard:
            obj = getattr(engine, attr, None)
            if obj is None:
                obj = factory(engine)
                setattr(engine, attr, obj)
    return obj


def write_gate(engine: Engine) -> WriteGate:
    """The one ``WriteGate`` of ``engine`` in this process."""
    return per_engine(engine, "write_gate", WriteGate)


def make_sessionmaker(url: str) -> sessionmaker[Any]:
    engine = make_engine(url)
    migrate(engine)
    return sessionmaker(engine, expire_on_commit=False)


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))
