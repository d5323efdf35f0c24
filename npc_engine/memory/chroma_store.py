"""The real memory store: one Chroma collection per NPC in a PersistentClient on disk.

Collections per NPC and per (NPC, player) keep queries fast without metadata filters and
make forgetting an NPC or a player cheap. Embeddings are computed
here with the offline all-MiniLM-L6-v2 ONNX model and passed to Chroma explicitly, so Chroma
never tries to fetch its own copy.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

from npc_engine.memory.types import Candidate, Memory, MemoryKind
from npc_engine.model_registry import EMBEDDING_MODEL, MODELS, ModelCache

NO_PLAYER = ""  # Chroma metadata cannot hold None


class OfflineMiniLM:
    """all-MiniLM-L6-v2 (ONNX) on our verified offline files, mean-pooled and normalised.

    Written here rather than using Chroma's ``ONNXMiniLM_L6_V2`` because that class pads
    every text to 256 tokens: NPC memories are 10-40 tokens, so it spent ~10× the work
    (31 ms per query, 36 memories/s written, measured by tools/bench.py). Padding to the
    longest text in a batch gives the same vectors (padding is masked out) much faster.
    """

    MAX_TOKENS = 256  # what sentence-transformers uses for this model
    BATCH = 64

    def __init__(self, cache: ModelCache, *, threads: int | None = None) -> None:
        import onnxruntime
        from tokenizers import Tokenizer

        spec = MODELS[EMBEDDING_MODEL]
        model_dir = cache.require(spec)  # raises with "what is missing, how to provide it"
        self._tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self._tokenizer.enable_truncation(max_length=self.MAX_TOKENS)
        self._tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle ONNX threads spin-wait by default, taking CPU from the llama.cpp threads that
        # start decoding right after a recall (first token ~35% slower on 2 cores).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
        self._session = onnxruntime.InferenceSession(
            str(model_dir / "model.onnx"), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._lock = threading.Lock()

    def __call__(self, texts: Sequence[str]) -> list[list[float]]:
        if not texts:
            return []
        # Similar lengths share a batch, so little is padded; results go back in order.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        vectors: list[Any] = [None] * len(texts)
        with self._lock:  # one ONNX session; keep its use serial
            for start in range(0, len(order), self.BATCH):
                chunk = order[start : start + self.BATCH]
                for index, vector in zip(
                    chunk, self._embed([texts[i] for i in chunk]), strict=True
                ):
                    vectors[index] = vector.tolist()
        return vectors

    def _embed(self, texts: list[str]) -> Any:
        import numpy as np

        encoded = self._tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encoded], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encoded], dtype=np.int64)
        hidden = self._session.run(
            None,
            {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)},
        )[0]
        weights = mask[..., None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.clip(norms, 1e-12, None)).astype(np.float32)


def _timestamp(moment: datetime) -> float:
    return moment.timestamp()


def _from_timestamp(value: Any) -> datetime:
    return datetime.fromtimestamp(float(value), tz=timezone.utc)


def _metadata(memory: Memory) -> dict[str, str | int | float | bool]:
    return {
        "npc_id": memory.npc_id,
        "player_id": memory.player_id or NO_PLAYER,
        "kind": memory.kind,
        "importance": memory.importance,
        "created_at": _timestamp(memory.created_at),
        "last_accessed_at": _timestamp(memory.last_accessed_at or memory.created_at),
    }


def _memory(memory_id: str, document: str | None, metadata: Any) -> Memory:
    meta = dict(metadata or {})
    player = str(meta.get("player_id", NO_PLAYER))
    return Memory(
        id=memory_id,
        npc_id=str(meta.get("npc_id", "")),
        text=document or "",
        kind=cast(MemoryKind, meta.get("kind", "dialogue")),
        importance=int(meta.get("importance", 3)),
        player_id=player or None,
        created_at=_from_timestamp(meta.get("created_at", 0)),
        last_accessed_at=_from_timestamp(meta.get("last_accessed_at", meta.get("created_at", 0))),
    )


def _memories(result: Any) -> list[Memory]:
    """The memories in a Chroma ``get`` result that included documents and metadatas."""
    return [
        _memory(memory_id, document, metadata)
        for memory_id, document, metadata in zip(
            result["ids"],
            result.get("documents") or [],
            result.get("metadatas") or [],
            strict=True,
        )
    ]


def _scope_name(npc_id: str, player_id: str | None) -> str:
    """Collection of an NPC's own memories, or of what it knows about one player."""
    if player_id is None:
        return f"npc-{npc_id}-mem"
    # Player ids are free-form; collection names allow only [a-zA-Z0-9._-].
    return f"npc-{npc_id}-p-{hashlib.sha1(player_id.encode()).hexdigest()[:20]}"


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

    def touch(self, memory_ids: Sequence[str], when: datetime) -> None:
        with self._lock:
            for memory_id in memory_ids:
                memory = self._records.get(memory_id)
                if memory is not None:
                    self._records[memory_id] = replace(memory, last_accessed_at=when)

    def discard(self, memory_ids: Sequence[str]) -> None:
        with self._lock:
            for memory_id in memory_ids:
                self._records.pop(memory_id, None)

    def __len__(self) -> int:
        return len(self._records)


class ChromaMemoryStore:
    """One Chroma collection per NPC for its own memories and one per (NPC, player).

    A query then needs no metadata filter: a ``where`` on player_id made a 10,000-memory
    query ~15× slower (tools/bench.py), because Chroma filters before the vector search.
    """

    def __init__(self, path: Path, embed: Any, *, cached_records: int = 100_000) -> None:
        import chromadb
        from chromadb.config import Settings

        path.mkdir(parents=True, exist_ok=True)
        self._client = chromadb.PersistentClient(
            path=str(path), settings=Settings(anonymized_telemetry=False)
        )
        self._embed = embed
        self._collections: dict[str, Any] = {}
        self._absent: set[str] = set()  # looked up and not there: skip Chroma's miss path
        self._lock = threading.Lock()
        self._records = RecordCache(cached_records)
        # Held while a record is read from Chroma into the cache and while touch/forget
        # change one, so a search never caches a copy older than what touch just wrote.
        self._record_writes = threading.Lock()

    def _collection(self, name: str, npc_id: str, *, create: bool = True) -> Any | None:
        with self._lock:
            collection = self._collections.get(name)
            if collection is None:
                if not create and name in self._absent:
                    return None
                if create:
                    collection = self._client.get_or_create_collection(
                        name=name,
                        embedding_function=None,
                        configuration={"hnsw": {"space": "cosine"}},
                        metadata={"npc_id": npc_id},
                    )
                else:
                    try:
                        collection = self._client.get_collection(name, embedding_function=None)
                    except Exception:  # Chroma raises NotFoundError (or ValueError in old ones)
                        self._absent.add(name)
                        return None
                self._absent.discard(name)
                self._collections[name] = collection
            return collection

    def _scopes(self, npc_id: str, player_id: str | None) -> list[Any]:
        """The collections a query for (npc, player) reads: its own, and the player's."""
        names = [_scope_name(npc_id, None)]
        if player_id is not None:
            names.append(_scope_name(npc_id, player_id))
        found = [self._collection(name, npc_id, create=False) for name in names]
        return [c for c in found if c is not None]

    def _all_of(self, npc_id: str) -> list[Any]:
        prefix = f"npc-{npc_id}-"
        names = [c if isinstance(c, str) else c.name for c in self._client.list_collections()]
        found = [self._collection(n, npc_id, create=False) for n in names if n.startswith(prefix)]
        return [c for c in found if c is not None]

    def add(self, memories: Sequence[Memory]) -> None:
        if memories:
            self.add_with_embeddings(memories, self._embed([m.text for m in memories]))

    def add_with_embeddings(self, memories: Sequence[Memory], vectors: Sequence[Any]) -> None:
        """Store memories whose vectors are already computed (imports, benchmarks)."""
        by_scope: dict[tuple[str, str | None], list[int]] = {}
        for index, memory in enumerate(memories):
            by_scope.setdefault((memory.npc_id, memory.player_id), []).append(index)
        for (npc_id, player_id), indexes in by_scope.items():
            collection = self._collection(_scope_name(npc_id, player_id), npc_id)
            assert collection is not None
            collection.add(
                ids=[memories[i].id for i in indexes],
                embeddings=[vectors[i] for i in indexes],
                documents=[memories[i].text for i in indexes],
                metadatas=[_metadata(memories[i]) for i in indexes],
            )
        # Just written, likely recalled on the next turn: cache them as stored.
        self._records.put([_memory(m.id, m.text, _metadata(m)) for m in memories])

    def search(self, npc_id: str, player_id: str | None, query: str, limit: int) -> list[Candidate]:
        scopes = self._scopes(npc_id, player_id)
        if limit <= 0 or not scopes:
            return []
        vector = self._embed([query])
        candidates = []
        for collection in scopes:
            result = collection.query(
                query_embeddings=vector, n_results=limit, include=["distances"]
            )
            ids = result["ids"][0]
            distances = (result.get("distances") or [[]])[0]
            found = self._cached_records(collection, ids)
            candidates += [
                Candidate(found[memory_id], 1.0 - float(distance))
                for memory_id, distance in zip(ids, distances, strict=True)
                if memory_id in found  # deleted between the query and the fetch
            ]
        candidates.sort(key=lambda c: c.relevance, reverse=True)
        return candidates[:limit]

    def _cached_records(self, collection: Any, ids: Sequence[str]) -> dict[str, Memory]:
        found = {i: m for i in ids if (m := self._records.get(i)) is not None}
        missing = [i for i in ids if i not in found]
        if missing:
            with self._record_writes:
                result = collection.get(ids=missing, include=["documents", "metadatas"])
                fetched = _memories(result)
                self._records.put(fetched)
            found.update((m.id, m) for m in fetched)
        return found

    def recent(self, npc_id: str, player_id: str | None, limit: int) -> list[Memory]:
        if limit <= 0:
            return []
        memories = []
        for collection in self._scopes(npc_id, player_id):
            memories += self._newest(collection, limit)
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
        return _memories(result)

    def touch(self, npc_id: str, memory_ids: Sequence[str], when: datetime) -> None:
        if not memory_ids:
            return
        stamp = _timestamp(when)
        prefix = f"npc-{npc_id}-"
        with self._lock:  # recalled memories came from collections opened by search()
            opened = [c for name, c in self._collections.items() if name.startswith(prefix)]
        with self._record_writes:
            for collection in opened:
                present = collection.get(ids=list(memory_ids), include=[])["ids"]
                if present:
                    collection.update(
                        ids=present, metadatas=[{"last_accessed_at": stamp} for _ in present]
                    )
            self._records.touch(memory_ids, _from_timestamp(stamp))

    def forget(
        self,
        npc_id: str,
        *,
        player_id: str | None = None,
        memory_ids: Sequence[str] | None = None,
        everything: bool = False,
    ) -> int:
        if everything or memory_ids is not None:
            scopes = self._all_of(npc_id)
        elif player_id is not None:
            scopes = [
                c
                for c in [self._collection(_scope_name(npc_id, player_id), npc_id, create=False)]
                if c is not None
            ]
        else:
            raise ValueError("forget needs player_id, memory_ids or everything=True")
        count = 0
        for collection in scopes:
            if memory_ids is not None and not everything:
                doomed = collection.get(ids=list(memory_ids), include=[])["ids"]
            else:
                doomed = collection.get(include=[])["ids"]
            if doomed:
                with self._record_writes:
                    collection.delete(ids=list(doomed))
                    self._records.discard(doomed)
                count += len(doomed)
        return count

    def count(self, npc_id: str) -> int:
        return sum(int(c.count()) for c in self._all_of(npc_id))

    def close(self) -> None:
        self._collections.clear()
