"""KV states of prompt heads, kept on disk so a new process starts an NPC warm.

Every conversation with one NPC begins with the same tokens: world lore, the persona and
its example dialogue (the "head", ~800 tokens for the sample innkeeper). A fresh process
used to re-read that head for each NPC's first line: 8-12 s on 2 cores. The KV cells of a
head are the same in every process that loads the same GGUF with the same llama.cpp, so
the first process to read a head stores them here and every later one restores them in
milliseconds (llama.cpp's ``llama_state_seq_set_data``). The conversation snapshots of
``snapshots.SnapshotCache`` live and die with one process; these outlive it.

Files are named by the hash of their tokens, under a folder named by the fingerprint of
the model file and the llama.cpp build, so a changed GGUF or an upgraded llama.cpp never
restores stale cells. A file is written under a temporary name and renamed, so several
processes sharing the folder never read half a file. The folder is a cache: its least
recently used files go beyond the byte budget, and deleting it loses nothing.

This module knows nothing of llama.cpp: it stores bytes and token arrays (tested alone).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from npc_engine.generation.snapshots import Snapshot, TokenArray, common_prefix_length

log = logging.getLogger(__name__)

MAGIC = b"NPCKV1\n"
# After MAGIC: token count, KV byte count, CRC-32 of the KV bytes; then tokens, KV bytes.
_HEADER = struct.Struct("<IQI")
# Heads shorter than this are cheaper to read again than to store and restore.
MIN_HEAD_TOKENS = 64


def model_digest(model_path: Path, cache_file: Path | None = None) -> str:
    """SHA-256 of a GGUF's bytes. Hashing gigabytes takes seconds, so the digest is kept
    in ``cache_file`` by (path, size, modification time) and read back while those hold."""
    stat = model_path.stat()
    key = f"{model_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    known: dict[str, str] = {}
    if cache_file is not None and cache_file.is_file():
        with contextlib.suppress(ValueError, OSError):
            known = dict(json.loads(cache_file.read_text()))
    if key in known:
        return known[key]
    digest = hashlib.sha256()
    with model_path.open("rb") as model:
        for block in iter(lambda: model.read(1 << 20), b""):
            digest.update(block)
    known[key] = digest.hexdigest()
    if cache_file is not None:
        with contextlib.suppress(OSError):  # only a cache: a read-only folder costs a rehash
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            unfinished = cache_file.with_suffix(f".{os.getpid()}.tmp")
            unfinished.write_text(json.dumps(known))
            unfinished.replace(cache_file)
    return known[key]


def model_fingerprint(model_path: Path, *parts: object, digest_cache: Path | None = None) -> str:
    """Names one GGUF by its content (``model_digest``) and whatever else decides the KV
    layout (``parts``: llama.cpp's version, offloading, batch slots)."""
    described = "|".join([model_digest(model_path, digest_cache), *map(str, parts)])
    return hashlib.sha256(described.encode()).hexdigest()[:24]


@dataclass
class _Head(Snapshot):
    checksum: int = 0  # CRC-32 of the KV bytes: a damaged file is never restored


def _token_digest(tokens: TokenArray) -> str:
    return hashlib.sha256(np.ascontiguousarray(tokens, dtype=np.int32).tobytes()).hexdigest()


class PrefixStore:
    """Head snapshots on disk for one model; the best one for a prompt shares its longest
    prefix. Safe to share between threads and between processes."""

    def __init__(self, directory: Path, fingerprint: str, budget_bytes: int) -> None:
        self.directory = directory / fingerprint
        self.directory.mkdir(parents=True, exist_ok=True)
        self.budget = budget_bytes
        self._entries: dict[str, _Head] = {}  # by token digest
        self._scanned_at: int | None = None  # the folder's mtime when last read
        self._lock = threading.Lock()
        self.hits = self.misses = self.writes = 0

    def _rescan(self) -> None:
        """Read the headers of files other processes wrote since the last look."""
        try:
            changed = self.directory.stat().st_mtime_ns
        except FileNotFoundError:
            self.directory.mkdir(parents=True, exist_ok=True)
            changed = self.directory.stat().st_mtime_ns
        if changed == self._scanned_at:
            return
        self._scanned_at = changed
        found: dict[str, _Head] = {}
        for path in self.directory.glob("*.kv"):
            digest = path.stem
            known = self._entries.get(digest)
            if known is not None:
                found[digest] = known
                continue
            header = _read_header(path)
            if header is not None:
                found[digest] = header
        self._entries = found

    def __len__(self) -> int:
        with self._lock:
            self._rescan()
            return len(self._entries)

    def has(self, tokens: TokenArray) -> bool:
        with self._lock:
            self._rescan()
            return _token_digest(tokens) in self._entries

    def best(self, tokens: TokenArray) -> tuple[Snapshot, int] | None:
        """The stored head that is a prefix of ``tokens`` and the longest such, with its
        length. A head only partly shared is useless (its cells past the shared part would
        have to be dropped, and a head is whole or nothing here)."""
        with self._lock:
            self._rescan()
            found: tuple[Snapshot, int] | None = None
            for snapshot in self._entries.values():
                length = len(snapshot.tokens)
                longer = found is None or length > found[1]
                fits = length < len(tokens)  # the last prompt token must still be read
                if longer and fits and common_prefix_length(snapshot.tokens, tokens) == length:
                    found = (snapshot, length)
            if found is None:
                self.misses += 1
            else:
                self.hits += 1
            return found

    def load(self, snapshot: Snapshot) -> bytearray | None:
        assert isinstance(snapshot, _Head)
        """The head's KV bytes; None when the file went (another process evicted it) or is
        damaged (then it is removed)."""
        assert snapshot.path is not None
        try:
            raw = snapshot.path.read_bytes()
        except FileNotFoundError:
            return None
        offset = len(MAGIC) + _HEADER.size + 4 * len(snapshot.tokens)
        data = bytearray(memoryview(raw)[offset:])
        if len(data) != snapshot.size or zlib.crc32(data) != snapshot.checksum:
            log.warning("%s: damaged KV head file, removed", snapshot.path)
            snapshot.path.unlink(missing_ok=True)
            return None
        os.utime(snapshot.path)  # recently used: evicted last
        return data

    def put(self, tokens: TokenArray, data: bytearray) -> None:
        """Store the KV cells of the head ``tokens`` (atomically; the budget is kept)."""
        if len(tokens) < MIN_HEAD_TOKENS or len(data) > self.budget:
            return
        tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        digest = _token_digest(tokens)
        path = self.directory / f"{digest}.kv"
        partial = path.with_name(f"{digest}.{os.getpid()}.{threading.get_ident()}.part")
        try:
            with partial.open("wb") as out:
                header = _HEADER.pack(len(tokens), len(data), zlib.crc32(data))
                out.write(MAGIC + header + tokens.tobytes())
                out.write(data)
            os.replace(partial, path)
        except OSError as exc:  # a full or read-only disk costs speed, never a reply
            log.warning("could not store a KV head in %s: %s", self.directory, exc)
            partial.unlink(missing_ok=True)
            return
        with self._lock:
            self._entries[digest] = _Head(
                digest, tokens.copy(), len(data), path=path, checksum=zlib.crc32(data)
            )
            self.writes += 1
            self._fit()

    def _fit(self) -> None:
        """Remove the least recently used files until the folder fits its budget."""
        files = []
        for path in self.directory.glob("*.kv"):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            files.append((stat.st_mtime_ns, stat.st_size, path))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.budget:
                break
            path.unlink(missing_ok=True)
            self._entries.pop(path.stem, None)
            total -= size


def _read_header(path: Path) -> _Head | None:
    """A head file's tokens and KV byte count (its KV bytes are read only when restored),
    or None if it is not a whole head file."""
    try:
        with path.open("rb") as file:
            fixed = file.read(len(MAGIC) + _HEADER.size)
            if len(fixed) != len(MAGIC) + _HEADER.size or not fixed.startswith(MAGIC):
                return None
            count, size, checksum = _HEADER.unpack(fixed[len(MAGIC) :])
            raw = file.read(4 * count)
            whole = len(fixed) + len(raw) + size == path.stat().st_size
    except OSError:
        return None
    tokens = np.frombuffer(raw, dtype=np.int32).copy()
    if len(raw) != 4 * count or not whole or _token_digest(tokens) != path.stem:
        return None
    return _Head(path.stem, tokens, size, path=path, checksum=checksum)
