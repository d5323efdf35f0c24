"""The persona and world schema. These models are the single source of truth: the JSON Schema
shipped for editors is generated from them (`npc-engine schema persona`)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

NPC_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$"

NonEmptyText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
NpcId = Annotated[str, StringConstraints(pattern=NPC_ID_PATTERN)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class DialogueExample(_Strict):
    """One exchange showing how the NPC talks. Shown to the model before the conversation."""

    player: NonEmptyText = Field(description="What the player says.")
    npc: NonEmptyText = Field(description="How this NPC answers, in its own voice.")


class Relationship(_Strict):
    """How this NPC feels about another NPC of the same world."""

    attitude: NonEmptyText = Field(
        description="A few words: 'trusts', 'owes money to', 'secretly loves'."
    )
    notes: str = Field("", description="Anything the NPC knows or feels about them.")


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
    greeting: str = Field("", description="First line when a player walks up.")
    knowledge: list[NonEmptyText] = Field(
        default_factory=list, description="Facts the NPC knows and may share."
    )
    secrets: list[NonEmptyText] = Field(
        default_factory=list, description="Facts the NPC knows but must never reveal."
    )
    goals: list[NonEmptyText] = Field(default_factory=list, description="What the NPC wants.")
    relationships: dict[NpcId, Relationship] = Field(
        default_factory=dict, description="Other NPCs of this world, by id."
    )
    example_dialogue: list[DialogueExample] = Field(default_factory=list)
    mood: str = Field("neutral", description="Mood at the start of a conversation.")
    fallback_lines: list[NonEmptyText] = Field(
        default_factory=lambda: ["Hm. Give me a moment, my mind wandered."],
        min_length=1,
        description="Said when generation fails or times out.",
    )
    generation: GenerationOverrides = Field(default_factory=GenerationOverrides)


class Place(_Strict):
    name: NonEmptyText
    description: str = ""


class Faction(_Strict):
    name: NonEmptyText
    description: str = ""


class World(_Strict):
    """Lore shared by every NPC whose file sits beside this ``world.yaml``."""

    name: NonEmptyText
    setting: NonEmptyText = Field(description="The world in a few sentences.")
    places: list[Place] = Field(default_factory=list)
    factions: list[Faction] = Field(default_factory=list)
    rules: list[NonEmptyText] = Field(
        default_factory=list, description="Hard rules: 'no modern technology exists'."
    )
    lore: list[NonEmptyText] = Field(default_factory=list, description="Common knowledge.")
