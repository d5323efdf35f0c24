"""Game state and saves in Chroma, beside the memories (see ``saves.py`` for the design)."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from npc_engine.errors import is_unavailable
from npc_engine.memory.chroma_records import (
    ARCHIVE_COLLECTION,
    ONE_VECTOR,
    PENDING_LOAD,
    SAVES_COLLECTION,
    STATE_COLLECTION,
    from_timestamp,
    state_labels,
    timestamp,
    where_all,
)
from npc_engine.memory.save_imports import check_stored_manifest, read_import
from npc_engine.memory.saves import (
    MAX_SAVES,
    SaveError,
    SaveInfo,
    check_save_id,
    encode_export,
    pack,
    unknown_save,
    unpack,
)
from npc_engine.memory.types import (
    utc_now,
)

if TYPE_CHECKING:
    from npc_engine.memory.chroma_store import ChromaMemoryStore

log = logging.getLogger(__name__)


class ChromaGameState:
    """Game-state records (trust, flags, histories): key -> JSON document, with labels to
    find them by, in one collection whose name cannot be an NPC's (those are
    npc-<sha1>-…). Chroma needs a vector per record: a constant one."""

    def __init__(self, collection: Callable[..., Any]) -> None:
        self._collection = collection

    def collection(self) -> Any:
        return self._collection(STATE_COLLECTION, "", create=True)

    def load_state(self, key: str) -> dict[str, Any] | None:
        found = self.collection().get(ids=[key], include=["documents"])
        documents = found.get("documents") or []
        return json.loads(documents[0]) if documents and documents[0] else None

    def save_state(
        self, key: str, value: dict[str, Any], labels: dict[str, str] | None = None
    ) -> None:
        self.collection().upsert(
            ids=[key],
            documents=[json.dumps(value, sort_keys=True)],
            metadatas=[state_labels(key, labels)],
            embeddings=ONE_VECTOR,
        )

    def state_keys(self, labels: dict[str, str]) -> list[str]:
        """Keys of the state records carrying all of ``labels``."""
        return list(self.collection().get(where=where_all(labels), include=[])["ids"])

    def delete_state(self, keys: list[str]) -> None:
        if keys:
            self.collection().delete(ids=list(keys))


class ChromaSaves:
    """The saves of one store. A save is one record naming the live memory ids of every
    collection and the whole game state; memories a save names that are no longer alive
    (forgotten, or undone by a load) wait in the archive collection."""

    def __init__(self, store: ChromaMemoryStore, state: ChromaGameState) -> None:
        self._store = store
        self._state = state
        self._lock = threading.RLock()
        self._referenced_ids: set[str] | None = None

    def saves_collection(self) -> Any:
        return self._store.collection(SAVES_COLLECTION, "", create=True)

    def _archive(self) -> Any:
        return self._store.collection(ARCHIVE_COLLECTION, "", create=True)

    def _manifest(self, save_id: str) -> dict[str, Any] | None:
        found = self.saves_collection().get(ids=[save_id], include=["metadatas"])
        metadatas = found.get("metadatas") or []
        if not metadatas or not metadatas[0] or "manifest" not in metadatas[0]:
            return None
        return unpack(str(metadatas[0]["manifest"]))

    def _referenced(self) -> set[str]:
        """Every memory id some save names (cached until saves change; on a server,
        where another replica may save, read each time)."""
        with self._lock:
            if self._referenced_ids is None or self._store.shared:
                ids: set[str] = set()
                for info in self.list_saves():
                    manifest = self._manifest(info.save_id) or {}
                    for names in manifest.get("memories", {}).values():
                        ids.update(names)
                self._referenced_ids = ids
            return self._referenced_ids

    def list_saves(self) -> list[SaveInfo]:
        found = self.saves_collection().get(where={"kind": "save"}, include=["metadatas"])
        infos = [
            SaveInfo(
                str(save_id),
                from_timestamp(meta.get("created_at", 0)),
                int(meta.get("memories", 0)),
            )
            for save_id, meta in zip(found["ids"], found.get("metadatas") or [], strict=True)
            if meta
        ]
        return sorted(infos, key=lambda info: info.created_at)

    def create_save(self, save_id: str) -> SaveInfo:
        check_save_id(save_id)
        with self._lock:
            known = {info.save_id for info in self.list_saves()}
            if save_id not in known and len(known) >= MAX_SAVES:
                raise SaveError("save_id", f"at most {MAX_SAVES} saves: delete one first")
            live = self._store.live_ids()
            state = self._state.collection().get(include=["documents", "metadatas"])
            manifest = {
                "memories": live,
                "state": {
                    key: [document, metadata or {}]
                    for key, document, metadata in zip(
                        state["ids"],
                        state.get("documents") or [],
                        state.get("metadatas") or [],
                        strict=True,
                    )
                },
            }
            info = SaveInfo(save_id, utc_now(), sum(len(ids) for ids in live.values()))
            # One record, one write: a save is there whole or not at all.
            self.saves_collection().upsert(
                ids=[save_id],
                metadatas=[
                    {
                        "kind": "save",
                        "created_at": timestamp(info.created_at),
                        "memories": info.memories,
                        "manifest": pack(manifest),
                    }
                ],
                embeddings=ONE_VECTOR,
            )
            if self._referenced_ids is not None:
                for ids in live.values():
                    self._referenced_ids.update(ids)
            return info

    def delete_save(self, save_id: str) -> bool:
        check_save_id(save_id)
        with self._lock:
            existed = bool(self.saves_collection().get(ids=[save_id], include=[])["ids"])
            if existed:
                self.saves_collection().delete(ids=[save_id])
                self._referenced_ids = None
        if existed:
            self._collect_archive()
        return existed

    def load_save(self, save_id: str) -> SaveInfo:
        """Make the live store exactly what the save names: memories made since are
        removed (archived if another save names them), forgotten ones come back from the
        archive, and the game state (trust, flags, histories) is replaced. A load
        interrupted by a crash is finished when the store next opens."""
        check_save_id(save_id)
        with self._lock:
            manifest = self._manifest(save_id)
            info = next((i for i in self.list_saves() if i.save_id == save_id), None)
            if manifest is None or info is None:
                raise unknown_save(save_id)
            try:  # checked before anything changes: a load that starts runs to its end
                check_stored_manifest(manifest)
            except (ValueError, RecursionError) as exc:
                raise SaveError(
                    "save_id", f"save {save_id!r} is damaged and cannot be loaded ({exc})"
                ) from exc
            self.saves_collection().upsert(
                ids=[PENDING_LOAD],
                metadatas=[{"kind": "pending", "save_id": save_id}],
                embeddings=ONE_VECTOR,
            )
        self._apply(manifest)
        with self._lock:
            self.saves_collection().delete(ids=[PENDING_LOAD])
        return info

    def resume_interrupted_load(self) -> None:
        saves = self._store.collection(SAVES_COLLECTION, "", create=False)
        if saves is None:
            return
        found = saves.get(ids=[PENDING_LOAD], include=["metadatas"])
        metadatas = found.get("metadatas") or []
        if metadatas and metadatas[0]:
            save_id = str(metadatas[0].get("save_id", ""))
            log.warning("finishing the load of save %r that was interrupted", save_id)
            # A load that cannot finish is given up, never retried at every start: the
            # engine must always be able to open its data directory.
            try:
                manifest = self._manifest(save_id)
                if manifest is not None:
                    check_stored_manifest(manifest)
                    self._apply(manifest)
            except Exception as exc:
                if is_unavailable(exc):  # the server is down: retry at the next start
                    raise
                log.error(
                    "could not finish loading save %r (%s): given up; the memories and "
                    "game state may be partly as they were before the load and partly as "
                    "the save has them. Load a save again to make them whole.",
                    save_id,
                    exc,
                    exc_info=True,
                )
            saves.delete(ids=[PENDING_LOAD])

    def _apply(self, manifest: dict[str, Any]) -> None:
        self._store.index_synced.clear()  # until sync_keywords below: Chroma changes under it
        # Rumours still held were passed on after every save was made (making a save moves
        # them into Chroma first): no save names them, so the load drops them.
        self._store.drop_held(None)
        wanted: dict[str, list[str]] = manifest.get("memories", {})
        live = self._store.live_ids()
        referenced = self._referenced()
        with self._store.record_writes:
            for name in sorted(set(live) | set(wanted)):
                now, want = set(live.get(name, [])), set(wanted.get(name, []))
                gone = sorted(now - want)
                if gone:
                    collection = self._store.collection(name, "", create=False)
                    assert collection is not None
                    self._move(collection, self._archive(), [i for i in gone if i in referenced])
                    collection.delete(ids=gone)
                back = sorted(want - now)
                if back:
                    self._restore(name, back)
            self._store.drop_caches()
        self._store.sync_keywords()
        state = self._state.collection()
        current = state.get(include=[])["ids"]
        if current:
            state.delete(ids=list(current))
        records: dict[str, list[Any]] = manifest.get("state", {})
        if records:
            keys = sorted(records)
            state.upsert(
                ids=keys,
                documents=[records[k][0] for k in keys],
                metadatas=[records[k][1] or state_labels(k, None) for k in keys],
                embeddings=ONE_VECTOR * len(keys),
            )
        self._collect_archive()

    @staticmethod
    def _move(source: Any, target: Any, ids: list[str]) -> None:
        """Copy records (vectors included) from one collection into another."""
        if not ids:
            return
        found = source.get(ids=ids, include=["embeddings", "documents", "metadatas"])
        if found["ids"]:
            target.upsert(
                ids=found["ids"],
                embeddings=found["embeddings"],
                documents=found["documents"],
                metadatas=found["metadatas"],
            )

    def _restore(self, name: str, ids: list[str]) -> None:
        found = self._archive().get(ids=ids, include=["embeddings", "documents", "metadatas"])
        if len(found["ids"]) < len(ids):
            log.error(
                "%d memories of a save are missing from the archive", len(ids) - len(found["ids"])
            )
        if not found["ids"]:
            return
        npc_id = str((found["metadatas"][0] or {}).get("npc_id", ""))
        collection = self._store.collection(name, npc_id, create=True)
        assert collection is not None
        collection.upsert(
            ids=found["ids"],
            embeddings=found["embeddings"],
            documents=found["documents"],
            metadatas=found["metadatas"],
        )

    def _collect_archive(self) -> None:
        """Drop archived memories no save names any more."""
        archive = self._archive()
        held = archive.get(include=[])["ids"]
        if not held:
            return
        unused = [i for i in held if i not in self._referenced()]
        if unused:
            archive.delete(ids=unused)

    def archive_before_forget(self, collection: Any, ids: list[str]) -> None:
        """A forgotten memory that a save names is kept in the archive for that save."""
        saves = self._store.collection(SAVES_COLLECTION, "", create=False)
        if saves is None or saves.count() == 0:
            return
        referenced = self._referenced()
        self._move(collection, self._archive(), [i for i in ids if i in referenced])

    def export_save(self, save_id: str) -> bytes:
        check_save_id(save_id)
        manifest = self._manifest(save_id)
        info = next((i for i in self.list_saves() if i.save_id == save_id), None)
        if manifest is None or info is None:
            raise unknown_save(save_id)
        records: dict[str, dict[str, Any]] = {}
        sources = [*self._store.memory_collections().values(), self._archive()]
        wanted = {i for ids in manifest.get("memories", {}).values() for i in ids}
        for source in sources:
            missing = sorted(wanted - records.keys())
            if not missing:
                break
            found = source.get(ids=missing, include=["embeddings", "documents", "metadatas"])
            for memory_id, vector, document, metadata in zip(
                found["ids"],
                found["embeddings"],
                found["documents"],
                found["metadatas"],
                strict=True,
            ):
                records[memory_id] = {
                    "document": document,
                    "metadata": metadata,
                    "vector": [float(x) for x in vector],
                }
        return encode_export(info, manifest, records)

    def import_save(self, save_id: str, data: bytes) -> SaveInfo:
        """Store an exported save under ``save_id``; its memories wait in the archive
        until the save is loaded. The file is untrusted: read and checked whole first
        (``read_import``: its memories get new ids, so it reaches nothing but its own
        records), then written, or nothing is."""
        check_save_id(save_id)
        with self._lock:
            known = {info.save_id for info in self.list_saves()}
            if save_id not in known and len(known) >= MAX_SAVES:
                raise SaveError("save_id", f"at most {MAX_SAVES} saves: delete one first")
            imported = read_import(data, self._store.dimension())
            archive = self._archive()
            written: list[str] = []
            try:
                for start in range(0, len(imported.ids), 1000):
                    chunk = slice(start, start + 1000)
                    written += imported.ids[chunk]
                    archive.add(
                        ids=imported.ids[chunk],
                        embeddings=imported.vectors[chunk],
                        documents=imported.documents[chunk],
                        metadatas=imported.metadatas[chunk],
                    )
                created = utc_now()
                count = len(imported.ids)
                self.saves_collection().upsert(
                    ids=[save_id],
                    metadatas=[
                        {
                            "kind": "save",
                            "created_at": timestamp(created),
                            "memories": count,
                            "manifest": pack(imported.manifest),
                        }
                    ],
                    embeddings=ONE_VECTOR,
                )
            except BaseException:
                if written:  # new ids: nothing but this import's own records
                    archive.delete(ids=written)
                raise
            finally:
                self._referenced_ids = None
        return SaveInfo(save_id, created, count)
