"""Protocol v1, sans I/O: frames in, typed requests or errors out; typed messages to frames.

No sockets here, so every rule of ``protocol-v1`` is unit-tested and fuzzed directly; the
asyncio server is a thin layer around ``ProtocolSession``. The pydantic models are the
single source of truth (``npc-engine schema protocol`` prints their JSON Schema).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import msgpack
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from npc_engine.game_state import (
    FLAG_NAME_PATTERN,
    MAX_FLAG_TEXT,
    MAX_FLAGS_PER_PLAYER,
)
from npc_engine.ids import ID_PATTERN, SAVE_ID_PATTERN, check_save_name

PROTOCOL_VERSION = "1"
SUPPORTED_PROTOCOLS = [PROTOCOL_VERSION]
DEFAULT_MAX_FRAME_BYTES = 1 << 20

ErrorCode = Literal[
    "bad_frame",
    "too_large",
    "hello_required",
    "unsupported_protocol",
    "unauthorized",
    "unknown_type",
    "invalid_request",
    "unknown_npc",
    "busy",
    "rate_limited",
    "internal",
    "shutdown",
    "deadline",
    "unavailable",
]
Encoding = Literal["json", "msgpack"]

RequestId = Annotated[str, Field(min_length=1, max_length=128)]
Text = Annotated[str, Field(min_length=1, max_length=4000)]
EntityId = Annotated[str, Field(pattern=ID_PATTERN)]
# Game context: a flat object of short values. Keys are words, values scalars or short
# lists of scalars; anything deeper is the game's business, not the prompt's.
CONTEXT_KEY_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_ .-]{0,39}$"
MAX_CONTEXT_KEYS = 16
MAX_CONTEXT_VALUE_CHARS = 200
ContextKey = Annotated[str, Field(pattern=CONTEXT_KEY_PATTERN)]
ContextScalar = Annotated[str, Field(max_length=MAX_CONTEXT_VALUE_CHARS)] | int | float | bool
ContextValue = ContextScalar | None | Annotated[list[ContextScalar], Field(max_length=16)]
Context = Annotated[dict[ContextKey, ContextValue], Field(max_length=MAX_CONTEXT_KEYS)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown fields are ignored (protocol rule)
    id: RequestId


class Hello(_Request):
    type: Literal["hello"]
    protocol: str
    client: str | None = None
    token: str | None = None


class Say(_Request):
    type: Literal["say"]
    npc_id: EntityId
    player_id: EntityId = "player"
    text: Text
    context: Context | None = None
    max_tokens: int | None = Field(None, ge=1, le=1024)
    priority: Literal["foreground", "background"] = Field(
        "foreground",
        description="Extension: `background` (NPC chatter nobody is facing) waits while any "
        "`foreground` say is queued.",
    )
    deadline_ms: int | None = Field(
        None,
        ge=1,
        le=600_000,
        description="Extension: if no token has streamed this many ms after acceptance, the "
        "persona's fallback line is sent at once (reason error, code deadline).",
    )
    game_time: GameTime | None = None
    scene_id: EntityId | None = Field(
        None,
        description="The player speaks in this running scene (its player_id must be this "
        "say's): every NPC of it hears the line, and the scene's next line answers it, "
        "streamed as this say's reply (reply.start names the NPC).",
    )
    inspect: bool = Field(
        False,
        description="Extension: reply.end carries `inspect` (the exact prompt and the recalled "
        "memories with their scores), for tools such as `npc-engine playtest --url`. Served "
        "only by a server started with --allow-inspect or to a connection that presented "
        "the server's token; otherwise the say gets error `unauthorized` (no close).",
    )


GameTime = Annotated[
    float,
    Field(
        ge=0,
        le=1e12,
        description="Minutes of game time since the game's own epoch (non-decreasing within "
        "a save); read by reveal conditions (game_time).",
    ),
]
FlagName = Annotated[str, Field(pattern=FLAG_NAME_PATTERN)]
FlagValue = bool | int | Annotated[str, Field(max_length=MAX_FLAG_TEXT)]


class StateSet(_Request):
    """Set trust (per NPC and player) and flags (per player); see protocol-v1-game."""

    type: Literal["state.set"]
    npc_id: EntityId | None = None
    player_id: EntityId
    trust: int | None = Field(None, ge=-100, le=100)
    trust_delta: int | None = Field(None, ge=-200, le=200)
    flags: Annotated[dict[FlagName, FlagValue | None], Field(max_length=MAX_FLAGS_PER_PLAYER)] = (
        Field(default_factory=dict, description="null deletes a flag.")
    )
    game_time: GameTime | None = None


class SceneStart(_Request):
    """Several NPCs talk among themselves: each line streams as reply.* frames (re: this
    request's id, with npc_id and scene_id), then one scene.end."""

    type: Literal["scene.start"]
    scene_id: EntityId
    npc_ids: Annotated[list[EntityId], Field(min_length=2, max_length=6)]
    player_id: EntityId | None = Field(
        None, description="The player is present: may join with say + scene_id."
    )
    topic: Annotated[str, Field(max_length=200)] = ""
    max_turns: int = Field(8, ge=1, le=40, description="NPC lines at most.")
    max_tokens: int | None = Field(None, ge=1, le=1024, description="Cap on each line.")
    game_time: GameTime | None = None
    inspect: bool = False


class WorldTick(_Request):
    """Background work for game time passing: rumours spread along relationships."""

    type: Literal["world.tick"]
    game_time: GameTime | None = None


class Greet(_Request):
    """The player walks up to an NPC: answered with reply.* frames exactly as a say is."""

    type: Literal["greet"]
    npc_id: EntityId
    player_id: EntityId = "player"
    context: Context | None = None
    max_tokens: int | None = Field(None, ge=1, le=1024)
    priority: Literal["foreground", "background"] = "foreground"
    deadline_ms: int | None = Field(None, ge=1, le=600_000)
    game_time: GameTime | None = None
    inspect: bool = False


class NpcWarm(_Request):
    """Prepare NPCs' stable prompt prefixes (world, persona, examples) ahead of a say."""

    type: Literal["npc.warm"]
    npc_ids: list[EntityId | Literal["*"]] = Field(min_length=1, max_length=256)


# Save ids and save file names become file names: no ":", no Windows device name, no
# trailing "." (``ids.check_save_name``, which the stores and the CLI call too).
SaveId = Annotated[str, Field(pattern=SAVE_ID_PATTERN), AfterValidator(check_save_name)]
SAVE_FILE_PATTERN = r"^[A-Za-z0-9_.@-]{1,64}\.npcsave$"


def _check_save_file(name: str) -> str:
    check_save_name(name.removesuffix(".npcsave"))
    return name


SaveFile = Annotated[str, Field(pattern=SAVE_FILE_PATTERN), AfterValidator(_check_save_file)]


class SaveCreate(_Request):
    type: Literal["save.create"]
    save_id: SaveId


class SaveLoad(_Request):
    type: Literal["save.load"]
    save_id: SaveId


class SaveList(_Request):
    type: Literal["save.list"]


class SaveDelete(_Request):
    type: Literal["save.delete"]
    save_id: SaveId


class SaveExport(_Request):
    """Extension: write a save as one file in the data directory's ``exports`` folder
    (``ok.path``), for games that keep the engine's part inside their own save files."""

    type: Literal["save.export"]
    save_id: SaveId


class SaveImport(_Request):
    """Extension: read ``file`` (a name in the ``exports`` folder, no path) as ``save_id``;
    ``save.load`` then restores it."""

    type: Literal["save.import"]
    save_id: SaveId
    file: SaveFile


class StateGet(_Request):
    type: Literal["state.get"]
    npc_id: EntityId | None = None
    player_id: EntityId


class Cancel(_Request):
    type: Literal["cancel"]
    target: str


class Event(_Request):
    type: Literal["event"]
    npc_ids: list[EntityId | Literal["*"]] = Field(min_length=1, max_length=64)
    player_id: EntityId | None = None
    text: Text
    importance: int | None = Field(None, ge=1, le=10)
    game_time: GameTime | None = None


class MemoryList(_Request):
    type: Literal["memory.list"]
    npc_id: EntityId
    player_id: EntityId | None = None
    query: Annotated[str, Field(max_length=4000)] | None = None
    limit: int = Field(10, ge=1, le=100)


class MemoryForget(_Request):
    type: Literal["memory.forget"]
    npc_id: EntityId
    player_id: EntityId | None = None
    memory_ids: Annotated[list[EntityId], Field(max_length=1000)] | None = None
    all: bool = False


class NpcList(_Request):
    type: Literal["npc.list"]


class Ping(_Request):
    type: Literal["ping"]


class Stats(_Request):
    """Extension: the server's counters (answered with ``stats.report``)."""

    type: Literal["stats"]


Request = Annotated[
    Hello
    | Say
    | Cancel
    | Event
    | MemoryList
    | MemoryForget
    | NpcList
    | Ping
    | Stats
    | StateSet
    | StateGet
    | Greet
    | NpcWarm
    | SaveCreate
    | SaveLoad
    | SaveList
    | SaveDelete
    | SaveExport
    | SaveImport
    | SceneStart
    | WorldTick,
    Field(discriminator="type"),
]
REQUEST_ADAPTER: TypeAdapter[Request] = TypeAdapter(Request)
# Every request type, read off the models so a new one cannot be forgotten here.
REQUEST_TYPES = {
    str(member.model_fields["type"].annotation.__args__[0])  # Literal["say"] -> "say"
    for member in Request.__origin__.__args__  # type: ignore[attr-defined]
}


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
    type: Literal["ok"] = "ok"
    re: str
    memory_ids: list[str] | None = None
    count: int | None = None
    save_id: str | None = None
    memories: int | None = Field(None, description="save.*: memories the save holds.")
    path: str | None = Field(None, description="save.export: the file written.")
    warmed: list[str] | None = Field(None, description="npc.warm: the NPCs prepared.")
    ms: int | None = Field(None, description="npc.warm: how long it took.")
    spread: int | None = Field(None, description="world.tick: rumours passed on.")


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


@dataclass
class Outcome:
    """What one incoming frame produced: a request to serve, or an error to send back."""

    request: Request | None = None
    error: Error | None = None
    encoding: Encoding = "json"  # the encoding of the frame (errors answer in it)
    close_code: int | None = None  # set when the connection must be closed after sending


def _error(code: ErrorCode, message: str, re: str | None, **details: Any) -> Error:
    return Error(re=re, code=code, message=message, details=details)


@dataclass
class ProtocolSession:
    """The state of one connection: handshake, encoding, request ids in flight."""

    token: str | None = None
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    hello_done: bool = False
    encoding: Encoding = "json"
    in_flight: set[str] = field(default_factory=set)

    def receive(self, frame: str | bytes) -> Outcome:
        frame_encoding: Encoding = "msgpack" if isinstance(frame, bytes) else "json"
        size = len(frame) if isinstance(frame, bytes) else len(frame.encode("utf-8"))
        if size > self.max_frame_bytes:
            return Outcome(
                error=_error(
                    "too_large",
                    f"Frame of {size} bytes exceeds the limit of {self.max_frame_bytes}.",
                    None,
                    limit=self.max_frame_bytes,
                ),
                encoding=frame_encoding,
            )
        try:
            data = self._decode(frame)
        except ValueError as exc:
            return Outcome(error=_error("bad_frame", str(exc), None), encoding=frame_encoding)
        request_id = data.get("id") if isinstance(data.get("id"), str) and data.get("id") else None
        kind = data.get("type")

        def fail(code: ErrorCode, message: str, **details: Any) -> Outcome:
            return Outcome(
                error=_error(code, message, request_id, **details), encoding=frame_encoding
            )

        if not self.hello_done and kind not in ("hello", "ping"):
            return fail("hello_required", "Send hello first.")
        if request_id is None:
            return fail("invalid_request", "Every request needs a string id.", field="id")
        if not isinstance(kind, str) or kind not in REQUEST_TYPES:
            return fail("unknown_type", f"Unknown message type {kind!r}.", type=str(kind))
        if request_id in self.in_flight:
            return fail(
                "invalid_request", f"Request id {request_id!r} is still in flight.", field="id"
            )
        try:
            request = REQUEST_ADAPTER.validate_python(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"][1:]) or "type"
            return fail("invalid_request", f"{where}: {first['msg']}", field=where)
        if isinstance(request, Hello):
            return self._hello(request, frame_encoding)
        if isinstance(request, MemoryForget) and not (
            request.player_id is not None or request.memory_ids is not None or request.all
        ):
            return fail(
                "invalid_request",
                "memory.forget needs player_id, memory_ids or all: true.",
                field="all",
            )
        return Outcome(request=request, encoding=frame_encoding)

    def _hello(self, hello: Hello, frame_encoding: Encoding) -> Outcome:
        def fail(
            code: ErrorCode, message: str, close: int | None = None, **details: Any
        ) -> Outcome:
            return Outcome(
                error=_error(code, message, hello.id, **details),
                encoding=frame_encoding,
                close_code=close,
            )

        if self.hello_done:
            return fail("invalid_request", "hello was already sent on this connection.")
        if hello.protocol not in SUPPORTED_PROTOCOLS:
            return fail(
                "unsupported_protocol",
                f"Protocol {hello.protocol!r} is not supported.",
                supported=SUPPORTED_PROTOCOLS,
            )
        if self.token is not None and hello.token != self.token:
            return fail("unauthorized", "Missing or wrong token.", close=4401)
        self.hello_done = True
        self.encoding = frame_encoding
        return Outcome(request=hello, encoding=frame_encoding)

    @staticmethod
    def _decode(frame: str | bytes) -> dict[str, Any]:
        if isinstance(frame, bytes):
            try:
                data = msgpack.unpackb(frame, raw=False, strict_map_key=False)
            except Exception as exc:
                raise ValueError(f"Binary frame is not MessagePack: {exc}") from None
        else:
            try:
                data = json.loads(frame)
            except ValueError as exc:
                raise ValueError(f"Text frame is not JSON: {exc}") from None
            except RecursionError:  # "[" * 100_000: the C decoder recurses per level
                raise ValueError("Text frame is nested too deeply.") from None
        if not isinstance(data, dict):
            raise ValueError("A frame must hold one object (a map) with a 'type'.")
        return data


def protocol_schema() -> dict[str, Any]:
    """JSON Schema of every client request and server message."""
    requests = TypeAdapter(Request).json_schema()
    messages = TypeAdapter(ServerMessage).json_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://npc-engine.dev/schemas/protocol-v1.schema.json",
        "title": "npc-engine protocol v1",
        "$defs": {**requests.pop("$defs", {}), **messages.pop("$defs", {})},
        "properties": {"request": requests, "server_message": messages},
    }
