"""The customer's side as `gridmint job ...` runs it (gridmint.customer), against the real app, chain and queue:
fund and submit in one go, finish a submission that failed half way without paying twice, refuse an escrow that
is not the customer's, and download the model."""
from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from eth_account import Account

from gridmint.customer import download_weights, read_spec, submit
from node.client import MarketClient, MarketError
from protocol.errors import GridMintValueError
from protocol.limits import max_steps_within
from protocol.jobs import job_id_customer, new_job_id
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
    job_id = new_job_id(customer.address)
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
    job_id = new_job_id(other.address)  # another customer's id, funded: refused before anything is sent
    market.contracts(other).fund_job(job_id, tokens(1))
    with pytest.raises(GridMintValueError, match=f"job id {job_id} is not {me.address}'s"):
        submit(MarketClient(market.url, me), market.contracts(me), SPEC, job_id, say=lambda _: None)
    assert market.ops.balance_of(me.address) == tokens(100)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(GridMintValueError, match="cannot read job spec"):
        read_spec(tmp_path / "bad.json")
    (tmp_path / "spec.json").write_text(SPEC.model_dump_json())
    assert read_spec(tmp_path / "spec.json") == SPEC
    assert MarketClient(market.url, Account.create()).quote(read_spec(tmp_path / "spec.json").model_dump(mode="json"))


def test_the_quote_makes_a_job_id_only_for_the_customer_it_names(market) -> None:
    """Review R3: the quote's job id was random, so anyone who saw it in a pending fundWithPermit could fund it first
    and own the job. An id now starts with its customer's address: the quote makes one only for ``?customer=``."""
    spec, me = SPEC.model_dump(mode="json"), market.account()
    ids = [httpx.post(f"{market.url}/jobs/quote", params={"customer": me.address.lower()}, json=spec).json()["job_id"]
           for _ in range(2)]
    assert all(job_id_customer(i) == me.address and i.startswith(me.address.lower()) for i in ids)
    assert ids[0] != ids[1]  # the rest is random
    assert httpx.post(f"{market.url}/jobs/quote", json=spec).json()["job_id"] is None
    # the client (and `gridmint job quote --customer`) asks for one bound to the address it names
    assert job_id_customer(MarketClient(market.url, Account.create()).quote(spec, me.address)["job_id"]) == me.address
    assert MarketClient(market.url, Account.create()).quote(spec)["job_id"] is None
    r = httpx.post(f"{market.url}/jobs/quote", params={"customer": "0x1234"}, json=spec)
    assert r.status_code == 422 and "not an address" in r.text


def test_a_job_whose_units_could_never_be_handed_in_is_refused_before_anything_is_funded(market) -> None:
    """A unit whose checkpoints are over ``max_upload_bytes`` (2 MiB here), or whose result body is over the 1 MiB JSON
    limit, was quoted and accepted: every provider trained it in full, was refused at upload (413), and trained it
    again until the deadline made it a dropout, and the job never finished. Now the quote and the submission are a
    422 that says which limit and what to stay under, before the customer funds anything."""
    customer = market.account(gmt=tokens(100))
    client, contracts = MarketClient(market.url, customer), market.contracts(customer)
    # 3.3 M parameters: a training state of 39,708,928 bytes (the final checkpoint the node review measured)
    wide = JobSpec(model={"d_model": 256, "n_layer": 4, "n_head": 4, "ctx": 64}, rounds=1, units_per_round=1,
                   steps_per_unit=2, segment_len=1, batch_size=1, max_price=tokens(1), verification="none")
    with pytest.raises(MarketError) as got:
        submit(client, contracts, wide, say=lambda _: None)
    assert got.value.status == 422 and "39708928 bytes" in got.value.detail
    assert "2097152-byte upload limit (max_upload_bytes)" in got.value.detail and "at most about" in got.value.detail
    assert market.ops.balance_of(customer.address) == tokens(100)  # refused at the quote: nothing funded
    # funded anyway (by hand), the submission itself is refused, and no job is stored
    job_id = new_job_id(customer.address)
    contracts.fund_job_with_permit(job_id, wide.budget())
    with pytest.raises(MarketError) as got:
        client.submit_job(job_id, wide.model_dump(mode="json"))
    assert got.value.status == 422 and "max_upload_bytes" in got.value.detail
    assert httpx.get(f"{market.url}/jobs/{job_id}").status_code == 404
    # one loss per step and one commitment per segment: 30,000 steps in segments of 15 is over the 1 MiB result body
    most = max_steps_within(1024 * 1024, 15)
    long = JobSpec(model={"d_model": 16, "n_layer": 1, "n_head": 1, "ctx": 8}, rounds=1, units_per_round=1,
                   steps_per_unit=30_000, segment_len=15, batch_size=1, max_price=tokens(1), verification="none")
    r = httpx.post(f"{market.url}/jobs/quote", json=long.model_dump(mode="json"))
    assert r.status_code == 422 and "1048576-byte limit" in r.text and f"at most {most} steps_per_unit" in r.text
    assert 20_000 < most < 30_000
    edge = long.model_copy(update={"steps_per_unit": most})
    assert httpx.post(f"{market.url}/jobs/quote", json=edge.model_dump(mode="json")).status_code == 200
    over = long.model_copy(update={"steps_per_unit": most + 15})
    assert httpx.post(f"{market.url}/jobs/quote", json=over.model_dump(mode="json")).status_code == 422
    # more segments than a result may commit
    many = long.model_copy(update={"steps_per_unit": 100_000, "segment_len": 1})
    r = httpx.post(f"{market.url}/jobs/quote", json=many.model_dump(mode="json"))
    assert r.status_code == 422 and "at most 10000" in r.text and "segment_len 10 or more" in r.text
    assert client.quote(SPEC.model_dump(mode="json"))["units"] == 2  # the usual shapes are quoted as before


def test_a_job_id_written_with_the_checksummed_address_is_submitted_and_read_as_lowercase(market) -> None:
    """The README's job id is the customer's address then 12 random bytes; written with the address's EIP-55 form
    it was taken by the wallet check (case-insensitive) and funded on chain, and then POST /jobs refused it (ids are
    lowercase hex there): the escrow funded for an id no submission could use. Now it is submitted, and read, as
    lowercase."""
    spec = JobSpec(rounds=1, units_per_round=1, steps_per_unit=10, segment_len=5, max_price=tokens(1))
    customer = market.account(gmt=tokens(100))
    client, contracts = MarketClient(market.url, customer), market.contracts(customer)
    job_id = "0x" + customer.address[2:] + "AB" * 12
    assert job_id != job_id.lower()
    out = submit(client, contracts, spec, job_id, say=lambda _: None)
    assert out["job_id"] == job_id.lower() and client.job(job_id.lower())["status"] == "running"
    assert contracts.get_job(job_id).remaining == spec.budget()


def test_a_rerun_with_an_edited_spec_funds_nothing_and_says_what_the_marketplace_holds(market) -> None:
    """The same job id again with another spec (3 rounds where 1 was submitted): refused before anything is funded
    (a review found it funded the difference and said the 3-round job was submitted, the marketplace holding the
    1-round one)."""
    customer = market.account(gmt=tokens(100))
    client, contracts = MarketClient(market.url, customer), market.contracts(customer)
    sent = submit(client, contracts, SPEC, say=lambda _: None)
    before = market.ops.balance_of(customer.address)
    with pytest.raises(GridMintValueError, match="holds job .* with another spec \\(1 rounds"):
        submit(client, contracts, SPEC.model_copy(update={"rounds": 3}), sent["job_id"], say=lambda _: None)
    assert market.ops.balance_of(customer.address) == before
    assert client.job(sent["job_id"])["rounds"] == 1


class _LandsThenTimesOut:
    """The customer's chain client, whose fund lands on chain and whose receipt is then lost (the RPC drops, a
    Ctrl-C): what a real chain does between sending and mining."""

    def __init__(self, real: object) -> None:
        self._real = real

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)

    def fund_job_with_permit(self, job_id: str, amount: int) -> None:
        from protocol.errors import ChainUnavailable

        self._real.fund_job_with_permit(job_id, amount)  # type: ignore[attr-defined]
        raise ChainUnavailable("timed out waiting for the receipt")


def test_a_fund_whose_receipt_is_lost_was_named_first_and_is_finished_with_its_id(market) -> None:
    """The job id is said before the money moves (a review found it never was: the budget sat in an escrow nobody
    could name, and a plain rerun funded a second one); the rerun with it funds nothing more and submits."""
    from protocol.errors import ChainError

    said: list[str] = []
    customer = market.account(gmt=tokens(100))
    client = MarketClient(market.url, customer)
    with pytest.raises(ChainError):
        submit(client, _LandsThenTimesOut(market.contracts(customer)), SPEC, say=said.append)  # type: ignore[arg-type]
    assert market.ops.balance_of(customer.address) == tokens(100) - SPEC.budget()
    named = [w for m in said for w in m.replace(";", " ").split() if w.startswith("0x") and len(w) == 2 + 64]
    assert named, said
    done = submit(client, market.contracts(customer), SPEC, named[0], say=said.append)
    assert done["funded_now"] == "0" and client.job(named[0])["status"] == "running"
    assert market.ops.balance_of(customer.address) == tokens(100) - SPEC.budget()


def test_each_jobs_model_downloads_under_its_own_name(market) -> None:
    """The file name comes from the id's random tail (its head, the customer's address, named every job of theirs
    alike: found by a review)."""
    customer = market.account(gmt=tokens(100))
    client, contracts = MarketClient(market.url, customer), market.contracts(customer)
    ids = [submit(client, contracts, SPEC, say=lambda _: None)["job_id"] for _ in range(2)]
    names = [httpx.get(f"{market.url}/jobs/{j}/weights").headers["content-disposition"] for j in ids]
    assert names[0] != names[1] and all(j[-24:][:12] in n for j, n in zip(ids, names)), names
