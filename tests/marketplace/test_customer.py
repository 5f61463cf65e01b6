"""The customer's side as `gridmint job ...` runs it (gridmint.customer), against the real app, chain and queue:
fund and submit in one go, finish a submission that failed half way without paying twice, refuse an escrow that
is not the customer's, and download the model."""
from __future__ import annotations

from pathlib import Path

import pytest
from eth_account import Account

from gridmint.customer import download_weights, read_spec, submit
from node.client import MarketClient
from protocol.errors import GridMintValueError
from protocol.money import tokens
from protocol.schemas import JobSpec

SPEC = JobSpec(rounds=1, units_per_round=2, steps_per_unit=10, segment_len=5, max_price=tokens(1))


def test_submit_funds_once_and_can_be_finished_after_a_lost_submission(market, tmp_path: Path) -> None:
    said: list[str] = []
    customer = market.account(gmt=tokens(100))
    client, contracts = MarketClient(market.url, customer), market.contracts(customer)
    budget = SPEC.budget()
    sent = submit(client, contracts, SPEC, say=said.append)
    assert int(sent["budget"]) == budget == int(sent["funded_now"])
    assert contracts.get_job(sent["job_id"]).remaining == budget and client.job(sent["job_id"])["status"] == "running"
    assert market.ops.balance_of(customer.address) == tokens(100) - budget
    # the second run of the same submission (the first one's answer lost): nothing funded twice, the job stands
    again = submit(client, contracts, SPEC, sent["job_id"], say=said.append)
    assert again["funded_now"] == "0" and market.ops.balance_of(customer.address) == tokens(100) - budget
    assert any("submitted already" in m for m in said)
    # funded, then the submission never reached the marketplace: a rerun funds nothing more and submits it
    job_id = "0x" + "5e" * 32
    contracts.fund_job_with_permit(job_id, budget)
    done = submit(client, contracts, SPEC, job_id, say=said.append)
    assert done["funded_now"] == "0" and client.job(job_id)["customer"] == customer.address
    # downloading the model: the round's current global model, said not to be final while the job runs
    got = download_weights(client, job_id, tmp_path / "m.safetensors")
    assert got["final"] is False and got["bytes"] == (tmp_path / "m.safetensors").stat().st_size > 0


def test_submit_refuses_what_it_cannot_pay_or_does_not_own(market, tmp_path: Path) -> None:
    poor = market.account(gmt=tokens(1))
    with pytest.raises(GridMintValueError, match="short"):
        submit(MarketClient(market.url, poor), market.contracts(poor), SPEC, say=lambda _: None)
    assert market.ops.balance_of(poor.address) == tokens(1)  # nothing sent
    other, me = market.account(gmt=tokens(100)), market.account(gmt=tokens(100))
    job_id = "0x" + "7a" * 32
    market.contracts(other).fund_job(job_id, tokens(1))
    with pytest.raises(GridMintValueError, match="funded by"):
        submit(MarketClient(market.url, me), market.contracts(me), SPEC, job_id, say=lambda _: None)
    assert market.ops.balance_of(me.address) == tokens(100)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(GridMintValueError, match="cannot read job spec"):
        read_spec(tmp_path / "bad.json")
    (tmp_path / "spec.json").write_text(SPEC.model_dump_json())
    assert read_spec(tmp_path / "spec.json") == SPEC
    assert MarketClient(market.url, Account.create()).quote(read_spec(tmp_path / "spec.json").model_dump(mode="json"))
