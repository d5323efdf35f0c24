"""The shape of a turn: what one NPC line reports (``TurnResult``), the memories a turn
makes, and the keys naming a conversation in caches and in the store."""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from npc_engine.actions import (
    ChosenAction,
)
from npc_engine.cleaning import strip_special_tokens
from npc_engine.game_state import (
    Standing,
)
from npc_engine.guard import (
    GuardCut,
)
from npc_engine.lore import ChosenLore
from npc_engine.memory.importance import rate_importance, rate_player_line
from npc_engine.memory.types import (
    PLAYER_LINE_PREFIX,
    Memory,
    ScoredMemory,
)
from npc_engine.memory.writer import StateWrite
from npc_engine.persona.model import Persona
from npc_engine.prompt import BuiltPrompt, Turn
from npc_engine.scenes import (
    Scene,
)

log = logging.getLogger(__name__)

ReplyReason = Literal["stop", "length", "cancelled", "error"]
DEFAULT_PLAYER = "player"
MAX_MEMORY_CHARS = 600
# Lines the model writes when it starts to play the player too: cut the reply there.
ROLE_STOPS = ["The player (", "\nPlayer:", "\nUser:"]
GREETING_MAX_TOKENS = 48


@dataclass
class TurnTimings:
    retrieval_ms: float = 0.0
    prompt_ms: float = 0.0
    ttft_ms: float | None = None
    generation_ms: float = 0.0
    total_ms: float = 0.0
    model_ttft_ms: float | None = None  # the model's first text, before the guard held any
    guard_ms: float = 0.0  # time spent checking the reply (key terms, meaning)
    action_ms: float = 0.0  # choosing a game action after the spoken line


@dataclass
class TurnResult:
    npc_id: str
    player_id: str
    text: str
    reason: ReplyReason
    prompt: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    memories: list[ScoredMemory] = field(default_factory=list)
    timings: TurnTimings = field(default_factory=TurnTimings)
    error: str | None = None
    used_fallback: bool = False
    # With reason "error": "unavailable" when a server the engine needs is down, else a bug.
    error_code: Literal["internal", "unavailable"] = "internal"
    dropped: dict[str, int] = field(default_factory=dict)
    memory_write: Future[list[str]] | None = None
    emotion: str | None = None
    action: dict[str, Any] | None = None
    guard: GuardCut | None = None  # why the reply was cut, if it was
    standing: Standing | None = None
    unlocked: tuple[str, ...] = ()
    game_action: ChosenAction | None = None
    # Who chose it (or chose none): the embedder by meaning, or the model on a close call.
    action_by: Literal["meaning", "model"] | None = None
    trimmed: str = ""  # what a max_tokens cut left out (an unfinished sentence)
    lore: list[ChosenLore] = field(default_factory=list)  # lorebook entries noted
    scene_turn: Turn | None = None  # in a scene: the line as a turn of the NPC's part


@dataclass(frozen=True)
class StateView:
    """A ``state`` answer: trust (when an NPC was named), flags, unlocked entries."""

    player_id: str
    flags: dict[str, Any]
    npc_id: str | None = None
    trust: int | None = None
    unlocked: tuple[str, ...] | None = None
    facts: tuple[Memory, ...] | None = None  # what the NPC knows about the player now


class Halt(threading.Event):
    """Stops a generation when the caller cancels it or the guard cut the reply."""

    def __init__(self, cancel: threading.Event | None) -> None:
        super().__init__()
        self._cancel = cancel

    def is_set(self) -> bool:
        return super().is_set() or (self._cancel is not None and self._cancel.is_set())


KEY_SEPARATOR = "\x1f"  # never in an id (ids are checked against ID_PATTERN)


def conversation_key(npc_id: str, player_id: str) -> str:
    """Names a conversation for the generator's caches (KV slots and snapshots)."""
    return f"{npc_id}{KEY_SEPARATOR}{player_id}"


def npc_of(key: str) -> str:
    return key.split(KEY_SEPARATOR, 1)[0]


def sanitize_for_memory(text: str) -> str:
    """Memories are quoted observations: no role tokens, no line breaks, bounded length."""
    clean = re.sub(r"\s+", " ", strip_special_tokens(text)).strip().replace('"', "'")
    return clean[:MAX_MEMORY_CHARS]


def player_line_memory(
    npc_id: str, player_id: str, text: str, when: datetime, game_time: float | None = None
) -> Memory:
    quoted = sanitize_for_memory(text)
    return Memory(
        npc_id=npc_id,
        player_id=player_id,
        kind="dialogue",
        text=f'{PLAYER_LINE_PREFIX}{player_id} told me: "{quoted}"',
        importance=rate_player_line(quoted),
        created_at=when,
        game_time=game_time,
        content=quoted,
    )


def reply_memory(
    npc_id: str,
    player_id: str,
    text: str,
    when: datetime,
    game_time: float | None = None,
    *,
    greeting: bool = False,
) -> Memory:
    quoted = sanitize_for_memory(text)
    said = "I greeted" if greeting else "I answered"
    return Memory(
        npc_id=npc_id,
        player_id=player_id,
        kind="dialogue",
        text=f'{said} the player {player_id}: "{quoted}"',
        importance=max(1, rate_importance(quoted) - 1),
        created_at=when,
        game_time=game_time,
        content=quoted,
    )


# Memories noted with one line of a scene: each line's notes are read anew (uncached), and
# a line answers the others more than it recalls (measured by tools/bench.py --only scene).
SCENE_MEMORIES = 2


def turn_of(
    text: str,
    result: TurnResult,
    built: BuiltPrompt,
    made: set[str],
    *,
    greeting: bool = False,
    heard: str = "",
) -> Turn:
    """The turn as the conversation window keeps it: shown exactly as it was, with the ids
    of what it showed (memories, lore) and made (``made``: its own memories)."""
    shown = {m.memory.id for m in built.memories} | made | {c.note_id for c in result.lore}
    return Turn(
        text,
        result.text,
        built.notes,
        frozenset(shown),
        built.scene,
        noted=built.noted,
        scene_shown=built.scene_shown,
        standing_shown=built.standing_shown,
        greeting=greeting,
        heard=heard,
    )


def scene_key(scene_id: str, npc_id: str) -> str:
    """The cache key of one NPC's part of a scene (its KV state between its lines)."""
    return f"scene{KEY_SEPARATOR}{scene_id}{KEY_SEPARATOR}{npc_id}"


def scene_stops(scene: Scene, npc_id: str) -> list[str]:
    """Where a model starts to speak for someone else of the scene: cut the line there."""
    stops = []
    for other in scene.npc_ids:
        if other != npc_id:
            name = scene.names[other]
            stops += [f"\n{name}:", f"{name} says:", f"\n{name.split()[0]}:"]
    return stops


def first_line_for(persona: Persona, player_id: str) -> str:
    """The written greeting a player meets the NPC with: one of ``greeting`` and the
    ``alternate_greetings``, always the same one for the same player (a stable hash, not
    Python's salted one, so it holds across restarts)."""
    lines = [line for line in [persona.greeting.strip(), *persona.alternate_greetings] if line]
    if len(lines) <= 1:
        return lines[0] if lines else ""
    digest = hashlib.sha1(f"{persona.id}\n{player_id}".encode()).digest()
    return lines[int.from_bytes(digest[:4], "big") % len(lines)]


def history_key(npc_id: str, player_id: str) -> str:
    """The store record of a conversation's history."""
    return f"history:{conversation_key(npc_id, player_id)}"


def history_write(npc_id: str, player_id: str, turns: Sequence[Turn] | None) -> StateWrite:
    """A conversation's history as a state write (None deletes it)."""
    labels = {"kind": "history", "npc_id": npc_id, "player_id": player_id}
    value = {"turns": [turn.to_record() for turn in turns]} if turns is not None else None
    return history_key(npc_id, player_id), value, labels
