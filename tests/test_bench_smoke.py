"""The benchmark runs end to end in quick mode (its timings are not checked here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_bench_quick_mode_reports_every_target(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "tools/bench.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    targets = {row["target"] for row in report["rows"]}
    assert {
        "1 warm multi-turn",
        "2 NPC switching",
        "3 many NPCs at once",
        "4 engine overhead",
        "5 memory",
        "6 single-stream decode",
        "structured output",
        "9 restart",
        "10 output guard",
        "11 npc.warm",
        "12 saves",
        "13 game actions",
        "14 lorebook",
        "15 scenes",
        "15 world tick",
        "16 scale-out",
    } <= targets
    assert report["machine"]["model"] and report["machine"]["build"]
    measured = [row for row in report["rows"] if "not implemented" not in row["note"]]
    assert all(row["ratio"] == row["ratio"] for row in measured if row["met"] is not None)
    assert "npc-engine benchmark" in result.stdout
