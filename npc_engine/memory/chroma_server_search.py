"""Memory search on a Chroma server, shared by engine replicas.

Every call is a round trip and nothing may be cached: the nearest of each collection and
the keyword matches come with their records in one request each, the requests run at once
(a search takes about the longest of them), and a shard's other players are dropped here
(a ``where`` on player_id made the server's query 8x slower: it filters before the vector
search). The store on disk searches in ``chroma_disk_search.DiskSearch.search``.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from npc_engine.memory.chroma_records import (
    COMMON_TERM_SECONDS,
    Lru,
    memories_of,
    server_terms,
    unit_rows,
)
from npc_engine.memory.types import Candidate

Exact = Callable[..., list[Candidate]]


class ServerSearch:
    def __init__(self, exact: Exact, overfetch: int) -> None:
        self._exact = exact  # the nearest among records a filter selects, exactly
        self._overfetch = overfetch
        # A search's requests to a server, sent at once (httpx's client is thread-safe).
        self._requests = ThreadPoolExecutor(max_workers=4, thread_name_prefix="npc-chroma")
        # Words found too common to search a collection by, until when (see
        # _keyword_matches); query words are the players': bounded.
        self._common_terms = Lru(4096)
        self._lock = threading.Lock()

    def search(
        self,
        own: Any,
        shard: Any,
        player_id: str | None,
        query: str,
        vector: Any,
        limit: int,
        keywords: bool,
    ) -> list[Candidate]:
        scopes = [(own, None), (shard, player_id)] if player_id is not None else [(own, None)]
        scopes = [(collection, who) for collection, who in scopes if collection is not None]
        dense = [
            self._requests.submit(self._nearest, collection, who, vector, limit)
            for collection, who in scopes
        ]
        terms = server_terms(query) if keywords else []
        lexical = [
            self._requests.submit(self._keyword_matches, collection, who, terms, vector, limit)
            for collection, who in scopes
            if terms
        ]
        candidates = sorted(
            (c for done in dense for c in done.result()), key=lambda c: c.relevance, reverse=True
        )[:limit]
        if lexical:
            scored = sorted(
                (pair for done in lexical for pair in done.result()),
                key=lambda pair: pair[0],
                reverse=True,
            )[:limit]
            rank = {c.memory.id: place for place, (_, c) in enumerate(scored)}
            joined = [replace(c, keyword_rank=rank.get(c.memory.id)) for c in candidates]
            seen = {c.memory.id for c in candidates}
            joined += [
                replace(c, keyword_rank=rank[c.memory.id])
                for _, c in scored
                if c.memory.id not in seen
            ]
            candidates = joined
        return [c for c in candidates if c.memory.superseded_by is None]

    def _nearest(
        self, collection: Any, player_id: str | None, vector: Any, limit: int
    ) -> list[Candidate]:
        wanted = limit if player_id is None else limit * self._overfetch
        found = collection.query(
            query_embeddings=vector,
            n_results=wanted,
            include=["documents", "metadatas", "distances"],
        )
        records = memories_of({key: found[key][0] for key in ("ids", "documents", "metadatas")})
        hits = [
            Candidate(memory, 1.0 - float(distance))
            for memory, distance in zip(records, found["distances"][0], strict=True)
            if player_id is None or memory.player_id == player_id
        ]
        if player_id is None or len(hits) >= limit or len(records) < wanted:
            return hits[:limit]
        # A shard shared by many players: this one's memories by a filter after all.
        return self._exact(collection, vector, limit, where={"player_id": player_id})

    def _keyword_matches(
        self, collection: Any, player_id: str | None, terms: list[str], vector: Any, limit: int
    ) -> list[tuple[float, Candidate]]:
        """The keyword half on a Chroma server: its full-text filter finds the memories
        holding the query's rarest telling words (any case), scored by how rare the words
        each holds are (wordfreq's Zipf scale standing in for BM25's IDF), each with its
        cosine to ``vector``.

        A word in most of what the filter returned is, like the local index's words in a
        third of an NPC's memories, no help in telling memories apart, and makes the
        server scan and send the most: it is left out of this collection's searches for a
        while (a hint kept here; nothing of the world)."""
        from wordfreq import zipf_frequency

        now = time.monotonic()
        with self._lock:
            terms = [
                t for t in terms if self._common_terms.get(f"{collection.name}\x1f{t}", 0.0) < now
            ]
        if not terms:
            return []
        spellings = [{"$contains": form} for t in terms for form in {t, t.capitalize()}]
        contains = spellings[0] if len(spellings) == 1 else {"$or": spellings}
        weight = {t: max(8.0 - zipf_frequency(t, "en"), 0.5) for t in terms}
        words = {t: re.compile(rf"\b{re.escape(t)}\b", re.I) for t in terms}
        wanted = limit * 2
        found = collection.get(
            # A shard holds several players: without the filter, others' matches could
            # fill the page and hide this player's.
            where={"player_id": player_id} if player_id is not None else None,
            where_document=contains,
            limit=wanted,
            include=["documents", "metadatas", "embeddings"],
        )
        if not found["ids"]:
            return []
        memories = memories_of(found)
        if len(memories) >= wanted:  # the filter had more to give: which words are common?
            for term in terms:
                holding = sum(1 for m in memories if words[term].search(m.text))
                if holding * 2 >= len(memories):
                    with self._lock:
                        self._common_terms.remember(
                            f"{collection.name}\x1f{term}", now + COMMON_TERM_SECONDS
                        )
        similarity = unit_rows(found["embeddings"]) @ unit_rows(vector)[0]
        scored = []
        for memory, cosine in zip(memories, similarity, strict=True):
            score = sum(weight[t] for t in terms if words[t].search(memory.text))
            if score > 0:
                scored.append((score, Candidate(memory, float(cosine))))
        return scored

    def close(self) -> None:
        self._requests.shutdown(wait=False)
