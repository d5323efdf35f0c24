"""Who the NPC is, noted beside a line that asks (npc_engine/identity.py): real MiniLM for the
meaning, a scripted generator and the in-memory store for the rest (no chat model)."""

from __future__ import annotations

from pathlib import Path

import pytest

from npc_engine.config import load_config
from npc_engine.dialogue import DialogueEngine
from npc_engine.generation.scripted import ScriptedGenerator
from npc_engine.identity import SelfQuestions
from npc_engine.memory.chroma_store import OfflineMiniLM
from npc_engine.memory.in_memory import InMemoryStore
from npc_engine.model_registry import ModelCache
from npc_engine.persona.loader import load_personas

from .conftest import FAKE_STORE_RETRIEVAL

pytestmark = pytest.mark.timeout(120)

NOTE = "(You are Mara Saltwhistle, Innkeeper of the Rusty Anchor, in Saltwhistle.)"


@pytest.fixture(scope="module")
def minilm() -> OfflineMiniLM:
    return OfflineMiniLM(ModelCache(load_config().cache_dir))


def test_questions_about_the_npc_are_told_from_other_lines(minilm: OfflineMiniLM) -> None:
    asks = SelfQuestions(minilm)
    for line in ("Who might you be?", "What's your trade, then?", "Where do you live?"):
        assert asks.asked(line), line
    for line in ("Is the stew any good tonight?", "Has the fog lifted yet?", "Thanks, goodnight."):
        assert not asks.asked(line), line


def test_the_note_sits_beside_the_question_and_not_beside_a_line_about_the_player(
    sample_personas: Path, minilm: OfflineMiniLM
) -> None:
    generator = ScriptedGenerator(["Aye."])
    engine = DialogueEngine(
        load_personas(sample_personas),
        generator,
        InMemoryStore(),
        load_config(retrieval=FAKE_STORE_RETRIEVAL),
        embed=minilm,
    )
    persona = engine.persona("mara").persona
    assert NOTE == f"(You are {persona.name}, {persona.role}, in Saltwhistle.)"
    engine.say("mara", "Who are you, then?", player_id="p1")
    assert f'{NOTE}\n"Who are you, then?"' in generator.prompts[-1].replace("\r", "")
    engine.say("mara", "Is the stew any good tonight?", player_id="p1")
    assert generator.prompts[-1].count(NOTE) == 1  # the first turn's, in the history only
    engine.say("mara", "My name is Zephyrine Quillfeather.", player_id="p2")
    assert NOTE not in generator.prompts[-1]  # the player's own name, told: a fact
    engine.close()
