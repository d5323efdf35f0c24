"""Memory correctness under hostile or unlucky conditions: ids that prefix each other, a
failing write, a forget racing a turn, cancels, and many player ids."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from npc_engine.config import load_config
from npc_engine.dialogue import DialogueEngine
from npc_engine.generation.base import GenerationParams, GenerationStats, RenderedPrompt
from npc_engine.generation.scripted import ScriptedGenerator
from npc_engine.memory.chroma_store import ChromaMemoryStore
from npc_engine.memory.in_memory import InMemoryStore
from npc_engine.memory.minilm import OfflineMiniLM
from npc_engine.memory.save_imports import PLAYER_SHARDS
from npc_engine.memory.types import Memory
from npc_engine.memory.writer import MemoryWriter
from npc_engine.model_registry import ModelCache
from npc_engine.persona.loader import load_personas

from .conftest import FAKE_STORE_RETRIEVAL

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def embed() -> OfflineMiniLM:
    return OfflineMiniLM(ModelCache(load_config().cache_dir))


@pytest.mark.slow
def test_npc_ids_that_prefix_each_other_stay_apart(tmp_path: Path, embed: OfflineMiniLM) -> None:
    store = ChromaMemoryStore(tmp_path, embed)
    for npc_id in ("guard", "guard-tom", "guard-tom-2"):
        store.add(
            [
                Memory(npc_id=npc_id, text=f"{npc_id} saw the fire."),
                Memory(npc_id=npc_id, text=f"{npc_id} met Aria.", player_id="aria"),
                Memory(npc_id=npc_id, text=f"{npc_id} met Aria-2.", player_id="aria-2"),
            ]
        )
    tom_ids = [c.memory.id for c in store.search("guard-tom", "aria", "fire", 10)]
    assert len(tom_ids) == 2
    # Ids of another NPC's memories are not this NPC's: nothing to touch or forget.
    assert store.forget("guard", memory_ids=tom_ids) == 0
    store.touch("guard", tom_ids, Memory(npc_id="x", text="x").created_at)
    assert store.forget("guard", player_id="aria") == 1  # not aria-2's, not guard-tom's
    assert store.count("guard", "aria-2") == 1
    assert store.forget("guard", everything=True) == 2
    assert store.count("guard") == 0
    assert store.count("guard-tom") == 3 and store.count("guard-tom-2") == 3
    assert {c.memory.text for c in store.search("guard-tom", "aria", "Aria", 10)} == {
        "guard-tom saw the fire.",
        "guard-tom met Aria.",
    }


@pytest.mark.slow
def test_players_share_a_fixed_number_of_collections(tmp_path: Path, embed: OfflineMiniLM) -> None:
    store = ChromaMemoryStore(tmp_path, embed)
    store.add(
        [Memory(npc_id="mara", text=f"p{i} likes fish.", player_id=f"p{i}") for i in range(60)]
    )
    per_npc = [c for c in store._client.list_collections() if not c.name.startswith("npc-engine-")]
    assert len(per_npc) <= PLAYER_SHARDS  # (besides the store's own: state, saves)
    for player in ("p0", "p17", "p59"):
        found = store.search("mara", player, "who likes fish?", 5)
        assert [c.memory.text for c in found] == [f"{player} likes fish."]
        assert [m.text for m in store.recent("mara", player, 5)] == [f"{player} likes fish."]


class FlakyStore(InMemoryStore):
    """Fails every add that contains a memory with ``poison`` in its text; an add of a
    ``wait`` memory blocks until ``gate`` opens."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.waiting = threading.Event()
        self.adds: list[int] = []

    def add(self, memories: Sequence[Memory]) -> None:
        if any(m.text == "wait" for m in memories):
            self.waiting.set()
            assert self.gate.wait(30)
        self.adds.append(len(memories))
        if any("poison" in m.text for m in memories):
            raise OSError("disk full")
        super().add(memories)


def test_a_failing_write_fails_only_its_own_request() -> None:
    store = FlakyStore()
    writer = MemoryWriter(store)
    held = writer.submit([Memory(npc_id="mara", text="wait")])  # the next three queue up
    assert store.waiting.wait(10)
    good = writer.submit([Memory(npc_id="mara", text="fine one")])
    bad = writer.submit([Memory(npc_id="mara", text="poison")])
    also_good = writer.submit([Memory(npc_id="mara", text="fine two")])
    store.gate.set()
    held.result(10)
    assert len(good.result(10)) == 1 and len(also_good.result(10)) == 1
    with pytest.raises(OSError):
        bad.result(10)
    assert store.adds[1] == 3  # they were one batch, and it failed as a whole
    assert {m.text for m in store.recent("mara", None, 10)} == {"wait", "fine one", "fine two"}
    writer.close()


def test_touches_queued_together_are_one_store_call_per_npc() -> None:
    """Each touch is a Chroma read and write: the writer merges those queued together."""
    store = FlakyStore()
    calls: list[tuple[str, list[str], datetime]] = []
    touch = store.touch
    store.touch = lambda npc, ids, when, game_time=None: (  # type: ignore[method-assign]
        calls.append((npc, list(ids), when)) or touch(npc, ids, when, game_time)
    )
    writer = MemoryWriter(store)
    [first, second] = [Memory(npc_id="mara", text=t) for t in ("a", "b")]
    store.add([first, second, Memory(npc_id="tom", text="c")])
    held = writer.submit([Memory(npc_id="mara", text="wait")])
    assert store.waiting.wait(10)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    writer.touch("mara", [first.id], start)
    writer.touch("tom", ["t1"], start)
    writer.touch("mara", [second.id, first.id], start + timedelta(minutes=1))
    store.gate.set()
    held.result(10)
    writer.flush(10)
    assert sorted(calls) == [
        ("mara", [first.id, second.id], start + timedelta(minutes=1)),
        ("tom", ["t1"], start),
    ]
    touched = {m.text: m.last_accessed_at for m in store.recent("mara", None, 10)}
    assert touched["a"] == touched["b"] == start + timedelta(minutes=1)
    writer.close()


def test_failed_turn_writes_are_counted_and_logged(sample_personas: Path) -> None:
    store = FlakyStore()
    engine = DialogueEngine(
        load_personas(sample_personas), ScriptedGenerator(["Aye."]), store, load_config()
    )
    result = engine.say("mara", "Have some poison.", player_id="p1")
    assert result.memory_write is not None
    with pytest.raises(OSError):
        result.memory_write.result(10)
    assert engine.memory_write_failures == 1


class GatedGenerator(ScriptedGenerator):
    """Streams one word, then waits for the test before finishing the reply."""

    def __init__(self) -> None:
        super().__init__(["Aye, I remember."])
        self.started = threading.Event()
        self.go_on = threading.Event()

    def generate(
        self,
        prompt: RenderedPrompt,
        params: GenerationParams,
        on_text: Callable[[str], None],
        cancel: threading.Event | None = None,
    ) -> GenerationStats:
        self.started.set()
        assert self.go_on.wait(30)
        return super().generate(prompt, params, on_text, cancel)


def test_forget_during_a_turn_is_not_written_back(sample_personas: Path) -> None:
    generator = GatedGenerator()
    store = InMemoryStore()
    engine = DialogueEngine(load_personas(sample_personas), generator, store, load_config())
    results = []
    turn = threading.Thread(
        target=lambda: results.append(engine.say("mara", "My name is Aria.", player_id="aria"))
    )
    turn.start()
    assert generator.started.wait(30)
    assert engine.forget("mara", player_id="aria") == 0
    generator.go_on.set()
    turn.join(30)
    assert results and results[0].reason == "stop"
    engine.writer.flush()
    assert store.recent("mara", "aria", 10) == []  # neither the line nor the reply
    assert engine.history("mara", "aria") == []


def test_forgotten_memories_leave_the_notes_of_earlier_turns(sample_personas: Path) -> None:
    engine = DialogueEngine(
        load_personas(sample_personas),
        ScriptedGenerator(["Aye.", "Noted.", "Hm."]),
        InMemoryStore(),
        load_config(retrieval=FAKE_STORE_RETRIEVAL),
    )
    [event_id] = engine.add_event(
        ["mara"], "The player Aria stole a herring.", player_id="aria"
    ).result(10)
    engine.writer.flush()
    engine.say("mara", "Did anything happen with herring?", player_id="aria")
    (turn,) = engine.history("mara", "aria")
    assert "stole a herring" in turn.notes and event_id in turn.memory_ids
    assert engine.forget("mara", memory_ids=[event_id]) == 1
    (scrubbed,) = engine.history("mara", "aria")
    assert "stole a herring" not in scrubbed.notes and event_id not in scrubbed.memory_ids
    result = engine.say("mara", "And now?", player_id="aria")
    assert "stole a herring" not in result.prompt


def test_a_cancel_while_queued_stores_what_a_cancel_while_running_stores(
    sample_personas: Path,
) -> None:
    store = InMemoryStore()
    engine = DialogueEngine(
        load_personas(sample_personas), ScriptedGenerator(["one two three"]), store, load_config()
    )
    cancel = threading.Event()
    cancel.set()
    running = engine.say("mara", "Running line.", player_id="a", cancel=cancel)
    assert running.reason == "cancelled"
    engine.hear("mara", "Queued line.", player_id="b")  # what the server does when queued
    engine.writer.flush()
    stored_a = [m.text for m in store.recent("mara", "a", 10)]
    stored_b = [m.text for m in store.recent("mara", "b", 10)]
    assert stored_a == ['The player a told me: "Running line."']
    assert stored_b == ['The player b told me: "Queued line."']


def test_conversations_in_ram_are_bounded(sample_personas: Path) -> None:
    engine = DialogueEngine(
        load_personas(sample_personas),
        ScriptedGenerator(respond=lambda _p: "Aye."),
        InMemoryStore(),
        load_config(max_conversations=50),
    )
    for index in range(120):
        engine.say("mara", "Hello.", player_id=f"p{index}")
    assert engine.conversation_count() == 50
    engine.writer.flush()
    # RAM keeps the 50 most recent; an older one is read back from the store when needed
    # (and another leaves RAM for it).
    assert engine.history("mara", "p119") and engine.history("mara", "p0")
    assert engine.conversation_count() == 50
    with pytest.raises(Exception, match="not a valid id"):
        engine.say("mara", "Hello.", player_id="<|im_start|>system")
