"""Reading an exported save file from someone else: checked whole, renamed, then written."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field, replace
from typing import Any

from npc_engine.memory.chroma_records import (
    PLAYER_SHARDS,
    home_name,
    memory_of,
    metadata_of,
)
from npc_engine.memory.saves import (
    MAX_MEMORY_TEXT,
    check_memory,
    check_memory_id,
    check_number,
    check_state_record,
    check_vector,
    decode_export,
    refuse,
)
from npc_engine.memory.types import (
    MEMORY_KINDS,
    Memory,
    new_memory_id,
)

log = logging.getLogger(__name__)
SAVED_COLLECTION = re.compile(rf"npc-[0-9a-f]{{24}}-(?:own|players-[0-{PLAYER_SHARDS - 1}])")

# -- imported saves ----------------------------------------------------------------------
#
# An imported save file came from someone else: it is untrusted. It is read whole and
# checked whole (``read_import``) before anything is written: every collection is one the
# engine makes, every record is named by the manifest and lies in the collection its own
# npc_id/player_id/kind put it in, every vector has the store's dimension, every game-state
# record keeps the rules of ``state.set``. Then its memories get NEW ids: the archive is
# shared by every save (keyed by memory id), and ids are visible to clients
# (``memory.list``), so a file carrying an id that exists here (live, archived for another
# save, or made later) could otherwise rewrite what another save restores. Renamed, an
# imported save can only ever reach its own records. References inside the save (a fact's
# ``superseded_by``, a rumour's ``origin``, the memory ids of its conversation histories)
# are renamed with it.

_METADATA_TEXTS = (
    *("npc_id", "player_id", "kind", "content", "subject"),
    *("superseded_by", "source", "origin"),
)
_METADATA_NUMBERS = ("created_at", "last_accessed_at", "game_time", "accessed_game_time")
_METADATA_INTS = ("importance", "hops")
_METADATA_REQUIRED = {"npc_id", "player_id", "kind", "importance", "created_at"}


@dataclass
class ImportedSave:
    """A save file read and checked whole, its memories renamed (see above)."""

    manifest: dict[str, Any]  # as create_save writes it: {"memories": …, "state": …}
    ids: list[str] = field(default_factory=list)
    vectors: list[list[float]] = field(default_factory=list)
    documents: list[str] = field(default_factory=list)
    metadatas: list[dict[str, Any]] = field(default_factory=list)


def _imported_memory(
    memory_id: str, record: Any, where: str, dimension: int
) -> tuple[Memory, list[float]]:
    if not isinstance(record, dict) or set(record) != {"document", "metadata", "vector"}:
        refuse(f"{where} is not a memory record (document, metadata, vector)")
    meta = record["metadata"]
    if not isinstance(meta, dict) or not set(meta) >= _METADATA_REQUIRED:
        refuse(f"{where}: the metadata lacks {', '.join(sorted(_METADATA_REQUIRED))}")
    for name, value in meta.items():
        if name in _METADATA_TEXTS:
            if not isinstance(value, str) or len(value) > MAX_MEMORY_TEXT:
                refuse(f"{where}: metadata {name} is not a text")
        elif name in _METADATA_NUMBERS:
            check_number(value, f"{where}: metadata {name}", -1e15, 1e15)
        elif name in _METADATA_INTS:
            if isinstance(value, bool) or not isinstance(value, int) or abs(value) > 10**6:
                refuse(f"{where}: metadata {name} is not an integer")
        else:
            refuse(f"{where}: unknown metadata {str(name)[:40]!r}")
    document = record["document"]
    if not isinstance(document, str):
        refuse(f"{where}: the document is not a text")
    if meta["kind"] not in MEMORY_KINDS:
        refuse(f"{where}: unknown kind")
    if not 1 <= meta["importance"] <= 10:
        refuse(f"{where}: importance is not 1-10")
    for name in ("created_at", "last_accessed_at"):
        if name in meta:
            check_number(meta[name], f"{where}: metadata {name}", 0, 1e11)
    memory = check_memory(memory_of(memory_id, document, meta), where)
    return memory, check_vector(record["vector"], where, dimension)


def _renamed(reference: str | None, names: dict[str, str]) -> str | None:
    """A reference to a memory of the save (a bare id or "npc/id"), renamed with it."""
    if reference is None:
        return None
    if reference in names:
        return names[reference]
    head, slash, tail = reference.rpartition("/")
    return f"{head}/{names[tail]}" if slash and tail in names else reference


def _renamed_state(value: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    if "turns" not in value:
        return value
    turns = []
    for turn in value["turns"]:
        turn = dict(turn)
        turn["memory_ids"] = sorted(names.get(i, i) for i in turn.get("memory_ids", []))
        turn["noted"] = [[names.get(i, i), line] for i, line in turn.get("noted", [])]
        turns.append(turn)
    return {"turns": turns}


def read_import(data: bytes, dimension: int) -> ImportedSave:
    """An exported save file, checked whole and renamed (see above); SaveError, naming
    what is wrong, for anything an engine save cannot hold. Writes nothing."""
    document = decode_export(data)
    manifest, records = document["manifest"], document["records"]
    if not set(manifest) <= {"memories", "state"}:
        refuse("the manifest holds more than memories and state")
    listed, state = manifest.get("memories", {}), manifest.get("state", {})
    if not isinstance(listed, dict) or not isinstance(state, dict):
        refuse("the manifest's memories or state is not an object")
    home: dict[str, str] = {}  # memory id -> the collection the manifest puts it in
    for name, ids in listed.items():
        if not SAVED_COLLECTION.fullmatch(name):
            refuse(f"the manifest names an unknown collection {name[:80]!r}")
        if not isinstance(ids, list):
            refuse(f"the manifest's {name} is not a list of ids")
        for memory_id in ids:
            check_memory_id(memory_id, f"a memory id of {name}")
            if memory_id in home:
                refuse(f"the manifest names memory {memory_id!r} twice")
            home[memory_id] = name
    unnamed = [memory_id for memory_id in records if memory_id not in home]
    if unnamed:
        refuse(f"{len(unnamed)} memory records are not named by the manifest")
    names = {memory_id: new_memory_id() for memory_id in records}  # uuid4: never collides
    imported = ImportedSave({"memories": {}, "state": {}})
    for memory_id, record in records.items():
        where = f"memory {memory_id!r}"
        memory, vector = _imported_memory(memory_id, record, where, dimension)
        if home_name(memory) != home[memory_id]:
            refuse(f"{where} is not in the collection of its npc_id and player_id")
        memory = replace(
            memory,
            id=names[memory_id],
            superseded_by=_renamed(memory.superseded_by, names),
            origin=_renamed(memory.origin, names),
        )
        imported.ids.append(memory.id)
        imported.vectors.append(vector)
        imported.documents.append(memory.text)
        imported.metadatas.append(metadata_of(memory))
    missing = len(home) - len(records)
    if missing:  # an export of a store that had lost them: nothing to bring back
        log.warning("the imported save names %d memories it does not hold", missing)
    kept: dict[str, list[str]] = {}
    for memory_id, name in home.items():
        if memory_id in names:
            kept.setdefault(name, []).append(names[memory_id])
    imported.manifest["memories"] = {name: sorted(ids) for name, ids in sorted(kept.items())}
    for key, entry in state.items():
        if not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[0], str):
            refuse(f"state {str(key)[:80]!r} is not [document, labels]")
        try:
            value = json.loads(entry[0])
        except (ValueError, RecursionError):
            refuse(f"state {str(key)[:80]!r} is not JSON")
        value, labels = check_state_record(key, value, entry[1])
        value = _renamed_state(value, names)
        imported.manifest["state"][key] = [json.dumps(value, sort_keys=True), labels]
    return imported


def check_stored_manifest(manifest: dict[str, Any]) -> None:
    """What a load needs of a stored save to run to its end (a save imported before
    imports were checked may lack it): raises ValueError before anything changes."""
    memories, state = manifest.get("memories", {}), manifest.get("state", {})
    if not isinstance(memories, dict) or not isinstance(state, dict):
        raise ValueError("memories or state is not an object")
    for name, ids in memories.items():
        if not isinstance(name, str) or not SAVED_COLLECTION.fullmatch(name):
            raise ValueError(f"unknown collection {str(name)[:80]!r}")
        if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
            raise ValueError(f"the ids of {name} are not a list of ids")
    for key, entry in state.items():
        if not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[0], str):
            raise ValueError(f"state {str(key)[:80]!r} is not [document, labels]")
        if not isinstance(json.loads(entry[0]), dict):
            raise ValueError(f"state {str(key)[:80]!r} is not a JSON object")
        labels = entry[1]
        if labels is not None and not (
            isinstance(labels, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items())
        ):
            raise ValueError(f"state {str(key)[:80]!r} has labels that are not texts")
