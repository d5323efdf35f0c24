"""The persona and world schema. These models are the single source of truth: the JSON Schema
shipped for editors is generated from them (`npc-engine schema persona`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

from npc_engine.conditions import Condition, ConditionError, GameFacts, parse_condition

NPC_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$"

NonEmptyText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
NpcId = Annotated[str, StringConstraints(pattern=NPC_ID_PATTERN)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


def _checked_condition(source: str) -> str:
    try:
        parse_condition(source)
    except ConditionError as exc:
        raise ValueError(str(exc)) from None
    return source


ConditionText = Annotated[
    str,
    AfterValidator(_checked_condition),
    Field(
        description="When the NPC knows this: comparisons over trust, flags.NAME and "
        "game_time, joined by and/or/not, e.g. 'trust >= 40 or flags.quest_pier >= 2'."
    ),
]


class GatedFact(_Strict):
    """A piece of knowledge (or of world lore) the NPC has only once its condition holds."""

    text: NonEmptyText
    reveal_when: ConditionText | None = None

    def known(self, facts: GameFacts) -> bool:
        return self.reveal_when is None or self.condition.holds(facts)

    @property
    def condition(self) -> Condition:
        assert self.reveal_when is not None
        return parse_condition(self.reveal_when)  # parsed once per source text (cached)


class Secret(GatedFact):
    """Something the NPC knows but must not say until ``reveal_when`` holds (never, without
    one). Guarded: a reply that starts to tell it is cut and deflected."""

    keys: list[NonEmptyText] = Field(
        default_factory=list,
        description="Words or phrases that give the secret away; a reply saying one is cut. "
        "Default: the secret's own distinctive words.",
    )
    guard: bool = Field(True, description="false: trust the model, do not check replies.")


def _text_or_object(value: Any) -> Any:
    """A plain string is the short form of ``{text: ...}`` (always known)."""
    return {"text": value} if isinstance(value, str) else value


FactEntry = Annotated[
    GatedFact, BeforeValidator(_text_or_object, json_schema_input_type=str | GatedFact)
]
SecretEntry = Annotated[
    Secret, BeforeValidator(_text_or_object, json_schema_input_type=str | Secret)
]


class DialogueExample(_Strict):
    """One exchange showing how the NPC talks. Shown to the model before the conversation."""

    player: NonEmptyText = Field(description="What the player says.")
    npc: NonEmptyText = Field(description="How this NPC answers, in its own voice.")


class Relationship(_Strict):
    """How this NPC feels about another NPC of the same world. A plain string is short for
    its ``attitude``."""

    attitude: NonEmptyText = Field(
        description="A few words: 'trusts', 'owes money to', 'secretly loves'."
    )
    notes: str = Field("", description="Anything the NPC knows or feels about them.")


def _short_form(field_name: str) -> Any:
    """Writers write what reads naturally: a plain string where an object has one field
    that matters (``captain_ysolde: Respects her.``) is short for ``{field_name: ...}``."""

    def expand(value: Any) -> Any:
        return {field_name: value} if isinstance(value, str) else value

    return expand


RelationshipEntry = Annotated[
    Relationship,
    BeforeValidator(_short_form("attitude"), json_schema_input_type=str | Relationship),
]


class LoraAdapter(_Strict):
    """A LoRA adapter the generation server loaded (llama-server ``--lora``), by its index."""

    id: int = Field(ge=0, le=1023, description="The adapter's index on the server.")
    scale: float = Field(1.0, ge=-4, le=4, description="How strongly it applies.")


class GenerationOverrides(_Strict):
    """Per-NPC overrides of the engine's generation settings."""

    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1, le=1024)
    repeat_penalty: float | None = Field(None, ge=0)
    stop: list[NonEmptyText] | None = Field(None, description="Extra stop strings.")


class Persona(_Strict):
    """A character, authored by a writer. One YAML file per NPC."""

    id: NpcId | None = Field(
        None, description="Stable id used by games and memory. Defaults to the file name."
    )
    name: NonEmptyText = Field(description="The name the NPC goes by.")
    role: NonEmptyText = Field(description="What the NPC does in the world: 'Innkeeper'.")
    description: NonEmptyText = Field(description="Backstory, in the third person.")
    personality: list[NonEmptyText] = Field(
        default_factory=list, description="Traits: 'gruff', 'kind to children'."
    )
    speech_style: str = Field("", description="How the NPC talks: vocabulary, rhythm, tics.")
    scenario: str = Field(
        "", description="The situation the NPC is in when players meet it (shown to the model)."
    )
    greeting: str = Field("", description="First line when a player walks up.")
    alternate_greetings: list[NonEmptyText] = Field(
        default_factory=list,
        description="Other first lines: each player meets the NPC with one of greeting and "
        "these (the same one every time for the same player).",
    )
    knowledge: list[FactEntry] = Field(
        default_factory=list,
        description="Facts the NPC knows and may share: a string, or {text, reveal_when} for "
        "a fact the NPC only knows once the condition holds.",
    )
    secrets: list[SecretEntry] = Field(
        default_factory=list,
        description="Facts the NPC knows but must not reveal: a string (never revealed), or "
        "{text, reveal_when, keys, guard}. Replies are checked and cut before they tell one.",
    )
    trust: int = Field(
        0, ge=-100, le=100, description="How much this NPC trusts a player it has just met."
    )
    factions: list[NonEmptyText] = Field(
        default_factory=list,
        description="Factions of the world this NPC belongs to (for lore with known_by).",
    )
    deflections: list[NonEmptyText] = Field(
        default_factory=list,
        description="In-voice lines that end a reply cut by a guard ('That's not for "
        "strangers' ears.'). Default: built-in ones.",
    )
    goals: list[NonEmptyText] = Field(default_factory=list, description="What the NPC wants.")
    relationships: dict[NpcId, RelationshipEntry] = Field(
        default_factory=dict,
        description="Other NPCs of this world, by id: how this NPC regards them (a string), "
        "or {attitude, notes}.",
    )
    example_dialogue: list[DialogueExample] = Field(default_factory=list)
    mood: str = Field("neutral", description="Mood at the start of a conversation.")
    fallback_lines: list[NonEmptyText] = Field(
        default_factory=lambda: ["Hm. Give me a moment, my mind wandered."],
        min_length=1,
        description="Said when generation fails or times out.",
    )
    generation: GenerationOverrides = Field(default_factory=GenerationOverrides)
    model: NonEmptyText | None = Field(
        None,
        description="With the openai generation backend: the server's model for this NPC "
        "(a bigger model for a main character; on vLLM a LoRA adapter is served under its "
        "own name). The in-process backend has one model and ignores it.",
    )
    lora: list[LoraAdapter] = Field(
        default_factory=list,
        description="With the openai backend on llama-server: adapters applied to this "
        "NPC's replies (per request; the server loads them with --lora).",
    )
    actions: GameActions = Field(
        default_factory=list,
        description="What this NPC can do in the game (besides the world's actions).",
    )
    creator_notes: str = Field("", description="Notes for other writers; never shown to the model.")
    tags: list[NonEmptyText] = Field(default_factory=list, description="For finding the NPC.")
    extensions: dict[str, Any] = Field(
        default_factory=dict,
        description="Data kept for other tools (an imported card's fields that have no "
        "persona equivalent); never shown to the model.",
    )

    def adapters(self) -> list[tuple[int, float]] | None:
        """``lora`` as (id, scale) pairs for the generator; None: none."""
        return [(adapter.id, adapter.scale) for adapter in self.lora] or None


ACTION_NAME_PATTERN = r"^[a-z][a-z0-9_]{0,39}$"
ACTION_WORD_PATTERN = r"^[A-Za-z0-9_-]{1,40}$"
ActionName = Annotated[str, StringConstraints(pattern=ACTION_NAME_PATTERN)]
ActionWord = Annotated[str, StringConstraints(pattern=ACTION_WORD_PATTERN)]


class IntegerParam(_Strict):
    """A whole number from ``min`` to ``max`` (an amount of gold, a count)."""

    min: int = Field(ge=-1_000_000, le=1_000_000)
    max: int = Field(ge=-1_000_000, le=1_000_000)

    def model_post_init(self, _context: Any) -> None:
        if self.min > self.max:
            raise ValueError("min must not exceed max")


class TextParam(_Strict):
    """A short free text (a name the NPC gives, a password)."""

    max_length: int = Field(24, ge=1, le=64)


ActionParam = (
    Annotated[list[ActionWord], Field(min_length=1, max_length=32)] | IntegerParam | TextParam
)


class ActionExample(_Strict):
    """A player line after which the NPC does the action. A plain string is short for
    ``{say: ...}``. ``args`` names the value of each list parameter this line asks for;
    numbers are read from the player's line ("five bits")."""

    say: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=300)]
    args: dict[ActionWord, ActionWord] = Field(default_factory=dict, max_length=4)


ActionExampleEntry = Annotated[
    ActionExample,
    BeforeValidator(_short_form("say"), json_schema_input_type=str | ActionExample),
]


class GameActionSpec(_Strict):
    """Something the NPC can do in the game; ``reply.end.game_action`` names it when the
    NPC does it. Parameters: a list of words (one of them), {min, max} (an integer) or
    {max_length} (a short text)."""

    name: ActionName = Field(description="The name the game receives: give_item, open_door.")
    description: NonEmptyText = Field(
        description="When the NPC does this, in a few words: 'hand the player an item'."
    )
    params: dict[ActionWord, ActionParam] = Field(default_factory=dict, max_length=4)
    when: ConditionText | None = Field(
        None, description="Offered only while this condition holds (same language as reveal_when)."
    )
    examples: list[ActionExampleEntry] = Field(
        default_factory=list,
        max_length=64,
        description="Player lines after which the NPC does this (with the list parameters' "
        "values): the engine decides by their meaning, without asking the model, when a "
        "line is near one of them.",
    )

    def model_post_init(self, _context: Any) -> None:
        for example in self.examples:
            for param, value in example.args.items():
                spec = self.params.get(param)
                if not isinstance(spec, list):
                    raise ValueError(
                        f"example {example.say!r}: {param!r} is not a list parameter of {self.name}"
                    )
                if value not in spec:
                    raise ValueError(
                        f"example {example.say!r}: {value!r} is not one of {param}: {spec}"
                    )


def _unique_actions(actions: list[GameActionSpec]) -> list[GameActionSpec]:
    names = [action.name for action in actions]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"action names must be unique: {', '.join(repeated)}")
    return actions


GameActions = Annotated[list[GameActionSpec], AfterValidator(_unique_actions), Field(max_length=32)]


class Place(_Strict):
    """A place of the world. A plain string is short for its name."""

    name: NonEmptyText
    description: str = ""


class Faction(_Strict):
    """A faction of the world. A plain string is short for its name."""

    name: NonEmptyText
    description: str = ""


PlaceEntry = Annotated[
    Place, BeforeValidator(_short_form("name"), json_schema_input_type=str | Place)
]
FactionEntry = Annotated[
    Faction, BeforeValidator(_short_form("name"), json_schema_input_type=str | Faction)
]

LORE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$"


def _checked_keys(keys: list[str]) -> list[str]:
    """A ``/regex/`` key must compile with RE2, as the turn's key scan compiles it (the error
    names it at load, not at a turn)."""
    from npc_engine.lore import regex_key  # lore imports this module

    for key in keys:
        regex_key(key)  # raises ValueError naming the key
    return keys


SecondaryLogic = Literal["and_any", "not_all", "not_any", "and_all"]


class WorldLore(GatedFact):
    """A piece of lore (a lorebook entry), known to everyone or only to some. Entries marked
    ``always`` are in every prompt of the NPCs that know them; the others are looked up per
    turn, by their keys and by meaning (see docs/lore.md)."""

    id: Annotated[str, StringConstraints(pattern=LORE_ID_PATTERN)] | None = Field(
        None,
        description="Stable name of the entry (shown by the inspector). Default: the file's "
        "name and the entry's number, e.g. 'harbour.3'.",
    )
    keys: Annotated[list[NonEmptyText], AfterValidator(_checked_keys)] = Field(
        default_factory=list,
        max_length=32,
        description="Words or phrases that bring the entry into the talk when said in the "
        "recent conversation (whole words, any case); '/regex/' for a regular expression.",
    )
    secondary_keys: Annotated[list[NonEmptyText], AfterValidator(_checked_keys)] = Field(
        default_factory=list,
        max_length=32,
        description="Optional keys that narrow a key match (SillyTavern's secondary keys), "
        "checked in the same talk as `keys`, per `secondary_logic`.",
    )
    secondary_logic: SecondaryLogic = Field(
        "and_any",
        description="With `secondary_keys`, once a key matched: and_any needs one of them "
        "said too, and_all all of them, not_any none, not_all not all.",
    )
    always: bool | None = Field(
        None,
        description="true: in every prompt (the stable head). Default: true for an entry of "
        "world.yaml without keys, false for lorebook files.",
    )
    priority: int = Field(
        0, ge=-100, le=100, description="Higher first when the lore budget is short."
    )
    known_by: list[NonEmptyText] = Field(
        default_factory=list,
        description="NPC ids or faction names that know it (empty: everyone).",
    )
    extensions: dict[str, Any] = Field(
        default_factory=dict, description="Data kept for other tools (from an imported card)."
    )

    def known_by_npc(self, npc_id: str, factions: list[str]) -> bool:
        return not self.known_by or any(k == npc_id or k in factions for k in self.known_by)

    @property
    def constant(self) -> bool:
        return bool(self.always)


WorldFact = Annotated[
    WorldLore, BeforeValidator(_text_or_object, json_schema_input_type=str | WorldLore)
]


def resolve_lore_entries(entries: list[WorldLore], stem: str, always_default: bool) -> None:
    """Every entry gets its id and a definite ``always``."""
    for index, entry in enumerate(entries):
        if entry.id is None:
            entry.id = f"{stem}.{index}"
        if entry.always is None:
            entry.always = always_default and not entry.keys


class LoreFile(_Strict):
    """A lorebook file (``lore/*.yaml`` beside ``world.yaml``): entries looked up per turn."""

    known_by: list[NonEmptyText] = Field(
        default_factory=list,
        description="NPC ids or faction names that know every entry of this file that "
        "names none itself (empty: everyone).",
    )
    entries: list[WorldFact] = Field(
        description="Lore entries: a string, or {text, keys, secondary_keys, always, "
        "priority, known_by, reveal_when, id}."
    )
    extensions: dict[str, Any] = Field(
        default_factory=dict,
        description="Data kept for other tools (an imported lorebook's own settings and "
        "disabled entries); never shown to the model.",
    )

    def resolved(self, stem: str) -> list[WorldLore]:
        for entry in self.entries:
            if not entry.known_by:
                entry.known_by = list(self.known_by)
        resolve_lore_entries(self.entries, stem, always_default=False)
        return self.entries


class World(_Strict):
    """Lore shared by every NPC whose file sits beside this ``world.yaml``."""

    name: NonEmptyText
    setting: NonEmptyText = Field(description="The world in a few sentences.")
    places: list[PlaceEntry] = Field(default_factory=list)
    factions: list[FactionEntry] = Field(default_factory=list)
    rules: list[NonEmptyText] = Field(
        default_factory=list, description="Hard rules: 'no modern technology exists'."
    )
    lore: list[WorldFact] = Field(
        default_factory=list,
        description="Common knowledge: a string, or {text, reveal_when, known_by} for lore "
        "only some NPCs know, or only once a condition holds; an entry with keys is looked "
        "up per turn like a lorebook entry (lore/*.yaml, see docs/lore.md).",
    )
    out_of_world: list[NonEmptyText] = Field(
        default_factory=list,
        description="Things that do not exist in this world ('computer', 'internet'): a "
        "reply that speaks of one is cut and answered in character.",
    )
    actions: GameActions = Field(
        default_factory=list, description="What every NPC of this world can do in the game."
    )

    @model_validator(mode="after")
    def _lore_ids(self) -> World:
        resolve_lore_entries(self.lore, "world", always_default=True)
        return self
