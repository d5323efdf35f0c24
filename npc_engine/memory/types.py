"""Memory records and the small interface every store implements."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from npc_engine.memory.saves import SaveInfo

# A player's line is stored as 'The player p1 told me: "…"' (``dialogue.player_line_memory``).
PLAYER_LINE_PREFIX = "The player "

MemoryKind = Literal["dialogue", "event", "fact", "summary", "rumour"]
MEMORY_KINDS: tuple[MemoryKind, ...] = ("dialogue", "event", "fact", "summary", "rumour")


def utc_now() -> datetime:
    return datetime.now(UTC)


def new_memory_id() -> str:
    return uuid.uuid4().hex


def faded_at(
    created_at: datetime,
    game_time: float | None,
    now: datetime,
    game_now: float | None,
    fade_minutes: float,
) -> bool:
    """Whether a rumour made then is older than ``fade_minutes``: in game time where both it
    and the tick have one, else in real time."""
    if game_now is not None and game_time is not None:
        return game_now - game_time > fade_minutes
    return (now - created_at).total_seconds() / 60 > fade_minutes


@dataclass
class Memory:
    npc_id: str
    text: str
    kind: MemoryKind = "dialogue"
    importance: int = 3
    player_id: str | None = None  # None: the NPC's own knowledge, recallable with any player
    id: str = field(default_factory=new_memory_id)
    created_at: datetime = field(default_factory=utc_now)
    last_accessed_at: datetime | None = None
    # Minutes of game time (the game's own clock) when made and when last recalled; None
    # when the game sent no game_time: recency then runs on the wall clock.
    game_time: float | None = None
    accessed_game_time: float | None = None
    # What was said, without the third-person wrapper of ``text`` ("The player p1 told me:
    # …"): what search compares a query with. None: the text itself (events, facts).
    content: str | None = None
    # Facts about a player (kind "fact"): what the fact is about ("name", "trade"), so a
    # newer fact on the same subject supersedes this one. A superseded memory is kept
    # as history (saves, memory.list) but never recalled as current.
    subject: str | None = None
    superseded_by: str | None = None
    # Rumours (kind "rumour", ``rumours.py``): the NPC that told it, the memory it started
    # from (one NPC hears one story once), and how many tellers it passed through.
    source: str | None = None
    origin: str | None = None
    hops: int = 0

    @property
    def said_by_player(self) -> bool:
        return self.kind == "dialogue" and self.text.startswith(PLAYER_LINE_PREFIX)

    @property
    def states_little(self) -> bool:
        """A question the player asked, the NPC's own reply, a summary of small talk:
        memories that tell nothing about the player, only talk around it."""
        if self.kind == "summary":
            return True
        if self.kind != "dialogue":
            return False
        # (older stores have no content: their text ends in the question's closing quote)
        return not self.said_by_player or self.searchable.rstrip(' "').endswith("?")

    @property
    def searchable(self) -> str:
        """The words a memory is found by (its vector, and keyword search)."""
        return self.content or self.text

    def __post_init__(self) -> None:
        if not 1 <= self.importance <= 10:
            raise ValueError(f"importance must be 1–10, got {self.importance}")
        if self.kind not in MEMORY_KINDS:
            raise ValueError(f"kind must be one of {', '.join(MEMORY_KINDS)}")
        if self.last_accessed_at is None:
            self.last_accessed_at = self.created_at
        if self.accessed_game_time is None:
            self.accessed_game_time = self.game_time


@dataclass
class Candidate:
    """A memory returned by a store's similarity search, before scoring."""

    memory: Memory
    relevance: float  # cosine similarity to the query, -1..1
    keyword_rank: int | None = None  # place among the keyword (BM25) matches, 0 = best


@dataclass
class ScoredMemory:
    memory: Memory
    score: float
    relevance: float
    recency: float
    importance: float
    keyword_rank: int | None = None

    def summary(self) -> dict[str, Any]:
        """The fields tools and the protocol show for a recalled memory."""
        return {
            "id": self.memory.id,
            "text": self.memory.text,
            "kind": self.memory.kind,
            "score": self.score,
            "relevance": self.relevance,
            "recency": self.recency,
            "importance": self.importance,
            "source": self.memory.source,
        }


class RumourQueries(Protocol):
    """What a world tick asks of the store: who heard what, and when."""

    def made_between(
        self, npc_id: str, since: datetime, until: datetime, min_importance: int
    ) -> Iterable[Memory]:
        """Its memories made in [since, until) of at least this importance (rumours), most
        important first, then oldest; a store may read them lazily."""
        ...

    def origins_known(self, npc_id: str, origins: Sequence[str]) -> set[str]: ...

    def rumours_of(self, npc_id: str) -> list[Memory]: ...

    def faded_rumours(
        self, npc_id: str, now: datetime, game_now: float | None, fade_minutes: float
    ) -> list[str]:
        """The ids of its rumours that faded (see ``faded_at``)."""
        ...


class StateStore(Protocol):
    """Game-state records by key: JSON objects, labelled to be found again."""

    def load_state(self, key: str) -> dict[str, Any] | None:
        """A game-state record (trust, flags), or None if never saved."""
        ...

    def save_state(
        self, key: str, value: dict[str, Any], labels: dict[str, str] | None = None
    ) -> None:
        """Replace a game-state record; durable when this returns. ``labels`` (default:
        the key's first part as ``kind``) let ``state_keys`` find records."""
        ...

    def state_keys(self, labels: dict[str, str]) -> list[str]: ...

    def delete_state(self, keys: list[str]) -> None: ...


class SaveStore(Protocol):
    """Save slots (``npc_engine/memory/saves.py``): every memory, history, trust and flag."""

    def create_save(self, save_id: str) -> SaveInfo: ...

    def load_save(self, save_id: str) -> SaveInfo: ...

    def list_saves(self) -> list[SaveInfo]: ...

    def delete_save(self, save_id: str) -> bool: ...

    def export_save(self, save_id: str) -> bytes: ...

    def import_save(self, save_id: str, data: bytes) -> SaveInfo:
        """Keep an exported save file as ``save_id``. ``data`` is untrusted (someone
        else's file): bounded when inflated, checked whole, kept whole or not at all
        (SaveError, nothing changed), and never able to change another save."""
        ...


class MemoryStore(Protocol):
    """Where memories live, searched by meaning and keywords; its ``state`` and ``saves``
    are the two other ports of the same store. Implementations: Chroma on disk or on a
    server, and an in-memory fake for tests.

    ``player_id=None`` in a query means: only the NPC's own memories (tied to no player).
    With a player id: that player's memories plus the NPC's own; never another player's.
    """

    def add(self, memories: Sequence[Memory]) -> None: ...

    def search(
        self,
        npc_id: str,
        player_id: str | None,
        query: str,
        limit: int,
        *,
        keywords: bool = True,
    ) -> list[Candidate]:
        """The ``limit`` nearest by meaning, plus (``keywords``) the ``limit`` best keyword
        matches, marked with their keyword rank; superseded memories are left out."""
        ...

    def of_player(self, npc_id: str, player_id: str) -> list[Memory]:
        """Every memory tied to this player, superseded ones too, in no set order."""
        ...

    def mark_superseded(
        self, npc_id: str, player_id: str, memory_ids: Sequence[str], by: str
    ) -> None:
        """Keep these memories of the player as history, never recalled again: ``by``
        (a newer fact) replaced them."""
        ...

    def oldest(self, npc_id: str, limit: int, kinds: Sequence[MemoryKind]) -> list[Memory]:
        """The ``limit`` oldest memories of these kinds of an NPC, all players together."""
        ...

    def recent(
        self, npc_id: str, player_id: str | None, limit: int, *, player_only: bool = False
    ) -> list[Memory]:
        """Newest first; ``player_only``: only those tied to ``player_id``."""
        ...

    def touch(
        self,
        npc_id: str,
        memory_ids: Sequence[str],
        when: datetime,
        game_time: float | None = None,
    ) -> None: ...

    def forget(
        self,
        npc_id: str,
        *,
        player_id: str | None = None,
        memory_ids: Sequence[str] | None = None,
        everything: bool = False,
    ) -> int: ...

    def count(self, npc_id: str) -> int: ...

    @property
    def rumours(self) -> RumourQueries:
        """What a world tick asks (``npc_engine/rumours.py``)."""
        ...

    @property
    def state(self) -> StateStore:
        """Game-state records (trust, flags, histories) kept beside the memories."""
        ...

    @property
    def saves(self) -> SaveStore:
        """Save slots of everything: memories, histories, trust and flags."""
        ...

    def close(self) -> None: ...
