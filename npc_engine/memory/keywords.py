"""Keyword search over memories (the BM25 half of hybrid retrieval), on SQLite FTS5.

FTS5 ships with Python's sqlite3, ranks with BM25, takes inserts and deletes one memory at
a time, and keeps its index on disk; in-memory BM25 libraries (bm25s, rank_bm25) must
rebuild their index to add a document, which a store written every turn cannot afford.
The index is derived data: Chroma stays the store of record, and ``rebuild`` remakes this
from it whenever the two disagree (a crash between the writes, a save load, a reindex).

Each row also keeps the few fields a world tick reads (when, how important, what kind, the
rumour's origin): Chroma cannot sort or index metadata, so asking it per NPC read 9
collections 5 times (about 0.3 s an NPC, most of a 100-NPC tick); here it is one indexed
query (see ``rumours.py``).
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

from npc_engine.memory.types import Memory

MAX_QUERY_TERMS = 16  # a hostile 2,000-word line must not become a 2,000-way OR
# A word in more than this share of an NPC's memories is left out of its searches: its
# BM25 weight (IDF ~0.7 at a third, 0 at a half) is a tenth of a telling word's, and its
# posting list was the whole cost of the query (12 ms at 10,000 memories, against 1).
MAX_TERM_SHARE = 1 / 3
_TERM = re.compile(r"\w+", re.UNICODE)
# Words at least this common (Zipf scale: 6 is once per thousand words, like "what",
# "have", "where") say nothing about which memory is meant; "name" (5.6) still counts.
COMMON_WORD_ZIPF = 5.9
OWN = "own"  # the scope word of an NPC's own memories (tied to no player)


def _scope_word(prefix: str, value: str) -> str:
    # Ids become one hashed word each: any id is safe in a MATCH, and no id is a prefix
    # of another's. Hex digits only, so the stemmer has no suffix to take off.
    return prefix + hashlib.sha1(value.encode("utf-8")).hexdigest()[:20]


def _player_scope(memory: Memory) -> str:
    return _scope_word("p", memory.player_id) if memory.player_id is not None else OWN


def _table(npc_id: str) -> str:
    # One full-text table per NPC: a search reads the posting lists of that NPC's memories
    # only (one table for all: 27 ms at 110,000 memories, against 3 ms). NPC ids come from
    # persona files, so the tables are as many as the personas.
    return "words_" + _scope_word("n", npc_id)


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
    """What each memory said, indexed for BM25 per NPC, by player scope."""

    SCHEMA = 3  # 1: one table for every NPC (never released); 2: no tick fields

    def __init__(self, path: Path | None) -> None:
        # check_same_thread: the writer thread adds, request threads search; one lock.
        self._db = sqlite3.connect(
            str(path) if path is not None else ":memory:", check_same_thread=False
        )
        self._lock = threading.Lock()
        self._closed = False
        self._tables: set[str] = set()
        self._sizes: dict[str, int] = {}  # memories per word table, counted once then kept
        # Per table: (its size when counted, how many of its memories hold each term). Shares
        # move slowly: recounted once the table changed by 2 %, not on every turn's write.
        self._shares: dict[str, tuple[int, dict[str, int]]] = {}
        with self._lock, self._db:
            self._db.execute("PRAGMA journal_mode=WAL")
            # Derived data, rebuilt from Chroma on a mismatch: no fsync per turn.
            self._db.execute("PRAGMA synchronous=OFF")
            if self._db.execute("PRAGMA user_version").fetchone()[0] != self.SCHEMA:
                self._drop_all()  # an older layout: empty, refilled from Chroma on open
                self._db.execute(f"PRAGMA user_version={self.SCHEMA}")
            self._create_rows()
            self._tables = self._word_tables()
            # Whether the last process to use the index closed it (``close``): then it
            # holds what Chroma holds, and a restart need not compare the two (reading
            # every collection's ids: minutes at 100 NPCs x 1,000 memories). Cleared at
            # once, so a process that dies leaves it unset.
            self.opened_clean = (
                self._db.execute("SELECT 1 FROM index_state WHERE key = 'closed'").fetchone()
                is not None
            )
            self._db.execute("DELETE FROM index_state WHERE key = 'closed'")

    def _create_rows(self) -> None:
        self._db.execute("CREATE TABLE IF NOT EXISTS index_state (key TEXT PRIMARY KEY)")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS memory_rows (row INTEGER PRIMARY KEY, "
            "memory_id TEXT UNIQUE NOT NULL, word_table TEXT, player_id TEXT, "
            "created REAL, importance INTEGER, kind TEXT, origin TEXT, game_time REAL, "
            "hops INTEGER)"
        )
        self._db.execute(
            "CREATE INDEX IF NOT EXISTS rows_by_time ON memory_rows (word_table, created)"
        )
        self._db.execute(
            "CREATE INDEX IF NOT EXISTS rows_by_origin ON memory_rows (word_table, origin) "
            "WHERE origin IS NOT NULL"
        )
        self._db.execute(
            "CREATE INDEX IF NOT EXISTS rows_by_kind ON memory_rows (word_table, kind)"
        )
        # count_of on every recall with a player: counting the word table's scope matches
        # took ~4 ms a turn, this index answers in microseconds.
        self._db.execute(
            "CREATE INDEX IF NOT EXISTS rows_by_player ON memory_rows (word_table, player_id)"
        )

    def _word_tables(self) -> set[str]:
        found = self._db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name GLOB 'words_n*' "
            "AND name NOT GLOB '*_*_*'"
        )
        return {str(name) for (name,) in found}

    def _drop_all(self) -> None:
        names = [
            str(name)
            for (name,) in self._db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND "
                "(name GLOB 'words_n*' OR name = 'memory_words') AND name NOT GLOB '*_*_*'"
            )
        ]
        for name in names:
            self._db.execute(f"DROP TABLE IF EXISTS {name}")
        self._db.execute("DROP TABLE IF EXISTS memory_rows")
        self._db.execute("DROP TABLE IF EXISTS index_state")
        self._tables = set()
        self._sizes = {}
        self._shares = {}

    def _ensure_table(self, table: str) -> None:
        if table not in self._tables:
            # Porter stemming: "sailed" finds "sail", "trader" finds "trade".
            self._db.execute(
                f"CREATE VIRTUAL TABLE IF NOT EXISTS {table} USING fts5("
                "words, scope, tokenize='porter unicode61 remove_diacritics 2')"
            )
            self._tables.add(table)

    def add(self, memories: Sequence[Memory]) -> None:
        with self._lock, self._db:
            self._insert(memories)

    def _insert(self, memories: Iterable[Memory]) -> None:
        memories = list(memories)
        self._remove([m.id for m in memories])  # re-adding a memory replaces it
        for memory in memories:
            table = _table(memory.npc_id)
            self._ensure_table(table)
            cursor = self._db.execute(
                "INSERT INTO memory_rows (memory_id, word_table, player_id, created, "
                "importance, kind, origin, game_time, hops) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    memory.id,
                    table,
                    memory.player_id,
                    memory.created_at.timestamp(),
                    memory.importance,
                    memory.kind,
                    memory.origin,
                    memory.game_time,
                    memory.hops,
                ),
            )
            self._db.execute(
                f"INSERT INTO {table} (rowid, words, scope) VALUES (?, ?, ?)",
                (cursor.lastrowid, memory.searchable, _player_scope(memory)),
            )
            if table in self._sizes:
                self._sizes[table] += 1

    def delete(self, memory_ids: Sequence[str]) -> None:
        with self._lock, self._db:
            self._remove(memory_ids)

    def _remove(self, memory_ids: Sequence[str]) -> None:
        for start in range(0, len(memory_ids), 500):
            chunk = list(memory_ids[start : start + 500])
            marks = ",".join("?" * len(chunk))
            found = self._db.execute(
                f"SELECT row, word_table FROM memory_rows WHERE memory_id IN ({marks})", chunk
            ).fetchall()
            by_table: dict[str, list[int]] = {}
            for row, table in found:
                by_table.setdefault(str(table), []).append(int(row))
            for table, rows in by_table.items():
                row_marks = ",".join("?" * len(rows))
                if table in self._tables:
                    self._db.execute(f"DELETE FROM {table} WHERE rowid IN ({row_marks})", rows)
                    self._sizes.pop(table, None)  # recounted when next needed
                self._db.execute(f"DELETE FROM memory_rows WHERE row IN ({row_marks})", rows)

    def rebuild(self, memories: Iterable[Memory]) -> None:
        """Replace the whole index with these memories."""
        with self._lock, self._db:
            self._drop_all()
            self._create_rows()
            self._insert(memories)

    def ids(self) -> set[str]:
        with self._lock:
            return {str(i) for (i,) in self._db.execute("SELECT memory_id FROM memory_rows")}

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM memory_rows").fetchone()[0])

    def count_of(self, npc_id: str, player_id: str) -> int:
        """How many memories of this NPC are tied to this player."""
        with self._lock:
            found = self._db.execute(
                "SELECT count(*) FROM memory_rows WHERE word_table = ? AND player_id = ?",
                (_table(npc_id), player_id),
            ).fetchone()
        return int(found[0])

    def search(
        self, npc_id: str, player_id: str | None, query: str, limit: int
    ) -> list[tuple[str, float]]:
        """(memory id, BM25 score; higher is better) of the best matches among the NPC's
        own memories and, with ``player_id``, that player's: best first."""
        terms = query_terms(query)
        table = _table(npc_id)
        if not terms or limit <= 0 or table not in self._tables:
            return []
        players = f'"{OWN}"'
        if player_id is not None:
            players += f' OR "{_scope_word("p", player_id)}"'
        with self._lock:
            if table not in self._sizes:
                self._sizes[table] = int(
                    self._db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                )
            most = max(1.0, self._sizes[table] * MAX_TERM_SHARE)
            terms = [term for term in terms if self._share(table, term) <= most]
            if not terms:
                return []
            match = f"scope : ({players}) AND words : ({' OR '.join(terms)})"
            found = self._db.execute(
                f"SELECT memory_rows.memory_id, bm25({table}, 1.0, 0.0) FROM {table} "
                f"JOIN memory_rows ON memory_rows.row = {table}.rowid "
                f"WHERE {table} MATCH ? ORDER BY bm25({table}, 1.0, 0.0) LIMIT ?",
                (match, limit),
            ).fetchall()
        # FTS5's bm25() is negative, more negative is better.
        return [(str(memory_id), -float(score)) for memory_id, score in found]

    # -- what a world tick reads ---------------------------------------------------------

    def made_between(
        self, npc_id: str, since: float, until: float, min_importance: int
    ) -> list[tuple[str, str | None]]:
        """(memory id, player id) of the NPC's memories made in [since, until) (timestamps)
        with at least this importance: most important first, then oldest."""
        with self._lock:
            found = self._db.execute(
                "SELECT memory_id, player_id FROM memory_rows WHERE word_table = ? "
                "AND created >= ? AND created < ? AND importance >= ? "
                "ORDER BY importance DESC, created",
                (_table(npc_id), since, until, min_importance),
            ).fetchall()
        return [(str(memory_id), player_id) for memory_id, player_id in found]

    def rumours_of(self, npc_id: str) -> list[tuple[str, float, float | None]]:
        """(memory id, created timestamp, game time) of the NPC's rumours."""
        with self._lock:
            found = self._db.execute(
                "SELECT memory_id, created, game_time FROM memory_rows "
                "WHERE word_table = ? AND kind = 'rumour'",
                (_table(npc_id),),
            ).fetchall()
        return [(str(i), float(created), game_time) for i, created, game_time in found]

    def origins_known(self, npc_id: str, origins: Sequence[str]) -> set[str]:
        """Which of these rumour origins the NPC has a memory of."""
        known: set[str] = set()
        with self._lock:
            for start in range(0, len(origins), 500):
                chunk = list(origins[start : start + 500])
                marks = ",".join("?" * len(chunk))
                known |= {
                    str(origin)
                    for (origin,) in self._db.execute(
                        f"SELECT DISTINCT origin FROM memory_rows WHERE word_table = ? "
                        f"AND origin IN ({marks})",
                        (_table(npc_id), *chunk),
                    )
                }
        return known

    def _share(self, table: str, term: str) -> int:
        """In how many memories of the table ``term`` occurs (the table's own stemming)."""
        size = self._sizes[table]
        counted_at, shares = self._shares.get(table, (size, {}))
        if abs(size - counted_at) > max(16, counted_at // 50):
            counted_at, shares = size, {}
        if term not in shares:
            if len(shares) >= 4096:  # query words are the client's: bounded
                shares.clear()
            shares[term] = int(
                self._db.execute(
                    f"SELECT count(*) FROM {table} WHERE {table} MATCH ?", (f"words : {term}",)
                ).fetchone()[0]
            )
        self._shares[table] = (counted_at, shares)
        return shares[term]

    def close(self, *, in_step: bool = False) -> None:
        """``in_step``: every memory the store holds is indexed (the store closes after its
        last write), so the next process may trust the index without comparing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if in_step:
                with self._db:
                    self._db.execute("INSERT OR IGNORE INTO index_state (key) VALUES ('closed')")
            self._db.close()
