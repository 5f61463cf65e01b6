from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest
import torch

from node import data
from node.trainer import data_seed, segment_batches
from protocol.errors import GridMintValueError


def test_shipped_corpus_matches_committed_hash() -> None:
    raw = data.load_corpus()
    assert hashlib.sha256(raw).hexdigest() == data.CORPUS_SHA256
    assert 300_000 < len(raw) < 600_000
    assert raw.decode("utf-8").count("The \"assert\" statement") == 1  # real English docs, not noise


def test_corpus_hash_is_checked(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    bad = tmp_path / "corpus.txt"
    bad.write_bytes(data.CORPUS_PATH.read_bytes().replace(b"\n", b"\r\n", 1))
    monkeypatch.setattr(data, "CORPUS_PATH", bad)
    data.load_corpus.cache_clear()
    try:
        with pytest.raises(data.CorpusError, match="sha256"):
            data.load_corpus()
    finally:
        data.load_corpus.cache_clear()


def test_split_is_disjoint_and_complete() -> None:
    raw = data.load_corpus()
    train, held = data.split_corpus(raw)
    assert len(train) + len(held) == len(raw)
    assert 0.08 < len(held) / len(raw) < 0.12
    assert raw[: data.BLOCK_BYTES] == train[: data.BLOCK_BYTES]
    assert held[: data.BLOCK_BYTES] == raw[9 * data.BLOCK_BYTES : 10 * data.BLOCK_BYTES]


def test_batch_indices_is_a_pure_function_inside_the_shard() -> None:
    a = data.batch_indices(5, 1, 3, 17, 16, 64)
    assert a == data.batch_indices(5, 1, 3, 17, 16, 64)
    assert len(a) == 16 and all(isinstance(i, int) for i in a)
    lo, hi = data.shard_bounds(int(data.train_tokens().numel()), 1, 3, 64)
    assert all(lo <= i < hi for i in a)
    assert a != data.batch_indices(5, 1, 3, 18, 16, 64)
    assert a != data.batch_indices(6, 1, 3, 17, 16, 64)
    assert a != data.batch_indices(5, 2, 3, 17, 16, 64)


def test_batch_indices_known_values() -> None:
    # Pinned: a change here changes every proof ever made, so it must be deliberate.
    first = data.batch_indices(0, 0, 1, 0, 1, 64)[0]
    n = int(data.train_tokens().numel())
    h = hashlib.sha256(b"GridMint/batch/v1" + b"".join(v.to_bytes(8, "big") for v in (0, 0, 1, 0, 0))).digest()
    assert first == int.from_bytes(h, "big") % (n - 64)


def test_shards_do_not_overlap() -> None:
    n = int(data.train_tokens().numel())
    bounds = [data.shard_bounds(n, s, 4, 64) for s in range(4)]
    for (lo_a, hi_a), (lo_b, _) in zip(bounds, bounds[1:]):
        assert hi_a + 64 <= lo_b  # last window of shard a ends before shard b starts


@pytest.mark.parametrize(
    "args",
    [(0, 3, 3, 0, 4, 64), (-1, 0, 1, 0, 4, 64), (0, 0, 1, 0, 0, 64), (0, 0, 0, 0, 4, 64), (True, 0, 1, 0, 4, 64)],
)
def test_batch_indices_rejects_bad_args(args) -> None:
    with pytest.raises(GridMintValueError):
        data.batch_indices(*args)


def test_make_batch_targets_are_shifted_inputs() -> None:
    toks = data.train_tokens()
    x, y = data.make_batch(toks, [0, 100], 8)
    assert x.shape == y.shape == (2, 8) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert bytes(x[0].tolist()) == data.split_corpus(data.load_corpus())[0][:8]
    with pytest.raises(GridMintValueError):
        data.make_batch(toks, [int(toks.numel()) - 8], 8)


def test_eval_batches_are_fixed_and_held_out() -> None:
    a = data.eval_batches(2, 4, 16)
    b = data.eval_batches(2, 4, 16)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))


def test_data_order_changes_with_round(spec) -> None:
    assert data_seed(spec) != data_seed(replace(spec, round=1))
    assert segment_batches(spec, 0) != segment_batches(replace(spec, round=1), 0)
    assert segment_batches(spec, 0) == segment_batches(replace(spec, unit_id="0x" + "00" * 32), 0)
