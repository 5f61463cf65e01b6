from __future__ import annotations

import hashlib
import io
import json
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

from node import checkpoint
from protocol.errors import CheckpointError


def _tensors() -> dict[str, torch.Tensor]:
    return {
        "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b.step": torch.tensor(3.0),
        "c": torch.zeros(0, dtype=torch.float32),
    }


def _blob(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


def test_round_trip_and_file_hash(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    digest = checkpoint.save(path, _tensors(), {"k": "v"})
    assert digest == "0x" + hashlib.sha256(path.read_bytes()).hexdigest() == checkpoint.file_sha256(path)
    tensors, meta = checkpoint.load(path)
    assert meta == {"k": "v"}
    assert tensors.keys() == _tensors().keys()
    assert all(torch.equal(tensors[k], v) for k, v in _tensors().items())
    assert checkpoint.load(path.read_bytes())[1] == {"k": "v"}


def test_save_is_deterministic(tmp_path: Path) -> None:
    assert checkpoint.save(tmp_path / "1", _tensors(), {"x": "1"}) == checkpoint.save(tmp_path / "2", _tensors(), {"x": "1"})


def test_refuses_torch_save_zip(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save(_tensors(), path)
    with pytest.raises(CheckpointError, match="zip archive"):
        checkpoint.load(path)


def test_refuses_legacy_torch_save_pickle() -> None:
    buf = io.BytesIO()
    torch.save(_tensors(), buf, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="pickle"):
        checkpoint.load(buf.getvalue())


def test_refuses_plain_pickle_without_unpickling() -> None:
    class Boom:
        def __reduce__(self):  # would run on unpickling
            return (pytest.fail, ("unpickled!",))

    with pytest.raises(CheckpointError, match="pickle"):
        checkpoint.load(pickle.dumps(Boom(), protocol=4))


def test_refuses_zip_of_safetensors(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("model.safetensors", st_save(_tensors()))
    with pytest.raises(CheckpointError, match="zip"):
        checkpoint.load(buf.getvalue())


@pytest.mark.parametrize("cut", [0, 5, 8, 20, -1, -4])
def test_refuses_truncated(tmp_path: Path, cut: int) -> None:
    blob = st_save(_tensors())
    with pytest.raises(CheckpointError):
        checkpoint.load(blob[:cut])


@pytest.mark.parametrize("blob", [b"", b"garbage!", b"\x00" * 64, bytes(range(256)) * 4, b"{}" * 10])
def test_refuses_garbage(blob: bytes) -> None:
    with pytest.raises(CheckpointError):
        checkpoint.load(blob)


def test_refuses_appended_bytes() -> None:
    with pytest.raises(CheckpointError, match="truncated or padded"):
        checkpoint.load(st_save(_tensors()) + b"\x00" * 4)


def test_refuses_header_lying_about_sizes() -> None:
    data = b"\x00" * 16
    with pytest.raises(CheckpointError, match="needs 32 bytes"):
        checkpoint.load(_blob({"a": {"dtype": "F32", "shape": [8], "data_offsets": [0, 16]}}, data))
    with pytest.raises(CheckpointError, match="gap or overlap"):
        checkpoint.load(_blob({
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        }, data[:12]))
    with pytest.raises(CheckpointError, match="file has"):
        checkpoint.load((10**9).to_bytes(8, "little") + b"{}")


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": "OBJ", "shape": [1], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [1], "data_offsets": [0]},
        {"dtype": "F32", "shape": [1]},
        "nope",
    ],
)
def test_refuses_malformed_entries(entry) -> None:
    with pytest.raises(CheckpointError):
        checkpoint.load(_blob({"a": entry}, b"\x00" * 4))


def test_refuses_duplicate_keys_and_bad_metadata() -> None:
    raw = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    with pytest.raises(CheckpointError, match="duplicate"):
        checkpoint.load(len(raw).to_bytes(8, "little") + raw + b"\x00" * 4)
    with pytest.raises(CheckpointError, match="__metadata__"):
        checkpoint.load(_blob({"__metadata__": {"k": 1}}, b""))


def test_missing_file_is_an_os_error_not_evidence(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        checkpoint.load(tmp_path / "nope.safetensors")


def test_a_failed_save_leaves_no_partial_file(tmp_path: Path) -> None:
    """A write that fails part-way (a full disk; here RLIMIT_FSIZE: EFBIG past 64 KiB) raises the OSError and
    removes its ``.tmp``: a full disk must not fill up further with halves of checkpoints."""
    import resource
    import signal

    big = {"w": torch.zeros(64 * 1024, dtype=torch.float32)}  # 256 KiB
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    prev = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, old[1]))
    try:
        with pytest.raises(OSError):
            checkpoint.save(tmp_path / "x.safetensors", big, {})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, prev)
    assert list(tmp_path.iterdir()) == []


def test_save_rejects_non_string_metadata(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError):
        checkpoint.save(tmp_path / "x", _tensors(), {"k": 1})  # type: ignore[dict-item]


def test_canonical_bytes_are_read_by_safetensors_itself() -> None:
    from safetensors.torch import load as st_load

    meta = {f"k{i}": str(i) for i in range(20)}  # many keys: safetensors' own writer orders them at random
    blob = checkpoint.serialize(_tensors(), meta)
    assert blob == checkpoint.serialize(dict(reversed(list(_tensors().items()))), dict(reversed(list(meta.items()))))
    loaded = st_load(blob)
    assert all(torch.equal(loaded[k], v) for k, v in _tensors().items())
    assert checkpoint.load(blob)[1] == meta


def _raw_blob(header: bytes, data: bytes = b"") -> bytes:
    return len(header).to_bytes(8, "little") + header + data


NESTED = _raw_blob(b'{"__metadata__":' + b"[" * 100_000 + b"]" * 100_000 + b"}")


def test_a_deeply_nested_header_is_refused_before_json_parses_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """json.loads recurses in C once per bracket: the depth check must refuse first, whatever the recursion limit."""
    def no_parse(*args: object, **kwargs: object) -> None:
        raise AssertionError("json.loads was called on a header nested 100,000 deep")

    monkeypatch.setattr(checkpoint.json, "loads", no_parse)
    for blob in (NESTED, _raw_blob(b'{"a":{"b":{"c":[1]}}}'), _raw_blob(b'{"a":[[[[}')):
        with pytest.raises(CheckpointError, match="nests deeper than 3 levels"):
            checkpoint.load(blob)


def test_a_deeply_nested_header_does_not_crash_the_process() -> None:
    """With the recursion limit eth_account (py_ecc) sets, json.loads on this header overflowed the C stack: the
    process died of SIGSEGV. Loaded in a child process so a regression fails this test instead of killing pytest."""
    code = ("import sys; sys.setrecursionlimit(100_000)\n"
            "from node import checkpoint\nfrom protocol.errors import CheckpointError\n"
            "try:\n    checkpoint.load(sys.stdin.buffer.read())\nexcept CheckpointError as exc:\n    print(exc)\n")
    done = subprocess.run([sys.executable, "-c", code], input=NESTED, capture_output=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert b"nests deeper than 3 levels" in done.stdout


def test_a_huge_integer_in_the_header_is_a_checkpoint_error() -> None:
    """int() refuses more than 4,300 digits with a bare ValueError; the loader says what is wrong instead."""
    for digits in (b"1" * 5000, b"1" * 21, b"-" + b"1" * 5000):
        raw = b'{"a":{"dtype":"F32","shape":[' + digits + b'],"data_offsets":[0,4]}}'
        with pytest.raises(CheckpointError, match="-digit integer"):
            checkpoint.load(_raw_blob(raw, b"\x00" * 4))


def test_brackets_and_quotes_inside_strings_do_not_count_as_nesting() -> None:
    meta = {"note": '[[[[{{{{ "quoted" \\ }}', "k[": "v{"}
    blob = checkpoint.serialize(_tensors(), meta)
    assert checkpoint.load(blob)[1] == meta


def test_an_unclosed_string_of_escaped_quotes_is_stripped_in_one_pass() -> None:
    """A header of one string never closed, made of escaped quotes: the string pattern takes it to the end in one
    match, so the depth check is linear (the pattern, which needed a closing quote, was tried again from each later
    quote, each try scanning to the end: 4 s of CPU with the GIL held for a 32 KB header, about an hour at the 1 MB
    a header may have, found by a review); the loader then refuses it."""
    def unclosed(n: int) -> bytes:
        return b'{"' + b'\\"' * n + b"\\"

    assert checkpoint._JSON_STRING.sub(b"", unclosed(2_000)) == b"{"
    assert checkpoint._JSON_STRING.sub(b"", b'{"a\\"b":"c"}') == b"{:}"  # closed strings as before
    with pytest.raises(CheckpointError, match="header"):
        checkpoint.load(_raw_blob(unclosed(400_000)))  # 800 KB, under the header bound: parsed, and refused


def _empty_tensors_blob(n: int) -> bytes:
    """A header of ``n`` zero-size tensors: valid in every other way (offsets tile an empty data buffer)."""
    header = {f"t{i:07d}": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]} for i in range(n)}
    return _raw_blob(json.dumps(header, separators=(",", ":")).encode())


def test_a_header_of_too_many_tensors_or_bytes_is_refused_before_json_parses_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """32 MB of header declaring 550,000 empty tensors cost 12 s of CPU and 1.1 GB to parse and load; a header over
    the entry or byte bound is refused from a count of the bytes, before json.loads or safetensors sees it."""
    assert len(checkpoint.load(_empty_tensors_blob(checkpoint.MAX_TENSORS))[0]) == checkpoint.MAX_TENSORS

    def no_parse(*args: object, **kwargs: object) -> None:
        raise AssertionError("json.loads was called on a header over the bounds")

    monkeypatch.setattr(checkpoint.json, "loads", no_parse)
    with pytest.raises(CheckpointError, match=f"describes {checkpoint.MAX_TENSORS + 1} tensors"):
        checkpoint.load(_empty_tensors_blob(checkpoint.MAX_TENSORS + 1))
    padded = b'{"__metadata__":{"k":"' + b"x" * checkpoint.MAX_HEADER_BYTES + b'"}}'
    with pytest.raises(CheckpointError, match="byte limit"):
        checkpoint.load(_raw_blob(padded))


def test_a_header_escaping_its_keys_or_of_many_dimensions_is_a_checkpoint_error() -> None:
    """Two ways past the header's bounds, each a CheckpointError (a 422 at the upload) now: a key written with an
    escape ("data\\u005foffsets") was not counted before parsing (17,548 tensors loaded against the 8,192 limit),
    and a shape of 230 dimensions of 2**63 - 1 had a byte count too long to print: a bare ValueError (a 500), and
    50,000 such dimensions cost 6 s of CPU."""
    entries = ",".join(f'"t{i:07d}":{{"dtype":"U8","shape":[0],"data\\u005foffsets":[0,0]}}'
                       for i in range(checkpoint.MAX_TENSORS + 1))
    with pytest.raises(CheckpointError, match=f"describes {checkpoint.MAX_TENSORS + 1} tensors"):
        checkpoint.load(_raw_blob(("{" + entries + "}").encode()))
    for rank in (checkpoint.MAX_RANK + 1, 230):
        dims = ",".join([str(2**63 - 1)] * rank)
        with pytest.raises(CheckpointError, match=f"at most {checkpoint.MAX_RANK} ints"):
            checkpoint.load(_raw_blob(f'{{"a":{{"dtype":"F32","shape":[{dims}],"data_offsets":[0,4]}}}}'.encode(),
                                      b"\0" * 4))
    ok = ",".join(["1"] * checkpoint.MAX_RANK)  # (as many as a tensor may have: loads)
    assert checkpoint.load(_raw_blob(f'{{"a":{{"dtype":"F32","shape":[{ok}],"data_offsets":[0,4]}}}}'.encode(),
                                     b"\0" * 4))[0]["a"].shape == (1,) * checkpoint.MAX_RANK


def test_the_largest_model_a_job_may_ask_for_is_well_inside_the_header_bounds() -> None:
    """The bounds must never refuse real work: the training checkpoint of the largest ModelSpec has its header
    described here (names and shapes as node.trainer writes them; its 3.4 GB of data are not needed for that)."""
    from node.model import ModelConfig, param_shapes
    from node.trainer import STATE_FORMAT
    from protocol.schemas import ModelSpec

    limits = {name: field.metadata for name, field in ModelSpec.model_fields.items()}
    biggest = {name: max(getattr(m, "le", 0) or 0 for m in meta) for name, meta in limits.items()}
    cfg = ModelConfig(**biggest)
    header: dict[str, object] = {"__metadata__": {"format": STATE_FORMAT, "spec_hash": "0x" + "f" * 64,
                                                  "unit_id": "0x" + "f" * 64, "segment": "final"}}
    pos = 0
    for name, shape in param_shapes(cfg).items():
        for key, s in ((f"model.{name}", shape), (f"optim.{name}.exp_avg", shape),
                       (f"optim.{name}.exp_avg_sq", shape), (f"optim.{name}.step", ())):
            size = 4 * int(torch.Size(s).numel())
            header[key] = {"dtype": "F32", "shape": list(s), "data_offsets": [pos, pos + size]}
            pos += size
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    assert (cfg.n_layer, cfg.d_model, cfg.ctx) == (24, 1024, 1024)
    assert 4 * (len(header) - 1) <= checkpoint.MAX_TENSORS  # 1,176 tensors
    assert 4 * len(raw) <= checkpoint.MAX_HEADER_BYTES  # about 125 KB


def test_a_dimension_past_int64_is_a_checkpoint_error() -> None:
    """[2**63, 0] has 0 elements, so its byte count checks out, but torch sizes are int64: safetensors' load raised a
    TypeError (a 500 from PUT /blobs)."""
    for shape in ([2**63, 0], [0, 2**64 - 1]):
        with pytest.raises(CheckpointError, match=r"ints in \[0, 2\*\*63\)"):
            checkpoint.load(_blob({"a": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}, b""))
    assert checkpoint.load(_blob({"a": {"dtype": "F32", "shape": [2**63 - 1, 0], "data_offsets": [0, 0]}}, b""))
