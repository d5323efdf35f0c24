"""Protocol v1: what the server sends, and how a message becomes a frame (JSON or msgpack)."""

from __future__ import annotations

import json
from typing import Any, Literal

import msgpack
from pydantic import BaseModel, ConfigDict, Field

from npc_engine.protocol.requests import (
    PROTOCOL_VERSION,
    Encoding,
    ErrorCode,
    FlagValue,
)


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NpcInfo(_Message):
    id: str
    name: str
    role: str
    mood: str | None = Field(None, description="Extension: the persona's starting mood.")


class Welcome(_Message):
    type: Literal["welcome"] = "welcome"
    re: str
    protocol: str = PROTOCOL_VERSION
    server: str
    session: str
    capabilities: list[str]
    npcs: list[NpcInfo]


class ReplyStart(_Message):
    type: Literal["reply.start"] = "reply.start"
    re: str
    npc_id: str
    turn_id: str
    scene_id: str | None = Field(None, description="Set for a line of a scene.")


class ReplyDelta(_Message):
    type: Literal["reply.delta"] = "reply.delta"
    re: str
    seq: int
    text: str
    scene_id: str | None = None


class SceneEnd(_Message):
    type: Literal["scene.end"] = "scene.end"
    re: str
    scene_id: str
    reason: Literal["max_turns", "ended", "cancelled", "error"]
    turns: int = Field(description="NPC lines spoken.")


class ErrorInfo(_Message):
    code: ErrorCode
    message: str


class Usage(_Message):
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    ttft_ms: int | None
    total_ms: int


class RecalledMemory(_Message):
    id: str
    text: str
    kind: str
    score: float
    relevance: float
    recency: float
    importance: float
    source: str | None = Field(None, description="A rumour: the NPC it was heard from.")


class ChosenLoreItem(_Message):
    id: str = Field(description="The lore entry's id (world.3, harbour.12, or its own).")
    why: str = Field(description="key 'WORD' (a key matched), similar (by meaning), or both.")
    similarity: float
    tokens: int


class TurnInspection(_Message):
    prompt: str
    memories: list[RecalledMemory]
    lore: list[ChosenLoreItem] = Field(
        default_factory=list,
        description="Lorebook entries noted for this line (entries marked always are in the "
        "prompt's head, not here), best first, with why each was chosen.",
    )
    dropped: dict[str, int] = Field(
        default_factory=dict, description="Prompt parts left out to fit the context, by kind."
    )
    retrieval_ms: float
    prompt_ms: float
    trust: int | None = None
    flags: dict[str, FlagValue] | None = None
    unlocked: list[str] | None = None
    guard_entry: str | None = Field(
        None, description="What the guard protected: secrets.N, or the out-of-world term."
    )
    guard_reason: str | None = None
    guard_withheld: str | None = Field(None, description="The sentence that was not sent.")


class GameAction(_Message):
    name: str
    args: dict[str, str | int] = Field(default_factory=dict)


class ReplyEnd(_Message):
    type: Literal["reply.end"] = "reply.end"
    re: str
    text: str
    reason: Literal["stop", "length", "cancelled", "error"]
    guard: Literal["secret", "out_of_world"] | None = Field(
        None,
        description="Set when the reply was cut before it told a guarded secret (secret) or "
        "spoke of things outside the world (out_of_world) and ended with an in-character "
        "line; the deltas sent plus that line still make up text.",
    )
    emotion: str | None = None
    action: dict[str, Any] | None = None
    game_action: GameAction | None = Field(
        None,
        description="null, or one action the persona (or world) declares, with valid "
        "arguments: what the NPC does in the game after this line.",
    )
    usage: Usage | None = None
    error: ErrorInfo | None = None
    inspect: TurnInspection | None = None
    scene_id: str | None = None


class MemoryItem(_Message):
    id: str
    text: str
    kind: str
    importance: int
    player_id: str | None
    created_at: str
    score: float | None = None
    source: str | None = Field(
        None, description="A rumour (kind rumour): the NPC it was heard from."
    )


class State(_Message):
    type: Literal["state"] = "state"
    re: str
    npc_id: str | None = None
    player_id: str
    trust: int | None = None
    flags: dict[str, FlagValue]
    unlocked: list[str] | None = Field(
        None, description="Persona entries whose reveal condition holds now (knowledge.2…)."
    )
    facts: list[MemoryItem] | None = Field(
        None,
        description="What the NPC knows about the player now (with npc_id): the current "
        "facts the player stated (kind fact), oldest first; superseded ones are left out.",
    )


class Ok(_Message):
    """A request done. ``cancel`` gets it bare; the others below add their own fields, and
    only those (``OK_ANSWERS`` says which request gets which)."""

    type: Literal["ok"] = "ok"
    re: str


class EventWritten(Ok):
    """``event``: the memories written, on disk when this arrives."""

    memory_ids: list[str]


class MemoryForgotten(Ok):
    """``memory.forget``: how many memories were forgotten."""

    count: int


class SaveWritten(Ok):
    """``save.create``, ``save.load``, ``save.import``: the save and how many memories it
    holds."""

    save_id: str
    memories: int


class SaveDeleted(Ok):
    """``save.delete``."""

    save_id: str


class SaveExported(Ok):
    """``save.export``: the file written in the exports folder (what ``save.import``
    takes), never a path."""

    save_id: str
    path: str


class NpcsWarmed(Ok):
    """``npc.warm``: the NPCs prepared, and how long it took."""

    warmed: list[str]
    ms: int


class WorldTicked(Ok):
    """``world.tick``: rumours passed on."""

    spread: int


# Which ``ok`` answers which request: the schema publishes it, a client reads these fields.
OK_ANSWERS: dict[str, type[Ok]] = {
    "cancel": Ok,
    "event": EventWritten,
    "memory.forget": MemoryForgotten,
    "save.create": SaveWritten,
    "save.load": SaveWritten,
    "save.import": SaveWritten,
    "save.delete": SaveDeleted,
    "save.export": SaveExported,
    "npc.warm": NpcsWarmed,
    "world.tick": WorldTicked,
}


class SaveItem(_Message):
    save_id: str
    created_at: str
    memories: int


class SaveItems(_Message):
    type: Literal["save.items"] = "save.items"
    re: str
    saves: list[SaveItem]


class MemoryItems(_Message):
    type: Literal["memory.items"] = "memory.items"
    re: str
    items: list[MemoryItem]


class NpcItems(_Message):
    type: Literal["npc.items"] = "npc.items"
    re: str
    npcs: list[NpcInfo]


class Pong(_Message):
    type: Literal["pong"] = "pong"
    re: str


class StatsReport(_Message):
    """Extension: what the server holds now, and failures nobody else would see."""

    type: Literal["stats.report"] = "stats.report"
    re: str
    connections: int
    replies: int = Field(description="Accepted says not yet ended.")
    queued_generations: int
    conversations: int = Field(description="Conversations with turns held in RAM.")
    memory_write_failures: int = Field(
        description="Turns whose memories could not be stored (also logged) since start."
    )


class Error(_Message):
    type: Literal["error"] = "error"
    re: str | None = None
    code: ErrorCode
    message: str
    details: dict[str, Any] = Field(default_factory=dict)


ServerMessage = (
    Welcome
    | ReplyStart
    | ReplyDelta
    | ReplyEnd
    | Ok
    | EventWritten
    | MemoryForgotten
    | SaveWritten
    | SaveDeleted
    | SaveExported
    | NpcsWarmed
    | WorldTicked
    | SaveItems
    | MemoryItems
    | NpcItems
    | Pong
    | StatsReport
    | State
    | SceneEnd
    | Error
)


def encode(message: BaseModel, encoding: Encoding) -> str | bytes:
    data = message.model_dump(mode="json", exclude_none=isinstance(message, Error))
    if isinstance(message, Error) and message.re is None:
        data.pop("re", None)
    if encoding == "msgpack":
        packed: bytes = msgpack.packb(data, use_bin_type=True)
        return packed
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))
