"""Generators and stores come from config through one registry; the fakes are selectable
like the real adapters, so wiring tests run without a model."""

from __future__ import annotations

from pathlib import Path

import pytest

from npc_engine.backends import GENERATORS, STORES, make_generator
from npc_engine.client import NpcClient
from npc_engine.config import load_config
from npc_engine.errors import ConfigError
from npc_engine.generation.scripted import ScriptedGenerator
from npc_engine.memory.in_memory import InMemoryStore
from npc_engine.runtime import open_engine
from npc_engine.server import NpcServer
from tests.conftest import SAMPLE_PERSONAS

pytestmark = pytest.mark.timeout(60)


def test_the_real_adapters_and_the_fakes_are_registered() -> None:
    assert {"llama", "scripted"} <= set(GENERATORS)
    assert {"chroma", "memory"} <= set(STORES)


def test_an_unknown_backend_is_a_config_error(tmp_path: Path) -> None:
    config = load_config(data_dir=tmp_path, generation={"backend": "nope"})
    with pytest.raises(ConfigError, match=r"generation.backend: unknown backend 'nope'"):
        make_generator(config, lambda _m: None)


async def test_wiring_runs_on_the_fakes_chosen_by_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NPC_ENGINE_GENERATION__BACKEND", "scripted")
    monkeypatch.setenv("NPC_ENGINE_GENERATION__SCRIPTED_REPLY", "Aye. Wired up.")
    monkeypatch.setenv("NPC_ENGINE_MEMORY__BACKEND", "memory")
    runtime = open_engine(load_config(personas_dir=SAMPLE_PERSONAS, data_dir=tmp_path))
    try:
        assert isinstance(runtime.engine.generator, ScriptedGenerator)
        assert isinstance(runtime.engine.store, InMemoryStore)
        server = NpcServer(runtime.engine, port=0)
        await server.start()
        try:
            async with await NpcClient.connect(server.url) as client:
                stream = await client.say("mara", "Hello?", player_id="p1")
                deltas = [d async for d in stream]
                assert len(deltas) >= 2 and "".join(deltas) == "Aye. Wired up."
                assert (await stream.result())["text"] == "Aye. Wired up."
                items = await client.memory_list("mara", player_id="p1")
                assert any("Hello?" in item["text"] for item in items)
        finally:
            await server.stop()
    finally:
        runtime.close()
