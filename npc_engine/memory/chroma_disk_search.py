"""Memory search on Chroma on disk: the nearest memories by meaning, joined by the keyword
index's best matches (each keeps its rank for fusion). One player's memories are compared
one by one from vectors kept in RAM while they are few (Chroma's HNSW answers are
approximate); an NPC's own, and a crowded shard, are asked of Chroma. The search on a
Chroma server is ``chroma_server_search.py``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from npc_engine.memory.chroma_records import (
    EXACT_SEARCH_LIMIT,
    NoKeywordIndex,
    PlayerVectors,
    unit_rows,
)
from npc_engine.memory.keywords import KeywordIndex
from npc_engine.memory.types import Candidate, Memory

CachedRecords = Callable[[Any, Sequence[str]], dict[str, Memory]]


class DiskSearch:
    def __init__(
        self,
        cached_records: CachedRecords,
        keywords: KeywordIndex | NoKeywordIndex,
        player_vectors: PlayerVectors,
        overfetch: int,
    ) -> None:
        self.cached_records = cached_records  # the store's records, read through its cache
        self._keywords = keywords
        self._player_vectors = player_vectors
        self._overfetch = overfetch  # nearest read per wanted memory before a filter

    def search(
        self,
        own: Any,
        shard: Any,
        npc_id: str,
        player_id: str | None,
        query: str,
        vector: Any,
        limit: int,
        keywords: bool,
    ) -> list[Candidate]:
        """The nearest of ``own`` (the NPC's collection) and ``shard`` (the player's), by
        meaning, joined by the best keyword matches when ``keywords``."""
        candidates = self._nearest(own, vector, limit, None) if own is not None else []
        if shard is not None and player_id is not None:
            if self._keywords.count_of(npc_id, player_id) <= EXACT_SEARCH_LIMIT:
                # What one player said is a few hundred memories under the consolidation
                # caps: compared one by one. Chroma's HNSW answers are approximate, and
                # missed the nearest ones once a shard had deletions and many identical
                # lines (the recall probe through the server lost 2 to 6 of 60 facts).
                candidates += self._player_nearest(shard, npc_id, player_id, vector, limit)
            else:
                candidates += self._nearest(shard, vector, limit, player_id)
        candidates.sort(key=lambda c: c.relevance, reverse=True)
        candidates = candidates[:limit]
        if keywords:
            matches = self._keywords.search(npc_id, player_id, query, limit)
            candidates = self._join_keyword_matches(
                candidates, [memory_id for memory_id, _ in matches], [own, shard], vector
            )
        return [c for c in candidates if c.memory.superseded_by is None]

    def _join_keyword_matches(
        self,
        candidates: list[Candidate],
        matched_ids: list[str],
        collections: list[Any],
        vector: Any,
    ) -> list[Candidate]:
        """Mark dense candidates that are also keyword matches with their keyword rank,
        and add the keyword matches the dense search missed, with their own cosine."""
        rank = {memory_id: place for place, memory_id in enumerate(matched_ids)}
        joined = [replace(c, keyword_rank=rank.get(c.memory.id)) for c in candidates]
        missing = [i for i in matched_ids if i not in {c.memory.id for c in candidates}]
        for collection in collections:
            if collection is None or not missing:
                continue
            for found in self.exact(collection, vector, len(missing), ids=missing):
                joined.append(replace(found, keyword_rank=rank[found.memory.id]))
                missing.remove(found.memory.id)
        return joined

    def _nearest(
        self, collection: Any, vector: Any, limit: int, player_id: str | None
    ) -> list[Candidate]:
        total = collection.count()
        if total == 0:
            return []
        wanted = limit if player_id is None else min(total, limit * self._overfetch)
        found = self._query(collection, vector, wanted, None)
        if player_id is None:
            return found
        mine = [c for c in found if c.memory.player_id == player_id]
        if len(mine) >= limit or wanted >= total:
            return mine[:limit]
        return self.exact(collection, vector, limit, where={"player_id": player_id})

    def _player_nearest(
        self, shard: Any, npc_id: str, player_id: str, vector: Any, limit: int
    ) -> list[Candidate]:
        """The ``limit`` nearest of one player's memories, by exact cosine similarity over
        their vectors (cached in RAM between searches)."""
        key = (npc_id, player_id)
        entry, epoch = self._player_vectors.get(key)
        if entry is None:
            found = shard.get(where={"player_id": player_id}, include=["embeddings"])
            entry = (list(found["ids"]), unit_rows(found["embeddings"]))
            self._player_vectors.put(key, entry[0], entry[1], epoch)
        return self._ranked(shard, entry[0], entry[1], vector, limit)

    def exact(
        self,
        collection: Any,
        vector: Any,
        limit: int,
        *,
        where: dict[str, Any] | None = None,
        ids: list[str] | None = None,
    ) -> list[Candidate]:
        """The ``limit`` nearest among the records ``where`` or ``ids`` select, by exact
        cosine similarity."""
        result = collection.get(where=where, ids=ids, include=["embeddings"])
        return self._ranked(
            collection, list(result["ids"]), unit_rows(result["embeddings"]), vector, limit
        )

    def _ranked(
        self, collection: Any, ids: list[str], unit_rows: Any, vector: Any, limit: int
    ) -> list[Candidate]:
        """The ``limit`` of ``ids`` nearest to ``vector`` (their vectors: ``unit_rows``)."""
        import numpy as np

        if not ids:
            return []
        query = np.asarray(vector, dtype=np.float32).reshape(-1)
        similarity = unit_rows @ (query / max(float(np.linalg.norm(query)), 1e-12))
        best = np.argsort(-similarity)[:limit]
        records = self.cached_records(collection, [ids[i] for i in best])
        return [Candidate(records[ids[i]], float(similarity[i])) for i in best if ids[i] in records]

    def _query(
        self, collection: Any, vector: Any, count: int, where: dict[str, Any] | None
    ) -> list[Candidate]:
        result = collection.query(
            query_embeddings=vector, n_results=count, where=where, include=["distances"]
        )
        ids = result["ids"][0]
        distances = (result.get("distances") or [[]])[0]
        found = self.cached_records(collection, ids)
        return [
            Candidate(found[memory_id], 1.0 - float(distance))
            for memory_id, distance in zip(ids, distances, strict=True)
            if memory_id in found  # deleted between the query and the fetch
        ]
