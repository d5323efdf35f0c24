"""Domain to wire: the one place engine results become protocol messages."""

from __future__ import annotations

from npc_engine.lore import lore_summary
from npc_engine.memory.types import Memory
from npc_engine.persona.loader import PersonaRegistry
from npc_engine.protocol import (
    ChosenLoreItem,
    GameAction,
    MemoryItem,
    NpcInfo,
    RecalledMemory,
    ReplyEnd,
    State,
    TurnInspection,
    Usage,
)
from npc_engine.reply_stream import FinishedTurn, end_message
from npc_engine.turns import StateView, TurnResult


def memory_item(memory: Memory, score: float | None = None) -> MemoryItem:
    return MemoryItem(
        id=memory.id,
        text=memory.text,
        kind=memory.kind,
        importance=memory.importance,
        player_id=memory.player_id,
        created_at=memory.created_at.isoformat().replace("+00:00", "Z"),
        score=score,
        source=memory.source,
    )


def npc_infos(registry: PersonaRegistry) -> list[NpcInfo]:
    return [
        NpcInfo(id=npc_id, name=p.persona.name, role=p.persona.role, mood=p.persona.mood)
        for npc_id, p in sorted(registry.personas.items())
    ]


def state_message(request_id: str, view: StateView) -> State:
    return State(
        re=request_id,
        npc_id=view.npc_id,
        player_id=view.player_id,
        trust=view.trust,
        flags=view.flags,
        unlocked=list(view.unlocked) if view.unlocked is not None else None,
        facts=[memory_item(f) for f in view.facts] if view.facts is not None else None,
    )


def finished_turn(result: TurnResult, inspect: bool) -> FinishedTurn:
    """What ``reply.end`` says about a turn that ran."""
    timings = result.timings
    return FinishedTurn(
        reason=result.reason,
        guard=result.guard.kind if result.guard is not None else None,
        emotion=result.emotion,
        action=result.action,
        game_action=GameAction(**result.game_action.as_dict())
        if result.game_action is not None
        else None,
        usage=Usage(
            prompt_tokens=result.prompt_tokens,
            cached_tokens=result.cached_tokens,
            completion_tokens=result.completion_tokens,
            ttft_ms=round(timings.ttft_ms) if timings.ttft_ms is not None else None,
            total_ms=round(timings.total_ms),
        ),
        error=result.error,
        error_code=result.error_code,
        inspect=inspection(result) if inspect else None,
    )


def reply_end(result: TurnResult, request_id: str = "", *, inspect: bool = True) -> ReplyEnd:
    """A finished turn as ``reply.end`` reports it, for front ends that ran it themselves
    (``say --json``, the playtest in process): the server's mapping, no other."""
    return end_message(request_id, result.text, finished_turn(result, inspect))


def inspection(result: TurnResult) -> TurnInspection:
    return TurnInspection(
        prompt=result.prompt,
        memories=[RecalledMemory(**scored.summary()) for scored in result.memories],
        lore=[ChosenLoreItem(**item) for item in lore_summary(result.lore)],
        dropped=result.dropped,
        retrieval_ms=result.timings.retrieval_ms,
        prompt_ms=result.timings.prompt_ms,
        trust=result.standing.trust if result.standing is not None else None,
        flags=dict(result.standing.flags) if result.standing is not None else None,
        unlocked=list(result.unlocked),
        guard_entry=result.guard.entry if result.guard else None,
        guard_reason=result.guard.reason if result.guard else None,
        guard_withheld=result.guard.withheld if result.guard else None,
    )
