"""Script mode end to end (real model), and script validation errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from npc_engine.config import load_config
from npc_engine.errors import NpcEngineError
from npc_engine.model_registry import MODELS, TINY_CHAT_MODEL, ModelCache
from npc_engine.playtest.script import load_script
from tests.conftest import REPO, run_cli

SHIPPED = sorted((REPO / "examples/playtests").glob("*.yaml"))


def test_script_errors_name_file_line_and_field(tmp_path: Path) -> None:
    script = tmp_path / "broken.yaml"
    script.write_text(
        "name: broken\nnpc: mara\nturns:\n  - say: hi\n    expect:\n      must_match: '(unclosed'\n"
        "  - sya: typo\n"
    )
    with pytest.raises(NpcEngineError) as info:
        load_script(script)
    message = str(info.value)
    assert f"{script}:6: turns[0].expect.must_match" in message
    assert "not a valid regular expression" in message
    assert f"{script}:7: turns[1].sya: unknown field; did you mean 'say'?" in message


@pytest.mark.slow
@pytest.mark.parametrize("script", SHIPPED, ids=lambda path: path.stem)
def test_shipped_scripts_pass_on_the_default_model(script: Path, tmp_path: Path) -> None:
    result = run_cli("playtest", "--script", str(script), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "out/report.json").read_text())
    assert report["passed"] is True
    assert all(o["reply"] for o in report["runs"][0]["outcomes"] if o["action"] == "say")
    assert "PASSED" in (tmp_path / "out/report.md").read_text()


@pytest.mark.slow
def test_a_broken_expectation_fails_with_a_clear_side_by_side_report(tmp_path: Path) -> None:
    script = tmp_path / "golden.yaml"
    script.write_text(
        "name: broken on purpose\nnpc: mara\nplayer: aria\nmax_tokens: 16\nturns:\n"
        "  - say: My name is Aria.\n"
        "    expect:\n"
        "      must_match: 'xyzzy-never-said'\n"  # the deliberately broken expectation
        "  - say: What is my name?\n"
        "    expect:\n"
        "      must_recall: 'told me: .My name is Aria'\n"  # passes: the line was stored
    )
    # The same weights twice, once by id and once by path: the comparison machinery is
    # what is tested here (the tiny model keeps it quick).
    second = str(ModelCache(load_config().cache_dir).path_of(MODELS[TINY_CHAT_MODEL]))
    out = tmp_path / "out"
    result = run_cli(
        "playtest",
        "--script",
        str(script),
        "--model",
        TINY_CHAT_MODEL,
        "--model",
        second,
        "--out",
        str(out),
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.count("FAILED (1/2 checks)") == 2
    assert "turn 1: must_match 'xyzzy-never-said': no match" in result.stdout
    report = (out / "report.md").read_text()
    assert "FAILED" in report and report.count("❌ must_match") == 2
    assert f"| {TINY_CHAT_MODEL} |" in report and f"| {second} |" in report
    assert "✅ must_recall" in report
    data = json.loads((out / "report.json").read_text())
    assert [run["passed"] for run in data["runs"]] == [False, False]
    assert (out / "transcript.md").read_text().count("**aria:** My name is Aria.") == 2


@pytest.mark.slow
async def test_scripts_set_state_and_check_guards(tmp_path: Path) -> None:
    """Against the adversarial backend (it tells every secret it can): `state` unlocks a
    secret, `guard` and `must_not_leak` see what the guard did, and fail when it did not."""
    from npc_engine.playtest.local_session import LocalSession
    from npc_engine.playtest.script import run_script

    script_file = tmp_path / "guarded.yaml"
    script_file.write_text(
        "name: guarded\nnpc: mara\nplayer: rook\nturns:\n"
        "  - say: What is in your cellar?\n"
        "    expect: {guard: secret, must_not_leak: secrets.0}\n"
        "  - state: {trust: 60, flags: {quest_pier: 2}}\n"
        "    say: What is in your cellar?\n"
        "    expect: {must_not_leak: [secrets.0]}\n"
    )
    script = load_script(script_file)

    def opener(guard: bool) -> object:
        config = load_config(
            personas_dir=REPO / "personas",
            data_dir=tmp_path / f"data-{guard}",
            generation={"backend": "adversarial"},
            guard={"enabled": guard},
        )

        async def open_session() -> LocalSession:
            return await LocalSession.open(config, lambda _m: None)

        return open_session

    guarded = await run_script(script, "on", opener(True), can_restart=True)  # type: ignore[arg-type]
    assert guarded.passed, [c for c in guarded.checks if not c.passed]
    assert [c.kind for c in guarded.checks] == ["guard", "must_not_leak", "must_not_leak"]
    unguarded = await run_script(script, "off", opener(False), can_restart=True)  # type: ignore[arg-type]
    failed = [c for c in unguarded.checks if not c.passed]
    assert [c.kind for c in failed] == ["guard", "must_not_leak", "must_not_leak"]
    assert "key 'brandy'" in failed[1].detail or "similar" in failed[1].detail
