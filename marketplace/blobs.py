"""Content-addressed checkpoint store: files named by their sha256. Only safetensors are accepted."""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Mapping

from safetensors.torch import save as safetensors_save
from torch import Tensor

from node.checkpoint import load as load_checkpoint
from protocol.errors import CheckpointError, GridMintValueError


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sha: str) -> Path:
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise GridMintValueError(f"not a sha256 hex digest: {sha!r}")
        return self.root / f"{sha}.safetensors"

    def has(self, sha: str) -> bool:
        return self.path(sha).exists()

    def put_checkpoint(self, data: bytes, admit: Callable[[], object] | None = None) -> str:
        """Validate ``data`` as safetensors (never unpickled) and store it; returns its sha256. Idempotent.
        ``admit``, if given, runs first and raises to refuse the uploader: parsing costs CPU and memory that a
        stranger's upload must not get to spend."""
        if admit is not None:
            admit()
        load_checkpoint(data)  # raises CheckpointError for pickle, zip, junk, lying headers
        sha = hashlib.sha256(data).hexdigest()
        target = self.path(sha)
        if not target.exists():
            fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".part")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())  # on disk before it has a name: a host crash leaves no torn blob named right
                os.replace(tmp, target)  # atomic: a crash never leaves a half blob under its name
            except BaseException:
                with contextlib.suppress(OSError):  # a full disk: the partial file must not keep it full
                    os.unlink(tmp)
                raise
        return sha

    def put_tensors(self, tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> str:
        return self.put_checkpoint(safetensors_save({k: v.contiguous() for k, v in tensors.items()}, dict(metadata)))

    def put_file(self, path: Path) -> str:
        return self.put_checkpoint(path.read_bytes())

    def read(self, sha: str) -> bytes:
        p = self.path(sha)
        if not p.exists():
            raise CheckpointError(f"no checkpoint {sha}")
        return p.read_bytes()
