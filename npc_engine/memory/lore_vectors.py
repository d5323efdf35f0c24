"""Lorebook vectors: a shared Chroma collection keyed by a hash of each entry's text (and of
the embedding model), so an entry is embedded once, ever; searched exactly in RAM. Beside
it, one file shared by every data directory on the machine (``SharedLoreVectors``)."""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

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


class SharedLoreVectors:
    """Lore vectors in one SQLite file that every data directory and engine process on this
    machine shares: a vector depends on the model and the text alone, so a new data
    directory (a save slot, a replica, each test) reads its lorebook's vectors instead of
    embedding them again (the sample world's 29 entries: ~0.9 s of 2 cores at each start).
    Only authored lore goes here, never what players said. A cache: when the file cannot
    be used it is left alone, and deleting it loses nothing."""

    def __init__(self, path: Path, dimension: int) -> None:
        self._dimension = dimension
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(path, timeout=30, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")  # other engine processes read meanwhile
            db.execute("CREATE TABLE IF NOT EXISTS vectors (key TEXT PRIMARY KEY, vector BLOB)")
            self._db = db
        except (OSError, sqlite3.Error) as exc:
            log.warning("lore vector cache %s not used: %s", path, exc)

    def get(self, keys: Sequence[str]) -> dict[str, list[float]]:
        found: dict[str, list[float]] = {}
        for start in range(0, len(keys), 500):
            chunk = list(keys[start : start + 500])
            rows = self._run(
                f"SELECT key, vector FROM vectors WHERE key IN ({','.join('?' * len(chunk))})",
                chunk,
            )
            for key, blob in rows:
                # A damaged row, or another model's size: embedded again, never trusted.
                if isinstance(blob, bytes) and len(blob) == 4 * self._dimension:
                    vector = np.frombuffer(blob, dtype=np.float32)
                    if np.isfinite(vector).all():
                        found[str(key)] = vector.tolist()
        return found

    def put(self, vectors: dict[str, Sequence[float]]) -> None:
        rows = [(k, np.asarray(v, dtype=np.float32).tobytes()) for k, v in vectors.items()]
        self._run("INSERT OR REPLACE INTO vectors (key, vector) VALUES (?, ?)", rows, many=True)

    def _run(self, sql: str, params: Sequence[Any], *, many: bool = False) -> list[Any]:
        with self._lock:
            if self._db is None:
                return []
            try:
                if many:
                    with self._db:
                        self._db.execute("BEGIN")
                        self._db.executemany(sql, params)
                    return []
                return self._db.execute(sql, params).fetchall()
            except sqlite3.Error as exc:  # busy for 30 s, damaged, disk full: do without
                log.warning("lore vector cache not used: %s", exc)
                self._db = None
                return []

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


class ChromaLoreVectors:
    def __init__(
        self, client: Any, embed: Embed, model: str, shared: SharedLoreVectors | None = None
    ) -> None:
        self._collection = client.get_or_create_collection(
            name=LORE_COLLECTION,
            embedding_function=None,
            configuration={"hnsw": {"space": "cosine"}},
        )
        self._embed = embed
        self._model = model
        self._shared = shared

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
        if missing and self._shared is not None:
            known = self._shared.get(missing)
            found = list(known)
            for start in range(0, len(found), BATCH):
                chunk = found[start : start + BATCH]
                self._collection.upsert(ids=chunk, embeddings=[known[key] for key in chunk])
            stored.update(known)
            missing = [key for key in missing if key not in known]
        if missing:
            text_of = dict(zip(keys, texts, strict=True))
            for start in range(0, len(missing), BATCH):
                chunk = missing[start : start + BATCH]
                vectors = self._embed([text_of[key] for key in chunk])
                self._collection.upsert(ids=chunk, embeddings=[list(v) for v in vectors])
                stored.update(zip(chunk, vectors, strict=True))
                if self._shared is not None:
                    self._shared.put(dict(zip(chunk, vectors, strict=True)))
        matrix = [stored[key] for key in keys] if keys else np.zeros((0, 1))
        return MatrixIndex(matrix, self._embed, len(missing))

    def prune(self, keep: Sequence[str]) -> int:
        wanted = {text_key(self._model, text) for text in keep}
        stale = [key for key in self._collection.get(include=[])["ids"] if key not in wanted]
        for start in range(0, len(stale), BATCH):
            self._collection.delete(ids=stale[start : start + BATCH])
        return len(stale)
