"""How a Chroma store's vectors were made, and the one-off conversion of a store written by
an older version (``npc-engine memory reindex``): vectors of what was said, not of the
whole third-person line."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from npc_engine.memory.chroma_records import (
    ARCHIVE_COLLECTION,
    CONTENT_VECTORS,
    ONE_VECTOR,
    SAVES_COLLECTION,
    STORE_FORMAT,
    said,
)

if TYPE_CHECKING:
    from npc_engine.memory.chroma_store import ChromaMemoryStore


class EmbeddingFormat:
    def __init__(self, store: ChromaMemoryStore) -> None:
        self._store = store

    def current(self) -> str | None:
        """CONTENT_VECTORS, or None for a store of an older version (vectors of the whole
        third-person text: run ``reindex``)."""
        saves = self._store.collection(SAVES_COLLECTION, "", create=False)
        if saves is not None:
            found = saves.get(ids=[STORE_FORMAT], include=["metadatas"])
            if found["ids"]:
                return str((found["metadatas"][0] or {}).get("embedding"))
        return None

    def mark_if_new(self) -> bool:
        """A store without memories yet is written the current way from the start.
        Returns whether it has no memories."""
        fresh = not self._store.memory_collection_names()
        if fresh and self.current() is None:
            self._mark()
        return fresh

    def _mark(self) -> None:
        self._store.saves.saves_collection().upsert(
            ids=[STORE_FORMAT],
            metadatas=[{"kind": "format", "embedding": CONTENT_VECTORS}],
            embeddings=ONE_VECTOR,
        )

    def reindex(self, progress: Any = None, batch: int = 256) -> int:
        """Re-embed every memory (live and archived) from what was said. Returns how many."""
        store = self._store
        names = [*store.memory_collections(), ARCHIVE_COLLECTION]
        collections = [store.collection(n, "", create=n == ARCHIVE_COLLECTION) for n in names]
        total = sum(int(c.count()) for c in collections if c is not None)
        done = 0
        for collection in collections:
            if collection is None:
                continue
            count = int(collection.count())
            for offset in range(0, count, batch):
                page = collection.get(
                    limit=batch, offset=offset, include=["documents", "metadatas"]
                )
                contents = [
                    str((meta or {}).get("content") or said(document or ""))
                    for document, meta in zip(page["documents"], page["metadatas"], strict=True)
                ]
                collection.update(
                    ids=page["ids"],
                    embeddings=store.embedder(contents),
                    metadatas=[
                        {"content": content}
                        if content != document
                        else {"kind": str((meta or {}).get("kind", "dialogue"))}
                        for content, document, meta in zip(
                            contents, page["documents"], page["metadatas"], strict=True
                        )
                    ],
                )
                done += len(page["ids"])
                if progress is not None:
                    progress(done, total)
        store.drop_caches()
        self._mark()
        store.sync_keywords(rewrite=True)
        return done
