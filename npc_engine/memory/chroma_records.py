"""How memories lie in Chroma: collection names, record metadata, and the caches in front.

Shared by the memory index (``chroma_store``) and the saves (``chroma_saves``).
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, cast

from npc_engine.errors import is_unavailable
from npc_engine.memory.keywords import query_terms
from npc_engine.memory.types import (
    Memory,
    MemoryKind,
)

log = logging.getLogger(__name__)

NO_PLAYER = ""  # Chroma metadata cannot hold None
STATE_COLLECTION = "npc-engine-game-state"
SAVES_COLLECTION = "npc-engine-saves"
# Memories some save names that are no longer alive (forgotten, or undone by a load).
ARCHIVE_COLLECTION = "npc-engine-archive"
PENDING_LOAD = "\x1fpending-load"  # the saves record of a load not finished yet
STORE_FORMAT = "\x1fformat"  # the saves record naming how memories are embedded
CONTENT_VECTORS = "content-v1"  # vectors of what was said, not of the third-person text
# The third-person wrappers older versions embedded whole; reindex takes the words back out.
WRAPPED = re.compile(
    r'^(?:The player \S+ told me|I (?:answered|greeted) the player \S+): "(.*)"$', re.S
)
MEMORY_COLLECTION_NAME = re.compile(r"npc-[0-9a-f]{24}-(own|players-[0-9]+)")  # fullmatch
KEYWORD_INDEX = "npc-engine-keywords.sqlite3"  # beside Chroma's own files
TICK_READ_BATCH = 8  # a tick's candidate memories read from Chroma at a time
# Chroma keeps every write in its write-ahead log (a SQLite table, read without an index
# on each write) until the collection's vector index is saved to disk, at ``sync_threshold``
# writes (default 1,000). A collection of one NPC and a few players rarely reaches that:
# at 100 NPCs x 1,000 memories the log held all 100,000 and each write took ~145 ms
# (chroma-core/chroma#7659). Saved every 64 writes, the log stays short.
MEMORY_COLLECTION_CONFIG: dict[str, Any] = {
    "hnsw": {"space": "cosine", "sync_threshold": 64, "batch_size": 64}
}
# A player with at most this many memories on an NPC is searched exactly (~3 ms), past it
# by Chroma's HNSW index (consolidation keeps players far below it unless turned off).
EXACT_SEARCH_LIMIT = 2000
PLAYER_VECTORS_BYTES = 64 << 20  # ~100 players' memories at the per-player cap
SERVER_KEYWORD_TERMS = 4  # rarest words of a line looked up by the server's full-text filter
COMMON_TERM_SECONDS = 600.0  # a word found too common is not searched by for this long
ONE_VECTOR = [[1.0]]  # Chroma needs a vector per record; state and save records have none


def timestamp(moment: datetime) -> float:
    return moment.timestamp()


def from_timestamp(value: Any) -> datetime:
    return datetime.fromtimestamp(float(value), tz=UTC)


def metadata_of(memory: Memory) -> dict[str, str | int | float | bool]:
    metadata: dict[str, str | int | float | bool] = {
        "npc_id": memory.npc_id,
        "player_id": memory.player_id or NO_PLAYER,
        "kind": memory.kind,
        "importance": memory.importance,
        "created_at": timestamp(memory.created_at),
        "last_accessed_at": timestamp(memory.last_accessed_at or memory.created_at),
    }
    if memory.game_time is not None:  # Chroma metadata cannot hold None: absent instead
        metadata["game_time"] = memory.game_time
    if memory.accessed_game_time is not None:
        metadata["accessed_game_time"] = memory.accessed_game_time
    if memory.content is not None:
        metadata["content"] = memory.content
    if memory.subject is not None:
        metadata["subject"] = memory.subject
    if memory.superseded_by is not None:
        metadata["superseded_by"] = memory.superseded_by
    if memory.source is not None:
        metadata["source"] = memory.source
    if memory.origin is not None:
        metadata["origin"] = memory.origin
    if memory.hops:
        metadata["hops"] = memory.hops
    return metadata


def optional_float(value: Any) -> float | None:
    return float(value) if value is not None else None


def memory_of(memory_id: str, document: str | None, metadata: Any) -> Memory:
    meta = dict(metadata or {})
    player = str(meta.get("player_id", NO_PLAYER))
    return Memory(
        id=memory_id,
        npc_id=str(meta.get("npc_id", "")),
        text=document or "",
        kind=cast(MemoryKind, meta.get("kind", "dialogue")),
        importance=int(meta.get("importance", 3)),
        player_id=player or None,
        created_at=from_timestamp(meta.get("created_at", 0)),
        last_accessed_at=from_timestamp(meta.get("last_accessed_at", meta.get("created_at", 0))),
        game_time=optional_float(meta.get("game_time")),
        accessed_game_time=optional_float(meta.get("accessed_game_time")),
        content=str(meta["content"]) if "content" in meta else None,
        subject=str(meta["subject"]) if "subject" in meta else None,
        superseded_by=str(meta["superseded_by"]) if "superseded_by" in meta else None,
        source=str(meta["source"]) if "source" in meta else None,
        origin=str(meta["origin"]) if "origin" in meta else None,
        hops=int(meta.get("hops", 0)),
    )


def memories_of(result: Any) -> list[Memory]:
    """The memories in a Chroma ``get`` result that included documents and metadatas."""
    return [
        memory_of(memory_id, document, metadata)
        for memory_id, document, metadata in zip(
            result["ids"],
            result.get("documents") or [],
            result.get("metadatas") or [],
            strict=True,
        )
    ]


PLAYER_SHARDS = 8  # collections per NPC holding what it knows about players


def save_vectors_often(collection: Any) -> None:
    """A collection made before MEMORY_COLLECTION_CONFIG gets its sync threshold lowered;
    Chroma applies it from the next start (measured: its log then shrinks as written)."""
    wanted = MEMORY_COLLECTION_CONFIG["hnsw"]
    try:
        with warnings.catch_warnings():  # "legacy embedding function config": we set none
            warnings.simplefilter("ignore", DeprecationWarning)
            hnsw = (collection.configuration or {}).get("hnsw") or {}
        if int(hnsw.get("sync_threshold", wanted["sync_threshold"])) > wanted["sync_threshold"]:
            collection.modify(
                configuration={
                    "hnsw": {
                        "sync_threshold": wanted["sync_threshold"],
                        "batch_size": wanted["batch_size"],
                    }
                }
            )
    except Exception as exc:  # only speed is at stake: never fail an open over it
        if is_unavailable(exc):
            raise
        log.debug("could not lower the sync threshold of %s: %s", collection.name, exc)


def digest(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:24]


def own_name(npc_id: str) -> str:
    """The collection of an NPC's own memories (tied to no player)."""
    return f"npc-{digest(npc_id)}-own"


def shard_name(npc_id: str, shard: int) -> str:
    return f"npc-{digest(npc_id)}-players-{shard}"


def player_shard(npc_id: str, player_id: str) -> str:
    """The collection holding what ``npc_id`` knows about ``player_id``.

    Names are hashes, so no id is a prefix of another's (``guard`` vs ``guard-tom``) and any
    id fits Chroma's name alphabet. Players share a fixed number of shards: a collection per
    player cost ~2.5 MB of RAM, 4 file handles and 37 ms to create (1,000 measured), so
    hostile or merely many player ids would exhaust the machine.
    """
    shard = int(hashlib.sha1(player_id.encode("utf-8")).hexdigest()[:8], 16) % PLAYER_SHARDS
    return shard_name(npc_id, shard)


def home_name(memory: Memory) -> str:
    """The collection a memory is stored in."""
    if memory.player_id is None:
        return own_name(memory.npc_id)
    return player_shard(memory.npc_id, memory.player_id)


# The collections a save may name: those the engine makes (an NPC's own, its 8 shards).


def names_of(npc_id: str) -> list[str]:
    return [own_name(npc_id), *(shard_name(npc_id, k) for k in range(PLAYER_SHARDS))]


def state_labels(key: str, labels: dict[str, str] | None) -> dict[str, str]:
    return dict(labels) if labels else {"kind": key.split(":", 1)[0]}


def where_all(labels: dict[str, str]) -> dict[str, Any]:
    clauses = [{name: value} for name, value in sorted(labels.items())]
    return clauses[0] if len(clauses) == 1 else {"$and": clauses}


def said(document: str) -> str:
    """The words inside an older memory's third-person wrapper (the text if none)."""
    match = WRAPPED.fullmatch(document)
    return match.group(1) if match else document


class RecordCache:
    """Documents and metadata of recently recalled memories, by id, least recently used out.

    Chroma stays the store of record; this only spares the search its document and
    metadata fetch from SQLite, which was half of a query's time (1.8 ms vs 0.8 ms for ids
    and distances alone, 10,000 memories, by a profile of the bench's query).
    """

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._records: OrderedDict[str, Memory] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, memory_id: str) -> Memory | None:
        with self._lock:
            memory = self._records.get(memory_id)
            if memory is not None:
                self._records.move_to_end(memory_id)
            return memory

    def put(self, memories: Sequence[Memory]) -> None:
        with self._lock:
            for memory in memories:
                self._records[memory.id] = memory
                self._records.move_to_end(memory.id)
            while len(self._records) > self._capacity:
                self._records.popitem(last=False)

    def touch(self, memory_ids: Sequence[str], when: datetime, game_time: float | None) -> None:
        with self._lock:
            for memory_id in memory_ids:
                memory = self._records.get(memory_id)
                if memory is not None:
                    game = game_time if game_time is not None else memory.accessed_game_time
                    self._records[memory_id] = replace(
                        memory, last_accessed_at=when, accessed_game_time=game
                    )

    def clear(self) -> None:
        with self._lock:
            self._records.clear()

    def discard(self, memory_ids: Sequence[str]) -> None:
        with self._lock:
            for memory_id in memory_ids:
                self._records.pop(memory_id, None)

    def __len__(self) -> int:
        return len(self._records)


class Lru(OrderedDict[str, Any]):
    """An ordered dict that forgets its least recently used entries beyond ``capacity``."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity

    def remember(self, key: str, value: Any) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.capacity:
            self.popitem(last=False)


class PlayerVectors:
    """The unit vectors of recently searched players' memories, in RAM, least recently
    used out past a byte budget. Reading a player's 400 vectors from Chroma on every search
    cost ~9 ms (mostly turning lists into arrays). Kept current by the store: new memories
    are appended, a forget or reload drops what it touched. A fill that started before a
    write and ended after it is not kept (``epoch``); one that read the write and was kept
    before the write's ``extend`` already holds its ids (``extend`` skips them). A deleted
    id left in a matrix is harmless, since its record is gone and search drops it."""

    def __init__(self, budget_bytes: int) -> None:
        self._budget = budget_bytes
        self._pairs: OrderedDict[tuple[str, str], tuple[list[str], Any]] = OrderedDict()
        self._bytes = 0
        self._epoch = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str]) -> tuple[tuple[list[str], Any] | None, int]:
        with self._lock:
            entry = self._pairs.get(key)
            if entry is not None:
                self._pairs.move_to_end(key)
            return entry, self._epoch

    def put(self, key: tuple[str, str], ids: list[str], matrix: Any, epoch: int) -> None:
        with self._lock:
            if epoch != self._epoch or key in self._pairs or matrix.nbytes > self._budget:
                return
            self._pairs[key] = (ids, matrix)
            self._bytes += matrix.nbytes
            while self._bytes > self._budget:
                _, (_, dropped) = self._pairs.popitem(last=False)
                self._bytes -= dropped.nbytes

    def extend(self, key: tuple[str, str], ids: list[str], unit_vectors: Any) -> None:
        import numpy as np

        with self._lock:
            self._epoch += 1
            entry = self._pairs.pop(key, None)
            if entry is None:
                return
            self._bytes -= entry[1].nbytes
            # A fill that read the shard after these were written, and was kept before
            # this call, holds them already: a second copy would be a duplicate id.
            known = set(entry[0])
            new = [index for index, memory_id in enumerate(ids) if memory_id not in known]
            added = [ids[index] for index in new]
            rows = unit_vectors[new] if len(new) != len(ids) else unit_vectors
            matrix = np.vstack([entry[1], rows]) if len(entry[0]) else rows
            if self._bytes + matrix.nbytes <= self._budget:
                self._pairs[key] = (entry[0] + added, matrix)
                self._bytes += matrix.nbytes

    def drop(self, npc_id: str | None = None) -> None:
        """Forget the cached vectors of one NPC's players, or of all."""
        with self._lock:
            self._epoch += 1
            for key in [k for k in self._pairs if npc_id is None or k[0] == npc_id]:
                self._bytes -= self._pairs.pop(key)[1].nbytes


def server_terms(query: str) -> list[str]:
    """The rarest telling words of a line, for the server's full-text filter."""
    from wordfreq import zipf_frequency

    terms = [t.strip('"') for t in query_terms(query) if len(t.strip('"')) >= 3]
    return sorted(terms, key=lambda t: zipf_frequency(t, "en"))[:SERVER_KEYWORD_TERMS]


def unit_rows(vectors: Any) -> Any:
    import numpy as np

    matrix = np.asarray(vectors, dtype=np.float32)
    if matrix.ndim != 2 or not len(matrix):
        return np.zeros((0, 0), dtype=np.float32)
    return matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)


class NoKeywordIndex:
    """The keyword index of a store on a Chroma server: none kept here (a local index would
    miss what other replicas wrote); keyword matches come from the server's full-text
    search instead (``chroma_server_search.ServerSearch._keyword_matches``)."""

    def add(self, memories: Sequence[Memory]) -> None:
        """Nothing to index locally."""

    def delete(self, memory_ids: Sequence[str]) -> None:
        """Nothing indexed locally."""

    def rebuild(self, memories: Sequence[Memory]) -> None:
        """Nothing to rebuild."""

    def ids(self) -> set[str]:
        return set()

    def count_of(self, npc_id: str, player_id: str) -> int:
        return 0

    def search(
        self, npc_id: str, player_id: str | None, query: str, limit: int
    ) -> list[tuple[str, float]]:
        return []

    def close(self) -> None:
        """Nothing open."""


def connect_server(
    url: str, *, token: str | None, tenant: str, database: str, timeout: float
) -> Any:
    """A Chroma ``HttpClient`` for ``url`` (http[s]://host:port). Every call gets ``timeout``
    seconds (chromadb's own client waits forever), so a hung server fails a request instead
    of holding a thread."""
    from urllib.parse import urlsplit

    import chromadb
    import httpx
    from chromadb.config import Settings

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"memory.url: {url!r} is not an http(s)://host:port address")
    if parts.username is not None or parts.password is not None:  # never echoed back
        raise ValueError("memory.url: credentials in the URL are not sent (use memory.token_env)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        # HttpClient takes a host and a port: a path (a proxy's prefix) would be dropped.
        raise ValueError(f"memory.url: {url!r} has a path or query the client would drop")
    headers = {"Authorization": f"Bearer {token}"} if token else None
    client = chromadb.HttpClient(
        host=parts.hostname,
        port=parts.port or (443 if parts.scheme == "https" else 80),
        ssl=parts.scheme == "https",
        headers=headers,
        settings=Settings(anonymized_telemetry=False),
        tenant=tenant,
        database=database,
    )
    session = getattr(getattr(client, "_server", None), "_session", None)
    if isinstance(session, httpx.Client):
        session.timeout = httpx.Timeout(timeout, connect=min(timeout, 2.0))
    return client
