"""The main path, for real: the tiny GGUF model, Chroma on disk, new processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from npc_engine.config import EngineConfig
from npc_engine.errors import DataDirInUseError
from npc_engine.runtime import EngineRuntime, open_engine
from tests.conftest import REPO, SAMPLE_PERSONAS, run_cli

pytestmark = pytest.mark.slow

UNRELATED = [
    "What's the weather like out on the water?",
    "How much is a bowl of stew?",
    "Is the ale any good?",
    "Who runs the watchhouse?",
    "Have you seen any ships lately?",
    "What happened to the lighthouse?",
    "Do you like living by the sea?",
    "Where can I buy rope?",
    "Is the marsh dangerous at night?",
    "What's the best fish around here?",
]


def cli_env(config: EngineConfig) -> dict[str, str]:
    return {
        "NPC_ENGINE_PERSONAS_DIR": str(config.personas_dir),
        "NPC_ENGINE_DATA_DIR": str(config.data_dir),
        "NPC_ENGINE_SEED": "1234",
        "NPC_ENGINE_TEMPERATURE": "0",
        "NPC_ENGINE_N_CTX": "2048",
    }


def say_json(config: EngineConfig, npc: str, player: str, text: str) -> dict[str, Any]:
    result = run_cli(
        "say",
        "--npc",
        npc,
        "--player",
        player,
        "--json",
        "--max-tokens",
        "24",
        text,
        env=cli_env(config),
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout[result.stdout.index("{\n") :])


def test_npc_greets_and_answers(real_runtime: EngineRuntime) -> None:
    engine = real_runtime.engine
    deltas: list[str] = []
    result = engine.say(
        "mara", "Hello! Any rooms free tonight?", player_id="p1", on_delta=deltas.append
    )
    assert result.reason in ("stop", "length")
    assert result.text.strip() and not result.used_fallback
    assert "".join(deltas) == result.text
    assert "<|im_start|>system" in result.prompt  # SmolLM2's own chat template was used
    assert result.prompt_tokens > 500 and result.completion_tokens > 0
    assert result.timings.ttft_ms is not None
    assert result.memory_write is not None and len(result.memory_write.result(30)) == 2
    # The second turn reuses the cached prefix (world + persona + examples).
    second = engine.say("mara", "And what's for supper?", player_id="p1")
    assert second.cached_tokens > 400


def test_name_recalled_after_ten_turns_and_after_restart(real_config: EngineConfig) -> None:
    runtime = open_engine(real_config)
    try:
        engine = runtime.engine
        engine.say("mara", "Hello, my name is Aria.", player_id="aria", max_tokens=16)
        for line in UNRELATED:
            engine.say("mara", line, player_id="aria", max_tokens=16)
        result = engine.say(
            "mara", "Do you remember what my name is?", player_id="aria", max_tokens=16
        )
        assert any("my name is Aria" in m.memory.text for m in result.memories), [
            m.memory.text for m in result.memories
        ]
        assert "my name is Aria" in result.prompt
        # Another player asking the same never sees Aria's memories.
        other = engine.say("mara", "What is my name? Is it Aria?", player_id="bo", max_tokens=4)
        assert not any("aria" in m.memory.text.lower() for m in other.memories)
        engine.writer.flush(30)
    finally:
        runtime.close()
    # A new process, the same data directory: the memory is still there and still recalled.
    turn = say_json(real_config, "mara", "aria", "What is my name?")
    assert any("my name is Aria" in m["text"] for m in turn["inspect"]["memories"])


def test_second_engine_on_same_data_dir_fails_fast(
    real_runtime: EngineRuntime, real_config: EngineConfig
) -> None:
    started = time.perf_counter()
    with pytest.raises(DataDirInUseError, match="in use by another npc-engine process"):
        open_engine(real_config)
    result = run_cli("say", "--npc", "mara", "hi", env=cli_env(real_config), timeout=60)
    assert result.returncode == 2
    assert "in use by another npc-engine process" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.perf_counter() - started < 30


KILL_SCRIPT = """
import sys, time
from npc_engine.config import load_config
from npc_engine.runtime import open_engine
config = load_config(personas_dir=sys.argv[1], data_dir=sys.argv[2])
runtime = open_engine(config)
for i in range(5):
    text = f"Acknowledged event number {i}: the bell rang."
    ids = runtime.engine.add_event(["mara"], text).result(30)
    print("ACK", ids[0], flush=True)
runtime.engine.say("mara", "Tell me a very long story about the sea.", max_tokens=400,
                   on_delta=lambda piece: print("DELTA", flush=True))
time.sleep(60)
"""


def test_acknowledged_memories_survive_kill_9(real_config: EngineConfig) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(SAMPLE_PERSONAS), str(real_config.data_dir)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    acked: list[str] = []
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("ACK"):
            acked.append(line.split()[1])
        if line.startswith("DELTA"):
            break  # a reply is streaming right now
    os.kill(process.pid, signal.SIGKILL)
    process.wait(30)
    assert len(acked) == 5
    runtime = open_engine(real_config)  # the lock died with the process
    try:
        stored = {m.id for m in runtime.engine.recent_memories("mara", None, 100)}
        assert set(acked) <= stored
        assert runtime.engine.say("mara", "Still open?", max_tokens=8).text
    finally:
        runtime.close()


def test_say_cli_streams_and_reports(real_config: EngineConfig) -> None:
    result = run_cli(
        "say",
        "--npc",
        "guard_tom",
        "--max-tokens",
        "16",
        "Who goes there?",
        env=cli_env(real_config),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "first token" in result.stderr and "2 stored" in result.stderr
    unknown = run_cli("say", "--npc", "marra", "hi", env=cli_env(real_config))
    assert unknown.returncode == 2
    assert "No NPC with id 'marra'. Known: guard_tom, mara, wren, ysolde." in unknown.stderr
