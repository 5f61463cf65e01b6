"""Prometheus metrics for one marketplace app: HTTP traffic by route template, and market state read at scrape time.

Each app gets its own ``CollectorRegistry`` (never the process-global default), so one process can build several apps
(tests do). With several worker processes behind one port (``gridmint marketplace serve --workers K``) a scrape lands
on any one of them, so the request counters then live in prometheus_client's multiprocess mode: the serve command sets
``PROMETHEUS_MULTIPROC_DIR`` (a fresh folder under the data dir) before the workers start, each worker's values go to
memory-mapped files there, and every scrape sums all of them. Separate API instances (other ports or machines) are
separate scrape targets, as usual. The market gauges come from the database at scrape time, so every process reports
the same figures.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, multiprocess
from prometheus_client.exposition import choose_encoder
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from marketplace.common import OPEN_CHECKS
from marketplace.db import Job, PayoutEpoch, Provider, Unit, Verification, pools_seen
from marketplace.settings import judging_pool

log = logging.getLogger(__name__)

# Seconds. Fine at the low end: a signed heartbeat should answer in a few milliseconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
UNMATCHED = "<unmatched>"  # requests no route matched: one label, whatever path a scanner tries
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})  # any other method is "OTHER"
# Statuses reported even when no row has them, so a gauge drops to 0 instead of vanishing (see marketplace.db).
UNIT_STATUSES = ("pending", "assigned", "submitted", "verified", "cancelled")
JOB_STATUSES = ("running", "done", "settled", "cancelling", "cancelled", "failing", "failed")
PROVIDER_STATUSES = ("active", "slashed")
CONTENT_TYPE = CONTENT_TYPE_LATEST
#: Set (before prometheus_client is imported) in every worker of a multi-worker server: see the module docstring.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True)
class MarketSnapshot:
    """Counts read from the database at one instant."""

    units: dict[str, int] = field(default_factory=dict)  # by status
    jobs: dict[str, int] = field(default_factory=dict)  # by status
    providers: dict[str, int] = field(default_factory=dict)  # registered, by status
    providers_active: int = 0  # status active and seen within the activity window
    latest_posted_epoch: int = 0  # 0: no payout root posted yet (epochs start at 1)
    # open disputes (awaiting a ruling, or a provider's reveal) by the referee that judges them: "default", or the
    # kernels of a referee pool (GRIDMINT_REFEREE_POOLS); each pool named is reported, as 0 when it has none
    disputes: dict[str, int] = field(default_factory=dict)
    # each referee pool's last sign of life, unix s (0: never seen)
    pools_seen: dict[str, int] = field(default_factory=dict)
    checks: dict[str, int] = field(default_factory=dict)  # checks not yet answered, by status (common.OPEN_CHECKS)
    stocking_since: int = 0  # when the oldest check still waiting for its unit's canaries was queued (0: none)


def market_families(snap: MarketSnapshot) -> list[Metric]:
    """The gauges for ``snap`` (pure)."""
    units = GaugeMetricFamily("gridmint_units", "Work units by status", labels=["status"])
    for status, n in sorted(({s: 0 for s in UNIT_STATUSES} | snap.units).items()):
        units.add_metric([status], n)
    jobs = GaugeMetricFamily("gridmint_jobs", "Jobs by status", labels=["status"])
    for status, n in sorted(({s: 0 for s in JOB_STATUSES} | snap.jobs).items()):
        jobs.add_metric([status], n)
    providers = GaugeMetricFamily("gridmint_providers", "Registered providers by status", labels=["status"])
    for status, n in sorted(({s: 0 for s in PROVIDER_STATUSES} | snap.providers).items()):
        providers.add_metric([status], n)
    disputes = GaugeMetricFamily("gridmint_disputes_open", "Disputes awaiting a referee's ruling (or a provider's "
                                 "reveal), by referee: default (with the disputes handed over from an away pool), "
                                 "or a referee pool's kernels", labels=["referee"])
    for referee, n in sorted(({"default": 0} | snap.disputes).items()):
        disputes.add_metric([referee], n)
    seen = GaugeMetricFamily("gridmint_referee_pool_seen_timestamp_seconds", "A referee pool's last sign of life "
                             "(0: never); after referee_pool_wait_s its disputes go to the default referee",
                             labels=["referee"])
    for referee, t in sorted(snap.pools_seen.items()):
        seen.add_metric([referee], t)
    checks = GaugeMetricFamily("gridmint_checks_open", "Real checks not yet answered, by status: stocking (waiting "
                               "for a worker to forge the unit's canaries), pending (waiting for a verifier), "
                               "assigned (out with a verifier, or held behind a canary out with one: planted canaries "
                               "are neither counted nor told apart), auditing (passed, waiting for the referee's "
                               "audit replay)", labels=["status"])
    for status, n in sorted(({s: 0 for s in PUBLIC_CHECK_STATES} | snap.checks).items()):
        checks.add_metric([status], n)
    return [
        units, jobs, providers, disputes, seen, checks,
        GaugeMetricFamily("gridmint_checks_stocking_since_timestamp_seconds", "When the oldest check still waiting "
                          "for its unit's canaries was queued (0: none); the sweep sends its step again after a "
                          "minute, so an old one means no worker is taking it", value=snap.stocking_since),
        GaugeMetricFamily("gridmint_providers_active", "Providers in good standing that were seen within the activity "
                          "window (unit_timeout_s)", value=snap.providers_active),
        GaugeMetricFamily("gridmint_payout_epoch_latest", "Newest payout epoch whose root is posted on chain (0: none)",
                          value=snap.latest_posted_epoch),
    ]


#: The states ``gridmint_checks_open`` reports: the open ones less "held" (counted as "assigned")
PUBLIC_CHECK_STATES = tuple(c for c in OPEN_CHECKS if c != "held")


def read_snapshot(s: Session, *, now: int, active_window_s: int, pools: Sequence[str] = ()) -> MarketSnapshot:
    """Count units, jobs and providers by status, active providers, the newest posted epoch, open disputes by
    referee and each referee pool's last sign of life (``pools``: the pools' kernels), open checks by status and
    the oldest one waiting for its canaries (eight small queries)."""

    def by_status(col: Any) -> dict[str, int]:
        return {str(k): int(v) for k, v in s.execute(select(col, func.count()).group_by(col))}

    active = s.scalar(select(func.count()).select_from(Provider)
                      .where(Provider.status == "active", Provider.last_seen >= now - active_window_s))
    epoch = s.scalar(select(func.max(PayoutEpoch.epoch)).where(PayoutEpoch.status == "posted"))
    disputes = {p: 0 for p in pools}
    seen = {p: 0 for p in pools} | pools_seen(s, pools)
    for build, fallen_back, n in s.execute(
            select(Unit.build, Verification.fallback_at.is_not(None), func.count())
            .join(Verification, Verification.unit_id == Unit.id)
            .where(Verification.status.in_(["disputed", "bisecting"]))
            .group_by(Unit.build, Verification.fallback_at.is_not(None))):
        referee = judging_pool(build, pools, bool(fallen_back)) or "default"
        disputes[referee] = disputes.get(referee, 0) + int(n)
    # (a public page: a verifier reading it around its poll must not tell a canary from a real task, as it did by
    # the "held" row and the canary's own appearing; a held check is counted as the one out, canaries not at all)
    checks: dict[str, int] = {}
    for status, n in s.execute(select(Verification.status, func.count())
                               .where(Verification.status.in_(OPEN_CHECKS), Verification.canary.is_(None))
                               .group_by(Verification.status)):
        key = "assigned" if status == "held" else str(status)
        checks[key] = checks.get(key, 0) + int(n)
    stocking = s.scalar(select(func.min(Verification.created_at)).where(Verification.status == "stocking"))
    return MarketSnapshot(units=by_status(Unit.status), jobs=by_status(Job.status),
                          providers=by_status(Provider.status),
                          providers_active=int(active or 0), latest_posted_epoch=int(epoch or 0), disputes=disputes,
                          pools_seen=seen, checks=checks, stocking_since=int(stocking or 0))


class MarketCollector(Collector):
    """Reads the market gauges from the database on every scrape. If the database cannot be read, the scrape still
    answers, with ``gridmint_market_scrape_ok 0`` instead of the gauges."""

    def __init__(self, sessions: sessionmaker[Session], *, active_window_s: int,
                 clock: Callable[[], float] = time.time, pools: Sequence[str] = ()) -> None:
        self.sessions, self.active_window_s, self.clock, self.pools = sessions, active_window_s, clock, tuple(pools)

    def collect(self) -> Iterator[Metric]:
        try:
            with self.sessions() as s:
                snap = read_snapshot(s, now=int(self.clock()), active_window_s=self.active_window_s, pools=self.pools)
        except Exception:  # noqa: BLE001 - a metrics scrape must not fail because the database is away
            log.exception("reading market metrics failed")
            yield GaugeMetricFamily("gridmint_market_scrape_ok", "1 if the market gauges could be read", value=0)
            return
        yield GaugeMetricFamily("gridmint_market_scrape_ok", "1 if the market gauges could be read", value=1)
        yield from market_families(snap)

    def describe(self) -> Iterable[Metric]:
        return []  # no scrape at registration time (it would touch the database)


class Metrics:
    """One app's registry: request counter, latency histogram and the market collector."""

    def __init__(self, sessions: sessionmaker[Session], *, active_window_s: int, pools: Sequence[str] = ()) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("gridmint_http_requests", "HTTP requests answered, by route template and status",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("gridmint_http_request_duration_seconds", "Time to answer an HTTP request",
                                 ["method", "route", "status"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.market = MarketCollector(sessions, active_window_s=active_window_s, pools=pools)
        self.registry.register(self.market)
        # Label children by (method, route, status): .labels() costs more than the observation itself. Bounded, as
        # routes and methods are a fixed set and statuses few.
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        children = self._children.get(key)
        if children is None:
            labels = (method, route, str(status))
            children = self._children.setdefault(key, (self.requests.labels(*labels), self.latency.labels(*labels)))
        children[0].inc()
        children[1].observe(seconds)

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """Everything in this registry, in the exposition format the ``Accept`` header asks for (Prometheus text by
        default, OpenMetrics if asked), and its content type. An ``Accept`` prometheus_client cannot read (it raises
        on ``version=abc``) gets the Prometheus text format, as a client asking for nothing in particular does."""
        try:
            encoder, content_type = choose_encoder(accept or "")
        except (TypeError, ValueError):
            encoder, content_type = choose_encoder("")
        return encoder(self.scrape_registry()), content_type

    def scrape_registry(self) -> CollectorRegistry:
        """This app's registry, or in multiprocess mode one that sums every worker's files plus the market gauges."""
        path = os.environ.get(MULTIPROC_ENV)
        if not path:
            return self.registry
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=path)
        registry.register(self.market)
        return registry


class MetricsMiddleware:
    """Plain ASGI middleware (no BaseHTTPMiddleware: no extra task per request, streaming bodies untouched).

    Labels a request by the template of the route that answered it (``/jobs/{job_id}``, not the job id), read from
    ``scope["route"]`` after the app ran; a request that raised is counted as 500."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or UNMATCHED
            method = scope["method"] if scope["method"] in METHODS else "OTHER"
            self.metrics.observe(method, route, status, time.perf_counter() - start)
