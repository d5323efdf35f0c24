"""A dict-backed store with a bag-of-words similarity: fast and deterministic, for unit tests."""

from __future__ import annotations

import copy
import math
import re
import threading
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from npc_engine.memory.types import Candidate, Memory

_WORD = re.compile(r"[a-z0-9']+")


def _bag(text: str) -> Counter[str]:
    return Counter(_WORD.findall(text.lower()))


def _cosine(a: Counter[str], b: Counter[str]) -> float:
    dot = sum(a[word] * b[word] for word in a.keys() & b.keys())
    norm = math.sqrt(sum(v * v for v in a.values())) * math.sqrt(sum(v * v for v in b.values()))
    return dot / norm if norm else 0.0


def visible_to(memory: Memory, npc_id: str, player_id: str | None) -> bool:
    return memory.npc_id == npc_id and memory.player_id in (None, player_id)


class InMemoryStore:
    def __init__(self) -> None:
        self._memories: dict[str, Memory] = {}
        self._state: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def add(self, memories: Sequence[Memory]) -> None:
        with self._lock:
            for memory in memories:
                self._memories[memory.id] = memory

    def _visible(self, npc_id: str, player_id: str | None) -> list[Memory]:
        with self._lock:
            return [m for m in self._memories.values() if visible_to(m, npc_id, player_id)]

    def search(self, npc_id: str, player_id: str | None, query: str, limit: int) -> list[Candidate]:
        query_bag = _bag(query)
        ranked = sorted(
            (
                Candidate(m, _cosine(query_bag, _bag(m.text)))
                for m in self._visible(npc_id, player_id)
            ),
            key=lambda c: c.relevance,
            reverse=True,
        )
        return ranked[:limit]

    def recent(self, npc_id: str, player_id: str | None, limit: int) -> list[Memory]:
        memories = sorted(
            self._visible(npc_id, player_id), key=lambda m: m.created_at, reverse=True
        )
        return memories[:limit]

    def touch(self, npc_id: str, memory_ids: Sequence[str], when: datetime) -> None:
        with self._lock:
            for memory_id in memory_ids:
                memory = self._memories.get(memory_id)
                if memory is not None and memory.npc_id == npc_id:
                    memory.last_accessed_at = when

    def forget(
        self,
        npc_id: str,
        *,
        player_id: str | None = None,
        memory_ids: Sequence[str] | None = None,
        everything: bool = False,
    ) -> int:
        with self._lock:
            doomed = [
                m.id
                for m in self._memories.values()
                if m.npc_id == npc_id
                and (
                    everything
                    or (memory_ids is not None and m.id in memory_ids)
                    or (player_id is not None and m.player_id == player_id)
                )
            ]
            for memory_id in doomed:
                del self._memories[memory_id]
            return len(doomed)

    def count(self, npc_id: str) -> int:
        return len(self._visible_all(npc_id))

    def _visible_all(self, npc_id: str) -> list[Memory]:
        with self._lock:
            return [m for m in self._memories.values() if m.npc_id == npc_id]

    def load_state(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            found = self._state.get(key)
            return copy.deepcopy(found) if found is not None else None

    def save_state(self, key: str, value: dict[str, Any]) -> None:
        with self._lock:
            self._state[key] = copy.deepcopy(value)

    def close(self) -> None:
        """Nothing to release: the dict goes with the object."""
