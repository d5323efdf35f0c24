"""Rumours: what NPCs heard, passed on along their relationships at each world tick.

The design, chosen so a designer can predict it (no model call):

- **Who tells whom.** An NPC talks to the NPCs its persona names under ``relationships``,
  unless its attitude to one is hostile ("does not trust", "afraid of", "hates"...):
  nobody confides in those.
- **What is worth telling.** A memory made since the last tick (the first tick ever: the
  last day's) with importance at least
  ``rumours.min_importance``: something a player said (not a question), an event, or a
  rumour that has passed through fewer than ``rumours.max_hops`` tellers; never one that
  tells a guarded secret of the teller (its key terms or meaning, as the reply guard
  judges). Each NPC passes on at most ``rumours.per_npc`` per tick, the most important.
- **How it is remembered.** As heard from the teller, in the teller's words, attributed:
  ``Mara Saltwhistle said the player p1 claims: "…"``, kind ``rumour``, tied to no player
  (gossip is known to everyone the listener talks to), importance two lower than the
  teller's memory. The words are passed on verbatim: the only distortion is the chain of
  attribution and the lower weight, so what spreads is what was said.
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


def worth_telling(memory: Memory, min_importance: int, max_hops: int) -> bool:
    if memory.superseded_by is not None or memory.importance < min_importance:
        return False
    if memory.kind == "rumour":
        return memory.hops < max_hops
    if memory.kind == "event":
        return True
    said = (memory.content or memory.text).rstrip(' "')
    return memory.said_by_player and not said.endswith("?")


def reported(memory: Memory) -> str:
    """What the teller says of its memory."""
    if memory.kind == "rumour":
        return memory.text
    said = (memory.content or memory.text).replace('"', "'")
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
    return Memory(
        npc_id=listener,
        player_id=None,
        kind="rumour",
        text=f"{teller_name} said {reported(memory)}",
        importance=max(1, memory.importance - 2),
        created_at=when,
        game_time=game_time,
        content=memory.content or memory.text,
        source=memory.npc_id,
        origin=memory.origin or memory.id,
        hops=memory.hops + 1,
    )


def faded(memory: Memory, now: datetime, game_now: float | None, fade_minutes: float) -> bool:
    if game_now is not None and memory.game_time is not None:
        return game_now - memory.game_time > fade_minutes
    return (now - memory.created_at).total_seconds() / 60 > fade_minutes
