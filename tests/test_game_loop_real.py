"""Issue 12 on the real path: the tiny GGUF, Chroma on disk, the WebSocket server in its own
process, new processes for restarts, and ``kill -9`` during a save."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from npc_engine.actions import action_grammar, offered_actions, parse_action
from npc_engine.client import NpcClient, ProtocolError
from npc_engine.config import EngineConfig
from npc_engine.generation.base import GenerationParams
from npc_engine.memory.chroma_store import ChromaMemoryStore
from npc_engine.memory.types import Memory
from npc_engine.persona.model import GameActionSpec

from .conftest import REPO, start_server_process
from .test_game_loop import hashed_embed

TURNS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from npc_engine.config import load_config
    from npc_engine.runtime import open_engine
    config = load_config(personas_dir=sys.argv[1], data_dir=sys.argv[2], seed=1234,
                         temperature=0.0, n_ctx=2048)
    runtime = open_engine(config)
    out = []
    for line in sys.argv[3:]:
        result = runtime.engine.say("guard_tom", line, player_id="p1", max_tokens=16)
        out.append({"prompt": result.prompt, "text": result.text})
    runtime.close()
    print(json.dumps(out))
    """
)


def turns_in_new_process(config: EngineConfig, *lines: str) -> list[dict[str, str]]:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            TURNS_SCRIPT,
            str(config.personas_dir),
            str(config.data_dir),
            *lines,
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return list(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.mark.timeout(400)
def test_a_restarted_engine_rebuilds_the_prompt_byte_for_byte(real_config: EngineConfig) -> None:
    before = turns_in_new_process(real_config, "Good evening, Tom.", "Any trouble tonight?")
    after = turns_in_new_process(real_config, "Who burned the pier?")
    last = before[-1]
    assert after[0]["prompt"].startswith(last["prompt"] + last["text"])
    assert '"Good evening, Tom."' in after[0]["prompt"]


async def _reply(client: NpcClient, kind: str, npc: str, **fields: Any) -> dict[str, Any]:
    stream = await (client.greet(npc, **fields) if kind == "greet" else client.say(npc, **fields))
    return await stream.result()


@pytest.mark.timeout(400)
def test_saves_greetings_and_warm_up_over_protocol_across_a_restart(
    real_config: EngineConfig,
) -> None:
    async def first_server(url: str) -> dict[str, Any]:
        async with await NpcClient.connect(url) as client:
            welcome = client.welcome
            greeting = await _reply(client, "greet", "mara", player_id="p1")
            [storm] = await client.event(
                ["mara"], "A storm sank the herring fleet.", player_id="p1"
            )
            saved = await client.save_create("slot1")
            await client.event(["mara"], "The mayor bought a golden carriage.", player_id="p1")
            assert await client.memory_forget("mara", memory_ids=[storm]) == 1
            warmed = await client.warm(["wren"])
            said = await _reply(client, "say", "wren", text="What ails the marsh?", player_id="p9")
            exported = await client.save_export("slot1")
            return {
                "welcome": welcome,
                "greeting": greeting,
                "saved": saved,
                "warmed": warmed,
                "said": said,
                "exported": exported,
            }

    process, url = start_server_process(real_config)
    try:
        first = asyncio.run(first_server(url))
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(60)
    assert {"saves", "greet", "warm", "actions"} <= set(first["welcome"]["capabilities"])
    greeting = first["greeting"]
    assert greeting["text"] == "Shut the door, love, you're letting the fog in. Ale or a room?"
    assert greeting["usage"]["prompt_tokens"] == greeting["usage"]["completion_tokens"] == 0
    assert first["saved"]["memories"] >= 2  # the greeting and the storm
    assert first["warmed"]["warmed"] == ["wren"]
    assert first["said"]["usage"]["cached_tokens"] > 300  # wren's head was ready
    assert "game_action" in first["said"]
    assert first["said"]["game_action"] is None or first["said"]["game_action"]["name"] in {
        "refuse",
        "take_payment",
    }
    assert first["exported"] == "slot1.npcsave"  # a name, never the data directory's path
    assert (real_config.data_dir / "exports" / "slot1.npcsave").is_file()

    async def second_server(url: str) -> dict[str, Any]:
        async with await NpcClient.connect(url) as client:
            saves = await client.save_list()
            loaded = await client.save_load("slot1")
            recalled = await client.memory_list("mara", player_id="p1", query="storm fleet")
            errors = {}
            for name, call in {
                "unknown": client.save_load("slot9"),
                # A hostile client's raw frame: the Python client itself refuses the name.
                "path": client.request(
                    {"type": "save.import", "save_id": "x", "file": "../../etc/passwd.npcsave"}
                ),
                "missing": client.save_import("x", "nothing.npcsave"),
            }.items():
                try:
                    await call
                except ProtocolError as exc:
                    errors[name] = exc.message
            imported = await client.save_import("copy", "slot1.npcsave")
            later = await _reply(client, "greet", "mara", player_id="p1")
            await client.save_delete("slot1")
            left = await client.save_list()
            return {
                "saves": saves,
                "loaded": loaded,
                "recalled": [item["text"] for item in recalled],
                "errors": errors,
                "imported": imported,
                "later": later,
                "left": left,
            }

    process, url = start_server_process(real_config)
    try:
        second = asyncio.run(second_server(url))
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(60)
    assert [s["save_id"] for s in second["saves"]] == ["slot1"]
    assert second["loaded"]["save_id"] == "slot1"
    assert "A storm sank the herring fleet." in second["recalled"]
    assert "The mayor bought a golden carriage." not in second["recalled"]
    errors = second["errors"]
    assert errors["unknown"]["details"]["field"] == "save_id"
    assert errors["path"]["details"]["field"] == "file"
    assert errors["missing"]["details"]["field"] == "file"
    assert second["imported"]["memories"] == first["saved"]["memories"]
    # Not a first meeting any more (the save remembers the greeting): a generated line.
    assert second["later"]["usage"]["completion_tokens"] > 0
    assert [s["save_id"] for s in second["left"]] == ["copy"]


SAVING_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from npc_engine.memory.chroma_store import ChromaMemoryStore
    from npc_engine.memory.types import Memory
    from tests.test_game_loop import hashed_embed
    store = ChromaMemoryStore(Path(sys.argv[1]), hashed_embed)
    if store.count("mara") == 0:
        store.add([Memory("mara", f"Fact {n} about the tide.", player_id=f"p{n % 7}")
                   for n in range(int(sys.argv[2]))])
    store.state.save_state("trust:mara:p1", {"trust": 10})
    print("ready", flush=True)
    n = 0
    while True:
        store.saves.create_save(f"s{n % 40}")
        n += 1
    """
)


@pytest.mark.timeout(300)
def test_kill_9_during_save_create_leaves_the_store_and_saves_whole(tmp_path: Path) -> None:
    path, count = tmp_path / "chroma", 1500
    rng = random.Random(12)
    for _round in range(3):
        saver = subprocess.Popen(
            [sys.executable, "-c", SAVING_SCRIPT, str(path), str(count)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        assert saver.stdout is not None and saver.stdout.readline().strip() == "ready"
        try:
            saver.wait(timeout=rng.uniform(0.3, 1.5))
        except subprocess.TimeoutExpired:
            os.kill(saver.pid, signal.SIGKILL)  # in the middle of a create_save
        saver.wait(10)
    store = ChromaMemoryStore(path, hashed_embed)  # first opened in this process
    assert store.count("mara") == count
    hits = store.search("mara", "p3", "Fact 3 about the tide.", 5)
    assert len(hits) == 5 and {hit.memory.player_id for hit in hits} == {"p3"}
    store.add([Memory("mara", "Whales sang under the lighthouse.", player_id="p3")])
    top = store.search("mara", "p3", "Whales sang under the lighthouse.", 1)
    assert top[0].memory.text == "Whales sang under the lighthouse."  # the index still takes writes
    saves = store.saves.list_saves()
    assert saves, "some saves finished before the kills"
    for info in saves:
        assert info.memories == count
        store.saves.load_save(info.save_id)
        assert store.count("mara") == count  # as saved (the whale line came later)
        assert store.state.load_state("trust:mara:p1") == {"trust": 10}


def test_warm_makes_the_first_say_start_at_the_head(shared_runtime: Any) -> None:
    engine = shared_runtime.engine
    assert engine.warm("ysolde") is True
    result = engine.say("ysolde", "What cargo do you carry?", player_id="warm-check", max_tokens=8)
    built = engine.prompts.build(
        persona=engine.persona("ysolde").persona,
        world=engine.persona("ysolde").world,
        names=engine.npc_names(),
        history=[],
        memories=[],
        context={},
        player_id="x",
        player_text="x",
        max_tokens=8,
        now=engine.clock(),
    )
    assert result.cached_tokens >= built.rendered.head_tokens > 100


def test_real_model_actions_are_always_declared_and_valid(shared_runtime: Any) -> None:
    engine = shared_runtime.engine
    gate = engine.config.actions.gate
    engine.config.actions.gate = -1  # ask the model every time
    try:
        for npc, line in [
            ("mara", "An ale, please, and the key to my room."),
            ("guard_tom", "Help! Thieves on the docks!"),
            ("mara", "What do you think of the weather?"),
        ]:
            result = engine.say(npc, line, player_id="actions-check", max_tokens=16)
            assert result.timings.action_ms > 0  # the choice ran on the model
            loaded = engine.persona(npc)
            offered = offered_actions(loaded.persona, loaded.world, result.standing.facts())
            action = result.game_action
            if action is not None:  # one of those offered, each argument of its type
                spec = next(a for a in offered if a.name == action.name)
                assert set(action.args) == set(spec.params)
    finally:
        engine.config.actions.gate = gate


def test_llama_grammar_holds_the_model_to_declared_actions(shared_runtime: Any) -> None:
    """Whatever the prompt asks for, llama.cpp's grammar lets out only a declared call."""
    generator = shared_runtime.engine.generator
    actions = [
        GameActionSpec.model_validate(
            {
                "name": "give_item",
                "description": "hand over",
                "params": {"item": ["room_key", "ale"], "count": {"min": 1, "max": 3}},
            }
        ),
        GameActionSpec.model_validate(
            {"name": "tell_name", "description": "x", "params": {"name": {"max_length": 6}}}
        ),
    ]
    prompt = generator.render(
        [
            {"role": "system", "content": "Answer with a function call."},
            {"role": "user", "content": "Write give_item(item=sword, count=99) exactly."},
        ]
    )
    answer: list[str] = []
    params = GenerationParams(max_tokens=32, temperature=0.0, grammar=action_grammar(actions))
    stats = generator.generate(prompt, params, answer.append)
    text = "".join(answer)
    assert stats.finish_reason == "stop"
    assert text == "none" or parse_action(text, actions) is not None, text


def test_a_reply_at_max_tokens_ends_on_a_sentence_or_a_whole_word(shared_runtime: Any) -> None:
    engine = shared_runtime.engine
    for line in ["Tell me everything about the marsh.", "Describe your herbs, all of them."]:
        result = engine.say("wren", line, player_id="trim-check", max_tokens=12)
        if result.reason == "length":
            assert re.search(r"([.!?][\"')\]]*|…)$", result.text.rstrip()), result.text
