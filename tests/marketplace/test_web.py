"""The customer's web pages: the market (providers, jobs) and one job as it runs, read from the database (SQLite and
PostgreSQL); every value a provider, a verifier or a reason could carry is escaped."""
from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from marketplace.app import create_app
from marketplace.db import Event, Job, LedgerEntry, Unit, Verification, now_s
from marketplace.runtime import Runtime
from marketplace.settings import Settings
from protocol.money import tokens
from protocol.schemas import JobSpec
from tests.marketplace.chainless import chainless_runtime

JOB = "0x" + "ab" * 32
CHEAT, HONEST, VERIFIER = "0x" + "c" * 40, "0x" + "d" * 40, "0x" + "e" * 40


@pytest.fixture()
def client(tmp_path: Path, db_url: str) -> tuple[TestClient, Runtime]:
    settings = Settings(data_dir=tmp_path, db_url=db_url)
    rt = chainless_runtime(settings, chain_id=31337)
    spec = JobSpec(rounds=2, units_per_round=2, max_price=tokens(2)).model_dump(mode="json")
    with rt.sessions.begin() as s:
        s.add(Job(id=JOB, customer="0x" + "0" * 40, spec=spec, budget=tokens(8), global_blob="0" * 64, round=1,
                  eval_losses=[5.25, 4.5]))
        s.flush()
        for shard, (status, prov) in enumerate([("verified", HONEST), ("verified", HONEST)]):
            s.add(Unit(id=f"0x{shard:064x}", job_id=JOB, round=0, shard=shard, status=status, provider=prov,
                       price=tokens(1)))
        s.add(Unit(id=f"0x{2:064x}", job_id=JOB, round=1, shard=0, status="assigned", provider=CHEAT, price=tokens(1)))
        s.flush()
        for seg, status, prov in [(0, "passed", HONEST), (1, "passed", HONEST), (2, "fraud", CHEAT),
                                  (3, "dismissed", HONEST)]:
            s.add(Verification(unit_id=f"0x{0:064x}", provider=prov, segment=seg, status=status, verifier=VERIFIER))
        s.add(LedgerEntry(job_id=JOB, unit_id=f"0x{0:064x}", provider=HONEST, amount=tokens(1), released=True))
        s.add(Event(job_id=JOB, kind="provider_slashed", at=now_s(),
                    data={"unit": f"0x{2:064x}", "provider": CHEAT, "amount": str(tokens(200)), "path": "fraud-proof",
                          "reason": "end state differs <script>alert(1)</script>"}))
        s.add(Event(job_id=JOB, kind="round_done", at=now_s(), data={"round": 0, "eval_loss": 4.5}))
    return TestClient(create_app(rt)), rt


def test_a_job_page_shows_its_units_checks_slashes_payouts_and_history(client: tuple[TestClient, Runtime]) -> None:
    tc, rt = client
    index = tc.get("/")
    assert index.status_code == 200 and f'<a href="/web/jobs/{JOB}">{JOB}</a>' in index.text
    page = tc.get(f"/web/jobs/{JOB}")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    text = page.text
    assert "Status <b>running</b> · round 2 of 2 · 2/4 units verified · budget 8.0000 GMT · refund -" in text
    assert "eval loss 4.5000" in text  # the latest, and each round's after the starting model's
    assert "<td>the starting model</td><td>5.2500</td>" in text and "<td>after round 1</td><td>4.5000</td>" in text
    assert "Segments checked by re-execution: 1 dismissed, 1 fraud, 2 passed." in text
    assert f"Providers slashed for cheating: 1 ({CHEAT[:8]}…{CHEAT[-4:]})." in text
    assert f'<a href="/jobs/{JOB}/weights">Download the model</a>' in text
    assert "<td>1.0000 GMT</td><td>yes</td>" in text  # the payout, released to the pool
    # a reason is shown as text, never as markup
    assert "<script>" not in text and "end state differs &lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "amount 200.0000 GMT; path fraud-proof" in text
    assert 'http-equiv="refresh"' in text  # it reloads while the job runs ...
    with rt.sessions.begin() as s:
        s.get(Job, JOB).status = "settled"  # type: ignore[union-attr]
    assert 'http-equiv="refresh"' not in tc.get(f"/web/jobs/{JOB}").text  # ... and not once it is settled


def test_an_unknown_job_has_no_page(client: tuple[TestClient, Runtime]) -> None:
    tc, _ = client
    got = tc.get("/web/jobs/0x" + "00" * 32)
    assert got.status_code == 404 and "does not exist" in got.json()["detail"]
