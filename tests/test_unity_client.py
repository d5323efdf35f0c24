"""The Unity C# client, compiled with Mono and run against a live server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from npc_engine.config import EngineConfig
from tests.conftest import REPO, start_server_process

pytestmark = pytest.mark.slow

SOURCES = [REPO / "examples/unity/NpcEngineClient.cs", REPO / "examples/unity/Harness.cs"]


def mono_tools() -> tuple[str, str]:
    mcs, mono = shutil.which("mcs"), shutil.which("mono")
    if mcs is None or mono is None:
        pytest.fail(
            "Mono is missing: `tools/dev.sh test` installs it (apt-get install mono-mcs "
            "mono-runtime)"
        )
    return mcs, mono


def test_csharp_client_streams_a_reply_from_the_live_server(
    real_config: EngineConfig, tmp_path: Path
) -> None:
    mcs, mono = mono_tools()
    harness = tmp_path / "npc-harness.exe"
    compiled = subprocess.run(
        [mcs, "-warnaserror", f"-out:{harness}", *map(str, SOURCES)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr

    process, url = start_server_process(real_config)
    harness_run = subprocess.Popen(
        [mono, str(harness), url, "mara", "Any rooms free tonight?"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HARNESS_DROP": "1"},
    )
    assert harness_run.stdout is not None
    lines = []
    watchdog = threading.Timer(240, harness_run.kill)  # a hung harness fails, never blocks
    watchdog.start()
    try:
        for line in harness_run.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("READY"):
                process.kill()  # the server vanishes while a reply is pending
        returncode = harness_run.wait(240)
    finally:
        watchdog.cancel()
        harness_run.kill()
        process.kill()
        process.wait(60)
    stdout = "\n".join(lines)
    assert returncode == 0, stdout + harness_run.stderr.read()  # type: ignore[union-attr]
    steps = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in lines if " " in line}
    assert steps["NPCS"] == "guard_tom,mara,wren,ysolde"
    assert steps["EVENT"] == "1"

    # The first reply's deltas, in order and gapless, add up to the final text.
    first_reply = lines[: next(i for i, line in enumerate(lines) if line.startswith("END "))]
    deltas = [line.split(" ", 2) for line in first_reply if line.startswith("DELTA ")]
    assert deltas, stdout
    assert [int(seq) for _, seq, _ in deltas] == list(range(len(deltas)))
    reason, count, text = steps["END"].split(" ", 2)
    assert reason in ("stop", "length") and int(count) == len(deltas)
    assert "".join(json.loads(piece) for _, _, piece in deltas) == json.loads(text)

    assert steps["CANCELLED"] == "cancelled"
    assert steps["ERROR"] == "unknown_npc"
    assert int(steps["MEMORY"]) >= 1
    # Trust and a quest flag set from C#: Mara's pier fact and trust-gated secret unlock.
    assert steps["STATE"] == "45 knowledge.3,secrets.1"
    # Greet at a first meeting: the persona's line, no model time; warm; a save slot that
    # undoes an event stored after it; an unknown slot names the field.
    tokens, greeting = steps["GREET"].split(" ", 1)
    assert tokens == "0" and json.loads(greeting).startswith("Shut the door, love")
    assert steps["WARM"] == "mara"
    # A two-line scene from C#: both NPCs speak, one after the other, then scene.end.
    assert steps["SCENE"] in ("max_turns 2 mara,guard_tom", "ended 2 mara,guard_tom")
    assert steps["SAVES"] == "1 cs-slot True"
    assert steps["SAVEERROR"] == "invalid_request save_id"
    assert steps["ACTION"] in ("null", "give_item", "take_payment", "refuse")
    # A handler that threw (ReplyFinished, per ended reply) was reported; the awaited
    # replies still completed and reading went on.
    faults, connected = steps["FAULTS"].split()
    assert int(faults) >= 2 and connected == "True"
    # The pending say failed when the server vanished, and the client knows it is offline.
    assert steps["DROPPED"] == "disconnected False"
