"""Game state the engine keeps for the game: how each NPC regards each player (trust) and
the player's flags (quest stages, deeds), and what that unlocks in a persona.

Trust is per (NPC, player), -100…100, starting at the persona's ``trust``; flags are per
player and shared by every NPC; the last ``game_time`` the game sent is kept with them.
All of it is saved through the memory store (``load_state``/``save_state``), so it
survives restarts and lives wherever the memories live. Reads go through a bounded LRU.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from npc_engine.conditions import FlagValue, GameFacts
from npc_engine.errors import FieldError
from npc_engine.memory.types import MemoryStore
from npc_engine.persona.model import Persona, World

TRUST_MIN, TRUST_MAX = -100, 100
MAX_FLAGS_PER_PLAYER = 64
MAX_FLAG_TEXT = 64
FLAG_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"  # what a condition can name
_FLAG_NAME = re.compile(FLAG_NAME_PATTERN)


class StateError(FieldError):
    """A state change the engine refuses (names the field)."""


@dataclass(frozen=True)
class Standing:
    """Where one player stands with one NPC."""

    trust: int
    flags: Mapping[str, FlagValue] = field(default_factory=dict)
    game_time: float | None = None

    def facts(self) -> GameFacts:
        return GameFacts(trust=self.trust, flags=self.flags, game_time=self.game_time)


def describe_trust(trust: int) -> str:
    """Trust in the NPC's own terms: the prompt never shows a number."""
    if trust <= -60:
        return "You despise and distrust this player; you would not help them."
    if trust <= -20:
        return "You are wary of this player and keep them at arm's length."
    if trust < 20:
        return "You do not know this player well yet; you neither trust nor distrust them."
    if trust < 60:
        return "You like this player and have come to trust them."
    return "You trust this player completely; to you they are a true friend."


@dataclass(frozen=True)
class Unlocked:
    """Gated entries of one persona (and its world) whose condition holds for a player."""

    ids: tuple[str, ...]  # "knowledge.2", "secrets.0", "lore.3"
    lines: tuple[str, ...]  # their texts, for the prompt


def unlocked_entries(persona: Persona, world: World | None, facts: GameFacts) -> Unlocked:
    ids: list[str] = []
    lines: list[str] = []
    for index, fact in enumerate(persona.knowledge):
        if fact.reveal_when is not None and fact.known(facts):
            ids.append(f"knowledge.{index}")
            lines.append(fact.text)
    for index, secret in enumerate(persona.secrets):
        if secret.reveal_when is not None and secret.known(facts):
            ids.append(f"secrets.{index}")
            lines.append(secret.text)
    if world is not None:
        for index, lore in enumerate(world.lore):
            # Entries looked up per turn come in the lore notes when they hold (lore.py).
            if not lore.constant or lore.reveal_when is None:
                continue
            if lore.known_by_npc(persona.id or "", persona.factions) and lore.known(facts):
                ids.append(f"lore.{index}")
                lines.append(lore.text)
    return Unlocked(tuple(ids), tuple(lines))


def standing_notes(trust: int, unlocked: Unlocked) -> str:
    """The per-turn lines that tell the NPC where this player stands (shown when they
    change, so the conversation stays a cached prefix)."""
    lines = [f"(How you feel about this player: {describe_trust(trust)})"]
    if unlocked.lines:
        lines.append("(What you now know and may share with this player:)")
        lines += [f"- {line}" for line in unlocked.lines]
    return "\n".join(lines) + "\n"


def _check_flag(name: str, value: Any) -> None:
    if not _FLAG_NAME.fullmatch(name):
        raise StateError(f"flags.{name[:40]}", f"a flag name matches {FLAG_NAME_PATTERN}")
    if value is None or isinstance(value, bool | int):
        return
    if not isinstance(value, str) or len(value) > MAX_FLAG_TEXT:
        raise StateError(
            f"flags.{name}", f"a flag is true/false, an integer or a word (≤ {MAX_FLAG_TEXT})"
        )


class GameState:
    """Trust and flags, read through a bounded cache, written through to the store."""

    def __init__(
        self,
        store: MemoryStore,
        start_trust: Callable[[str], int],
        capacity: int = 4096,
        writing: Callable[[], AbstractContextManager[Any]] = nullcontext,
    ) -> None:
        """``writing``: held around each state write (``WorldGate.writing``: a save being
        loaded waits for it, and it waits for the load)."""
        self._store = store
        self._start_trust = start_trust
        self._capacity = capacity
        self._trust: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._players: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.RLock()
        self._writing = writing

    def _remember(self, cache: OrderedDict[Any, Any], key: Any, value: Any) -> None:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > self._capacity:
            cache.popitem(last=False)

    def _trust_of(self, npc_id: str, player_id: str) -> int:
        key = (npc_id, player_id)
        if key in self._trust:
            self._trust.move_to_end(key)
            return self._trust[key]
        record = self._store.state.load_state(f"trust:{npc_id}:{player_id}")
        trust = int(record["trust"]) if record else self._start_trust(npc_id)
        self._remember(self._trust, key, trust)
        return trust

    def _player(self, player_id: str) -> dict[str, Any]:
        if player_id in self._players:
            self._players.move_to_end(player_id)
            return self._players[player_id]
        record = self._store.state.load_state(f"player:{player_id}") or {}
        player = {"flags": dict(record.get("flags", {})), "game_time": record.get("game_time")}
        self._remember(self._players, player_id, player)
        return player

    def standing(self, npc_id: str, player_id: str) -> Standing:
        with self._lock:
            player = self._player(player_id)
            return Standing(
                self._trust_of(npc_id, player_id), dict(player["flags"]), player["game_time"]
            )

    def game_time(self, player_id: str) -> float | None:
        """The last game time this player's game sent (minutes), if any."""
        with self._lock:
            time = self._player(player_id)["game_time"]
            return float(time) if time is not None else None

    def clear(self) -> None:
        """Forget what is cached (after a save was loaded under it)."""
        with self._lock:
            self._trust.clear()
            self._players.clear()

    def flags(self, player_id: str) -> dict[str, FlagValue]:
        with self._lock:
            return dict(self._player(player_id)["flags"])

    def update(
        self,
        player_id: str,
        *,
        npc_id: str | None = None,
        trust: int | None = None,
        trust_delta: int | None = None,
        flags: Mapping[str, FlagValue | None] | None = None,
        game_time: float | None = None,
    ) -> None:
        """Apply a ``state.set``: checked whole first, so a refused change changes nothing."""
        if (trust is not None or trust_delta is not None) and npc_id is None:
            raise StateError("npc_id", "trust is per NPC: give npc_id")
        if trust is not None and trust_delta is not None:
            raise StateError("trust", "give trust or trust_delta, not both")
        for name, value in (flags or {}).items():
            _check_flag(name, value)
        with self._writing(), self._lock:
            player = self._player(player_id)
            new_flags = dict(player["flags"])
            for name, value in (flags or {}).items():
                if value is None:
                    new_flags.pop(name, None)
                else:
                    new_flags[name] = value
            if len(new_flags) > MAX_FLAGS_PER_PLAYER:
                raise StateError("flags", f"at most {MAX_FLAGS_PER_PLAYER} flags per player")
            if flags or game_time is not None:
                time = game_time if game_time is not None else player["game_time"]
                self._store.state.save_state(
                    f"player:{player_id}", {"flags": new_flags, "game_time": time}
                )
                self._remember(self._players, player_id, {"flags": new_flags, "game_time": time})
            if npc_id is not None and (trust is not None or trust_delta is not None):
                current = self._trust_of(npc_id, player_id)
                wanted = trust if trust is not None else current + (trust_delta or 0)
                clamped = max(TRUST_MIN, min(TRUST_MAX, wanted))
                self._store.state.save_state(f"trust:{npc_id}:{player_id}", {"trust": clamped})
                self._remember(self._trust, (npc_id, player_id), clamped)


class WorldGate:
    """Writers of the world (memory batches, state changes, forgets) run together; a save
    being loaded runs alone: it waits for the writes under way, and new ones wait for it.
    (A shared/exclusive lock: the standard library has none, and one class is all it takes.)
    Reads never wait here, only writes."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._writers = 0
        self._loader: int | None = None  # the thread loading a save

    @contextmanager
    def writing(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._condition:
            while self._loader is not None and self._loader != me:
                self._condition.wait()
            self._writers += 1
        try:
            yield
        finally:
            with self._condition:
                self._writers -= 1
                self._condition.notify_all()

    @contextmanager
    def loading(self) -> Iterator[None]:
        with self._condition:
            while self._loader is not None:
                self._condition.wait()
            self._loader = threading.get_ident()
            while self._writers:
                self._condition.wait()
        try:
            yield
        finally:
            with self._condition:
                self._loader = None
                self._condition.notify_all()
