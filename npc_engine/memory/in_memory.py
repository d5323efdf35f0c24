"""A dict-backed store with a bag-of-words similarity: fast and deterministic, for unit tests."""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import threading
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from npc_engine.memory.keywords import KeywordIndex
from npc_engine.memory.saves import (
    MAX_SAVES,
    SaveError,
    SaveInfo,
    check_memory,
    check_save_id,
    check_state_record,
    decode_export,
    encode_export,
    refuse,
    unknown_save,
)
from npc_engine.memory.types import Candidate, Memory, MemoryKind, faded_at, utc_now

_WORD = re.compile(r"[a-z0-9']+")


def _bag(text: str) -> Counter[str]:
    return Counter(_WORD.findall(text.lower()))


def _cosine(a: Counter[str], b: Counter[str]) -> float:
    dot = sum(a[word] * b[word] for word in a.keys() & b.keys())
    norm = math.sqrt(sum(v * v for v in a.values())) * math.sqrt(sum(v * v for v in b.values()))
    return dot / norm if norm else 0.0


class BagOfWordsLoreIndex:
    """Lore similarity by shared words: the fake of ``lore_vectors.MatrixIndex``."""

    embedded = 0

    def __init__(self, texts: Sequence[str]) -> None:
        self._bags = [_bag(text) for text in texts]

    def scores(self, query: str) -> Any:
        import numpy as np

        bag = _bag(query)
        return np.array([_cosine(bag, other) for other in self._bags], dtype=np.float32)


class BagOfWordsLoreVectors:
    def index(self, texts: Sequence[str]) -> BagOfWordsLoreIndex:
        return BagOfWordsLoreIndex(texts)

    def prune(self, keep: Sequence[str]) -> int:
        return 0


def visible_to(memory: Memory, npc_id: str, player_id: str | None) -> bool:
    return memory.npc_id == npc_id and memory.player_id in (None, player_id)


class InMemoryStore:
    def __init__(self) -> None:
        self._memories: dict[str, Memory] = {}
        self._state: dict[str, dict[str, Any]] = {}
        self._labels: dict[str, dict[str, str]] = {}
        # save id -> (info, memories, state, labels), deep copies
        self._saves: dict[str, tuple[SaveInfo, dict[str, Memory], dict[str, Any], Any]] = {}
        self._lock = threading.Lock()
        self._keywords = KeywordIndex(None)  # the real keyword half, in RAM

    @property
    def state(self) -> InMemoryStore:
        return self  # one object plays every port of the store

    @property
    def rumours(self) -> InMemoryStore:
        return self

    @property
    def saves(self) -> InMemoryStore:
        return self

    def made_between(
        self, npc_id: str, since: datetime, until: datetime, min_importance: int
    ) -> list[Memory]:
        with self._lock:
            found = [
                m
                for m in self._memories.values()
                if m.npc_id == npc_id
                and since <= m.created_at < until
                and m.importance >= min_importance
            ]
        return sorted(found, key=lambda m: (-m.importance, m.created_at))

    def origins_known(self, npc_id: str, origins: Sequence[str]) -> set[str]:
        wanted = set(origins)
        with self._lock:
            return {
                str(m.origin)
                for m in self._memories.values()
                if m.npc_id == npc_id and m.origin in wanted
            }

    def rumours_of(self, npc_id: str) -> list[Memory]:
        with self._lock:
            return [m for m in self._memories.values() if m.npc_id == npc_id and m.kind == "rumour"]

    def faded_rumours(
        self, npc_id: str, now: datetime, game_now: float | None, fade_minutes: float
    ) -> list[str]:
        return [
            m.id
            for m in self.rumours_of(npc_id)
            if faded_at(m.created_at, m.game_time, now, game_now, fade_minutes)
        ]

    def lore_vectors(self) -> BagOfWordsLoreVectors:
        return BagOfWordsLoreVectors()

    def add(self, memories: Sequence[Memory]) -> None:
        with self._lock:
            for memory in memories:
                self._memories[memory.id] = memory
        self._keywords.add(memories)

    def _visible(self, npc_id: str, player_id: str | None) -> list[Memory]:
        with self._lock:
            return [m for m in self._memories.values() if visible_to(m, npc_id, player_id)]

    def search(
        self,
        npc_id: str,
        player_id: str | None,
        query: str,
        limit: int,
        *,
        keywords: bool = True,
    ) -> list[Candidate]:
        query_bag = _bag(query)
        ranked = sorted(
            (
                Candidate(m, _cosine(query_bag, _bag(m.searchable)))
                for m in self._visible(npc_id, player_id)
                if m.superseded_by is None
            ),
            key=lambda c: c.relevance,
            reverse=True,
        )
        chosen = ranked[:limit]
        if keywords:
            matches = self._keywords.search(npc_id, player_id, query, limit)
            rank = {memory_id: place for place, (memory_id, _) in enumerate(matches)}
            chosen += [c for c in ranked[limit:] if c.memory.id in rank]
            chosen = [dataclasses.replace(c, keyword_rank=rank.get(c.memory.id)) for c in chosen]
        return chosen

    def of_player(self, npc_id: str, player_id: str) -> list[Memory]:
        with self._lock:
            return [
                m
                for m in self._memories.values()
                if m.npc_id == npc_id and m.player_id == player_id
            ]

    def mark_superseded(
        self, npc_id: str, player_id: str, memory_ids: Sequence[str], by: str
    ) -> None:
        with self._lock:
            for memory_id in memory_ids:
                memory = self._memories.get(memory_id)
                if memory is not None and (memory.npc_id, memory.player_id) == (npc_id, player_id):
                    memory.superseded_by = by

    def oldest(self, npc_id: str, limit: int, kinds: Sequence[MemoryKind]) -> list[Memory]:
        with self._lock:
            found = [m for m in self._memories.values() if m.npc_id == npc_id and m.kind in kinds]
        return sorted(found, key=lambda m: m.created_at)[:limit]

    def recent(
        self, npc_id: str, player_id: str | None, limit: int, *, player_only: bool = False
    ) -> list[Memory]:
        visible = self._visible(npc_id, player_id)
        if player_only and player_id is not None:
            visible = [m for m in visible if m.player_id == player_id]
        memories = sorted(visible, key=lambda m: m.created_at, reverse=True)
        return memories[:limit]

    def touch(
        self,
        npc_id: str,
        memory_ids: Sequence[str],
        when: datetime,
        game_time: float | None = None,
    ) -> None:
        with self._lock:
            for memory_id in memory_ids:
                memory = self._memories.get(memory_id)
                if memory is not None and memory.npc_id == npc_id:
                    memory.last_accessed_at = when
                    if game_time is not None:
                        memory.accessed_game_time = game_time

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
        self._keywords.delete(doomed)
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

    def save_state(
        self, key: str, value: dict[str, Any], labels: dict[str, str] | None = None
    ) -> None:
        with self._lock:
            self._state[key] = copy.deepcopy(value)
            self._labels[key] = dict(labels) if labels else {"kind": key.split(":", 1)[0]}

    def state_keys(self, labels: dict[str, str]) -> list[str]:
        with self._lock:
            return [
                key
                for key, own in self._labels.items()
                if all(own.get(name) == value for name, value in labels.items())
            ]

    def delete_state(self, keys: list[str]) -> None:
        with self._lock:
            for key in keys:
                self._state.pop(key, None)
                self._labels.pop(key, None)

    def create_save(self, save_id: str) -> SaveInfo:
        check_save_id(save_id)
        with self._lock:
            if save_id not in self._saves and len(self._saves) >= MAX_SAVES:
                raise SaveError("save_id", f"at most {MAX_SAVES} saves: delete one first")
            info = SaveInfo(save_id, utc_now(), len(self._memories))
            self._saves[save_id] = (
                info,
                copy.deepcopy(self._memories),
                copy.deepcopy(self._state),
                copy.deepcopy(self._labels),
            )
            return info

    def load_save(self, save_id: str) -> SaveInfo:
        check_save_id(save_id)
        with self._lock:
            if save_id not in self._saves:
                raise unknown_save(save_id)
            info, memories, state, labels = copy.deepcopy(self._saves[save_id])
            self._memories, self._state, self._labels = memories, state, labels
        self._keywords.rebuild(memories.values())
        return info

    def list_saves(self) -> list[SaveInfo]:
        with self._lock:
            return sorted((s[0] for s in self._saves.values()), key=lambda i: i.created_at)

    def delete_save(self, save_id: str) -> bool:
        check_save_id(save_id)
        with self._lock:
            return self._saves.pop(save_id, None) is not None

    def export_save(self, save_id: str) -> bytes:
        check_save_id(save_id)
        with self._lock:
            if save_id not in self._saves:
                raise unknown_save(save_id)
            info, memories, state, labels = self._saves[save_id]
            records = {
                memory_id: {"memory": _memory_record(memory)}
                for memory_id, memory in memories.items()
            }
            manifest = {"memories": {"all": sorted(memories)}, "state": state, "labels": labels}
            return encode_export(info, manifest, records)

    def import_save(self, save_id: str, data: bytes) -> SaveInfo:
        """As the Chroma store's: the file is untrusted, checked whole before the save is
        kept (every record named by the manifest and shaped as the engine writes it,
        game state by the rules of ``state.set``). Saves here are deep copies, not a
        shared archive, so an imported memory id reaches nothing outside its own save."""
        check_save_id(save_id)
        with self._lock:
            if save_id not in self._saves and len(self._saves) >= MAX_SAVES:
                raise SaveError("save_id", f"at most {MAX_SAVES} saves: delete one first")
        memories, state, labels = _read_import(decode_export(data))
        with self._lock:
            if save_id not in self._saves and len(self._saves) >= MAX_SAVES:
                raise SaveError("save_id", f"at most {MAX_SAVES} saves: delete one first")
            info = SaveInfo(save_id, utc_now(), len(memories))
            self._saves[save_id] = (info, memories, state, labels)
            return info

    def close(self) -> None:
        self._keywords.close()


def _memory_record(memory: Memory) -> dict[str, Any]:
    record = dataclasses.asdict(memory)
    for name in ("created_at", "last_accessed_at"):
        record[name] = record[name].isoformat() if record[name] else None
    return record


def _memory_from_record(record: Any, where: str = "a memory") -> Memory:
    if not isinstance(record, dict) or not set(record) <= _MEMORY_FIELDS:
        refuse(f"{where} is not a memory")
    fields = dict(record)
    try:
        for name in ("created_at", "last_accessed_at"):
            fields[name] = datetime.fromisoformat(fields[name]) if fields.get(name) else None
        if fields.get("created_at") is None:
            refuse(f"{where} has no created_at")
        for name in ("importance", "hops"):
            if isinstance(fields.get(name), bool):
                refuse(f"{where}: {name} is not an integer")
        return Memory(**fields)
    except (TypeError, ValueError) as exc:
        refuse(f"{where} is not a memory ({str(exc)[:200]})")


_MEMORY_FIELDS = {f.name for f in dataclasses.fields(Memory)}


def _read_import(
    document: dict[str, Any],
) -> tuple[dict[str, Memory], dict[str, Any], dict[str, dict[str, str]]]:
    manifest, records = document["manifest"], document["records"]
    if not set(manifest) <= {"memories", "state", "labels"}:
        refuse("the manifest holds more than memories, state and labels")
    listed = manifest.get("memories", {})
    state, labels = manifest.get("state", {}), manifest.get("labels", {})
    if not isinstance(listed, dict) or set(listed) - {"all"}:
        refuse("not a save file of the in-memory store")
    if not isinstance(listed.get("all", []), list) or not isinstance(state, dict):
        refuse("the manifest's memories or state is not a list and an object")
    if not isinstance(labels, dict) or set(labels) - set(state):
        refuse("the manifest's labels are not those of its state")
    named = set()
    for memory_id in listed.get("all", []):
        if not isinstance(memory_id, str) or memory_id in named:
            refuse("the manifest names a memory twice, or not by id")
        named.add(memory_id)
    if set(records) - named:
        refuse(f"{len(set(records) - named)} memory records are not named by the manifest")
    memories = {}
    for memory_id, record in records.items():
        where = f"memory {memory_id!r}"
        if not isinstance(record, dict) or set(record) != {"memory"}:
            refuse(f"{where} is not a memory record")
        memory = _memory_from_record(record["memory"], where)
        if memory.id != memory_id:
            refuse(f"{where} carries another id")
        memories[memory_id] = check_memory(memory, where)
    checked_state, checked_labels = {}, {}
    for key, value in state.items():
        checked_state[key], checked_labels[key] = check_state_record(
            key, copy.deepcopy(value), labels.get(key)
        )
    return memories, checked_state, checked_labels
