"""Checkpoints as safetensors files, and a loader that accepts nothing else.

A checkpoint arriving from a provider is untrusted input. It is parsed by hand first (header length,
JSON header, dtypes, shapes, offsets that tile the data buffer exactly) so a refusal says what was
received, and only then handed to ``safetensors``. Nothing here ever calls ``torch.load`` or unpickles.

What a training checkpoint holds (see :mod:`node.trainer`): ``model.<param>`` weights and the AdamW state
``optim.<param>.exp_avg``, ``optim.<param>.exp_avg_sq`` and ``optim.<param>.step``. It holds no random
number generator state because training uses none: the model has no dropout and the data order is a
pure SHA-256 function of (seed, shard, step) (:func:`node.data.batch_indices`).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from torch import Tensor

from protocol.errors import CheckpointError

#: safetensors dtype name -> bytes per element, for the dtypes a GridMint checkpoint may contain.
DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}
_TORCH_TO_ST: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
#: The largest model a job may ask for (protocol.schemas.ModelSpec: 24 layers, d_model 1024, ctx 1024) makes a training
#: checkpoint of 1,176 tensors (294 parameters x model, exp_avg, exp_avg_sq, step) whose header is about 125 KB. The
#: bounds below are several times that; they exist because the parse and safetensors' load cost CPU and memory per
#: entry, not per byte: 32 MB of header describing 550,000 empty tensors took 12 s and 1.1 GB to load.
MAX_HEADER_BYTES = 1024 * 1024
MAX_TENSORS = 8192
#: torch sizes are int64: a larger dimension (with another one 0, so the byte count checks out) is a TypeError there.
MAX_DIM = 2**63 - 1
#: The most dimensions a tensor may have (torch allows 64; a training state's have at most 2). Bounds the byte count's
#: product: 230 dims of 2**63 - 1 made a number too long to print (a bare ValueError, a 500), 50,000 took 6 s of CPU.
MAX_RANK = 8
MAX_FILE_BYTES = 4 * 1024**3
#: How deep a header's brackets may nest: {"name": {"shape": [...]}} is 3, the most a valid header has. Checked before
#: json.loads, which recurses once per level in C: eth_account (py_ecc) raises the recursion limit to 100,000, so a
#: header of a few hundred kilobytes of brackets would overflow the C stack and kill the process.
MAX_HEADER_DEPTH = 3
#: One string literal, escapes included; an unclosed one runs to the end (json.loads refuses it anyway). Linear time:
#: a pattern that had to find the closing quote was tried again from every later quote of an unclosed string, each
#: try scanning to the end (a review measured 4 s of CPU, GIL held, for a 32 KB header of quotes; an hour at 1 MB).
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*\\?(?:"|\Z)', re.DOTALL)
_AS_BRACKETS = bytes.maketrans(b"{}", b"[]")  # depth only: a bracket of the wrong kind fails json.loads itself
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def save(path: str | os.PathLike[str], tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> str:
    """Write ``tensors`` + ``metadata`` as a safetensors file (atomically) and return ``0x`` + its SHA-256.

    The bytes are a pure function of the inputs (header keys sorted, data in name order), so two saves of
    the same state give the same file hash. (``safetensors.torch.save`` orders ``__metadata__`` from a
    Rust HashMap, which differs from call to call.) The tensors' bytes are written straight from their
    memory (no joined copy of the file), so saving from another thread costs the trainer little.
    """
    parts = _parts(tensors, metadata)
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as f:
            for part in parts:
                h.update(part)
                f.write(part)
        os.replace(tmp, target)
    except BaseException:  # a full disk, say: no partial file is left behind
        tmp.unlink(missing_ok=True)
        raise
    return "0x" + h.hexdigest()


def serialize(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> bytes:
    """Canonical safetensors bytes (see :func:`save`)."""
    return b"".join(_parts(tensors, metadata))


def serialized_size(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> int:
    """Bytes of the file :func:`save` writes for ``tensors`` + ``metadata``, from their names, dtypes and shapes
    alone: tensors on the ``meta`` device (no data) give the size of a checkpoint without allocating it."""
    entries = _entries(tensors)
    return len(_header(entries, metadata)) + sum(nbytes for _, _, _, nbytes in entries)


def _entries(tensors: Mapping[str, Tensor]) -> list[tuple[str, str, list[int], int]]:
    """(name, safetensors dtype, shape, bytes) of every tensor, in the name order the file lays them out."""
    out = []
    for name in sorted(tensors):
        t = tensors[name]
        if not isinstance(name, str) or name == "__metadata__" or not isinstance(t, Tensor):
            raise CheckpointError(f"checkpoint entries must be str -> Tensor, got {name!r}: {type(t).__name__}")
        if t.dtype not in _TORCH_TO_ST:
            raise CheckpointError(f"tensor {name!r} has dtype {t.dtype}, not one of {sorted(DTYPE_SIZES)}")
        out.append((name, _TORCH_TO_ST[t.dtype], list(t.shape), t.numel() * t.element_size()))
    return out


def _header(entries: list[tuple[str, str, list[int], int]], metadata: Mapping[str, str]) -> bytes:
    """The length field and the JSON header (padded as safetensors pads it) that come before the tensors' bytes."""
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise CheckpointError(f"checkpoint metadata must map str to str, got {k!r}: {v!r}")
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    pos = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)  # safetensors pads the header with spaces to 8-byte alignment
    return len(head).to_bytes(8, "little") + head


def _parts(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> list[bytes | memoryview]:
    """The file as its header followed by every tensor's raw bytes in name order (views, not copies, of
    contiguous CPU tensors)."""
    if sys.byteorder != "little":  # pragma: no cover - safetensors data is little-endian
        raise CheckpointError("writing checkpoints needs a little-endian machine")
    entries = _entries(tensors)
    chunks: list[bytes | memoryview] = []
    for name, _, _, nbytes in entries:
        t = tensors[name].detach().to("cpu").contiguous()
        chunks.append(memoryview(t.reshape(-1).view(torch.uint8).numpy()) if nbytes else memoryview(b""))
    return [_header(entries, metadata), *chunks]


def file_sha256(path_or_bytes: str | os.PathLike[str] | bytes) -> str:
    """``0x`` + SHA-256 of a checkpoint file's bytes (the value :func:`save` returned)."""
    return "0x" + hashlib.sha256(_read(path_or_bytes)).hexdigest()


def load(path_or_bytes: str | os.PathLike[str] | bytes) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of a valid safetensors checkpoint.

    Raises :class:`CheckpointError` for any content that is not one (pickle, zip, garbage, truncated file,
    header that lies about sizes), and ``OSError`` if the path cannot be read at all.
    """
    blob = _read(path_or_bytes)
    header = _parse_header(blob)
    metadata = header.pop("__metadata__", {})
    try:
        tensors = st_load(blob)
    except (SafetensorError, ValueError, RuntimeError, TypeError) as exc:  # pragma: no cover - _parse_header first
        raise CheckpointError(f"safetensors refused the checkpoint: {exc}") from exc
    if set(tensors) != set(header):
        raise CheckpointError(f"checkpoint tensor names {sorted(tensors)} differ from its header {sorted(header)}")
    return tensors, metadata


def _read(path_or_bytes: str | os.PathLike[str] | bytes) -> bytes:
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        return bytes(path_or_bytes)
    # A missing or unreadable file raises OSError, not CheckpointError: that is a local problem
    # (wrong path, failed download), not evidence against whoever produced the checkpoint.
    path = Path(path_or_bytes)
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise CheckpointError(f"checkpoint {path} is {size} bytes, over the {MAX_FILE_BYTES} byte limit")
    return path.read_bytes()


def _describe(blob: bytes) -> str:
    """A guess at what a non-safetensors blob is, for error messages."""
    if blob.startswith(b"PK\x03\x04"):
        return "a zip archive (torch.save output?)"
    if len(blob) >= 2 and blob[0] == 0x80 and 2 <= blob[1] <= 5:
        return f"a Python pickle (protocol {blob[1]})"
    if blob.startswith(b"\x1f\x8b"):
        return "a gzip stream"
    return f"{len(blob)} bytes starting {blob[:16].hex()}"


def _parse_header(blob: bytes) -> dict[str, Any]:
    if len(blob) < 8:
        raise CheckpointError(f"not a safetensors file: {len(blob)} bytes is shorter than the 8-byte header length")
    n = int.from_bytes(blob[:8], "little")
    if n < 2 or n > len(blob) - 8:
        raise CheckpointError(
            f"not a safetensors file: header length field says {n} bytes but the file has {len(blob) - 8} "
            f"after it; got {_describe(blob)}"
        )
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(f"safetensors header is {n} bytes, over the {MAX_HEADER_BYTES} byte limit")
    raw = blob[8 : 8 + n]
    if raw[:1] != b"{":
        raise CheckpointError(f"not a safetensors file: header does not start with '{{'; got {_describe(blob)}")
    # an upper bound on the entries (a key named so in a string counts too), counted in C before json.loads builds them
    entries = raw.count(b'"data_offsets"')
    if entries > MAX_TENSORS:
        raise CheckpointError(f"safetensors header describes {entries} tensors, over the {MAX_TENSORS} limit")
    _check_depth(raw)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_int=_header_int)
    except CheckpointError:
        raise
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"safetensors header is not valid UTF-8 JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"safetensors header must be a JSON object, got {type(header).__name__}")
    tensors = len(header) - ("__metadata__" in header)  # counted again as parsed: a key written with an escape
    if tensors > MAX_TENSORS:  # ("data\u005foffsets") is not counted above
        raise CheckpointError(f"safetensors header describes {tensors} tensors, over the {MAX_TENSORS} limit")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"safetensors __metadata__ must map str to str, got {meta!r}")
    buffer_len = len(blob) - 8 - n
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        spans.append(_check_entry(name, entry) + (name,))
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            raise CheckpointError(
                f"tensor {name!r} starts at byte {begin} of the data buffer, expected {pos} (gap or overlap)"
            )
        pos = end
    if pos != buffer_len:
        raise CheckpointError(
            f"header describes {pos} bytes of tensor data but the file holds {buffer_len} (truncated or padded)"
        )
    return header


def _check_depth(raw: bytes) -> None:
    """Refuse a header whose brackets nest deeper than :data:`MAX_HEADER_DEPTH` (or do not pair up), without
    recursing: strings removed, only the brackets kept (``{}`` as ``[]``), then each pass removes the innermost pairs.
    Whatever is left after MAX_HEADER_DEPTH passes is nested deeper or unpaired. Linear time, in C."""
    brackets = _JSON_STRING.sub(b"", raw).translate(_AS_BRACKETS, _NOT_BRACKETS)
    for _ in range(MAX_HEADER_DEPTH):
        brackets = brackets.replace(b"[]", b"")
    if brackets:
        raise CheckpointError(
            f"safetensors header nests deeper than {MAX_HEADER_DEPTH} levels, the most a valid one has "
            "(or its brackets do not pair up)"
        )


def _check_entry(name: str, entry: Any) -> tuple[int, int]:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(f"tensor {name!r}: header entry must have dtype, shape, data_offsets; got {entry!r}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_SIZES:
        raise CheckpointError(f"tensor {name!r}: dtype {dtype!r} is not one of {sorted(DTYPE_SIZES)}")
    if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(_is_uint(d) and d <= MAX_DIM for d in shape):
        raise CheckpointError(f"tensor {name!r}: shape must be a list of at most {MAX_RANK} ints in [0, 2**63), got "
                              f"{str(shape)[:200]}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_uint(o) for o in offsets):
        raise CheckpointError(f"tensor {name!r}: data_offsets must be [begin, end], got {offsets!r}")
    begin, end = offsets
    need = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != need:
        raise CheckpointError(
            f"tensor {name!r}: {dtype}{shape} needs {need} bytes but its offsets [{begin}, {end}] give {end - begin}"
        )
    return begin, end


def _is_uint(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _header_int(text: str) -> int:
    # json.loads would call int() itself, which raises a bare ValueError past Python's 4,300-digit limit
    if len(text.lstrip("-")) > 20:
        raise CheckpointError(f"safetensors header holds a {len(text)}-digit integer; shapes and offsets are 64-bit")
    return int(text)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise CheckpointError(f"duplicate key {k!r} in safetensors header")
        out[k] = v
    return out


__all__ = ["save", "serialize", "serialized_size", "load", "file_sha256", "DTYPE_SIZES"]
