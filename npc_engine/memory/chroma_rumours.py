"""What a world tick asks of the Chroma store (``npc_engine/rumours.py``): memories made
in a time window, rumour origins already known, rumours that faded. Answered from the
engine's SQLite index beside Chroma once it is in step, else by reading the collections
(a store on a shared server keeps no local index)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from npc_engine.memory.chroma_records import (
    TICK_READ_BATCH,
    from_timestamp,
    memories_of,
    own_name,
    player_shard,
    timestamp,
)
from npc_engine.memory.types import Memory, faded_at

if TYPE_CHECKING:
    from npc_engine.memory.chroma_store import ChromaMemoryStore


class ChromaRumours:
    def __init__(self, store: ChromaMemoryStore) -> None:
        self._store = store

    def made_between(
        self, npc_id: str, since: datetime, until: datetime, min_importance: int
    ) -> Iterator[Memory]:
        """The NPC's memories (its own and every player's) made in [since, until) with at
        least this importance, most important first, then oldest: what it may pass on at
        a world tick. Read lazily, a few at a time: a tick stops once it has chosen."""
        index = self._store.synced_index()
        if index is None:  # no local index on a shared server: scan its collections
            yield from sorted(
                self._scan_made_between(npc_id, since, until, min_importance),
                key=lambda m: (-m.importance, m.created_at),
            )
            return
        rows = index.made_between(npc_id, timestamp(since), timestamp(until), min_importance)
        for start in range(0, len(rows), TICK_READ_BATCH):
            chunk = rows[start : start + TICK_READ_BATCH]
            # The rumours of earlier ticks still held out of Chroma are read where they are
            # held: the teller's collections are not filled for this.
            found = self._store.held_records([memory_id for memory_id, _ in chunk])
            wanted: dict[str, list[str]] = {}
            for memory_id, player_id in chunk:
                if memory_id in found:
                    continue
                name = own_name(npc_id) if player_id is None else player_shard(npc_id, player_id)
                wanted.setdefault(name, []).append(memory_id)
            for name, ids in wanted.items():
                collection = self._store.collection(name, npc_id, create=False, deliver=False)
                if collection is not None:
                    found.update(self._store.cached_records(collection, ids))
            yield from (found[i] for i, _player in chunk if i in found)

    def _scan_made_between(
        self, npc_id: str, since: datetime, until: datetime, min_importance: int
    ) -> list[Memory]:
        # One range condition only: Chroma plans "$and" with importance as a scan of every
        # collection's metadata (~0.5 s a shard at 100,000 memories, against ~10 ms).
        where = {"created_at": {"$gte": timestamp(since)}}
        found: list[Memory] = []
        for collection in self._store.all_of(npc_id):
            got = memories_of(collection.get(where=where, include=["documents", "metadatas"]))
            found += [m for m in got if m.created_at < until and m.importance >= min_importance]
        return found

    def origins_known(self, npc_id: str, origins: Sequence[str]) -> set[str]:
        """Which of these rumour origins the NPC already has a memory of (rumours of a
        player's words live with that player's memories: every collection is read)."""
        if not origins:
            return set()
        index = self._store.synced_index()
        if index is not None:
            return index.origins_known(npc_id, origins)
        known: set[str] = set()
        for collection in self._store.all_of(npc_id):
            got = collection.get(where={"origin": {"$in": list(origins)}}, include=["metadatas"])
            known |= {str((m or {}).get("origin")) for m in got.get("metadatas") or []}
        return known

    def faded_rumours(
        self, npc_id: str, now: datetime, game_now: float | None, fade_minutes: float
    ) -> list[str]:
        """The ids of the NPC's rumours older than ``fade_minutes`` (in game time where
        both the rumour and the tick have one, else in real time)."""
        index = self._store.synced_index()
        if index is None:
            return [
                m.id
                for m in self.rumours_of(npc_id)
                if faded_at(m.created_at, m.game_time, now, game_now, fade_minutes)
            ]
        return [
            memory_id
            for memory_id, created, game_time in index.rumours_of(npc_id)
            if faded_at(from_timestamp(created), game_time, now, game_now, fade_minutes)
        ]

    def rumours_of(self, npc_id: str) -> list[Memory]:
        found: list[Memory] = []
        for collection in self._store.all_of(npc_id):
            got = collection.get(where={"kind": "rumour"}, include=["documents", "metadatas"])
            found += memories_of(got)
        return found
