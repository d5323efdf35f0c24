"""Rumours: what NPCs heard, passed on along their relationships at each world tick.

The design, chosen so a designer can predict it (no model call):

- **Who tells whom.** An NPC talks to the NPCs its persona names under ``relationships``,
  unless its attitude to one is hostile ("does not trust", "afraid of", "hates"...):
  nobody confides in those.
- **What is worth telling.** A memory made since the last tick (the first tick ever: the
  last day's) with importance at least
  ``rumours.min_importance``: something a player said (not a question), an event, or a
  rumour that has passed through fewer than ``rumours.max_hops`` tellers; never one that
  tells a guarded secret of any NPC of the world (its key terms or meaning, as the reply
  guard judges: a player repeating Mara's secret to Tom does not make Tom spread it).
  Each NPC passes on at most ``rumours.per_npc`` per tick, the most important.
- **A player's words are untrusted** (docs/security.md). The player does not decide what
  spreads: a line that reads as instructions to the engine or asks the NPC to spread it
  ("tell everyone", "ignore your instructions", "system:") is never passed on, whatever
  importance it was rated. What is passed on is at most ``MAX_REPORTED_CHARS`` of it, on
  one line. And a rumour that carries a player's words stays with that player: it is tied
  to the player who said them (``player_id``), so a listener recalls it only when talking
  to that player, never in another player's conversation.
- **How it is remembered.** As heard from the teller, in the teller's words, attributed:
  ``Mara Saltwhistle said the player p1 claims: "…"``, kind ``rumour``, importance two
  lower than the teller's memory. News from the game (events) and from NPCs is tied to no
  player: gossip is known to everyone the listener talks to.
- **Once.** A listener hears one story once, whoever tells it (``origin``: the first
  memory it came from).
- **Fading.** A rumour older than ``rumours.fade_minutes`` of game time (wall-clock
  minutes when the game sends no game time) is forgotten at a tick.
"""

from __future__ import annotations

import re
from datetime import datetime

from npc_engine.memory.types import Memory
from npc_engine.persona.model import Persona

_HOSTILE = re.compile(
    r"\b(hates?|hated|despises?|distrusts?|(does not|doesn't|do not|never) trusts?|"
    r"not trust|afraid|fears?|enem(y|ies)|avoids?|suspects?|rivals?|loathes?)\b",
    re.IGNORECASE,
)


def confidants(persona: Persona) -> list[str]:
    """The NPCs this one passes news to: those it names, less those it is hostile to."""
    return [
        other
        for other, relation in persona.relationships.items()
        if not _HOSTILE.search(relation.attitude)
    ]


MAX_REPORTED_CHARS = 200  # of a player's words, passed on
# Words a player uses to steer the engine or the gossip itself, not news about the world.
# English only, like the importance rules (memory/importance.py).
_INSTRUCTIONS = re.compile(
    r"\b(ignore|disregard|forget|override)\b[^.!?]{0,40}\b(instructions?|rules|prompts?|"
    r"previous|above|everything|orders)\b|"
    r"\b(system|assistant|developer|admin)\s*(notice|message|prompt|override|:)|"
    r"\b(tell|warn|inform) (every(one|body)|all|the (others|whole|entire)|the town)\b|"
    r"\b(spread|pass) (the word|this|it|that)\b|\bnew instructions?\b|"
    r"\byou (must|will) (now )?(say|tell|repeat|obey)\b|<\||\[/?inst\]|^\s*#{2,}",
    re.IGNORECASE | re.MULTILINE,
)


def steers(text: str) -> bool:
    """Whether a player's line reads as instructions or a request to spread it."""
    return bool(_INSTRUCTIONS.search(text))


def worth_telling(memory: Memory, min_importance: int, max_hops: int) -> bool:
    if memory.superseded_by is not None or memory.importance < min_importance:
        return False
    if memory.kind == "rumour":
        return memory.hops < max_hops
    if memory.kind == "event":
        return True
    said = (memory.content or memory.text).rstrip(' "')
    return memory.said_by_player and not said.endswith("?") and not steers(said)


def bounded_words(text: str, limit: int = MAX_REPORTED_CHARS) -> str:
    """A player's words as they travel: one line, double quotes made single (they are
    quoted), cut at a sentence or word end within ``limit`` characters."""
    flat = " ".join(text.replace('"', "'").split())
    if len(flat) <= limit:
        return flat
    cut = flat[:limit]
    end = max(cut.rfind(". "), cut.rfind("! "), cut.rfind("? "))
    if end >= limit // 2:
        return cut[: end + 1]
    return cut.rsplit(" ", 1)[0] + " …"


def reported(memory: Memory) -> str:
    """What the teller says of its memory."""
    if memory.kind == "rumour":
        return memory.text
    said = bounded_words(memory.content or memory.text)
    if memory.said_by_player:
        return f'the player {memory.player_id} claims: "{said}"'
    return f'"{said}"'


def rumour(
    memory: Memory,
    teller_name: str,
    listener: str,
    *,
    when: datetime,
    game_time: float | None,
) -> Memory:
    """The listener's memory of hearing ``memory`` from its teller."""
    # A player's words (and rumours of them) stay with that player; news does not.
    player_id = memory.player_id if memory.said_by_player or memory.kind == "rumour" else None
    return Memory(
        npc_id=listener,
        player_id=player_id,
        kind="rumour",
        text=f"{teller_name} said {reported(memory)}",
        importance=max(1, memory.importance - 2),
        created_at=when,
        game_time=game_time,
        content=bounded_words(memory.content or memory.text),
        source=memory.npc_id,
        origin=memory.origin or memory.id,
        hops=memory.hops + 1,
    )
