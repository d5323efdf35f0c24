"""Per-conversation KV-cache snapshots: an LRU with a RAM budget and an optional disk spill.

One llama.cpp context holds one conversation's tokens at a time, so a player who turns to
another NPC would make the model re-read that NPC's whole persona and history (about a
second per thousand tokens on a small CPU). A snapshot is the raw KV state of one sequence
(llama.cpp's ``llama_state_seq_get_data``: only the KV cells, a few MB per thousand tokens)
plus the tokens it holds; restoring one takes milliseconds. ``Llama.save_state`` is not
used: it also copies an (n_batch × n_vocab) logits buffer, hundreds of MB.

This module knows nothing of llama.cpp: it stores bytes and token arrays, so it is tested
on its own.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

TokenArray = npt.NDArray[np.int32]


def common_prefix_length(a: TokenArray, b: TokenArray) -> int:
    """How many leading tokens two arrays share (vectorised: prompts are ~1-4k tokens)."""
    length = min(len(a), len(b))
    if length == 0:
        return 0
    differ = np.flatnonzero(a[:length] != b[:length])
    return int(differ[0]) if len(differ) else length


@dataclass
class Snapshot:
    key: str
    tokens: TokenArray
    size: int
    data: bytearray | None = None  # in RAM (writable: llama.cpp reads it without a copy)
    path: Path | None = None  # spilled to disk


class SnapshotCache:
    """Snapshots by conversation key; the best one for a prompt shares its longest prefix."""

    def __init__(
        self,
        ram_budget_bytes: int,
        *,
        spill_dir: Path | None = None,
        disk_budget_bytes: int = 0,
    ) -> None:
        self.ram_budget = ram_budget_bytes
        self.disk_budget = disk_budget_bytes if spill_dir is not None else 0
        self.spill_dir = spill_dir
        if spill_dir is not None and self.disk_budget:
            spill_dir.mkdir(parents=True, exist_ok=True)
            for stale in spill_dir.glob("*.kv"):  # a cache: never trusted across runs
                stale.unlink(missing_ok=True)
        self._entries: OrderedDict[str, Snapshot] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = self.spills = 0

    @property
    def ram_bytes(self) -> int:
        return sum(s.size for s in self._entries.values() if s.data is not None)

    @property
    def disk_bytes(self) -> int:
        return sum(s.size for s in self._entries.values() if s.path is not None)

    def __len__(self) -> int:
        return len(self._entries)

    def best(self, tokens: TokenArray) -> tuple[Snapshot, int] | None:
        """The snapshot sharing the longest prefix with ``tokens``, and that length."""
        with self._lock:
            found: tuple[Snapshot, int] | None = None
            for snapshot in self._entries.values():
                shared = common_prefix_length(snapshot.tokens, tokens)
                if shared and (found is None or shared > found[1]):
                    found = (snapshot, shared)
            if found is None:
                self.misses += 1
            else:
                self.hits += 1
            return found

    def load(self, snapshot: Snapshot) -> bytearray:
        """The snapshot's bytes; one in RAM becomes the most recently used, one spilled is
        read back from disk and stays where it is in the disk LRU."""
        with self._lock:
            if snapshot.data is not None:
                self._entries.move_to_end(snapshot.key)
                return snapshot.data
            assert snapshot.path is not None
            return bytearray(snapshot.path.read_bytes())

    def put(self, key: str, tokens: TokenArray, data: bytearray) -> None:
        """Store (or replace) the snapshot of conversation ``key``."""
        if len(data) > self.ram_budget:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None and old.path is not None:
                old.path.unlink(missing_ok=True)
            self._entries[key] = Snapshot(key, tokens.copy(), len(data), data=data)
            self._fit()

    def _fit(self) -> None:
        """Evict least recently used snapshots to disk (within its budget), then drop."""
        in_ram = [s for s in self._entries.values() if s.data is not None]
        ram = sum(s.size for s in in_ram)
        for snapshot in in_ram:  # oldest first
            if ram <= self.ram_budget:
                break
            ram -= snapshot.size
            self._spill(snapshot)
        disk = self.disk_bytes
        for snapshot in [s for s in self._entries.values() if s.path is not None]:
            if disk <= self.disk_budget:
                break
            disk -= snapshot.size
            assert snapshot.path is not None
            snapshot.path.unlink(missing_ok=True)
            del self._entries[snapshot.key]

    def _spill(self, snapshot: Snapshot) -> None:
        if self.spill_dir is None or not self.disk_budget or snapshot.size > self.disk_budget:
            del self._entries[snapshot.key]
            return
        name = hashlib.sha1(snapshot.key.encode()).hexdigest() + ".kv"
        path = self.spill_dir / name
        assert snapshot.data is not None
        path.write_bytes(snapshot.data)
        snapshot.path, snapshot.data = path, None
        self.spills += 1
