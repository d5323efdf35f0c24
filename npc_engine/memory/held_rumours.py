"""Rumours a world tick passed on, held in a SQLite file until their listener's memories
are next read, then moved into Chroma (``ChromaMemoryStore.collection``).

Why: a tick in a 100-NPC town passes on ~900 rumours into ~600 collections, and each
Chroma write (an embedding, a transaction, the HNSW log) cost 13-26 ms, most of the tick.
Here they are one transaction. Most listeners are not talked to before their rumours fade,
and a faded rumour is dropped from here without ever reaching Chroma; the others move in
one write per collection, however many ticks they waited.

The file is the record of what it holds (a tick's answer acknowledges its rumours), so it
is written with full sync; the keyword index beside it is told of held rumours too, so a
tick's reads (news, known origins, faded rumours) see them as stored.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from npc_engine.memory.chroma_records import home_name, memory_of, metadata_of
from npc_engine.memory.types import Memory

HELD_RUMOURS_FILE = "npc-engine-held-rumours.sqlite3"  # beside Chroma's own files


class HeldRumours:
    def __init__(self, path: Path) -> None:
        # check_same_thread: the writer thread holds, request threads deliver; one lock.
        self._db = sqlite3.connect(str(path), check_same_thread=False)
        self._lock = threading.RLock()
        with self._lock, self._db:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # acknowledged: must survive a crash
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS held (memory_id TEXT PRIMARY KEY, "
                "collection TEXT NOT NULL, npc_id TEXT NOT NULL, player_id TEXT, "
                "document TEXT NOT NULL, metadata TEXT NOT NULL)"
            )
            self._db.execute("CREATE INDEX IF NOT EXISTS held_by_collection ON held (collection)")
            self._db.execute("CREATE INDEX IF NOT EXISTS held_by_npc ON held (npc_id, player_id)")
            # Which collections have rumours waiting, and whose: checked on every read of
            # a collection, so kept in RAM (at most an NPC's 9 collections each).
            self._waiting: dict[str, str] = dict(
                self._db.execute("SELECT DISTINCT collection, npc_id FROM held").fetchall()
            )

    def hold(self, memories: Sequence[Memory]) -> None:
        rows = [
            (
                m.id,
                home_name(m),
                m.npc_id,
                m.player_id,
                m.text,
                json.dumps(metadata_of(m), ensure_ascii=False),
            )
            for m in memories
        ]
        with self._lock, self._db:
            self._db.executemany("INSERT OR REPLACE INTO held VALUES (?, ?, ?, ?, ?, ?)", rows)
            self._waiting.update((name, npc_id) for _, name, npc_id, *_rest in rows)

    def waiting(self) -> dict[str, str]:
        """Collection name -> NPC id, for every collection with rumours held for it."""
        with self._lock:
            return dict(self._waiting)

    def waits_for(self, name: str) -> bool:
        return name in self._waiting  # a dict lookup: read without the lock

    def held_for(self, name: str) -> list[Memory]:
        return self._memories("WHERE collection = ?", [name])

    def move_into(
        self,
        name: str,
        collection: Any,
        embed: Callable[[list[str]], Any],
        written: Callable[[list[Memory], Any], None],
    ) -> None:
        """Write the rumours held for collection ``name`` into it, embedded now, and let
        them go from here; ``written`` (the store's caches) sees them before any forget
        can (the lock is held throughout, and ``drop`` takes it)."""
        with self._lock:
            held = self.held_for(name)
            if not held:
                return
            vectors = embed([m.searchable for m in held])
            # Upsert: after a crash between this write and the release they move again.
            collection.upsert(
                ids=[m.id for m in held],
                embeddings=vectors,
                documents=[m.text for m in held],
                metadatas=[metadata_of(m) for m in held],
            )
            written(held, vectors)
            self.release(name, [m.id for m in held])

    def records(self, memory_ids: Sequence[str]) -> dict[str, Memory]:
        """The held rumours among these ids."""
        found: list[Memory] = []
        ids = list(memory_ids)
        for start in range(0, len(ids), 500):  # SQLite's bound on parameters
            chunk = ids[start : start + 500]
            found += self._memories(f"WHERE memory_id IN ({','.join('?' * len(chunk))})", chunk)
        return {m.id: m for m in found}

    def every(self) -> list[Memory]:
        return self._memories("", [])

    def _memories(self, where: str, values: Sequence[str]) -> list[Memory]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT memory_id, document, metadata FROM held {where}", list(values)
            ).fetchall()
        return [memory_of(i, document, json.loads(meta)) for i, document, meta in rows]

    def count(self, npc_id: str, player_id: str | None = None) -> int:
        with self._lock:
            if player_id is None:
                found = self._db.execute("SELECT count(*) FROM held WHERE npc_id = ?", (npc_id,))
            else:
                found = self._db.execute(
                    "SELECT count(*) FROM held WHERE npc_id = ? AND player_id = ?",
                    (npc_id, player_id),
                )
            return int(found.fetchone()[0])

    def release(self, name: str, memory_ids: Sequence[str]) -> None:
        """These rumours are in Chroma now."""
        with self._lock, self._db:
            self._db.executemany("DELETE FROM held WHERE memory_id = ?", [(i,) for i in memory_ids])
            self._forget_empty([name])

    def drop(
        self,
        npc_id: str,
        *,
        memory_ids: Sequence[str] | None = None,
        player_id: str | None = None,
    ) -> list[str]:
        """Forget held rumours of this NPC: these ids, or this player's, or (neither) all.
        Returns the ids dropped."""
        with self._lock:  # one step: none may move into Chroma between reading and deleting
            if memory_ids is not None:
                wanted = set(memory_ids)
                found = [(i, n) for i, n in self._select("npc_id = ?", (npc_id,)) if i in wanted]
            elif player_id is not None:
                found = self._select("npc_id = ? AND player_id = ?", (npc_id, player_id))
            else:
                found = self._select("npc_id = ?", (npc_id,))
            if found:
                with self._db:
                    doomed = [(i,) for i, _ in found]
                    self._db.executemany("DELETE FROM held WHERE memory_id = ?", doomed)
                    self._forget_empty({name for _, name in found})
        return [i for i, _ in found]

    def clear(self) -> list[str]:
        """Forget every held rumour (a save load replaces the world). Returns their ids."""
        with self._lock, self._db:
            ids = [row[0] for row in self._db.execute("SELECT memory_id FROM held")]
            self._db.execute("DELETE FROM held")
            self._waiting.clear()
        return ids

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _select(self, where: str, values: tuple[str, ...]) -> list[tuple[str, str]]:
        with self._lock:
            return self._db.execute(
                f"SELECT memory_id, collection FROM held WHERE {where}", values
            ).fetchall()

    def _forget_empty(self, names: Sequence[str] | set[str]) -> None:
        for name in names:
            if self._db.execute("SELECT 1 FROM held WHERE collection = ?", (name,)).fetchone():
                continue
            self._waiting.pop(name, None)
