"""Collecting pay and leaving the market outside the run loop: ``gridmint node|verifier claim / unbond / withdraw``
(gridmint.earnings), on a settled job, the real marketplace and chain."""
from __future__ import annotations

from pathlib import Path

import pytest

from gridmint import earnings
from protocol.errors import GridMintValueError
from protocol.money import tokens
from protocol.schemas import JobSpec
from tests.marketplace.test_flow import drive, provider, staked_verifier, submit_job


def test_a_stopped_node_claims_its_pay_then_unbonds_and_withdraws_its_stake(market, tmp_path: Path) -> None:
    node = provider(market, tmp_path, "node", "us-east", "0.9")
    verifier = staked_verifier(market, tmp_path, "verifier")
    spec = JobSpec(rounds=1, units_per_round=1, steps_per_unit=10, segment_len=5, batch_size=8, max_price=tokens(2))
    job_id = submit_job(market, spec)
    said: list[str] = []
    drive(market, [node], verifier, job_id)  # (the agents never claim here: drive only steps their work)
    market.wait(lambda: node.client.payout()["epoch"] == 1, what="payout root posted and claimable")
    owed = int(node.client.payout()["cumulative"])
    before = market.ops.balance_of(node.account.address)
    assert owed > 0 and earnings.claim(node.client, node.contracts, said.append) == owed
    assert market.ops.balance_of(node.account.address) == before + owed
    assert earnings.claim(node.client, node.contracts, said.append) == 0 and said[-1] == "nothing to claim now"
    # leaving: more than the free stake is refused before anything is sent; then all of it unbonds
    with pytest.raises(GridMintValueError, match="at most 200"):
        earnings.unbond(node.client, node.contracts, tokens(201), said.append)
    assert market.ops.stake_state(node.account.address).unbonding == 0
    ready = earnings.unbond(node.client, node.contracts, None, said.append)
    st = market.ops.stake_state(node.account.address)
    assert (st.staked, st.unbonding, st.unbonding_ready_at) == (0, tokens(200), ready)
    with pytest.raises(GridMintValueError, match="no free stake"):
        earnings.unbond(node.client, node.contracts, None, said.append)
    assert earnings.withdraw(node.client, node.contracts, said.append) == 0 and "withdrawable from" in said[-1]
    market.chain.advance_time(ready - market.chain.timestamp())  # the unbonding delay passes
    assert earnings.withdraw(node.client, node.contracts, said.append) == tokens(200)
    assert market.ops.balance_of(node.account.address) == before + owed + tokens(200)
    assert earnings.withdraw(node.client, node.contracts, said.append) == 0 and "nothing is unbonding" in said[-1]
