"""``gridmint bench settlement`` end to end at toy scale, on the session's Hardhat node: the last line is the JSON
figures, measured (not constants) and consistent with each other."""
from __future__ import annotations

import json

import pytest

from gridmint.bench import settlement
from ledger.devchain import HardhatNode


@pytest.mark.usefixtures("artifacts")
def test_bench_prints_measured_figures_last(hardhat_node: HardhatNode, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--leaves", "8", "--epochs", "2", "--providers", "6", "--units", "5", "--jobs", "2", "--ops", "60",
            "--probe-ops", "0", "--node-url", hardhat_node.url]
    assert settlement.main(argv) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # A claim is a transaction: more than the 21,000 base and more than a plain transfer, less than a first claim.
    assert 21_000 < figures["erc20_transfer_gas"] < figures["claim_gas"] < figures["claim_gas_first_claim"]
    assert figures["claim_gas_first_claim"] < figures["claim_gas_first_claim_new_holder"]
    assert 21_000 < figures["root_post_gas"] < 100_000
    steady = figures["epoch_gas"]
    assert steady["total"] == steady["releases"] + steady["post"] + steady["claims"]
    assert figures["gas_per_work_unit"] == round(steady["total"] / 30, 1)
    assert figures["gas_per_work_unit_first_epoch"] > figures["gas_per_work_unit"]
    assert (figures["invariant_ops"], figures["invariant_violations"]) == (60, 0)
    assert set(figures["meets_targets"]) >= {"claim_gas", "root_post_gas", "gas_per_work_unit", "invariant_violations"}
