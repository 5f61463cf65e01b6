"""``gridmint bench planting`` at toy size: the real market in-process, its counts from the database, last line JSON."""
from __future__ import annotations

import json

import pytest

from gridmint.bench import available
from gridmint.bench.planting import main
from marketplace import canary


def test_the_bench_counts_the_canaries_planted_with_and_without_the_order_counted_in(capsys) -> None:
    assert "planting" in available()
    assert main(["--units", "3", "--segments", "3", "--providers", "2", "--verifiers", "2", "--rate", "0.25"]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["rate"] == 0.25
    for name in ("full_counted", "full_uncounted"):
        f = figures[name]
        assert f["job"] == "settled" and f["checks"] == 9  # every segment of every unit checked, once each
        # a canary's real check goes out again as itself: one hand-out more per canary
        assert f["handed"] == f["checks"] + f["canaries"] and 0 <= f["canaries"] <= f["checks"]
        assert f["realized"] == round(f["canaries"] / f["checks"], 4)
    assert "full_counted_vs_uncounted" in figures
    assert canary.plant_odds.__name__ == "plant_odds"  # the baseline's odds were put back


def test_a_rate_the_stock_cannot_carry_is_refused() -> None:
    with pytest.raises(SystemExit, match="--rate"):
        main(["--rate", "0.5"])
