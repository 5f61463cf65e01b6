"""Prometheus /metrics: request counts and latency by route template and status, and market gauges read from the
database at scrape time (SQLite and PostgreSQL). Each app has its own registry, so several apps live in one process."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update
from sqlalchemy.orm import sessionmaker

from marketplace import checking
from marketplace.app import create_app
from marketplace.db import Job, PayoutEpoch, Provider, Unit, Verification, make_engine, now_s
from marketplace.metrics import PUBLIC_CHECK_STATES, MarketCollector, MarketSnapshot, market_families
from marketplace.runtime import Runtime
from marketplace.settings import Settings
from protocol.schemas import JobSpec
from tests.marketplace.chainless import chainless_runtime

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(got: Samples, name: str, **labels: str) -> float:
    return got.get((name, frozenset(labels.items())), 0.0)


def scrape(client: TestClient) -> Samples:
    got = client.get("/metrics")
    assert got.status_code == 200, got.text
    assert got.headers["content-type"].startswith("text/plain")
    return samples(got.text)


@pytest.fixture()
def rt(tmp_path: Path, db_url: str) -> Runtime:
    settings = Settings(data_dir=tmp_path, db_url=db_url, unit_timeout_s=120)
    return chainless_runtime(settings, chain_id=31337)


# ------------------------------------------------------------------------------------------------ pure
def test_families_fill_known_statuses_with_zero() -> None:
    fams = {f.name: f for f in market_families(MarketSnapshot(units={"verified": 3, "fraud": 1}, jobs={},
                                                                  providers={"active": 2}, providers_active=1,
                                                                  latest_posted_epoch=7))}
    units = {s.labels["status"]: s.value for s in fams["gridmint_units"].samples}
    assert units == {"pending": 0, "assigned": 0, "submitted": 0, "verified": 3, "fraud": 1, "cancelled": 0}
    assert {s.labels["status"]: s.value for s in fams["gridmint_jobs"].samples} == {
        "running": 0, "done": 0, "settled": 0, "cancelling": 0, "cancelled": 0, "failing": 0, "failed": 0}
    assert fams["gridmint_providers_active"].samples[0].value == 1
    assert fams["gridmint_payout_epoch_latest"].samples[0].value == 7
    assert {s.labels["referee"]: s.value for s in fams["gridmint_disputes_open"].samples} == {"default": 0}
    assert {s.labels["status"]: s.value for s in fams["gridmint_checks_open"].samples} == {
        "stocking": 0, "pending": 0, "assigned": 0, "auditing": 0}
    assert fams["gridmint_checks_stocking_since_timestamp_seconds"].samples[0].value == 0


def test_unreadable_database_still_scrapes(tmp_path: Path) -> None:
    broken = sessionmaker(make_engine(f"sqlite:///{tmp_path}/no/such/dir/x.db"))
    fams = {f.name: f for f in MarketCollector(broken, active_window_s=60).collect()}
    assert set(fams) == {"gridmint_market_scrape_ok"}
    assert fams["gridmint_market_scrape_ok"].samples[0].value == 0


# ------------------------------------------------------------------------------------------------ over HTTP
def test_request_counts_and_latency_move(rt: Runtime) -> None:
    client = TestClient(create_app(rt))
    before = scrape(client)
    for _ in range(3):
        assert client.get("/healthz").status_code == 200
    assert client.get("/jobs/0x" + "ab" * 32).status_code == 404
    assert client.get("/jobs/0x" + "cd" * 32).status_code == 404
    assert client.get("/no/such/route").status_code == 404
    assert client.request("BREW", "/healthz").status_code == 405
    after = scrape(client)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    ok = {"method": "GET", "route": "/healthz", "status": "200"}
    assert moved("gridmint_http_requests_total", **ok) == 3
    assert moved("gridmint_http_request_duration_seconds_count", **ok) == 3
    assert moved("gridmint_http_request_duration_seconds_sum", **ok) > 0
    assert moved("gridmint_http_request_duration_seconds_bucket", **ok, le="+Inf") == 3
    # labelled by the route template, not by each job id a client asks for
    assert moved("gridmint_http_requests_total", method="GET", route="/jobs/{job_id}", status="404") == 2
    assert moved("gridmint_http_requests_total", method="GET", route="<unmatched>", status="404") == 1
    assert not any(dict(labels).get("route", "").startswith("/jobs/0x") for _, labels in after)
    # nor by whatever method a client makes up
    assert moved("gridmint_http_requests_total", method="OTHER", route="/healthz", status="405") == 1
    # the first scrape is itself counted by the second
    assert value(after, "gridmint_http_requests_total", method="GET", route="/metrics", status="200") == 1


def test_market_gauges_follow_the_database(rt: Runtime) -> None:
    client = TestClient(create_app(rt))
    empty = scrape(client)
    assert value(empty, "gridmint_market_scrape_ok") == 1
    assert value(empty, "gridmint_units", status="pending") == 0
    assert value(empty, "gridmint_providers_active") == 0
    assert value(empty, "gridmint_payout_epoch_latest") == 0

    now = now_s()
    spec = JobSpec(max_price=1).model_dump(mode="json")
    with rt.sessions.begin() as s:
        for i, (status, seen) in enumerate([("active", now), ("active", now - 30), ("active", now - 10_000),
                                            ("slashed", now)]):
            s.add(Provider(address=f"0x{i:040x}", region="eu-north", gpu="t", vram_mb=1, price=1, tokens_per_s=1,
                           status=status, last_seen=seen))
        s.add(Job(id="0x" + "01" * 32, customer="0x" + "0" * 40, spec=spec, budget=1, global_blob="0" * 64))
        s.add(Job(id="0x" + "02" * 32, customer="0x" + "0" * 40, spec=spec, budget=1, global_blob="0" * 64,
                  status="done"))
        s.flush()
        for shard, status in enumerate(["pending", "pending", "assigned", "verified"]):
            s.add(Unit(id=f"0x{shard:064x}", job_id="0x" + "01" * 32, round=0, shard=shard, status=status))
        for epoch, status in [(1, "posted"), (2, "posted"), (3, "posting")]:
            s.add(PayoutEpoch(epoch=epoch, root="0x" + "00" * 32, total=1, entries={}, status=status, posted_at=now,
                              claimable_at=now))
        s.flush()
        # a unit's checks waiting for its canaries (the oldest queued 90 s ago), and others
        for segment, (status, queued) in enumerate([("stocking", now - 90), ("stocking", now - 5), ("pending", now),
                                                    ("assigned", now), ("passed", now), ("held", now),
                                                    ("auditing", now)]):
            s.add(Verification(unit_id=f"0x{3:064x}", provider="0x" + "0" * 40, segment=segment, status=status,
                               created_at=queued))
        # the canary planted in the held check's place: out with a verifier, yet neither counted nor told apart
        s.add(Verification(unit_id=f"0x{3:064x}", provider="0x" + "0" * 40, segment=5, status="assigned",
                           created_at=now, canary={"held": 0}))
    got = scrape(client)
    assert {st: value(got, "gridmint_checks_open", status=st) for st in PUBLIC_CHECK_STATES} \
        == {"stocking": 2, "pending": 1, "assigned": 2, "auditing": 1}  # (a passed check is not open)
    assert ("gridmint_checks_open", frozenset({("status", "held")})) not in got
    assert value(got, "gridmint_checks_stocking_since_timestamp_seconds") == now - 90
    assert value(got, "gridmint_units", status="pending") == 2
    assert value(got, "gridmint_units", status="assigned") == 1
    assert value(got, "gridmint_units", status="verified") == 1
    assert value(got, "gridmint_jobs", status="running") == 1
    assert value(got, "gridmint_jobs", status="done") == 1
    assert value(got, "gridmint_providers", status="active") == 3
    assert value(got, "gridmint_providers", status="slashed") == 1
    assert value(got, "gridmint_providers_active") == 2  # active and seen within unit_timeout_s
    assert value(got, "gridmint_payout_epoch_latest") == 2  # epoch 3 is still being posted

    with rt.sessions.begin() as s:
        s.execute(update(Unit).where(Unit.status == "pending").values(status="assigned"))
        s.execute(update(PayoutEpoch).where(PayoutEpoch.epoch == 3).values(status="posted"))
        s.execute(update(Verification).where(Verification.status == "stocking").values(status="pending"))
    got = scrape(client)
    assert value(got, "gridmint_checks_stocking_since_timestamp_seconds") == 0  # none waits now
    assert value(got, "gridmint_checks_open", status="pending") == 3
    assert value(got, "gridmint_units", status="pending") == 0  # still reported, as 0
    assert value(got, "gridmint_units", status="assigned") == 3
    assert value(got, "gridmint_payout_epoch_latest") == 3


def test_each_app_has_its_own_registry(rt: Runtime) -> None:
    a, b = TestClient(create_app(rt)), TestClient(create_app(rt))
    for _ in range(2):
        a.get("/healthz")
    labels: dict[str, Any] = {"method": "GET", "route": "/healthz", "status": "200"}
    assert value(scrape(a), "gridmint_http_requests_total", **labels) == 2
    assert value(scrape(b), "gridmint_http_requests_total", **labels) == 0


def test_openmetrics_on_request(rt: Runtime) -> None:
    client = TestClient(create_app(rt))
    got = client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert got.status_code == 200
    assert got.headers["content-type"].startswith("application/openmetrics-text")
    assert got.text.rstrip().endswith("# EOF")


@pytest.mark.parametrize("version", ["abc", "1.0.x"])
def test_an_accept_header_prometheus_client_cannot_read_gets_the_text_format(rt: Runtime, version: str) -> None:
    """prometheus_client.choose_encoder raised TypeError on 'version=abc' (a 500): the answer is the plain text
    format, as for a scraper that asks for nothing in particular."""
    client = TestClient(create_app(rt), raise_server_exceptions=False)
    got = client.get("/metrics", headers={"Accept": f"application/openmetrics-text; version={version}"})
    assert got.status_code == 200 and got.headers["content-type"] == client.get("/metrics").headers["content-type"]
    assert got.headers["content-type"].startswith("text/plain")
    assert any(f.name == "gridmint_http_requests" for f in text_string_to_metric_families(got.text))


def test_open_disputes_are_counted_by_the_referee_that_judges_them(tmp_path: Path, db_url: str) -> None:
    """A referee pool whose disputes pile up has no worker running (they wait in its queue): /metrics shows it.
    Disputed and bisecting checks count, by the kernels the unit was computed with: a pool's, else the default
    referee's; every pool named is reported, as 0 when it has none."""
    pool, other = "torch-2.13.0.example/x86_64.genuineintel.avx512/aten-avx512", "torch-2.13.0.example/arm/aten-x"
    idle = "torch-2.13.0.example/aarch64.arm.neon/aten-default"
    settings = Settings(data_dir=tmp_path, db_url=db_url, referee_pools=f"{pool},{idle}")
    rt = chainless_runtime(settings, chain_id=31337)
    client = TestClient(create_app(rt))
    spec = JobSpec(max_price=1).model_dump(mode="json")
    with rt.sessions.begin() as s:
        s.add(Job(id="0x" + "01" * 32, customer="0x" + "0" * 40, spec=spec, budget=1, global_blob="0" * 64))
        s.flush()
        for shard, build in enumerate([pool, other, None]):
            s.add(Unit(id=f"0x{shard:064x}", job_id="0x" + "01" * 32, round=0, shard=shard, status="submitted",
                       build=build))
        s.flush()
        for shard, status in [(0, "disputed"), (0, "bisecting"), (0, "passed"), (1, "disputed"), (2, "bisecting"),
                              (2, "pending"), (2, "fraud")]:
            s.add(Verification(unit_id=f"0x{shard:064x}", provider="0x" + "0" * 40, segment=0, status=status))
    got = scrape(client)
    assert value(got, "gridmint_disputes_open", referee=pool) == 2
    assert value(got, "gridmint_disputes_open", referee="default") == 2  # other kernels and unsaid ones
    assert (("gridmint_disputes_open", frozenset({("referee", idle)})) in got
            and value(got, "gridmint_disputes_open", referee=idle) == 0)
    with rt.sessions.begin() as s:
        s.execute(update(Verification).where(Verification.status == "disputed").values(status="fraud"))
    got = scrape(client)
    assert value(got, "gridmint_disputes_open", referee=pool) == 1
    assert value(got, "gridmint_disputes_open", referee="default") == 1
    # each pool's last sign of life (0: never); a dispute handed over from an away pool is the default referee's
    assert value(got, "gridmint_referee_pool_seen_timestamp_seconds", referee=pool) == 0
    assert value(got, "gridmint_referee_pool_seen_timestamp_seconds", referee=idle) == 0
    checking.pool_alive(rt, pool)
    with rt.sessions.begin() as s:
        s.execute(update(Verification).where(Verification.status == "bisecting", Verification.unit_id == f"0x{0:064x}")
                  .values(fallback_at=now_s()))
    got = scrape(client)
    assert value(got, "gridmint_referee_pool_seen_timestamp_seconds", referee=pool) >= now_s() - 5
    assert value(got, "gridmint_referee_pool_seen_timestamp_seconds", referee=idle) == 0
    assert value(got, "gridmint_disputes_open", referee=pool) == 0
    assert value(got, "gridmint_disputes_open", referee="default") == 2
