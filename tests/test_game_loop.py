"""Issue 12 without a model: game time, greetings, histories kept in the store, save slots,
sentence-ended replies and declared game actions, with a scripted generator."""

from __future__ import annotations

import threading
import zlib
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from npc_engine.actions import action_grammar, offered_actions, parse_action
from npc_engine.conditions import GameFacts
from npc_engine.config import load_config
from npc_engine.dialogue import DialogueEngine
from npc_engine.errors import FieldError
from npc_engine.generation.scripted import ScriptedGenerator
from npc_engine.memory.chroma_store import ChromaMemoryStore
from npc_engine.memory.in_memory import InMemoryStore
from npc_engine.memory.types import Memory, MemoryStore, utc_now
from npc_engine.persona.loader import load_personas
from npc_engine.persona.model import GameActionSpec
from npc_engine.prompt import greeting_message
from npc_engine.sentences import SentenceTrim

from .conftest import fake_engine

DAY = 1440  # game minutes


def make_engine(
    personas: Path,
    generator: ScriptedGenerator,
    store: MemoryStore | None = None,
    **config: object,
) -> DialogueEngine:
    engine: DialogueEngine = fake_engine(generator, personas=personas, store=store, **config)
    return engine


def hashed_embed(texts: list[str]) -> list[list[float]]:
    """Deterministic unit vectors from word hashes: enough for store mechanics."""
    vectors = []
    for text in texts:
        vector = np.zeros(1024, dtype=np.float32)
        for word in text.lower().split():
            vector[zlib.crc32(word.encode()) % 1024] += 1.0
        vector /= max(float(np.linalg.norm(vector)), 1e-6)
        vectors.append(vector.tolist())
    return vectors


# -- game time ---------------------------------------------------------------------------


def test_game_time_ranks_recency_whatever_the_wall_clock_says(sample_personas: Path) -> None:
    engine = make_engine(sample_personas, ScriptedGenerator())
    now = utc_now()
    game_now = 10 * DAY
    # Equal relevance (the same words, in another order). By the wall clock the
    # 3-game-day-old memory is the newer one (made just now), the 1-game-hour-old one a
    # month old.
    three_days = Memory(
        "mara",
        "The cellar key is lost, p1 told me.",
        player_id="p1",
        created_at=now,
        game_time=game_now - 3 * DAY,
    )
    one_hour = Memory(
        "mara",
        "p1 told me the cellar key is lost.",
        player_id="p1",
        created_at=now - timedelta(days=30),
        game_time=game_now - 60,
    )
    engine.store.add([three_days, one_hour])
    by_game = engine.recall("mara", "p1", "cellar key", 2, game_now=game_now)
    assert [m.memory.id for m in by_game] == [one_hour.id, three_days.id]
    assert by_game[0].recency > by_game[1].recency
    # Without a game clock the wall clock decides, and the order flips.
    by_wall = engine.recall("mara", "p1", "cellar key", 2)
    assert [m.memory.id for m in by_wall] == [three_days.id, one_hour.id]


def test_game_time_gives_time_of_day_and_how_long_ago(sample_personas: Path) -> None:
    generator = ScriptedGenerator(respond=lambda _p: "Aye.")
    engine = make_engine(sample_personas, generator)
    evening_day_3 = 2 * DAY + 19 * 60
    engine.store.add(
        [
            Memory(
                "mara",
                "The player p1 told me the cellar key is lost.",
                player_id="p1",
                game_time=evening_day_3 - 3 * DAY,
            )
        ]
    )
    result = engine.say("mara", "Where is the cellar key?", player_id="p1", game_time=evening_day_3)
    assert "time: evening of day 3" in result.prompt
    assert "- 3 days ago: The player p1 told me the cellar key is lost." in result.prompt
    result.memory_write.result(5)  # type: ignore[union-attr]
    # The game time is kept for the player: the next line without one uses it, and the
    # time of day, unchanged, is not repeated.
    second = engine.say("mara", "And the stew?", player_id="p1")
    assert second.prompt.count("evening of day 3") == 1
    stored = engine.store.recent("mara", "p1", 10)
    assert {m.game_time for m in stored} == {evening_day_3 - 3 * DAY, evening_day_3}


# -- greetings ---------------------------------------------------------------------------


def test_first_meeting_greets_with_the_written_line_then_from_memory(
    sample_personas: Path,
) -> None:
    generator = ScriptedGenerator(respond=lambda _p: "Back again, love? Room's still yours.")
    engine = make_engine(sample_personas, generator)
    deltas: list[str] = []
    first = engine.greet("mara", player_id="p1", on_delta=deltas.append)
    written = "Shut the door, love, you're letting the fog in. Ale or a room?"
    assert first.text == "".join(deltas) == written
    assert generator.prompts == []  # no model time
    first.memory_write.result(5)  # type: ignore[union-attr]
    # A stranger meeting her elsewhere gets the written greeting too; p1 does not.
    assert engine.greet("mara", player_id="p2").text == written
    engine.say("mara", "My name is Aria and I sell rope.", player_id="p1").memory_write.result(5)  # type: ignore[union-attr]
    later = engine.greet("mara", player_id="p1")
    assert later.text == "Back again, love? Room's still yours."
    prompt = generator.prompts[-1]
    assert prompt.rstrip().endswith(greeting_message("p1") + "<|im_end|>\n<|im_start|>assistant")
    assert "My name is Aria and I sell rope." in prompt  # what she remembers of p1


# -- histories kept in the store --------------------------------------------------------


def test_a_new_engine_continues_the_conversation_byte_for_byte(sample_personas: Path) -> None:
    store = InMemoryStore()
    replies = iter(["One room left, love.", "Five bits.", "Supper is stew."])
    first = make_engine(sample_personas, ScriptedGenerator(respond=lambda _p: next(replies)), store)
    first.greet("mara", player_id="p1")
    first.say("mara", "Any rooms?", player_id="p1", context={"weather": "fog"})
    last = first.say("mara", "How much?", player_id="p1")
    first.writer.flush()
    second = make_engine(
        sample_personas, ScriptedGenerator(respond=lambda _p: next(replies)), store
    )
    after = second.say("mara", "And supper?", player_id="p1")
    assert after.prompt.startswith(last.prompt + last.text)
    assert after.cached_tokens == 0  # (the scripted generator caches nothing: no help there)


def test_forget_and_reset_reach_histories_in_the_store(sample_personas: Path) -> None:
    store = InMemoryStore()
    engine = make_engine(sample_personas, ScriptedGenerator(respond=lambda _p: "Aye."), store)
    for player in ("p1", "p2"):
        engine.say("mara", "I am a rope maker.", player_id=player).memory_write.result(5)  # type: ignore[union-attr]
    fresh = make_engine(sample_personas, ScriptedGenerator(), store)  # nothing in its RAM
    fresh.forget("mara", player_id="p1")
    assert make_engine(sample_personas, ScriptedGenerator(), store).history("mara", "p1") == []
    assert len(make_engine(sample_personas, ScriptedGenerator(), store).history("mara", "p2")) == 1
    fresh.reset_conversation("mara", "p2")
    fresh.writer.flush()
    assert make_engine(sample_personas, ScriptedGenerator(), store).history("mara", "p2") == []


# -- saves -------------------------------------------------------------------------------


@pytest.fixture(params=["in_memory", "chroma"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> MemoryStore:
    if request.param == "in_memory":
        return InMemoryStore()
    return ChromaMemoryStore(tmp_path / "chroma", hashed_embed)


def test_load_undoes_what_was_remembered_forgotten_and_changed(
    sample_personas: Path, any_store: MemoryStore
) -> None:
    engine = make_engine(sample_personas, ScriptedGenerator(respond=lambda _p: "Aye."), any_store)
    fact_a = engine.add_event(["mara"], "A storm sank the herring fleet.", player_id="p1")
    engine.say("mara", "Remember the storm?", player_id="p1").memory_write.result(5)  # type: ignore[union-attr]
    engine.set_state("p1", npc_id="mara", trust=50, flags={"paid_room": True})
    [a_id] = fact_a.result(5)
    assert engine.create_save("slot1").memories == 3
    # After the save: B is remembered, A forgotten, trust and flags change, one more turn.
    engine.add_event(["mara"], "The mayor bought a golden carriage.", player_id="p1").result(5)
    engine.forget("mara", memory_ids=[a_id])
    engine.set_state("p1", npc_id="mara", trust=-20, flags={"paid_room": None, "thief": True})
    engine.say("mara", "Anything new?", player_id="p1").memory_write.result(5)  # type: ignore[union-attr]
    assert len(engine.history("mara", "p1")) == 2

    engine.load_save("slot1")
    texts = [m.text for m in engine.store.recent("mara", "p1", 50)]
    assert "A storm sank the herring fleet." in texts
    assert "The mayor bought a golden carriage." not in texts
    assert not any("Anything new?" in t for t in texts)
    state = engine.get_state("p1", "mara")
    assert (state.trust, state.flags) == (50, {"paid_room": True})
    assert [t.player_text for t in engine.history("mara", "p1")] == ["Remember the storm?"]
    recalled = engine.recall("mara", "p1", "storm herring fleet", 3)
    assert recalled and recalled[0].memory.id == a_id
    # Loading twice changes nothing more; the save itself stays.
    engine.load_save("slot1")
    assert len(engine.store.recent("mara", "p1", 50)) == 3
    assert [info.save_id for info in engine.list_saves()] == ["slot1"]


def test_save_ids_are_checked_and_bounded(sample_personas: Path, any_store: MemoryStore) -> None:
    engine = make_engine(sample_personas, ScriptedGenerator(), any_store)
    with pytest.raises(FieldError) as unknown:
        engine.load_save("never-made")
    assert unknown.value.field == "save_id"
    with pytest.raises(FieldError):
        engine.create_save("../etc/passwd")
    assert engine.delete_save("never-made") is False


def test_chroma_archive_keeps_only_what_saves_name(tmp_path: Path) -> None:
    store = ChromaMemoryStore(tmp_path / "chroma", hashed_embed)
    kept = Memory("mara", "The bell rang twice.")
    store.add([kept, Memory("mara", "Gulls stole the bread.")])
    store.saves.create_save("s1")
    store.forget("mara", memory_ids=[kept.id])
    archive = store.saves._archive()
    assert archive.get(include=[])["ids"] == [kept.id]  # forgotten but named by s1
    unsaved = Memory("mara", "Fog rolled in.")
    store.add([unsaved])
    store.forget("mara", memory_ids=[unsaved.id])
    assert archive.get(include=[])["ids"] == [kept.id]  # no save names it: gone for good
    store.saves.delete_save("s1")
    assert archive.get(include=[])["ids"] == []


def test_export_import_into_another_store(tmp_path: Path) -> None:
    source = ChromaMemoryStore(tmp_path / "a", hashed_embed)
    memories = [
        Memory("mara", f"Fact number {n} about the harbour.", player_id="p1") for n in range(5)
    ]
    source.add(memories)
    source.state.save_state("trust:mara:p1", {"trust": 30})
    source.saves.create_save("slot")
    data = source.saves.export_save("slot")
    target = ChromaMemoryStore(tmp_path / "b", hashed_embed)
    assert target.saves.import_save("imported", data).memories == 5
    assert target.recent("mara", "p1", 10) == []  # waits in the archive until loaded
    target.saves.load_save("imported")
    assert sorted(m.text for m in target.recent("mara", "p1", 10)) == sorted(
        m.text for m in memories
    )
    assert target.state.load_state("trust:mara:p1") == {"trust": 30}
    hits = target.search("mara", "p1", "Fact number 3 about the harbour.", 1)
    assert hits[0].memory.text == "Fact number 3 about the harbour."
    with pytest.raises(FieldError) as bad:
        target.saves.import_save("junk", b"not a save")
    assert bad.value.field == "file"


# -- replies cut by max_tokens -----------------------------------------------------------


def test_a_reply_cut_by_max_tokens_ends_at_its_last_sentence(sample_personas: Path) -> None:
    reply = "One room left. Five bits a night. Supper is fish stew whether you like it or"
    engine = make_engine(sample_personas, ScriptedGenerator(respond=lambda _p: reply))
    deltas: list[str] = []
    result = engine.say("mara", "A room?", max_tokens=14, on_delta=deltas.append)
    assert result.reason == "length"
    assert result.text == "".join(deltas) == "One room left. Five bits a night."
    assert result.trimmed.strip().startswith("Supper is fish")
    whole = engine.say("mara", "A room?", max_tokens=40)
    assert whole.reason == "stop" and whole.text == reply  # not cut: sent whole


@pytest.mark.parametrize(
    ("pieces", "cut", "expected"),
    [
        (["Aye", ".", " And", " the", " rest", " of"], True, "Aye."),
        (["Aye", ".", " And", " the", " rest", "."], False, "Aye. And the rest."),
        (["Aye", ".", " And", " the", " rest", "."], True, "Aye. And the rest."),
        (["One", " long", " sentence", " with", " no", " end", " in", " sight"], True, None),
        (["Wh", "at"], True, "What…"),
    ],
)
def test_sentence_trim(pieces: list[str], cut: bool, expected: str | None) -> None:
    trim = SentenceTrim(max_tokens=len(pieces))
    out = "".join(trim.feed(piece, index) for index, piece in enumerate(pieces, 1))
    out += trim.finish(cut_by_length=cut)
    if expected is None:  # partly sent before the window: ends at a whole word, marked
        assert out.endswith("…") and "sigh" not in out.split()[-1].rstrip("…")
    else:
        assert out == expected


# -- game actions ------------------------------------------------------------------------

GIVE = GameActionSpec.model_validate(
    {
        "name": "give_item",
        "description": "hand something over",
        "params": {"item": ["room_key", "ale"], "count": {"min": 1, "max": 3}},
    }
)
NAME = GameActionSpec.model_validate(
    {"name": "tell_name", "description": "say a name", "params": {"name": {"max_length": 8}}}
)


def test_parse_accepts_only_declared_actions_with_valid_arguments() -> None:
    actions = [GIVE, NAME]
    assert parse_action("give_item(item=ale, count=2)", actions).args == {  # type: ignore[union-attr]
        "item": "ale",
        "count": 2,
    }
    assert parse_action('tell_name(name="Rook")', actions).args == {"name": "Rook"}  # type: ignore[union-attr]
    for bad in [
        "none",
        "give_item(item=sword, count=1)",  # not a declared word
        "give_item(item=ale, count=9)",  # out of range
        "give_item(item=ale)",  # a parameter missing
        "give_item(item=ale, count=1, extra=1)",
        'tell_name(name="Bartholomew")',  # too long
        "burn_inn()",
        "give_item(item=ale, count=1); drop table",
        "",
    ]:
        assert parse_action(bad, actions) is None, bad


def test_grammar_names_only_declared_actions() -> None:
    grammar = action_grammar([GIVE, NAME])
    assert grammar.startswith('root ::= "none" | action0 | action1')
    assert '"room_key"' in grammar and '"ale"' in grammar and "sword" not in grammar


def test_actions_offered_by_persona_world_and_condition(sample_personas: Path) -> None:
    registry = load_personas(sample_personas)
    mara = registry.get("mara")
    assert mara is not None
    stranger = {a.name for a in offered_actions(mara.persona, mara.world, GameFacts(trust=0))}
    friend = {a.name for a in offered_actions(mara.persona, mara.world, GameFacts(trust=60))}
    assert stranger == {"give_item", "refuse", "take_payment"}  # open_door needs trust 40
    assert friend == stranger | {"open_door"}


def test_reply_end_action_is_the_models_choice_only_when_valid(sample_personas: Path) -> None:
    answers = iter(["give_item(item=ale)", "give_item(item=the_crown)", "call_guard()"])
    generator = ScriptedGenerator(respond=lambda _p: "Here, love.", action=lambda _p: next(answers))
    engine = make_engine(sample_personas, generator)
    poured = engine.say("mara", "An ale, please.")
    assert poured.game_action is not None and poured.game_action.as_dict() == {
        "name": "give_item",
        "args": {"item": "ale"},
    }
    assert "give_item(item=room_key|ale|stew|map)" in generator.action_prompts[0]
    assert "open_door" not in generator.action_prompts[0]  # not offered at trust 0
    assert engine.say("mara", "The crown, now.").game_action is None  # undeclared value
    assert engine.say("mara", "Call the guard!").game_action is None  # Tom's, not hers
    # The question follows the conversation: it is never kept in the history.
    assert all("(Game:" not in t.player_text for t in engine.history("mara", "player"))


def test_no_action_question_when_nothing_declared_is_near(sample_personas: Path) -> None:
    generator = ScriptedGenerator(respond=lambda _p: "Aye.", action="give_item(item=ale)")
    engine = DialogueEngine(
        load_personas(sample_personas),
        generator,
        InMemoryStore(),
        load_config(),
        embed=hashed_embed,  # words in common make vectors near
    )
    engine.say("mara", "Lovely weather today.")
    assert generator.action_prompts == []
    # Bag-of-words vectors are not MiniLM's: a lower bar for "near", and every near line a
    # close call, so that the model is asked.
    engine.config.actions.gate, engine.config.actions.accept = 0.15, 1.0
    near = engine.say("mara", "hand something over: give item ale")
    assert len(generator.action_prompts) == 1 and near.game_action is not None
    assert near.action_by == "model"
    # On a close call the model's answer counts only when the meaning backs it: the line
    # names the room key, the model says ale.
    crossed = engine.say("mara", "hand something over: give item room key")
    assert len(generator.action_prompts) == 2 and crossed.game_action is None


def test_warm_without_a_kv_cache_reports_nothing_to_do(sample_personas: Path) -> None:
    engine = make_engine(sample_personas, ScriptedGenerator())
    assert engine.warm("mara") is False


def test_saves_while_turns_run_never_write_back_undone_turns(sample_personas: Path) -> None:
    started, release = threading.Event(), threading.Event()

    def slow(_prompt: str) -> str:
        started.set()
        release.wait(5)
        return "Late words."

    engine = make_engine(sample_personas, ScriptedGenerator(respond=slow))
    engine.create_save("empty")
    worker = threading.Thread(target=engine.say, args=("mara", "Remember me?"))
    worker.start()
    assert started.wait(5)
    engine.load_save("empty")
    release.set()
    worker.join(5)
    engine.writer.flush()
    assert engine.history("mara", "player") == []
    assert engine.store.recent("mara", "player", 10) == []


def test_a_player_remembered_under_many_newer_events_is_no_stranger(
    sample_personas: Path, tmp_path: Path
) -> None:
    generator = ScriptedGenerator(respond=lambda _p: "You again.")
    engine = make_engine(
        sample_personas, generator, ChromaMemoryStore(tmp_path / "chroma", hashed_embed)
    )
    engine.add_event(["mara"], "Aria bought rope.", player_id="aria").result(5)
    for n in range(80):  # the NPC's own memories, all newer than what it knows of Aria
        engine.add_event(["mara"], f"Ship {n} came in.").result(5)
    greeting = engine.greet("mara", player_id="aria")
    assert greeting.text == "You again."  # generated: she remembers Aria
    assert "Aria bought rope." in generator.prompts[-1]


class SlowStateStore(InMemoryStore):
    """State writes wait for ``release``: a history write stays queued meanwhile."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def save_state(
        self, key: str, value: dict[str, object], labels: dict[str, str] | None = None
    ) -> None:
        if key.startswith("history:"):
            self.release.wait(10)
        super().save_state(key, value, labels)


def test_a_conversation_evicted_before_its_write_lands_is_not_read_stale(
    sample_personas: Path,
) -> None:
    store = SlowStateStore()
    engine = make_engine(
        sample_personas,
        ScriptedGenerator(respond=lambda _p: "Aye."),
        store,
        max_conversations=1,
    )
    engine.say("mara", "First words.", player_id="p1")
    engine.say("mara", "Other words.", player_id="p2")  # p1 leaves RAM, unwritten
    assert [t.player_text for t in engine.history("mara", "p1")] == ["First words."]
    store.release.set()
    engine.writer.flush(10)
    assert [t.player_text for t in engine.history("mara", "p1")] == ["First words."]
