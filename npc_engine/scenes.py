"""Scenes: several NPCs talking among themselves, the player present or not (sans I/O).

A ``Scene`` holds what was said, in order. Each NPC speaks from its own prompt: its usual
stable head (world, persona, examples: the same cached prefix as its one-to-one talk),
then the scene as a conversation of its own: the lines it heard since it last spoke, as
one user message, and its own line as the answer. Earlier messages never change, so from
one of an NPC's lines to its next only the new lines are evaluated.

Who speaks next (``next_speaker``): an NPC addressed by name in the last line; else the
one whose persona is nearest in meaning to the last line (the embedding model, when the
engine has one); else the one who has waited longest. Never the same NPC twice in a row.
The scene ends after ``max_turns`` NPC lines, or by itself when a line takes leave
(``closes_talk``) after each NPC has spoken.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from npc_engine.cleaning import strip_special_tokens
from npc_engine.memory.importance import rate_importance, rate_player_line
from npc_engine.memory.types import PLAYER_LINE_PREFIX, Memory
from npc_engine.prompt import Turn, player_message, speaker_line

MIN_NPCS, MAX_NPCS = 2, 6
MAX_TURNS = 40  # NPC lines in one scene at most (each NPC's window holds them all)
MAX_LINE_CHARS = 600
# A line that takes leave: the talk is closing.
_FAREWELL = re.compile(
    r"\b(good ?bye|farewell|good night|see you (later|tomorrow|soon|around)|i must go|"
    r"i'll be off|i should go|"
    r"be on my way|off with you|until tomorrow|take care)\b",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class SceneLine:
    speaker: str  # an NPC id, or the player's id when ``by_player``
    name: str  # how the others call the speaker
    text: str
    by_player: bool = False


@dataclass
class Scene:
    scene_id: str
    npc_ids: list[str]
    names: dict[str, str]  # NPC id -> name
    player_id: str | None = None  # present: the player may join with say + scene_id
    topic: str = ""
    max_turns: int = 8
    lines: list[SceneLine] = field(default_factory=list)
    # Each NPC's own lines as turns of its scene conversation, and how many of the scene's
    # lines its prompt has shown.
    turns: dict[str, list[Turn]] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)
    # Ids of the memories made of this scene's lines: recalled, they would only repeat
    # what the scene itself shows.
    remembered: set[str] = field(default_factory=set)

    @property
    def spoken(self) -> int:
        """NPC lines so far."""
        return sum(1 for line in self.lines if not line.by_player)

    @property
    def last_speaker(self) -> str | None:
        for line in reversed(self.lines):
            if not line.by_player:
                return line.speaker
        return None

    def add(self, line: SceneLine) -> None:
        self.lines.append(line)

    def unheard(self, npc_id: str) -> list[SceneLine]:
        """The lines said since this NPC last spoke (or since the scene began)."""
        return self.lines[self.seen.get(npc_id, 0) :]

    def others(self, npc_id: str) -> list[str]:
        """The names of who else is in the scene, as this NPC sees them."""
        names = [self.names[other] for other in self.npc_ids if other != npc_id]
        if self.player_id is not None:
            names.append(f"the player ({self.player_id})")
        return names

    def context(self, npc_id: str) -> dict[str, str]:
        """The scene as game context for this NPC's notes (shown once: it never changes)."""
        context = {"conversation": "with " + join_names(self.others(npc_id))}
        if self.topic:
            context["topic"] = self.topic
        return context

    def heard_text(self, npc_id: str) -> str:
        """The unheard lines as this NPC's next user message: each marked as its speaker's
        words (a player's as the player's, exactly as in one-to-one talk)."""
        lines = self.unheard(npc_id)
        if not lines:  # the first line of the scene: nobody has spoken yet
            about = f" about {self.topic}" if self.topic else ""
            return f"(You start the conversation{about}. Say something to them.)"
        return "\n".join(
            player_message(line.speaker, line.text)
            if line.by_player
            else speaker_line(line.name, line.text)
            for line in lines
        )

    def query(self, npc_id: str) -> str:
        """What this NPC's memories and lore are looked up by: the last lines it heard."""
        lines = self.unheard(npc_id)[-2:]
        return " ".join(line.text for line in lines) or self.topic

    def spoke(self, npc_id: str, turn: Turn) -> None:
        """This NPC's line is in; its prompt has now shown everything so far."""
        self.turns.setdefault(npc_id, []).append(turn)
        self.seen[npc_id] = len(self.lines)

    def over(self) -> str | None:
        """Why the scene ends now (``max_turns`` or ``ended``), or None to go on."""
        if self.spoken >= self.max_turns:
            return "max_turns"
        last = self.lines[-1] if self.lines else None
        everyone_spoke = all(npc in self.turns for npc in self.npc_ids)
        if last is not None and not last.by_player and everyone_spoke and closes_talk(last.text):
            return "ended"
        return None


def join_names(names: Sequence[str]) -> str:
    if len(names) <= 1:
        return "".join(names)
    return ", ".join(names[:-1]) + " and " + names[-1]


def closes_talk(text: str) -> bool:
    return bool(_FAREWELL.search(text))


def clean_line(text: str) -> str:
    """A line as others hear it: no control tokens, one line, bounded."""
    return re.sub(r"\s+", " ", strip_special_tokens(text)).strip()[:MAX_LINE_CHARS]


def addressed(text: str, candidates: Sequence[str], names: Mapping[str, str]) -> str | None:
    """The first candidate NPC named in ``text`` (its full name, or its first or last
    word: "Tom", "Wren"), if any."""
    best: tuple[int, str] | None = None
    for npc_id in candidates:
        words = [names[npc_id], *names[npc_id].split()]
        for word in {w.strip(",.'") for w in words if len(w.strip(",.'")) >= 3}:
            if word.lower() in ("the", "old", "captain", "mara's"):
                continue
            found = re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, re.IGNORECASE)
            if found and (best is None or found.start() < best[0]):
                best = (found.start(), npc_id)
    return best[1] if best else None


def next_speaker(
    scene: Scene,
    relevance: Callable[[str, str], float] | None = None,
    *,
    facing: str | None = None,
) -> str:
    """Addressed by name in the last line, else (after a player line) the NPC the player
    faced, else nearest in meaning to the line, else the one who has waited longest; never
    whoever spoke last, unless a player line came between."""
    last = scene.lines[-1] if scene.lines else None
    last_npc = last.speaker if last is not None and not last.by_player else None
    candidates = [npc for npc in scene.npc_ids if npc != last_npc]
    if last is not None:
        named = addressed(last.text, candidates, scene.names)
        if named is not None:
            return named
        if last.by_player and facing in candidates:
            return str(facing)
        if relevance is not None:
            scores = {npc: relevance(npc, last.text) for npc in candidates}
            best = max(candidates, key=lambda npc: scores[npc])
            if scores[best] > 0:
                return best
    # who has waited longest: never spoken first, then the earliest last line
    last_spoke = {line.speaker: index for index, line in enumerate(scene.lines)}
    return min(candidates, key=lambda npc: (last_spoke.get(npc, -1), scene.npc_ids.index(npc)))


def line_memories(
    scene: Scene,
    line: SceneLine,
    *,
    when: datetime,
    game_time: float | None,
) -> list[Memory]:
    """What each NPC of the scene remembers of one line: the speaker what it said to
    whom, the others who said it to whom. Tied to the present player, if any."""
    memories = []
    quoted = line.text.replace('"', "'")
    for npc_id in scene.npc_ids:
        if line.by_player:
            text = f"{PLAYER_LINE_PREFIX}{line.speaker} told " + join_names(
                ["me", *(scene.names[o] for o in scene.npc_ids if o != npc_id)]
            )
            importance = rate_player_line(quoted)
        elif npc_id == line.speaker:
            text = "I told " + join_names(scene.others(npc_id))
            importance = max(1, rate_importance(quoted) - 1)
        else:
            audience = ["me"] + [name for name in scene.others(npc_id) if name != line.name]
            text = f"{line.name} told " + join_names(audience)
            importance = rate_importance(quoted)
        memories.append(
            Memory(
                npc_id=npc_id,
                player_id=scene.player_id,
                kind="dialogue",
                text=f'{text}: "{quoted}"',
                importance=importance,
                created_at=when,
                game_time=game_time,
                content=quoted,
            )
        )
    return memories
