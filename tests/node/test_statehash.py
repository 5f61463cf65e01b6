"""The state hash: async snapshots hash exactly like the synchronous reference, and later mutation cannot leak in."""
from __future__ import annotations

import time

import pytest
import torch
from blake3 import blake3

from node.statehash import PARALLEL_MIN, AsyncStateHasher, state_hash


def _state(big: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    st = {"model.w": torch.randn(33, 7, generator=g), "model.b": torch.zeros(5), "optim.w.step": torch.tensor(3.0)}
    if big:  # large enough to be hashed on several threads
        st["model.emb"] = torch.randn(PARALLEL_MIN // 4 + 1000, generator=g)
    return st


@pytest.mark.parametrize("big", [False, True])
def test_async_equals_sync_and_snapshot_is_taken_at_submit(big: bool) -> None:
    st = _state(big)
    ref = state_hash(st)
    with AsyncStateHasher(st, buffers=2, threads=2) as h:
        fut = h.submit(st)
        st["model.w"].add_(1.0)
        assert fut.result() == ref
        assert h.submit(st).result() == state_hash(st) != ref


def test_the_v3_hash_is_blake3_of_domain_layout_and_the_aligned_buffer() -> None:
    """The definition, written out by hand (what another implementation of a verifier must reproduce): tensors in
    name order, each at a 64-byte aligned offset, zero padding; the layout hashed first."""
    a = torch.arange(3, dtype=torch.float32)  # 12 bytes at offset 0
    b = torch.tensor([7], dtype=torch.int64)  # 8 bytes at offset 64
    layout = blake3()
    for name, t, off in (("a", a, 0), ("b", b, 64)):
        dt = str(t.dtype).encode()
        layout.update(len(name).to_bytes(4, "big") + name.encode() + len(dt).to_bytes(4, "big") + dt
                      + t.dim().to_bytes(4, "big") + b"".join(d.to_bytes(8, "big") for d in t.shape)
                      + off.to_bytes(8, "big"))
    buf = a.numpy().tobytes() + bytes(52) + b.numpy().tobytes() + bytes(56)
    want = "0x" + blake3(b"GridMint/state/v3" + layout.digest() + buf).hexdigest()
    assert state_hash({"b": b, "a": a}) == want


def test_hash_binds_names_dtypes_shapes_and_values() -> None:
    st = _state()
    ref = state_hash(st)
    renamed = {("model.v" if k == "model.w" else k): v for k, v in st.items()}
    reshaped = {**st, "model.w": st["model.w"].reshape(7, 33)}
    retyped = {**st, "model.b": torch.zeros(5, dtype=torch.float64)[:5].float().double()}
    flipped = {k: v.clone() for k, v in st.items()}
    flipped["model.w"].view(torch.int32)[0, 0] ^= 1  # one bit
    assert len({ref, state_hash(renamed), state_hash(reshaped), state_hash(retyped), state_hash(flipped)}) == 5


def test_submit_rejects_a_state_of_another_shape() -> None:
    st = _state()
    with AsyncStateHasher(st) as h:
        with pytest.raises(ValueError, match="model.w"):
            h.submit({**st, "model.w": torch.zeros(2, 2)})
        with pytest.raises(ValueError, match="template does not"):
            h.submit({**st, "extra": torch.zeros(1)})


def test_then_sees_the_snapshot_taken_at_submit_and_its_error_is_the_futures() -> None:
    st = _state()
    before = {k: v.clone() for k, v in st.items()}
    seen: list[dict[str, torch.Tensor]] = []
    with AsyncStateHasher(st, buffers=1) as h:
        fut = h.submit(st, then=lambda snap: seen.append({k: v.clone() for k, v in snap.items()}))
        st["model.w"].mul_(2.0)  # the trainer moves on at once
        assert fut.result() == state_hash(before)
        assert set(seen[0]) == set(st) and all(torch.equal(seen[0][k], before[k]) for k in st)

        def disk_full(_: dict[str, torch.Tensor]) -> None:
            raise OSError("no space left on device")

        with pytest.raises(OSError, match="no space"):
            h.submit(st, then=disk_full).result()
        assert h.submit(st).result() == state_hash(st)  # the buffer came back after the failure (buffers=1)


def test_timings_say_where_a_commitments_time_went() -> None:
    """Totals per stage: the caller's time in submit (of it, waiting for a free buffer), the hash, the callback."""
    st = _state()
    with AsyncStateHasher(st, buffers=1) as h:
        futs = [h.submit(st, then=lambda _: time.sleep(0.05)) for _ in range(3)]
        assert [f.result() for f in futs] == [state_hash(st)] * 3
        t = h.timings()
    assert t["submitted"] == 3 and t["hashed"] == 3
    assert t["then_s"] >= 3 * 0.05  # each callback slept that long
    # one buffer: the 2nd and 3rd submit each waited for the callback before them, on the caller's thread
    assert t["backpressure_s"] >= 2 * 0.04 and t["submit_s"] >= t["backpressure_s"]
    assert t["hash_s"] > 0 and t["copy_wait_s"] >= 0  # no device copy on the CPU


def test_a_failing_callback_still_counts_and_frees_its_buffer() -> None:
    def disk_full(_: dict[str, torch.Tensor]) -> None:
        raise OSError("no space left on device")

    st = _state()
    with AsyncStateHasher(st, buffers=1) as h:
        with pytest.raises(OSError):
            h.submit(st, then=disk_full).result()
        assert h.submit(st).result() == state_hash(st)  # the one buffer came back
        assert h.timings()["hashed"] == 2
