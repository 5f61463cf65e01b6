"""``gridmint bench settlement`` end to end at toy scale, on the session's Hardhat node: the last line is the JSON
figures, measured (not constants) and consistent with each other."""
from __future__ import annotations

import json

import pytest

from gridmint.bench import settlement
from ledger.devchain import HardhatNode


@pytest.mark.usefixtures("artifacts")
def test_bench_prints_measured_figures_last(hardhat_node: HardhatNode, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--leaves", "8", "--epochs", "2", "--providers", "6", "--units", "5", "--jobs", "2", "--batch", "4",
            "--ops", "60", "--probe-ops", "0", "--node-url", hardhat_node.url]
    assert settlement.main(argv) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # A claim is a transaction: more than the 21,000 base and more than a plain transfer, less than a first claim.
    assert 21_000 < figures["erc20_transfer_gas"] < figures["claim_gas"] < figures["claim_gas_first_claim"]
    assert figures["claim_gas_first_claim"] < figures["claim_gas_first_claim_new_holder"]
    assert 21_000 < figures["root_post_gas"] < 100_000
    # The headline is the batched push (6 providers in claimMany batches of 4: 2 transactions per epoch).
    steady, individual = figures["epoch_gas"], figures["epoch_gas_individual_claims"]
    for epoch in (steady, figures["epoch_gas_first"], individual, figures["epoch_gas_individual_claims_first"]):
        assert epoch["total"] == epoch["releases"] + epoch["post"] + epoch["claims"]
    assert (figures["claim_batch_size"], steady["claim_txs"], individual["claim_txs"]) == (4, 2, 6)
    assert figures["gas_per_work_unit"] == round(steady["total"] / 30, 1)
    assert figures["gas_per_work_unit_individual_claims"] == round(individual["total"] / 30, 1)
    assert figures["gas_per_work_unit_first_epoch"] > figures["gas_per_work_unit"]
    # Pushing shares the 21,000 transaction base, so it is cheaper per provider than claiming one by one.
    assert figures["claim_batch_gas_per_account"] < individual["claim_per_account"]
    assert figures["gas_per_work_unit"] < figures["gas_per_work_unit_individual_claims"]
    assert figures["claim_batch_gas"] < figures["block_gas_limit"]
    assert (figures["invariant_ops"], figures["invariant_violations"]) == (60, 0)
    assert set(figures["meets_targets"]) >= {"claim_gas", "root_post_gas", "gas_per_work_unit", "invariant_violations"}
