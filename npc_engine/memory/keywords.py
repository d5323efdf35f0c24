"""Keyword search over memories (the BM25 half of hybrid retrieval), on SQLite FTS5.

FTS5 ships with Python's sqlite3, ranks with BM25, takes inserts and deletes one memory at
a time, and keeps its index on disk; in-memory BM25 libraries (bm25s, rank_bm25) must
rebuild their index to add a document, which a store written every turn cannot afford.
The index is derived data: Chroma stays the store of record, and ``rebuild`` remakes this
from it whenever the two disagree (a crash between the writes, a save load, a reindex).
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

from npc_engine.memory.types import Memory

MAX_QUERY_TERMS = 32  # a hostile 2,000-word line must not become a 2,000-way OR
_TERM = re.compile(r"\w+", re.UNICODE)
# Words at least this common (Zipf scale: 6 is once per thousand words, like "what",
# "have", "where") say nothing about which memory is meant; "name" (5.6) still counts.
COMMON_WORD_ZIPF = 5.9
OWN = "own"  # the scope word of an NPC's own memories (tied to no player)


def _scope_word(prefix: str, value: str) -> str:
    # Ids become one hashed word each: any id is safe in a MATCH, and no id is a prefix
    # of another's. Hex digits only, so the stemmer has no suffix to take off.
    return prefix + hashlib.sha1(value.encode("utf-8")).hexdigest()[:20]


def _scope(memory: Memory) -> str:
    player = _scope_word("p", memory.player_id) if memory.player_id is not None else OWN
    return f"{_scope_word('n', memory.npc_id)} {player}"


def query_terms(text: str) -> list[str]:
    """The telling words of a query (not "what", "my", "do"), each quoted for FTS5 so none
    is read as syntax. How common a word is comes from wordfreq: BM25's own rarity
    weighting cannot tell on a store of a few dozen lines that "what" says nothing."""
    from wordfreq import zipf_frequency

    seen: dict[str, None] = {}
    for term in _TERM.findall(text.lower()):
        if len(term) > 1 and zipf_frequency(term, "en") < COMMON_WORD_ZIPF:
            seen.setdefault(term, None)
    return [f'"{term}"' for term in list(seen)[:MAX_QUERY_TERMS]]


class KeywordIndex:
    """What each memory said, indexed for BM25 by (NPC, player) scope."""

    def __init__(self, path: Path | None) -> None:
        # check_same_thread: the writer thread adds, request threads search; one lock.
        self._db = sqlite3.connect(
            str(path) if path is not None else ":memory:", check_same_thread=False
        )
        self._lock = threading.Lock()
        with self._lock, self._db:
            self._db.execute("PRAGMA journal_mode=WAL")
            # Derived data, rebuilt from Chroma on a mismatch: no fsync per turn.
            self._db.execute("PRAGMA synchronous=OFF")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS memory_rows "
                "(row INTEGER PRIMARY KEY, memory_id TEXT UNIQUE NOT NULL)"
            )
            # Porter stemming: "sailed" finds "sail", "trader" finds "trade".
            self._db.execute(
                "CREATE VIRTUAL TABLE IF NOT EXISTS memory_words USING fts5("
                "words, scope, tokenize='porter unicode61 remove_diacritics 2')"
            )

    def add(self, memories: Sequence[Memory]) -> None:
        with self._lock, self._db:
            self._insert(memories)

    def _insert(self, memories: Iterable[Memory]) -> None:
        for memory in memories:
            self._remove([memory.id])
            cursor = self._db.execute(
                "INSERT INTO memory_rows (memory_id) VALUES (?)", (memory.id,)
            )
            self._db.execute(
                "INSERT INTO memory_words (rowid, words, scope) VALUES (?, ?, ?)",
                (cursor.lastrowid, memory.searchable, _scope(memory)),
            )

    def delete(self, memory_ids: Sequence[str]) -> None:
        with self._lock, self._db:
            self._remove(memory_ids)

    def _remove(self, memory_ids: Sequence[str]) -> None:
        for start in range(0, len(memory_ids), 500):
            chunk = list(memory_ids[start : start + 500])
            marks = ",".join("?" * len(chunk))
            rows = [
                row
                for (row,) in self._db.execute(
                    f"SELECT row FROM memory_rows WHERE memory_id IN ({marks})", chunk
                )
            ]
            if rows:
                row_marks = ",".join("?" * len(rows))
                self._db.execute(f"DELETE FROM memory_words WHERE rowid IN ({row_marks})", rows)
                self._db.execute(f"DELETE FROM memory_rows WHERE row IN ({row_marks})", rows)

    def rebuild(self, memories: Iterable[Memory]) -> None:
        """Replace the whole index with these memories."""
        with self._lock, self._db:
            self._db.execute("DELETE FROM memory_words")
            self._db.execute("DELETE FROM memory_rows")
            self._insert(memories)

    def ids(self) -> set[str]:
        with self._lock:
            return {str(i) for (i,) in self._db.execute("SELECT memory_id FROM memory_rows")}

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM memory_rows").fetchone()[0])

    def count_of(self, npc_id: str, player_id: str) -> int:
        """How many memories of this NPC are tied to this player."""
        match = f'scope : "{_scope_word("n", npc_id)}" AND scope : "{_scope_word("p", player_id)}"'
        with self._lock:
            found = self._db.execute(
                "SELECT count(*) FROM memory_words WHERE memory_words MATCH ?", (match,)
            ).fetchone()
        return int(found[0])

    def search(
        self, npc_id: str, player_id: str | None, query: str, limit: int
    ) -> list[tuple[str, float]]:
        """(memory id, BM25 score; higher is better) of the best matches among the NPC's
        own memories and, with ``player_id``, that player's: best first."""
        terms = query_terms(query)
        if not terms or limit <= 0:
            return []
        players = f'"{OWN}"'
        if player_id is not None:
            players += f' OR "{_scope_word("p", player_id)}"'
        match = (
            f'scope : "{_scope_word("n", npc_id)}" AND scope : ({players}) '
            f"AND words : ({' OR '.join(terms)})"
        )
        with self._lock:
            found = self._db.execute(
                "SELECT memory_rows.memory_id, bm25(memory_words, 1.0, 0.0) FROM memory_words "
                "JOIN memory_rows ON memory_rows.row = memory_words.rowid "
                "WHERE memory_words MATCH ? ORDER BY bm25(memory_words, 1.0, 0.0) LIMIT ?",
                (match, limit),
            ).fetchall()
        # FTS5's bm25() is negative, more negative is better.
        return [(str(memory_id), -float(score)) for memory_id, score in found]

    def close(self) -> None:
        with self._lock:
            self._db.close()
