"""``gridmint bench canary`` at toy size: its figures come from a real run, last line JSON."""
from __future__ import annotations

import json

from gridmint.bench import available
from gridmint.bench.canary import FEATURES, KINDS, auc, main


def test_auc_is_a_folded_rank_statistic() -> None:
    assert auc([1, 2, 3], [4, 5]) == 1.0 and auc([4, 5], [1, 2, 3]) == 1.0  # a tell either way
    assert auc([1, 3], [2, 2]) == 0.5 and auc([1, 2], [1, 2]) == 0.5


def test_the_bench_prints_every_feature_for_the_canary_and_its_baseline_last(capsys) -> None:
    assert "canary" in available()
    assert main(["--small", "--units", "2", "--segments", "4", "--segment-len", "4", "--margin-segments", "3"]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(figures["tell_auc"]) == set(FEATURES)
    for f in FEATURES:
        assert set(figures["tell_auc"][f]) == set(KINDS) == {"canary", "elementwise", "two_segments_on", "stop27"}
        assert all(0.5 <= v <= 1.0 for v in figures["tell_auc"][f].values())
    assert figures["segments"]["honest"] == figures["segments"]["two_segments_on"] == 2 * 3
    assert figures["segments"]["canary"] + figures["segments"]["elementwise"] + figures["declined"] == 12
    # an honest verifier on another plan flags every canary: none approved (the referee would slash it)
    mine = figures["margins"]["canary"]
    assert figures["approved"] == 0 and len(mine["fp32"]) == len(mine["bf16"]) == 3  # forward x 2, backward
    assert len(figures["margins"]["two_segments_on"]["bf16"]) == 2  # the baseline, measured alongside
    assert min(figures["margin_min"]["canary"].values()) > 1
    # the exact check of the moments tells no honest end and none of the canaries; every one of the forgery before
    assert figures["told_by_moment_floor"] == {"honest": 0.0, "canary": 0.0, "elementwise": 0.0,
                                               "two_segments_on": 1.0, "stop27": 1.0}
    assert figures["told_by_moment_cs"]["honest"] == figures["told_by_moment_cs"]["canary"] == 0.0
    assert figures["told_exactly"]["honest"] == figures["told_exactly"]["canary"] == 0.0
    assert figures["told_exactly"]["elementwise"] == 0.0
    assert figures["told_exactly"]["stop27"] == 1.0  # the forgery this replaced: every one told, without a replay
    # a partial replay tells no honest end (the tests are exact); what it tells of the canaries is measured
    for told in figures["told_by_replaying"].values():
        assert told["honest"] == 0.0 and 0 <= told["canary"] <= 1 and told["stop27"] == 1.0
    assert 0 <= figures["canary_prefix_mean"] <= 3
    assert len(figures["from_truth"]["canary"]["bf16"]) == 3 and figures["void_for_cross_plan"]["canary"] >= 0


def test_a_tell_counts_forgeries_spread_to_both_sides_of_the_honest_ends() -> None:
    """Forgeries on both sides of a narrow honest spread are not told by a threshold on the feature (AUC 0.5), and are
    by their distance from the honest median: the bench reports the stronger (stop 29: the end moments' cosine)."""
    from gridmint.bench.canary import tell

    honest = [0.4 + 0.01 * i for i in range(21)]
    forged = [0.1, 0.15, 0.2, 0.8, 0.85, 0.9]
    assert auc(honest, forged) == 0.5
    assert tell(honest, forged) == 1.0
    assert tell(honest, honest) == 0.5
