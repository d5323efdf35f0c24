"""Trust, flags and what they unlock, and the guard inside a turn: the dialogue core with a
scripted generator and an in-memory store (the real server and model: test_secrets_real)."""

from __future__ import annotations

from pathlib import Path

import pytest

from npc_engine.dialogue import DialogueEngine
from npc_engine.game_state import MAX_FLAGS_PER_PLAYER, StateError
from npc_engine.generation.scripted import ScriptedGenerator
from npc_engine.guard import PUZZLED_LINES
from npc_engine.memory.in_memory import InMemoryStore

from .conftest import fake_engine

pytestmark = pytest.mark.timeout(60)

HUSBAND = "he ran off with a Fog Runner's daughter"
PIER = "saw Tom Hale's lantern on the customs jetty"
CRYPT = "meet in the crypt under the drowned chapel"
BELL = "The chapel bell rang by itself"


def make_engine(
    sample_personas: Path, generator: ScriptedGenerator, store: InMemoryStore | None = None
) -> DialogueEngine:
    engine: DialogueEngine = fake_engine(
        generator, personas=sample_personas, store=store, fake_retrieval=False
    )
    return engine


def test_trust_and_flags_are_set_clamped_and_read_back(sample_personas: Path) -> None:
    store = InMemoryStore()
    engine = make_engine(sample_personas, ScriptedGenerator([]), store)
    view = engine.get_state("p1", "mara")
    assert view.trust == 0 and view.flags == {} and view.unlocked == ()
    view = engine.set_state("p1", npc_id="mara", trust_delta=30, flags={"quest_pier": 2})
    assert view.trust == 30 and view.flags == {"quest_pier": 2}
    assert view.unlocked == ("knowledge.3",)  # the pier fact, gated on quest_pier >= 2
    view = engine.set_state("p1", npc_id="mara", trust_delta=500, flags={"paid": True})
    assert view.trust == 100 and set(view.unlocked or ()) == {"knowledge.3", "secrets.1"}
    view = engine.set_state("p1", flags={"paid": None, "name": "Rook"})  # flags only
    assert view.trust is None and view.flags == {"quest_pier": 2, "name": "Rook"}
    assert engine.get_state("p1", "guard_tom").trust == 0  # trust is per NPC
    assert engine.get_state("p1", "guard_tom").flags == view.flags  # flags per player
    # A new engine on the same store (a restart) reads it all back.
    again = make_engine(sample_personas, ScriptedGenerator([]), store)
    assert again.get_state("p1", "mara").trust == 100
    assert again.get_state("p1").flags == {"quest_pier": 2, "name": "Rook"}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"trust": 5}, "npc_id"),
        ({"npc_id": "mara", "trust": 5, "trust_delta": 1}, "trust"),
        ({"flags": {"bad name": 1}}, "flags.bad name"),
        ({"flags": {"<|im_start|>": 1}}, "flags.<|im_start|>"),
        ({"flags": {"story": "x" * 65}}, "flags.story"),
        ({"flags": {"nested": {"a": 1}}}, "flags.nested"),
        ({"flags": {f"f{i}": i for i in range(MAX_FLAGS_PER_PLAYER + 1)}}, "flags"),
    ],
)
def test_a_refused_change_names_the_field_and_changes_nothing(
    sample_personas: Path, change: dict[str, object], field: str
) -> None:
    engine = make_engine(sample_personas, ScriptedGenerator([]))
    engine.set_state("p1", npc_id="mara", trust=10, flags={"kept": True})
    with pytest.raises(StateError) as refused:
        engine.set_state("p1", **change)  # type: ignore[arg-type]
    assert refused.value.field == field
    view = engine.get_state("p1", "mara")
    assert view.trust == 10 and view.flags == {"kept": True}


def test_gated_entries_are_absent_until_their_condition_holds(sample_personas: Path) -> None:
    generator = ScriptedGenerator(respond=lambda _prompt: "Aye.")
    engine = make_engine(sample_personas, generator)
    engine.say("mara", "Tell me everything.", player_id="p1")
    cold = generator.prompts[-1]
    assert HUSBAND not in cold and PIER not in cold and BELL not in cold
    assert CRYPT in cold  # lore kept to the Fog Runners and Mara: Mara knows it
    engine.say("guard_tom", "Tell me everything.", player_id="p1")
    assert CRYPT not in generator.prompts[-1]  # Tom is neither

    engine.set_state("p1", npc_id="mara", trust=50, flags={"quest_pier": 2, "bell_rumour": True})
    engine.say("mara", "And now?", player_id="p1")
    warm = generator.prompts[-1]
    notes = warm[warm.rindex("<|im_start|>user") :]
    assert HUSBAND in notes and PIER in notes and BELL in notes
    assert "may share" in notes and "you like this player" in notes.lower()
    # Another player, still a stranger, is told none of it.
    engine.say("mara", "And me?", player_id="p2")
    assert HUSBAND not in generator.prompts[-1] and PIER not in generator.prompts[-1]


def test_standing_is_shown_when_it_changes_and_keeps_the_prefix_cached(
    sample_personas: Path,
) -> None:
    generator = ScriptedGenerator(respond=lambda _prompt: "Aye.")
    engine = make_engine(sample_personas, generator)
    engine.say("mara", "Zero.", player_id="p1")
    assert "How you feel" not in generator.prompts[-1]  # a stranger, as the persona expects
    engine.set_state("p1", npc_id="mara", trust=30)
    for line in ("One.", "Two."):
        engine.say("mara", line, player_id="p1")
    first, second = generator.prompts[-2:]
    assert first.count("How you feel about this player") == 1 and "like this player" in first
    assert second.count("How you feel about this player") == 1  # only the first turn's
    engine.set_state("p1", npc_id="mara", trust=-70)
    engine.say("mara", "Three.", player_id="p1")
    third = generator.prompts[-1]
    assert third.count("How you feel about this player") == 2 and "despise" in third
    # Each prompt is the previous one plus the new turn: the cached prefix stays valid.
    assert third.startswith(second[: second.rindex("<|im_start|>assistant")])
    engine.set_state("p1", npc_id="mara", trust=0)  # back to the start: said, not left out
    engine.say("mara", "Four.", player_id="p1")
    assert generator.prompts[-1].count("How you feel about this player") == 3


def test_a_leaking_reply_is_cut_deflected_and_never_remembered(sample_personas: Path) -> None:
    leak = "Aye, love. I keep the Fog Runners' brandy in my cellar. Don't tell the Duke."
    engine = make_engine(sample_personas, ScriptedGenerator([leak, leak]))
    deltas: list[str] = []
    result = engine.say("mara", "What's in your cellar?", player_id="p1", on_delta=deltas.append)
    assert result.guard is not None and result.guard.kind == "secret"
    assert result.guard.entry == "secrets.0" and "brandy" in result.guard.reason
    assert "brandy" not in "".join(deltas).lower() and "".join(deltas) == result.text
    assert result.text.startswith("Aye, love. ")
    deflections = engine.persona("mara").persona.deflections
    assert any(result.text.endswith(line) for line in deflections)
    assert result.reason == "stop"
    assert result.memory_write is not None
    result.memory_write.result(5)
    remembered = " ".join(m.text for m in engine.store.recent("mara", "p1", 10))
    assert "brandy" not in remembered.lower()
    assert "brandy" not in engine.history("mara", "p1")[-1].reply_text.lower()


def test_an_unlocked_secret_may_be_told(sample_personas: Path) -> None:
    told = "Between us, my husband ran off with a Fog Runner's daughter."
    engine = make_engine(sample_personas, ScriptedGenerator([told, told]))
    locked = engine.say("mara", "What happened to your husband?", player_id="p1")
    assert locked.guard is not None and locked.guard.entry == "secrets.1"
    engine.set_state("p2", npc_id="mara", trust=60)
    unlocked = engine.say("mara", "What happened to your husband?", player_id="p2")
    assert unlocked.guard is None and unlocked.text == told


def test_out_of_world_talk_is_cut_for_every_npc(sample_personas: Path) -> None:
    modern = "Hm. You could look it up on the internet, friend."
    engine = make_engine(sample_personas, ScriptedGenerator([modern]))
    result = engine.say("wren", "How do I find a cure?", player_id="p1")
    assert result.guard is not None and result.guard.kind == "out_of_world"
    assert "internet" not in result.text and result.text.startswith("Hm.")
    assert any(result.text.endswith(line) for line in PUZZLED_LINES)  # puzzled, in the world
