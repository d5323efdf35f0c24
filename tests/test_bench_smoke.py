"""The benchmark runs end to end in quick mode (its timings are not checked here).

Two bench processes: the targets on this machine's engine, then those on remote servers
(they wait for the llama-server build), each with a time limit at least 4x its typical
time on 2 cores. Whatever a bench starts (a Chroma server, llama-server, engine
replicas) dies with it: tools/servers.py asks the kernel to kill them with their parent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import servers

from tests.conftest import REPO

pytestmark = [pytest.mark.slow]

IN_PROCESS = {
    "warm": ["1 warm multi-turn"],
    "overhead": ["4 engine overhead"],
    "decode": ["6 single-stream decode"],
    "guard": ["10 output guard"],
    "expression": ["structured output"],
    "batch": ["3 many NPCs at once"],
    "actions": ["13 game actions"],
    "scene": ["15 scenes"],
}
RESTARTS = {
    "restart": ["9 restart"],
    "switch": ["2 NPC switching"],
    "npc_warm": ["11 npc.warm"],
}
WORLD = {
    "saves": ["12 saves"],
    "tick": ["15 world tick"],
    "lore": ["14 lorebook"],
}
MEMORY = {"memory": ["5 memory"]}
SERVERS = {"remote": ["16 scale-out"]}


def run_bench(tmp_path: Path, only: dict[str, list[str]], limit: float) -> dict[str, object]:
    out = tmp_path / "bench.json"
    command = [sys.executable, str(REPO / "tools/bench.py"), "--quick", "--json", str(out)]
    process = servers.popen(
        [*command, "--only", *only],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )
    try:
        said, _ = process.communicate(timeout=limit)
    finally:
        servers.stop(process)  # on a timeout too: its servers go with it
    assert process.returncode == 0, said
    assert "npc-engine benchmark" in said
    report = json.loads(out.read_text())
    targets = {row["target"] for row in report["rows"]}
    assert {target for names in only.values() for target in names} <= targets, said
    assert report["machine"]["model"] and report["machine"]["build"]
    measured = [row for row in report["rows"] if "not implemented" not in row["note"]]
    assert all(row["ratio"] == row["ratio"] for row in measured if row["met"] is not None)
    return report


# One bench process for every target on this machine's engine: each group in its own
# process read the model, Chroma and MiniLM again and warmed Mara's head again (~30 s).
# Typically ~116 s on 2 cores alone (2026-12-07): the limit leaves 5x.
@pytest.mark.timeout(600)
def test_bench_quick_engine_targets(tmp_path: Path) -> None:
    run_bench(tmp_path, IN_PROCESS | RESTARTS | WORLD | MEMORY, 580)


@pytest.mark.timeout(600)  # ~63 s (2026-12-07); runs last, with llama-server built
def test_bench_quick_server_targets(tmp_path: Path, llama_server_build_log: str) -> None:
    if servers.llama_server_binary() is None:
        pytest.fail(
            f"llama-server is not built: run tools/build_llama_server.sh\n{llama_server_build_log}"
        )
    report = run_bench(tmp_path, SERVERS, 580)
    notes = " ".join(row["note"] for row in report["rows"] if row["target"] == "16 scale-out")
    assert "not built" not in notes
