"""Protocol v1: what a client sends. Every request a pydantic model, every field bounded;
the ``Request`` union is what the router dispatches on."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter

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


def request_type(model: type[BaseModel]) -> str:
    """The ``type`` a request model declares: ``Literal["say"]`` -> ``"say"``."""
    return str(model.model_fields["type"].annotation.__args__[0])  # type: ignore[union-attr]


# Every request type, read off the models so a new one cannot be forgotten here.
REQUEST_TYPES = {request_type(member) for member in Request.__origin__.__args__}  # type: ignore[attr-defined]
