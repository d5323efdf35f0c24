"""The real memory store: one Chroma collection per NPC, in a PersistentClient on disk or
on a Chroma server (``HttpClient``) that several engine replicas share.

Collections per NPC and per (NPC, player) keep queries fast without metadata filters and
make forgetting an NPC or a player cheap. Embeddings are computed with the offline
all-MiniLM-L6-v2 ONNX model (``minilm.py``) and passed to Chroma explicitly, so Chroma
never tries to fetch its own copy. Game state and saves: ``chroma_saves.py``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from npc_engine.errors import is_unavailable
from npc_engine.memory.chroma_disk_search import DiskSearch
from npc_engine.memory.chroma_format import EmbeddingFormat
from npc_engine.memory.chroma_index_sync import IndexSync
from npc_engine.memory.chroma_records import (
    KEYWORD_INDEX,
    MEMORY_COLLECTION_CONFIG,
    MEMORY_COLLECTION_NAME,
    PLAYER_VECTORS_BYTES,
    Lru,
    NoKeywordIndex,
    PlayerVectors,
    RecordCache,
    from_timestamp,
    home_name,
    memories_of,
    memory_of,
    metadata_of,
    names_of,
    own_name,
    player_shard,
    save_vectors_often,
    timestamp,
    unit_rows,
)
from npc_engine.memory.chroma_rumours import ChromaRumours
from npc_engine.memory.chroma_saves import ChromaGameState, ChromaSaves
from npc_engine.memory.chroma_server_search import ServerSearch
from npc_engine.memory.held_rumours import HELD_RUMOURS_FILE, HeldRumours
from npc_engine.memory.keywords import KeywordIndex
from npc_engine.memory.types import (
    Candidate,
    Memory,
    MemoryKind,
)
from npc_engine.model_registry import EMBEDDING_MODEL

log = logging.getLogger(__name__)


class ChromaMemoryStore:
    """Per NPC: one collection of its own memories and ``PLAYER_SHARDS`` of what it knows
    about players (each memory carries its player_id).

    A query for one player first reads the shard without a filter and keeps that player's
    hits: whenever at least ``limit`` of them are among the nearest, they are exactly the
    player's nearest (a ``where`` on player_id made a 10,000-memory query 3-5x slower,
    since Chroma filters before the vector search). Only when the shard is shared by many
    players does the query fall back to the filter, on a shard of a few hundred records.
    """

    OVERFETCH = 4  # nearest read per wanted memory before falling back to a filter

    def __init__(
        self,
        path: Path | None,
        embed: Any,
        *,
        client: Any = None,
        cached_records: int = 100_000,
        cached_handles: int = 512,
        lore_cache: Path | None = None,
    ) -> None:
        """``path``: Chroma on disk there, this process's alone; or ``client``, a Chroma
        server's ``HttpClient`` (``connect_server``), shared with other engine replicas.
        ``lore_cache``: a lore vector file shared with other data directories (see
        ``SharedLoreVectors``)."""
        import chromadb
        from chromadb.config import Settings

        if client is None:
            if path is None:
                raise ValueError("a Chroma store needs a path or a client")
            path.mkdir(parents=True, exist_ok=True)
            client = chromadb.PersistentClient(
                path=str(path), settings=Settings(anonymized_telemetry=False)
            )
        self._client = client
        # On a server other replicas write too: nothing they may change is cached here
        # (records, player vectors, missing collections, the keyword index); what stays
        # cached cannot change under us (collection handles: collections are never
        # dropped; lore vectors: keyed by their text).
        self.shared = path is None
        self._embed = embed
        self._lore_cache = lore_cache
        self._shared_lore: Any = None
        # Open handles and known-missing names, both bounded (least recently used out).
        self._collections = Lru(cached_handles)
        self._absent = Lru(cached_handles * 8)
        self._lock = threading.Lock()
        self._records = RecordCache(0 if self.shared else cached_records)
        # Held while a record is read from Chroma into the cache and while touch/forget
        # change one, so a search never caches a copy older than what touch just wrote.
        self.record_writes = threading.Lock()
        self._keywords: KeywordIndex | NoKeywordIndex = (
            KeywordIndex(path / KEYWORD_INDEX) if path is not None else NoKeywordIndex()
        )
        self._player_vectors = PlayerVectors(0 if self.shared else PLAYER_VECTORS_BYTES)
        self._disk_search = DiskSearch(
            self.cached_records, self._keywords, self._player_vectors, self.OVERFETCH
        )
        self._server_search = (
            ServerSearch(self._disk_search.exact, self.OVERFETCH) if self.shared else None
        )
        # A tick's rumours, held until their collection is next read (``held_rumours.py``);
        # on a server other replicas read the collections directly: written at once there.
        self._held = HeldRumours(path / HELD_RUMOURS_FILE) if path is not None else None
        self._index_sync = (
            IndexSync(self, self._keywords, self._held)
            if isinstance(self._keywords, KeywordIndex) and self._held is not None
            else None
        )
        # Whether the local index holds every live memory (see synced_index).
        self.index_synced = (
            self._index_sync.synced if self._index_sync is not None else threading.Event()
        )
        # The store's two other ports (``MemoryStore.state``, ``.saves``).
        self.state = ChromaGameState(self.collection)
        self.saves = ChromaSaves(self, self.state)
        self.rumours = ChromaRumours(self)
        self.saves.resume_interrupted_load()
        self.format = EmbeddingFormat(self)
        fresh = self.format.mark_if_new()
        if isinstance(self._keywords, KeywordIndex) and (
            self._keywords.opened_clean or (fresh and not self._keywords.count())
        ):
            self.index_synced.set()

    def collection(
        self, name: str, npc_id: str, *, create: bool = True, deliver: bool = True
    ) -> Any | None:
        """The collection ``name`` (None if absent and not ``create``), with the rumours
        held for it moved in first unless ``deliver`` is False (the tick's own reads, and
        the writes that move them)."""
        waiting = deliver and self._held is not None and self._held.waits_for(name)
        collection = self._handle(name, npc_id, create or waiting)
        if waiting and collection is not None:
            self._deliver(name, collection)
        return collection

    def _handle(self, name: str, npc_id: str, create: bool) -> Any | None:
        with self._lock:
            collection = self._collections.get(name)
            if collection is not None:
                self._collections.move_to_end(name)
                return collection
            if not create and name in self._absent:
                return None
            if create:
                collection = self._client.get_or_create_collection(
                    name=name,
                    embedding_function=None,
                    configuration=MEMORY_COLLECTION_CONFIG,
                    metadata={"npc_id": npc_id},
                )
            else:
                try:
                    collection = self._client.get_collection(name, embedding_function=None)
                except Exception as exc:  # NotFoundError (or ValueError in old Chromas)
                    if is_unavailable(exc):
                        raise
                    if not self.shared:  # another replica may create it any moment
                        self._absent.remember(name, True)
                    return None
            self._absent.pop(name, None)
            save_vectors_often(collection)
            self._collections.remember(name, collection)
            return collection

    def all_of(self, npc_id: str, *, deliver: bool = True) -> list[Any]:
        found = [
            self.collection(name, npc_id, create=False, deliver=deliver)
            for name in names_of(npc_id)
        ]
        return [c for c in found if c is not None]

    def add(self, memories: Sequence[Memory]) -> None:
        if self._held is not None:
            rumours = [m for m in memories if m.kind == "rumour"]
            if rumours:
                self._hold(rumours)
                memories = [m for m in memories if m.kind != "rumour"]
        if memories:
            self.add_with_embeddings(memories, self._embed([m.searchable for m in memories]))

    def _hold(self, rumours: Sequence[Memory]) -> None:
        assert self._held is not None
        self._held.hold(rumours)
        try:
            self._keywords.add(rumours)  # a tick's reads find them there, as if stored
        except BaseException:
            self.index_synced.clear()
            raise

    def _deliver(self, name: str, collection: Any) -> None:
        """Move the rumours held for this collection into it."""
        assert self._held is not None
        self._held.move_into(name, collection, self._embed, self._remember_written)

    def held_records(self, memory_ids: Sequence[str]) -> dict[str, Memory]:
        """The rumours among these ids still held out of Chroma."""
        return self._held.records(memory_ids) if self._held is not None else {}

    def add_with_embeddings(self, memories: Sequence[Memory], vectors: Sequence[Any]) -> None:
        """Store memories whose vectors are already computed (imports, benchmarks)."""
        try:
            self._add_with_embeddings(memories, vectors)
        except BaseException:
            self.index_synced.clear()  # Chroma may hold some the index lacks
            raise

    def _add_with_embeddings(self, memories: Sequence[Memory], vectors: Sequence[Any]) -> None:
        by_collection: dict[tuple[str, str], list[int]] = {}
        for index, memory in enumerate(memories):
            by_collection.setdefault((home_name(memory), memory.npc_id), []).append(index)
        for (name, npc_id), indexes in by_collection.items():
            collection = self.collection(name, npc_id, deliver=False)
            assert collection is not None
            collection.add(
                ids=[memories[i].id for i in indexes],
                embeddings=[vectors[i] for i in indexes],
                documents=[memories[i].text for i in indexes],
                metadatas=[metadata_of(memories[i]) for i in indexes],
            )
        self._remember_written(memories, vectors)
        self._keywords.add(memories)

    def _remember_written(self, memories: Sequence[Memory], vectors: Sequence[Any]) -> None:
        """Caches of what was just written to Chroma: players' vectors, and the records
        (likely recalled on the next turn)."""
        by_player: dict[tuple[str, str], list[int]] = {}
        for index, memory in enumerate(memories):
            if memory.player_id is not None:
                by_player.setdefault((memory.npc_id, memory.player_id), []).append(index)
        for key, indexes in by_player.items():
            self._player_vectors.extend(
                key, [memories[i].id for i in indexes], unit_rows([vectors[i] for i in indexes])
            )
        self._records.put([memory_of(m.id, m.text, metadata_of(m)) for m in memories])

    def search(
        self,
        npc_id: str,
        player_id: str | None,
        query: str,
        limit: int,
        *,
        keywords: bool = True,
    ) -> list[Candidate]:
        """The nearest memories by meaning (MiniLM), joined by the best keyword (BM25)
        matches when ``keywords``; each keyword match carries its rank for fusion."""
        own = self.collection(own_name(npc_id), npc_id, create=False)
        shard = (
            self.collection(player_shard(npc_id, player_id), npc_id, create=False)
            if player_id is not None
            else None
        )
        if limit <= 0 or (own is None and shard is None):
            return []
        vector = self._embed([query])
        if self.shared:
            assert self._server_search is not None
            return self._server_search.search(own, shard, player_id, query, vector, limit, keywords)
        return self._disk_search.search(
            own, shard, npc_id, player_id, query, vector, limit, keywords
        )

    def cached_records(self, collection: Any, ids: Sequence[str]) -> dict[str, Memory]:
        found = {i: m for i in ids if (m := self._records.get(i)) is not None}
        missing = [i for i in ids if i not in found]
        if missing:
            with self.record_writes:
                result = collection.get(ids=missing, include=["documents", "metadatas"])
                fetched = memories_of(result)
                self._records.put(fetched)
            found.update((m.id, m) for m in fetched)
        return found

    def recent(
        self, npc_id: str, player_id: str | None, limit: int, *, player_only: bool = False
    ) -> list[Memory]:
        if limit <= 0:
            return []
        memories = []
        own = self.collection(own_name(npc_id), npc_id, create=False)
        if own is not None and not (player_only and player_id is not None):
            memories += self._newest(own, limit)
        if player_id is not None:
            shard = self.collection(player_shard(npc_id, player_id), npc_id, create=False)
            if shard is not None:
                memories += self._newest_of_player(shard, player_id, limit)
        memories.sort(key=lambda m: m.created_at, reverse=True)
        return memories[:limit]

    @staticmethod
    def _newest(collection: Any, limit: int) -> list[Memory]:
        """The ``limit`` newest memories of a collection, without reading all of it.

        Chroma cannot sort. But any ``limit`` stored memories bound the answer: the
        limit-th newest is at least as new as the oldest of them. The last stored are
        usually the newest, so the filtered read returns about ``limit`` records (6 ms at
        10,000 memories, against 250 ms for reading them all).
        """
        total = collection.count()
        result = None
        if total > limit:
            sample = collection.get(limit=limit, offset=total - limit, include=["metadatas"])
            stamps = [float((m or {}).get("created_at", 0)) for m in sample["metadatas"] or []]
            if len(stamps) == limit:  # else deleted meanwhile: no bound, read everything
                result = collection.get(
                    where={"created_at": {"$gte": min(stamps)}},
                    include=["documents", "metadatas"],
                )
        if result is None:
            result = collection.get(include=["documents", "metadatas"])
        return memories_of(result)

    def _newest_of_player(self, shard: Any, player_id: str, limit: int) -> list[Memory]:
        """A player's newest memories in a shard: the metadata alone picks them, then only
        those records are read whole."""
        result = shard.get(where={"player_id": player_id}, include=["metadatas"])
        stamped = sorted(
            zip(result["ids"], result["metadatas"] or [], strict=True),
            key=lambda pair: float((pair[1] or {}).get("created_at", 0)),
            reverse=True,
        )
        found = self.cached_records(shard, [memory_id for memory_id, _ in stamped[:limit]])
        return list(found.values())

    def touch(
        self,
        npc_id: str,
        memory_ids: Sequence[str],
        when: datetime,
        game_time: float | None = None,
    ) -> None:
        if not memory_ids:
            return
        stamp = timestamp(when)
        refreshed: dict[str, str | int | float | bool] = {"last_accessed_at": stamp}
        if game_time is not None:
            refreshed["accessed_game_time"] = game_time
        with self._lock:  # recalled memories came from collections opened by search()
            opened = {n: self._collections[n] for n in names_of(npc_id) if n in self._collections}
        with self.record_writes:
            # A recalled memory is usually cached, so its collection is known and it is
            # there (forget drops it from the cache first): updated at once. Chroma ignores
            # an update of an id it lacks, but each costs a write, so others are looked up
            # in the NPC's open collections (up to 9) first.
            known: dict[str, list[str]] = {}
            unknown: list[str] = []
            for memory_id in dict.fromkeys(memory_ids):  # Chroma refuses repeated ids
                cached = self._records.get(memory_id)
                if cached is not None and cached.npc_id == npc_id:
                    known.setdefault(home_name(cached), []).append(memory_id)
                else:
                    unknown.append(memory_id)
            for name, collection in opened.items():
                ids = known.get(name, [])
                if unknown:
                    ids += collection.get(ids=unknown, include=[])["ids"]
                if ids:
                    collection.update(ids=ids, metadatas=[refreshed for _ in ids])
            self._records.touch(memory_ids, from_timestamp(stamp), game_time)

    def forget(
        self,
        npc_id: str,
        *,
        player_id: str | None = None,
        memory_ids: Sequence[str] | None = None,
        everything: bool = False,
    ) -> int:
        where: dict[str, Any] | None = None
        if not (everything or memory_ids is not None or player_id is not None):
            raise ValueError("forget needs player_id, memory_ids or everything=True")
        # Held rumours go without ever reaching Chroma.
        dropped = set(
            self.drop_held(
                npc_id,
                memory_ids=None if everything else memory_ids,
                player_id=None if everything or memory_ids is not None else player_id,
            )
        )
        count = len(dropped)
        if memory_ids is not None and not everything:
            memory_ids = [i for i in memory_ids if i not in dropped]
            if not memory_ids:
                return count
        # What is still held was not asked for: it stays held (deliver=False).
        if everything or memory_ids is not None:
            scopes = self.all_of(npc_id, deliver=False)
        else:
            assert player_id is not None
            name = player_shard(npc_id, player_id)
            shard = self.collection(name, npc_id, create=False, deliver=False)
            scopes = [shard] if shard is not None else []
            where = {"player_id": player_id}
        for collection in scopes:
            if memory_ids is not None and not everything:
                doomed = collection.get(ids=list(memory_ids), include=[])["ids"]
            else:
                doomed = collection.get(where=where, include=[])["ids"]
            if doomed:
                with self.record_writes:
                    self.saves.archive_before_forget(collection, list(doomed))
                    try:
                        collection.delete(ids=list(doomed))
                        self._keywords.delete(doomed)
                    except BaseException:
                        self.index_synced.clear()  # the index may hold what Chroma lost
                        raise
                    self._records.discard(doomed)
                    self._player_vectors.drop(npc_id)
                count += len(doomed)
        return count

    def drop_held(
        self,
        npc_id: str | None,
        *,
        memory_ids: Sequence[str] | None = None,
        player_id: str | None = None,
    ) -> list[str]:
        """Forget held rumours: of one NPC (these ids, this player's, or all of them), or
        with ``npc_id`` None every one (a save load replaces the world)."""
        if self._held is None:
            return []
        # Not while they move into Chroma (the file's lock): one forgotten as it moved
        # would land there.
        if npc_id is None:
            dropped = self._held.clear()
        else:
            dropped = self._held.drop(npc_id, memory_ids=memory_ids, player_id=player_id)
        if dropped:
            try:
                self._keywords.delete(dropped)
            except BaseException:
                self.index_synced.clear()
                raise
            self._records.discard(dropped)
        return dropped

    def of_player(self, npc_id: str, player_id: str) -> list[Memory]:
        """Every memory tied to this player (superseded ones too), in no set order."""
        shard = self.collection(player_shard(npc_id, player_id), npc_id, create=False)
        if shard is None:
            return []
        found = shard.get(where={"player_id": player_id}, include=["documents", "metadatas"])
        return memories_of(found)

    def mark_superseded(
        self, npc_id: str, player_id: str, memory_ids: Sequence[str], by: str
    ) -> None:
        """Keep these memories as history, no longer recalled: ``by`` replaced them."""
        if not memory_ids:
            return
        shard = self.collection(player_shard(npc_id, player_id), npc_id, create=False)
        if shard is None:
            return
        with self.record_writes:
            present = shard.get(ids=list(memory_ids), include=[])["ids"]
            if present:  # Chroma merges the new key into each record's metadata
                shard.update(ids=present, metadatas=[{"superseded_by": by} for _ in present])
            self._records.discard(memory_ids)

    def oldest(self, npc_id: str, limit: int, kinds: Sequence[MemoryKind]) -> list[Memory]:
        """Reads every matching record's metadata (Chroma cannot sort): for the rare
        trim of an NPC over its cap, not for a turn."""
        found: list[Memory] = []
        for collection in self.all_of(npc_id):
            result = collection.get(
                where={"kind": {"$in": list(kinds)}}, include=["documents", "metadatas"]
            )
            found += memories_of(result)
        found.sort(key=lambda m: m.created_at)
        return found[:limit]

    def synced_index(self) -> KeywordIndex | None:
        """The local index, once it holds every live memory (None on a shared server)."""
        return self._index_sync.synced_index() if self._index_sync is not None else None

    def count(self, npc_id: str, player_id: str | None = None) -> int:
        """Memories of an NPC, or (with ``player_id``) those tied to that player."""
        held = self._held.count(npc_id, player_id) if self._held is not None else 0
        if player_id is None:
            return held + sum(int(c.count()) for c in self.all_of(npc_id, deliver=False))
        name = player_shard(npc_id, player_id)
        shard = self.collection(name, npc_id, create=False, deliver=False)
        if shard is None:
            return held
        return held + len(shard.get(where={"player_id": player_id}, include=[])["ids"])

    def lore_vectors(self) -> Any:
        """The lorebook's vectors, in this store's Chroma (see ``lore_vectors.py``)."""
        from npc_engine.memory.lore_vectors import ChromaLoreVectors, SharedLoreVectors

        if self._lore_cache is not None and self._shared_lore is None:
            self._shared_lore = SharedLoreVectors(self._lore_cache, self.dimension())
        return ChromaLoreVectors(self._client, self._embed, EMBEDDING_MODEL, self._shared_lore)

    @property
    def embedder(self) -> Any:
        """The sentence embedder (MiniLM): list of texts in, list of vectors out."""
        return self._embed

    def drop_caches(self) -> None:
        """Forget every cached record and player vector (Chroma changed under them)."""
        self._records.clear()
        self._player_vectors.drop()

    def memory_collection_names(self) -> list[str]:
        """Every memory collection, and those only held rumours wait for."""
        names = [c.name for c in self._client.list_collections()]
        waiting = self._held.waiting() if self._held is not None else {}
        return [n for n in dict.fromkeys([*names, *waiting]) if MEMORY_COLLECTION_NAME.fullmatch(n)]

    def memory_collections(self, *, deliver: bool = True) -> dict[str, Any]:
        """Every memory collection, open; with ``deliver``, held rumours moved in."""
        waiting = self._held.waiting() if self._held is not None else {}
        found = {
            n: self.collection(n, waiting.get(n, ""), create=False, deliver=deliver)
            for n in self.memory_collection_names()
        }
        return {n: c for n, c in found.items() if c is not None}

    def open_collections_in_background(self) -> threading.Thread:
        """Open every memory collection on a background thread (``IndexSync``)."""
        if self._index_sync is not None:
            return self._index_sync.open_in_background()
        thread = threading.Thread(target=lambda: None, daemon=True)  # a server: no index
        thread.start()
        return thread

    def sync_keywords(self, *, rewrite: bool = False) -> int:
        """Make the local index hold exactly the live memories (``IndexSync.sync``)."""
        return self._index_sync.sync(rewrite=rewrite) if self._index_sync is not None else 0

    def live_ids(self, *, deliver: bool = True) -> dict[str, list[str]]:
        """Each memory collection's ids; with ``deliver``, held rumours moved in first."""
        found = {
            n: list(c.get(include=[])["ids"])
            for n, c in self.memory_collections(deliver=deliver).items()
        }
        return {name: ids for name, ids in found.items() if ids}

    def dimension(self) -> int:
        """How many numbers this store's embedder puts in a vector."""
        return len(self._embed(["dimension"])[0])

    def close(self) -> None:
        if self._server_search is not None:
            self._server_search.close()
        if isinstance(self._keywords, KeywordIndex):
            self._keywords.close(in_step=self.index_synced.is_set())
        else:
            self._keywords.close()
        with self._lock:
            self._collections.clear()
        if self._held is not None:
            self._held.close()
        if self._shared_lore is not None:
            self._shared_lore.close()
