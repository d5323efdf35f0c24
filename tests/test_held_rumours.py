"""A world tick's rumours are held in the store's SQLite file, out of Chroma, until their
listener's memories are next read (``npc_engine/memory/held_rumours.py``): on real Chroma
and the real embedder. What is checked is what a player, a tick and a save see, and that a
rumour a tick acknowledged survives the process dying."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from npc_engine.config import load_config
from npc_engine.dialogue import DialogueEngine
from npc_engine.generation.scripted import ScriptedGenerator
from npc_engine.memory.chroma_records import home_name
from npc_engine.memory.chroma_store import ChromaMemoryStore
from npc_engine.memory.minilm import OfflineMiniLM
from npc_engine.memory.types import Memory
from npc_engine.model_registry import ModelCache
from npc_engine.persona.loader import load_personas

from .conftest import REPO, SAMPLE_PERSONAS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

NEWS = "The Duke's tax cutter sank off Gull Point last night and every soul drowned!"
START = datetime(2026, 12, 6, 12, tzinfo=UTC)


def open_engine_on(data: Path) -> tuple[DialogueEngine, ChromaMemoryStore, list[datetime]]:
    embed = OfflineMiniLM(ModelCache(load_config().cache_dir))
    store = ChromaMemoryStore(data, embed)
    engine = DialogueEngine(
        load_personas(SAMPLE_PERSONAS),
        ScriptedGenerator(respond=lambda _p: "Well I never."),
        store,
        load_config(),
        embed=embed,
    )
    now = [START]
    engine.clock = lambda: now[0]
    return engine, store, now


def tell_and_tick(engine: DialogueEngine, now: list[datetime]) -> list[Memory]:
    """Mara hears news from p1, a tick passes it on: the rumours made (as held)."""
    engine.say("mara", NEWS, player_id="p1", game_time=600)
    engine.writer.flush()
    now[0] += timedelta(minutes=1)
    assert engine.world_tick(game_time=660) >= 1
    engine.writer.flush()
    store = engine.store
    assert isinstance(store, ChromaMemoryStore)
    rumours = rumours_heard(store, "guard_tom", "p1")
    assert rumours, "the tick passed nothing on to Tom"
    assert store.held_records([m.id for m in rumours]).keys() == {m.id for m in rumours}
    return rumours


def rumours_heard(store: ChromaMemoryStore, npc_id: str, player_id: str) -> list[Memory]:
    """The NPC's rumours of this player's words, read as a tick reads them."""
    made = store.rumours.made_between(npc_id, START, START + timedelta(days=30), 1)
    return [m for m in made if m.kind == "rumour" and m.player_id == player_id]


def in_chroma(store: ChromaMemoryStore, memory: Memory) -> bool:
    """Whether Chroma itself holds the memory (read without moving held rumours in)."""
    collection = store.collection(home_name(memory), memory.npc_id, create=False, deliver=False)
    return collection is not None and bool(collection.get(ids=[memory.id], include=[])["ids"])


def test_a_ticks_rumours_wait_outside_chroma_until_their_listener_is_read(tmp_path: Path) -> None:
    engine, store, now = open_engine_on(tmp_path / "data")
    try:
        rumours = tell_and_tick(engine, now)
        rumour = rumours[0]
        assert not any(in_chroma(store, m) for m in rumours)
        # What a tick reads sees it as stored: counted, its origin known, told once only.
        assert store.count("guard_tom", "p1") >= len(rumours)
        assert store.rumours.origins_known("guard_tom", [rumour.origin or ""]) == {rumour.origin}
        now[0] += timedelta(minutes=1)
        assert engine.world_tick(game_time=700) == 0
        # Tom's next recall reads his memories: the rumour moves into Chroma first, found.
        found = store.search("guard_tom", "p1", "the tax cutter sank off Gull Point", 5)
        assert rumour.id in {c.memory.id for c in found}
        assert all(in_chroma(store, m) for m in rumours)
        assert store.held_records([m.id for m in rumours]) == {}
        assert store.count("guard_tom", "p1") >= len(rumours)  # counted once, not twice
    finally:
        engine.close()


def test_a_faded_rumour_is_forgotten_without_reaching_chroma(tmp_path: Path) -> None:
    engine, store, now = open_engine_on(tmp_path / "data")
    try:
        rumours = tell_and_tick(engine, now)
        for day in range(1, 5):
            now[0] += timedelta(minutes=1)
            engine.world_tick(game_time=660 + day * 1440)
        engine.writer.flush()
        assert store.held_records([m.id for m in rumours]) == {}
        assert not any(in_chroma(store, m) for m in rumours)
        assert store.rumours.rumours_of("guard_tom") == []
    finally:
        engine.close()


def test_a_save_keeps_held_rumours_and_loading_an_older_one_drops_them(tmp_path: Path) -> None:
    engine, store, now = open_engine_on(tmp_path / "data")
    try:
        store.saves.create_save("before")
        rumours = tell_and_tick(engine, now)
        store.saves.create_save("after")  # the save names them: moved into Chroma first
        assert all(in_chroma(store, m) for m in rumours)
        store.saves.load_save("before")
        assert not any(in_chroma(store, m) for m in rumours)
        store.saves.load_save("after")
        assert all(in_chroma(store, m) for m in rumours)
        # Held again by a new tick, then a load: the held ones go, no save names them.
        now[0] += timedelta(minutes=5)
        engine.say("mara", NEWS, player_id="p2", game_time=800)
        engine.writer.flush()
        now[0] += timedelta(minutes=1)
        assert engine.world_tick(game_time=900) >= 1
        held = rumours_heard(store, "guard_tom", "p2")
        assert held and store.held_records([m.id for m in held])
        store.saves.load_save("after")
        assert store.held_records([m.id for m in held]) == {}
        assert store.count("guard_tom", "p2") == 0
    finally:
        engine.close()


CRASH_AFTER_A_TICK = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {repo!r})
    from pathlib import Path
    from tests.test_held_rumours import open_engine_on, tell_and_tick
    engine, store, now = open_engine_on(Path({data!r}))
    rumours = tell_and_tick(engine, now)
    print(" ".join(m.id for m in rumours), flush=True)
    print(" ".join(m.origin for m in rumours), flush=True)
    os._exit(0)  # dies with nothing closed: no clean shutdown of the store
    """
)


def test_a_held_rumour_survives_the_process_dying_after_the_tick_answered(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    script = CRASH_AFTER_A_TICK.format(repo=str(REPO), data=str(data))
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=150, cwd=REPO
    )
    assert done.returncode == 0, done.stderr[-2000:]
    ids, origins = (line.split() for line in done.stdout.splitlines()[-2:])
    assert ids and origins
    engine, store, _now = open_engine_on(data)
    try:
        # The keyword index was not closed cleanly: it is compared with Chroma and the
        # held file, and must keep the held rumours (a tick would tell them again).
        assert store.rumours.origins_known("guard_tom", origins) == set(origins)
        assert store.held_records(ids).keys() == set(ids)
        found = store.search("guard_tom", "p1", "the tax cutter sank off Gull Point", 5)
        assert set(ids) <= {c.memory.id for c in found}
    finally:
        engine.close()
