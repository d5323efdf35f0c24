"""Scenes and rumours (issue 15) on the core, with the scripted generator and the in-memory
store: who speaks, what each NPC's prompt holds, what each remembers, what spreads."""

from __future__ import annotations

import itertools
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from npc_engine.dialogue import DialogueEngine
from npc_engine.errors import FieldError
from npc_engine.generation.scripted import ScriptedGenerator
from npc_engine.memory.types import Memory
from npc_engine.persona.loader import load_personas
from npc_engine.rumours import confidants, worth_telling
from npc_engine.scenes import Scene, SceneLine, addressed, closes_talk, next_speaker
from npc_engine.turns import scene_key

from .conftest import SAMPLE_PERSONAS, fake_engine

pytestmark = pytest.mark.timeout(60)
NAMES = {"mara": "Mara Saltwhistle", "guard_tom": "Tom Hale", "wren": "Old Wren"}


def engine(
    generator: ScriptedGenerator, folder: Path = SAMPLE_PERSONAS, **config: object
) -> DialogueEngine:
    built: DialogueEngine = fake_engine(generator, personas=folder, **config)
    return built


def scene_of(*lines: tuple[str, str]) -> Scene:
    scene = Scene("s", list(NAMES), dict(NAMES), player_id="p1")
    for speaker, text in lines:
        by_player = speaker == "p1"
        scene.add(SceneLine(speaker, NAMES.get(speaker, "the player"), text, by_player))
        if not by_player:
            scene.turns.setdefault(speaker, [])
    return scene


def test_next_speaker_addressed_facing_relevant_or_longest_waiting() -> None:
    assert next_speaker(scene_of()) == "mara"  # nobody spoke: the first named
    assert next_speaker(scene_of(("mara", "Tom, did you see the pier?"))) == "guard_tom"
    assert next_speaker(scene_of(("mara", "Ask old Wren about it."))) == "wren"
    # never the one who just spoke, even when named
    assert next_speaker(scene_of(("mara", "Mara knows best, says Mara."))) == "guard_tom"
    # longest waiting: never spoken first, then the earliest
    waited = scene_of(("mara", "Hm."), ("guard_tom", "Aye."))
    assert next_speaker(waited) == "wren"
    assert next_speaker(scene_of(("mara", "a"), ("wren", "b"), ("guard_tom", "c"))) == "mara"
    # a player line: named NPC first, else the one the player faced
    assert (
        next_speaker(scene_of(("mara", "x"), ("p1", "Tom, help me!")), facing="wren") == "guard_tom"
    )
    assert next_speaker(scene_of(("mara", "x"), ("p1", "What now?")), facing="mara") == "mara"
    # by meaning when nobody is named
    relevance = {"guard_tom": 0.9, "wren": 0.1}
    chosen = next_speaker(scene_of(("mara", "The watch is late.")), lambda n, _t: relevance[n])
    assert chosen == "guard_tom"
    assert addressed("Thanks, wren.", ["mara", "wren"], NAMES) == "wren"
    assert addressed("The old man said nothing.", ["wren"], NAMES) is None  # "old" is no name


def test_a_scene_ends_at_max_turns_or_by_itself_once_everyone_spoke() -> None:
    assert closes_talk("Well, good night to you both.") and not closes_talk("Good to see you.")
    scene = scene_of(("mara", "Goodbye!"))
    assert scene.over() is None  # Tom and Wren have not spoken yet
    for npc in NAMES:
        scene.turns.setdefault(npc, [])
    assert scene.over() == "ended"
    scene = Scene("s", list(NAMES), dict(NAMES), max_turns=2)
    scene.add(SceneLine("mara", "Mara Saltwhistle", "One."))
    assert scene.over() is None
    scene.add(SceneLine("guard_tom", "Tom Hale", "Two."))
    assert scene.over() == "max_turns"


def test_scene_lines_each_npc_prompt_and_memories() -> None:
    said = itertools.cycle(
        ["Tom, the pier burned again.", "Aye. Ask Wren, she saw it.", "I saw lanterns.", "Hm."]
    )
    generator = ScriptedGenerator(respond=lambda _p: next(said))
    eng = engine(generator)
    scene = eng.scenes.start(
        "pier", ["mara", "guard_tom", "wren"], player_id="p1", topic="the pier"
    )
    results = []
    while scene.over() is None and scene.spoken < 3:
        speaker = eng.scenes.next_speaker(scene)
        results.append((speaker, eng.scenes.line(scene, speaker)))
    assert [s for s, _ in results] == ["mara", "guard_tom", "wren"]
    tom_prompt = generator.prompts[1]
    assert "# You are Tom Hale" in tom_prompt
    assert 'Mara Saltwhistle says: "Tom, the pier burned again."' in tom_prompt
    assert (
        "conversation: with Mara Saltwhistle, Old Wren and the player (p1); topic: the pier"
        in tom_prompt
    )
    wren_prompt = generator.prompts[2]
    assert 'Tom Hale says: "Aye. Ask Wren, she saw it."' in wren_prompt
    # Mara's next prompt: her first one, her line, then only what she has not heard
    eng.scenes.hear_player(scene, "Mara, who set the fire?")
    mara_again = eng.scenes.line(scene, eng.scenes.next_speaker(scene, facing="guard_tom"))
    assert mara_again.npc_id == "mara"
    last = generator.prompts[-1]
    first = generator.prompts[0]
    assert last.startswith(first[: first.rindex("<|im_start|>assistant")])
    assert 'The player (p1) says: "Mara, who set the fire?"' in last
    assert last.count("the pier burned again") == 1
    eng.writer.flush()
    tom = [m.text for m in eng.store.recent("guard_tom", "p1", 10)]
    assert (
        'I told Mara Saltwhistle, Old Wren and the player (p1): "Aye. Ask Wren, she saw it."' in tom
    )
    assert any(
        t.startswith('Mara Saltwhistle told me, Old Wren and the player (p1): "Tom') for t in tom
    )
    assert any(t.startswith("The player p1 told me, Mara Saltwhistle and Old Wren") for t in tom)
    # the scene's own lines are not recalled back into the scene's notes
    assert "Things you remember" not in last.split("Mara, who set the fire?")[0][-400:]
    assert scene_key("pier", "mara") != scene_key("pier", "guard_tom")


def test_scene_without_a_player_remembers_untied_and_refuses_player_lines() -> None:
    eng = engine(ScriptedGenerator(respond=lambda _p: "Fine weather for it."))
    scene = eng.scenes.start("gate", ["guard_tom", "mara"])
    eng.scenes.line(scene, eng.scenes.next_speaker(scene))
    eng.writer.flush()
    (memory,) = eng.store.recent("mara", None, 5)
    assert memory.player_id is None and memory.text.startswith("Tom Hale told me:")
    with pytest.raises(FieldError) as refused:
        eng.scenes.hear_player(scene, "Hello?")
    assert refused.value.field == "scene_id"


@pytest.mark.parametrize(
    ("npc_ids", "field"),
    [(["mara"], "npc_ids"), (["mara", "mara"], "npc_ids"), (["mara"] * 7, "npc_ids")],
)
def test_scene_start_checks_its_npcs(npc_ids: list[str], field: str) -> None:
    eng = engine(ScriptedGenerator(["x"]))
    with pytest.raises(FieldError) as refused:
        eng.scenes.start("s", npc_ids)
    assert refused.value.field == field


def test_secrets_are_guarded_in_scenes_as_in_one_to_one_talk() -> None:
    # Mara's guarded secret: the Fog Runners' brandy in her cellar (key "brandy")
    eng = engine(ScriptedGenerator(respond=lambda _p: "Between us, the brandy sits in my cellar."))
    scene = eng.scenes.start("s", ["mara", "guard_tom"])
    result = eng.scenes.line(scene, "mara")
    assert result.guard is not None and "brandy" not in result.text
    assert "brandy" not in scene.lines[-1].text


# -- rumours ----------------------------------------------------------------------------


def world_with_a_hermit(tmp_path: Path) -> Path:
    folder = tmp_path / "personas"
    shutil.copytree(SAMPLE_PERSONAS, folder)
    (folder / "hermit.yaml").write_text(
        yaml.safe_dump(
            {"name": "Pell", "role": "Hermit of the dunes", "description": "Talks to nobody."}
        )
    )
    return folder


NEWS = "The Duke's tax cutter sank off Gull Point last night and every soul drowned!"


def test_who_tells_whom_and_what_is_worth_telling(sample_personas: Path) -> None:
    registry = load_personas(sample_personas)
    assert sorted(confidants(registry.personas["mara"].persona)) == ["guard_tom", "wren"]
    assert confidants(registry.personas["guard_tom"].persona) == ["mara"]  # afraid, suspects
    told = Memory("mara", 'The player p1 told me: "x"', importance=7, player_id="p1", content=NEWS)
    asked = Memory("mara", 'The player p1 told me: "x?"', importance=7, content="Who died?")
    assert worth_telling(told, 6, 2) and not worth_telling(asked, 6, 2)
    assert not worth_telling(Memory("mara", "I answered", importance=7), 6, 2)  # own line
    far = Memory("mara", "x", kind="rumour", importance=7, hops=2)
    assert not worth_telling(far, 6, 2)


def test_a_tick_spreads_news_along_relationships_once_and_it_fades(tmp_path: Path) -> None:
    now = [datetime(2026, 12, 6, 12, tzinfo=UTC)]
    eng = engine(
        ScriptedGenerator(respond=lambda _p: "Well I never."), world_with_a_hermit(tmp_path)
    )
    eng.clock = lambda: now[0]
    eng.say("mara", NEWS, player_id="p1", game_time=600)
    eng.writer.flush()
    now[0] += timedelta(minutes=1)
    assert eng.world_tick(game_time=660) == 2  # Tom and Wren (not Ysolde: distrusted)
    (tom,) = eng.store.rumours.rumours_of("guard_tom")
    assert (
        tom.text.startswith("Mara Saltwhistle said the player p1 claims:") and NEWS[:30] in tom.text
    )
    # a player's words stay with that player (docs/security.md)
    assert tom.source == "mara" and tom.hops == 1 and tom.player_id == "p1" and tom.importance >= 5
    assert (
        eng.store.rumours.rumours_of("hermit") == []
        and eng.store.rumours.rumours_of("ysolde") == []
    )
    now[0] += timedelta(minutes=1)
    # second hop: Tom tells Mara? she is where it began; Wren tells Mara and Tom? both know
    assert eng.world_tick(game_time=720) == 0
    assert (
        len(eng.store.rumours.rumours_of("mara")) == 0
        and len(eng.store.rumours.rumours_of("guard_tom")) == 1
    )
    # three game days later the rumour has faded (a tick moves game time a day at most)
    for day in (1, 2, 3):
        now[0] += timedelta(minutes=1)
        eng.world_tick(game_time=660 + day * 1440 + 1)
    assert eng.store.rumours.rumours_of("guard_tom") == []


def test_an_npc_does_not_gossip_its_own_secret(tmp_path: Path) -> None:
    eng = engine(ScriptedGenerator(respond=lambda _p: "Hush."), world_with_a_hermit(tmp_path))
    eng.say(
        "mara", "I know you keep the smugglers' brandy in your cellar, I swear it!", player_id="p1"
    )
    eng.writer.flush()
    assert eng.world_tick() == 0  # "brandy" gives Mara's secret away


def test_a_prepared_speaker_prompt_is_the_prefix_of_its_next_line() -> None:
    """scenes.prepare_line reads an NPC's part of the scene up to what it heard while
    another NPC speaks: its next real prompt must start with exactly that text (the heard
    lines come before the line's own notes), or the prepared KV cells would be wasted."""
    said = itertools.cycle(["The fog is thick tonight.", "Aye, thick as stew.", "Hm."])
    generator = ScriptedGenerator(respond=lambda _p: next(said))
    eng = engine(generator)
    scene = eng.scenes.start("fog", ["mara", "guard_tom", "wren"], player_id="p1", topic="fog")
    eng.scenes.line(scene, "mara")
    eng.scenes.line(scene, "guard_tom")
    assert eng.scenes.likely_next(scene, "mara", 2) == ["wren", "guard_tom"]
    eng.scenes.prepare_line(scene, "wren")  # while Mara would be speaking
    prepared = generator.prompts[-1]
    eng.scenes.line(scene, "mara")
    eng.scenes.line(scene, "wren")
    real = generator.prompts[-1]
    heard_part = prepared[: prepared.rindex("<|im_end|>")]
    assert 'Tom Hale says: "Aye, thick as stew."' in heard_part
    assert real.startswith(heard_part)
    assert "(What is happening in the game: conversation" in real[len(heard_part) :]
