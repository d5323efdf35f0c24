"""Lorebook vectors: a shared Chroma collection keyed by a hash of each entry's text (and of
the embedding model), so an entry is embedded once, ever; searched exactly in RAM."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

LORE_COLLECTION = "npc-engine-lore"
BATCH = 1000  # rows per Chroma call (its own limit is ~5,000)

Embed = Callable[[Sequence[str]], Sequence[Sequence[float]]]


def text_key(model: str, text: str) -> str:
    return hashlib.sha1(f"{model}\n{text}".encode()).hexdigest()


class MatrixIndex:
    """Entry vectors as one normalised matrix: cosine is a matrix-vector product."""

    def __init__(self, matrix: Any, embed: Embed, embedded: int) -> None:
        self._matrix = np.asarray(matrix, dtype=np.float32).reshape(len(matrix), -1)
        self._embed = embed
        self.embedded = embedded

    def scores(self, query: str) -> Any:
        if not len(self._matrix):
            return np.zeros(0, dtype=np.float32)
        vector = np.asarray(self._embed([query])[0], dtype=np.float32)
        return self._matrix @ vector


class ChromaLoreVectors:
    def __init__(self, client: Any, embed: Embed, model: str) -> None:
        self._collection = client.get_or_create_collection(
            name=LORE_COLLECTION,
            embedding_function=None,
            configuration={"hnsw": {"space": "cosine"}},
        )
        self._embed = embed
        self._model = model

    def _stored(self, keys: Sequence[str]) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for start in range(0, len(keys), BATCH):
            got = self._collection.get(
                ids=list(keys[start : start + BATCH]), include=["embeddings"]
            )
            for key, vector in zip(got["ids"], got["embeddings"], strict=True):
                found[key] = vector
        return found

    def index(self, texts: Sequence[str]) -> MatrixIndex:
        keys = [text_key(self._model, text) for text in texts]
        unique = list(dict.fromkeys(keys))
        stored = self._stored(unique)
        missing = [key for key in unique if key not in stored]
        if missing:
            text_of = dict(zip(keys, texts, strict=True))
            for start in range(0, len(missing), BATCH):
                chunk = missing[start : start + BATCH]
                vectors = self._embed([text_of[key] for key in chunk])
                self._collection.upsert(ids=chunk, embeddings=[list(v) for v in vectors])
                stored.update(zip(chunk, vectors, strict=True))
        matrix = [stored[key] for key in keys] if keys else np.zeros((0, 1))
        return MatrixIndex(matrix, self._embed, len(missing))

    def prune(self, keep: Sequence[str]) -> int:
        wanted = {text_key(self._model, text) for text in keep}
        stale = [key for key in self._collection.get(include=[])["ids"] if key not in wanted]
        for start in range(0, len(stale), BATCH):
            self._collection.delete(ids=stale[start : start + BATCH])
        return len(stale)
