"""Content-addressed checkpoint store: files named by their sha256. Only safetensors are accepted.

A name is a promise about the bytes: every read the marketplace decides on (averaging a round, checking a result or
a reveal, a referee's replay, forging a canary) and every download checks the bytes against it, so a copy corrupted
on disk or on shared storage raises :class:`BlobCorruptError` (logged, naming the blob) instead of being loaded or
served as if it were what was uploaded."""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Callable, Mapping

from safetensors.torch import save as safetensors_save
from torch import Tensor

from node.checkpoint import load as load_checkpoint
from protocol.errors import BlobCorruptError, CheckpointError, GridMintValueError

log = logging.getLogger(__name__)

#: bytes read (and hashed) at a time when a blob is checked or sent: never a whole checkpoint in memory for that
CHUNK = 1024 * 1024
#: files remembered as hashed whole (``BlobStore._intact``); past this the memory starts over (each is hashed again)
INTACT_MEMORY = 65536

_Identity = tuple[int, int, int, int]


def _identity(st: os.stat_result) -> _Identity:
    """A file as written: a write through the filesystem (a replaced file, a torn copy) changes its size or mtime."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _fsync_dir(d: Path) -> None:
    """Flush directory ``d``'s entries (a rename in it) to disk; a filesystem that cannot (some network ones) is
    left to its own guarantees."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        # blobs this process wrote or hashed whole, with their file then (_identity): sending one unchanged since is
        # not preceded by a second read to check it (it is still hashed on the way: :meth:`send`)
        self._intact: dict[str, _Identity] = {}

    def path(self, sha: str) -> Path:
        """Where blob ``sha`` lives; nothing is checked (:meth:`read`, :meth:`checked_path` and :meth:`send` are)."""
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise GridMintValueError(f"not a sha256 hex digest: {sha!r}")
        return self.root / f"{sha}.safetensors"

    def has(self, sha: str) -> bool:
        return self.path(sha).exists()

    def put_checkpoint(self, data: bytes, admit: Callable[[], object] | None = None,
                       claim: Callable[[str, Mapping[str, Tensor], Mapping[str, str]], object] | None = None) -> str:
        """Validate ``data`` as safetensors (never unpickled) and store it; returns its sha256. Idempotent; a stored
        copy that is corrupt is written anew (so the same bytes uploaded again repair it).
        ``admit``, if given, runs first and raises to refuse the uploader: parsing costs CPU and memory that a
        stranger's upload must not get to spend. ``claim``, if given, gets the sha256, the parsed tensors and the
        metadata before anything is written, and raises to refuse them (what they are for: ``marketplace.uploads``)."""
        if admit is not None:
            admit()
        tensors, metadata = load_checkpoint(data)  # raises CheckpointError for pickle, zip, junk, lying headers
        sha = hashlib.sha256(data).hexdigest()
        if claim is not None:
            claim(sha, tensors, metadata)
        del tensors
        target = self.path(sha)
        if self._holds(sha, target):
            # handed in again: its age starts over, so the collector (:meth:`collect`) never takes a blob somebody
            # has just uploaded, or written, to name it next; unless the collector took it meanwhile: written again
            try:
                os.utime(target)
                self._remember(sha, target.stat())
                return sha
            except FileNotFoundError:
                pass
        if target.exists():
            log.warning("blob %s: its corrupt copy is replaced by the same bytes uploaded again", sha)
        fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())  # on disk before it has a name: a host crash leaves no torn blob named right
            os.replace(tmp, target)  # atomic: a crash never leaves a half blob under its name
            _fsync_dir(self.root)  # and the name on disk before the caller records it (a review: a host crash could
            # lose the name of a blob a committed row already named)
        except BaseException:
            with contextlib.suppress(OSError):  # a full disk: the partial file must not keep it full
                os.unlink(tmp)
            raise
        self._remember(sha, target.stat())
        return sha

    def collect(self, keep: set[str], older_than: float) -> tuple[int, int]:
        """Delete every blob not in ``keep`` last written or handed in before ``older_than`` (unix s), and partial
        writes (``.part``, and a collection's own ``.gc`` left by a crash) as old; returns (files, bytes) deleted. A
        blob being named meanwhile is handed in anew first (:meth:`put_checkpoint` renews its age, or writes it again
        if it is gone), so its age is read again, once it is taken aside, just before it goes."""
        files = size = 0
        for p in self.root.iterdir():
            sha = p.name.removesuffix(".safetensors")
            if p.suffix == ".safetensors" and sha in keep:
                continue
            if p.suffix not in (".safetensors", ".part", ".gc"):
                continue
            try:
                st = p.stat()
                if st.st_mtime >= older_than:
                    continue
                if p.suffix == ".safetensors":
                    # taken aside first, then its age read again: one handed in again between the two reads (its
                    # age renewed, or, found gone, written anew under its name) stays
                    aside = p.with_suffix(".gc")
                    os.replace(p, aside)
                    st = aside.stat()
                    if st.st_mtime >= older_than:
                        os.replace(aside, p)
                        continue
                    p = aside
                p.unlink()
            except FileNotFoundError:
                continue
            self._intact.pop(sha, None)
            files, size = files + 1, size + st.st_size
        return files, size

    def put_tensors(self, tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> str:
        return self.put_checkpoint(safetensors_save({k: v.contiguous() for k, v in tensors.items()}, dict(metadata)))

    def put_file(self, path: Path) -> str:
        return self.put_checkpoint(path.read_bytes())

    def read(self, sha: str) -> bytes:
        """Blob ``sha``'s bytes, checked against its name (BlobCorruptError: they hash to something else). One read;
        hashing them costs a fraction of loading them (SHA-256: ~1 ms a MB)."""
        p = self.path(sha)
        if not p.exists():
            raise CheckpointError(f"no checkpoint {sha}")
        st = p.stat()
        data = p.read_bytes()
        self._check(sha, hashlib.sha256(data).hexdigest(), p)
        self._remember(sha, st)
        return data

    def checked_path(self, sha: str) -> Path:
        """Blob ``sha``'s path, once its bytes are hashed now (in chunks) and match its name (BlobCorruptError
        otherwise): for a reader that takes a path, the referee, whose replay costs far more than this read (the
        reader's own read then comes from the page cache). FileNotFoundError if there is none."""
        p = self.path(sha)
        st = p.stat()
        h = hashlib.sha256()
        with p.open("rb") as fh:
            while chunk := fh.read(CHUNK):
                h.update(chunk)
        self._check(sha, h.hexdigest(), p)
        self._remember(sha, st)
        return p

    def send(self, sha: str) -> tuple[int, Iterator[bytes]]:
        """(size, chunks) of blob ``sha``, to serve. Checked before the first byte goes (BlobCorruptError: the
        client gets an error, not the bytes) unless this process wrote or hashed this very file before (same inode,
        size and mtime: ``_identity``), so a blob every provider downloads is not read twice each time; and hashed on
        the way whatever: the last chunk goes only if the whole matches, so a copy that rotted in place (its
        metadata untouched) is cut off, and no client ever gets all of a corrupt blob. FileNotFoundError if none.
        The file is opened once, checked and sent from that one handle: the collector taking it meanwhile changes
        nothing (a review found a blob collected between the check and the send was a bare 500, or a cut body)."""
        p = self.path(sha)
        fh = p.open("rb")
        try:
            st = os.fstat(fh.fileno())
            if self._intact.get(sha) != _identity(st):
                h = hashlib.sha256()
                while chunk := fh.read(CHUNK):
                    h.update(chunk)
                self._check(sha, h.hexdigest(), p)
                self._remember(sha, st)
                fh.seek(0)
        except BaseException:
            fh.close()
            raise
        return st.st_size, self._chunks(sha, p, fh)

    def _chunks(self, sha: str, p: Path, fh: BinaryIO) -> Iterator[bytes]:
        h = hashlib.sha256()
        with fh:
            held = fh.read(CHUNK)
            while nxt := fh.read(CHUNK):
                h.update(held)
                yield held
                held = nxt
            h.update(held)
        self._check(sha, h.hexdigest(), p)  # raises: the connection is cut before the body is complete
        yield held

    def _holds(self, sha: str, p: Path) -> bool:
        """Whether ``p`` holds blob ``sha``: remembered so for this very file (:meth:`_remember`), or hashed now.
        False if there is no file, or it is corrupt (logged)."""
        try:
            st = p.stat()
        except FileNotFoundError:
            return False
        if self._intact.get(sha) == _identity(st):
            return True
        try:
            self.checked_path(sha)
        except (BlobCorruptError, FileNotFoundError):  # (taken by the collector since the stat: written again)
            return False
        return True

    def _remember(self, sha: str, st: os.stat_result) -> None:
        """``sha``'s file, as stat'ed *before* it was hashed whole and matched (a change since is a change after)."""
        if len(self._intact) >= INTACT_MEMORY:
            self._intact.clear()
        self._intact[sha] = _identity(st)

    def _check(self, sha: str, got: str, p: Path) -> None:
        """BlobCorruptError (logged) unless ``got``, the hash of ``p``'s bytes, is ``sha``."""
        if got == sha:
            return
        self._intact.pop(sha, None)
        log.error("blob %s is corrupt: its content hashes to %s (%s); nothing is loaded or served from it until it "
                  "is restored (its bytes uploaded again, or the file put back from a copy)", sha, got, p)
        raise BlobCorruptError(f"blob {sha} is corrupt: its content hashes to {got}; the marketplace operator must "
                               f"restore it")
