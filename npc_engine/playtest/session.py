"""What the playtest tool talks to: the engine in this process (``local_session.py``), or a
server over protocol v1 (``remote_session.py``), behind one ``PlaytestSession``.

Both sessions speak protocol v1 (in process through the server's own router, with no
socket), so the UI and script mode get the same view of a turn (``TurnView``) from the
``reply.end`` they ask for with ``say.inspect``: the reply, the exact prompt, the recalled
memories with their score parts, token counts and timings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

DeltaCallback = Callable[[str], None]
Progress = Callable[[str], None]


@dataclass
class NpcCard:
    id: str
    name: str
    role: str
    mood: str | None = None


@dataclass
class MemoryView:
    text: str
    kind: str
    score: float | None = None
    relevance: float | None = None
    recency: float | None = None
    importance: float | None = None
    id: str = ""
    source: str | None = None  # a rumour: the NPC it was heard from


@dataclass
class TurnView:
    npc_id: str
    player_id: str
    player_text: str
    text: str
    reason: str
    prompt: str = ""
    memories: list[MemoryView] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    ttft_ms: float | None = None
    total_ms: float = 0.0
    emotion: str | None = None
    action: dict[str, Any] | None = None
    error: str | None = None
    dropped: dict[str, int] = field(default_factory=dict)
    trust: int | None = None
    flags: dict[str, Any] = field(default_factory=dict)
    unlocked: list[str] = field(default_factory=list)
    guard: str | None = None  # secret | out_of_world: the reply was cut
    guard_entry: str | None = None
    guard_reason: str | None = None
    game_action: dict[str, Any] | None = None  # {"name", "args"}: what the NPC does
    lore: list[dict[str, Any]] = field(default_factory=list)  # {id, why, similarity, tokens}

    @property
    def tokens_per_second(self) -> float | None:
        """Decode speed: tokens after the first, over the time after the first token."""
        if self.ttft_ms is None or self.completion_tokens < 2:
            return None
        decode_ms = self.total_ms - self.ttft_ms
        return (self.completion_tokens - 1) / (decode_ms / 1000) if decode_ms > 0 else None


class PlaytestSession(Protocol):
    description: str

    async def npcs(self) -> list[NpcCard]: ...

    async def say(
        self,
        npc_id: str,
        player_id: str,
        text: str,
        *,
        context: dict[str, Any] | None = None,
        max_tokens: int | None = None,
        on_delta: DeltaCallback | None = None,
    ) -> TurnView: ...

    async def cancel(self) -> None: ...

    async def scene(
        self,
        npc_ids: list[str],
        *,
        player_id: str | None,
        topic: str,
        max_turns: int,
        max_tokens: int | None,
        on_line: Callable[[TurnView], None],
    ) -> str:
        """Run a scene; each finished line (with its speaker's prompt and memories) goes to
        ``on_line``; returns why it ended."""
        ...

    async def world_tick(self) -> int: ...

    async def event(
        self, npc_ids: list[str], text: str, player_id: str | None, importance: int | None
    ) -> list[str]: ...

    async def memories(
        self, npc_id: str, player_id: str | None, query: str | None, limit: int = 10
    ) -> list[MemoryView]: ...

    async def forget(self, npc_id: str, player_id: str) -> int: ...

    async def reset(self, npc_id: str, player_id: str) -> None: ...

    async def set_state(
        self,
        npc_id: str,
        player_id: str,
        *,
        trust: int | None = None,
        trust_delta: int | None = None,
        flags: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Change trust and flags; returns trust, flags and the unlocked entries."""
        ...

    async def tells_secret(self, npc_id: str, entry: str, text: str) -> str | None:
        """Why ``text`` tells the secret ``entry`` (None: it does not); needs the persona,
        so only the in-process session answers."""
        ...

    async def retry_text(self, npc_id: str, player_id: str) -> str | None:
        """Take the last exchange back and return the player's line to send again."""
        ...

    def reload_personas(self) -> list[str] | None:
        """Reload persona files if they changed: None when nothing changed, else problems."""
        ...

    async def close(self) -> None: ...


def persona_files_signature(folder: Path) -> tuple[tuple[str, int, int], ...]:
    """Names, sizes and modification times of the persona files: a change means reload."""
    entries = []
    for path in sorted(folder.rglob("*.y*ml")):
        try:
            stat = path.stat()
        except OSError:
            continue
        entries.append((str(path), stat.st_mtime_ns, stat.st_size))
    return tuple(entries)


def turn_from_end(npc_id: str, player_id: str, text: str, end: dict[str, Any]) -> TurnView:
    """A turn as the server reported it (``reply.end`` with ``inspect``)."""
    usage = end.get("usage") or {}
    inspect = end.get("inspect") or {}
    error = end.get("error") or {}
    return TurnView(
        npc_id=npc_id,
        player_id=player_id,
        player_text=text,
        text=end["text"],
        reason=end["reason"],
        prompt=inspect.get("prompt", ""),
        memories=[MemoryView(**m) for m in inspect.get("memories", [])],
        prompt_tokens=usage.get("prompt_tokens", 0),
        cached_tokens=usage.get("cached_tokens", 0),
        completion_tokens=usage.get("completion_tokens", 0),
        ttft_ms=usage.get("ttft_ms"),
        total_ms=usage.get("total_ms", 0),
        emotion=end.get("emotion"),
        action=end.get("action"),
        error=error.get("message"),
        dropped=inspect.get("dropped", {}),
        trust=inspect.get("trust"),
        flags=inspect.get("flags") or {},
        unlocked=inspect.get("unlocked") or [],
        lore=list(inspect.get("lore") or []),
        guard=end.get("guard"),
        guard_entry=inspect.get("guard_entry"),
        guard_reason=inspect.get("guard_reason"),
        game_action=end.get("game_action"),
    )
