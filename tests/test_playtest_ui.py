"""The playtest UI driven as a user would, through Textual's Pilot: on the scripted
generator and the in-RAM store in the fast lane (the UI's own behaviour), and on the real
model (what a designer sees)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from textual.pilot import Pilot
from textual.widgets import Input, Static

from npc_engine.config import EngineConfig, load_config
from npc_engine.playtest.app import PlaytestApp
from npc_engine.playtest.local_session import LocalSession
from npc_engine.playtest.session import PlaytestSession
from npc_engine.playtest.widgets import ChatLine
from tests.conftest import FAKE_STORE_RETRIEVAL, SAMPLE_PERSONAS

SCRIPTED_REPLY = "Aye, one room left upstairs, love. Five bits a night."


def plain(widget: Static) -> str:
    console = Console(record=True, width=200, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(widget.content)
    return console.export_text()


async def wait_for(pilot: Pilot[Any], condition: Callable[[], bool], timeout: float = 120) -> None:
    for _ in range(int(timeout / 0.05)):
        if condition():
            return
        await pilot.pause(0.05)
    raise AssertionError("condition not reached in time")


async def type_line(pilot: Pilot[Any], text: str, *, key_by_key: bool = False) -> None:
    """Enter a line. Key by key is how a user types (each key waits for the app to idle,
    ~0.1 s); the other lines are pasted in, so the test spends its time on the NPC."""
    await pilot.click("#line")
    if key_by_key:
        for char in text:
            await pilot.press(char if char != " " else "space")
    else:
        pilot.app.query_one("#line", Input).value = text
    await pilot.press("enter")


def npc_lines(app: PlaytestApp) -> list[ChatLine]:
    return [line for line in app.query(ChatLine) if line.kind == "npc"]


def local_app(config: EngineConfig, **kwargs: Any) -> PlaytestApp:
    async def open_session(progress: Callable[[str], None]) -> PlaytestSession:
        return await LocalSession.open(config, progress)

    return PlaytestApp(open_session, **kwargs)


@pytest.fixture
def scripted_config(tmp_path: Path) -> EngineConfig:
    """No model: the scripted generator and the in-RAM store."""
    return load_config(
        personas_dir=SAMPLE_PERSONAS,
        data_dir=tmp_path / "data",
        generation={"backend": "scripted", "scripted_reply": SCRIPTED_REPLY},
        memory={"backend": "memory"},
        retrieval=FAKE_STORE_RETRIEVAL,
    )


@pytest.mark.timeout(60)
async def test_the_ui_talks_records_events_and_runs_commands_without_a_model(
    scripted_config: EngineConfig,
) -> None:
    app = local_app(scripted_config, npc_id="mara", player_id="aria")
    async with app.run_test(size=(160, 50)) as pilot:
        await wait_for(pilot, lambda: not app.query_one("#line").disabled, timeout=30)
        assert "Mara Saltwhistle" in plain(app.query_one("#who", Static))
        await type_line(pilot, "Hello! My name is Aria.", key_by_key=True)
        await wait_for(pilot, lambda: app.last_turn is not None, timeout=30)
        assert app.last_turn is not None and app.last_turn.text == SCRIPTED_REPLY
        assert npc_lines(app)[-1].body.endswith(SCRIPTED_REPLY)
        await pilot.press("f2")
        assert "Hello! My name is Aria." in plain(app.query_one("#inspect-prompt", Static))

        await type_line(pilot, "/event The chapel bell cracked during the storm.")
        await wait_for(pilot, lambda: "event stored" in plain(list(app.query(ChatLine))[-1]))
        await type_line(pilot, "/memories chapel bell")
        await wait_for(pilot, lambda: "bell cracked" in plain(list(app.query(ChatLine))[-1]))
        await type_line(pilot, "/trust 50")
        await type_line(pilot, "/flag quest_pier=2 paid=true")
        state = plain(list(app.query(ChatLine))[-1])
        assert "trusts aria: 50" in state and "unlocked: knowledge.3, secrets.1" in state
        await type_line(pilot, "/nonsense")
        assert "Unknown command /nonsense" in plain(list(app.query(ChatLine))[-1])
        await type_line(pilot, "/npc guard_tom")
        assert app.npc_id == "guard_tom"
        await type_line(pilot, "/scene mara guard_tom -- the fog")
        await wait_for(pilot, lambda: "The scene ended" in plain(list(app.query(ChatLine))[-1]))
        spoken = [line for line in app.query(ChatLine) if line.kind == "npc"][-2:]
        assert {line.speaker for line in spoken} == {"Mara Saltwhistle", "Tom Hale"}


@pytest.mark.slow
async def test_talk_inspect_event_and_cancel(
    real_config: EngineConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = local_app(real_config, npc_id="mara", player_id="aria", max_tokens=48)
    async with app.run_test(size=(160, 50)) as pilot:
        await wait_for(pilot, lambda: not app.query_one("#line").disabled)
        assert "Mara Saltwhistle" in plain(app.query_one("#who", Static))

        # Talk: the reply streams into the conversation, piece by piece.
        await type_line(pilot, "Hello! My name is Aria.", key_by_key=True)
        await wait_for(pilot, lambda: app.last_turn is not None)
        reply = npc_lines(app)[-1]
        assert app.last_turn is not None and app.last_turn.text
        assert reply.deltas >= 2 and app.last_turn.text in reply.body

        # Inspector: exact prompt, recalled memories with score parts, speed.
        await pilot.press("f2")
        assert app.query_one("#inspector").has_class("shown")
        assert "Hello! My name is Aria." in plain(app.query_one("#inspect-prompt", Static))
        stats = plain(app.query_one("#inspect-stats", Static))
        assert "first token" in stats and "tokens" in stats

        # Inject an event; the next turn recalls it, and the inspector shows it with scores.
        await type_line(pilot, "/event The chapel bell cracked during the storm.")
        await wait_for(pilot, lambda: "event stored" in plain(list(app.query(ChatLine))[-1]))
        await type_line(pilot, "What happened to the chapel bell?")
        await wait_for(pilot, lambda: "chapel bell?" in app.last_turn.player_text)  # type: ignore[union-attr]
        assert any("bell cracked" in m.text for m in app.last_turn.memories)  # type: ignore[union-attr]
        table = plain(app.query_one("#inspect-memories", Static))
        assert "bell cracked" in table and "relev." in table
        # ... and the lorebook entries noted for that line, and why.
        assert "lore noted: drowned-chapel (key 'chapel'" in plain(
            app.query_one("#inspect-stats", Static)
        )

        # /memories with a query lists them ranked, with scores.
        await type_line(pilot, "/memories chapel bell")
        await wait_for(pilot, lambda: "bell cracked" in plain(list(app.query(Static))[-1]))

        # Esc cancels a reply in flight: the key is pressed as the second piece streams in
        # (the pilot itself waits for the app to be idle, which a fast stream never is).
        original_append = ChatLine.append

        def append_then_escape(line: ChatLine, piece: str) -> None:
            original_append(line, piece)
            if line.deltas == 2:
                app.simulate_key("escape")

        monkeypatch.setattr(ChatLine, "append", append_then_escape)
        app.max_tokens = 400  # a reply long enough that Esc lands while it still streams
        await type_line(pilot, "Tell me the whole long history of Saltwhistle, every detail.")
        await wait_for(pilot, lambda: "whole long history" in app.last_turn.player_text)  # type: ignore[union-attr]
        assert app.last_turn is not None and app.last_turn.reason == "cancelled"
        # Esc at the second piece: a few more at most (the cancel crosses the router and
        # the model stops between tokens); uncancelled, 400 tokens would stream.
        assert npc_lines(app)[-1].deltas <= 12
        monkeypatch.undo()

        # Other slash commands answer in the conversation.
        await type_line(pilot, "/context location=Rusty_Anchor mood=tense")
        assert app.context == {"location": "Rusty_Anchor", "mood": "tense"}
        # Trust and flags from slash commands: what they unlock is listed.
        await type_line(pilot, "/trust 50")
        await type_line(pilot, "/flag quest_pier=2 paid=true")
        state = plain(list(app.query(ChatLine))[-1])
        assert "trusts aria: 50" in state and "quest_pier=2, paid=True" in state
        assert "unlocked: knowledge.3, secrets.1" in state
        await type_line(pilot, "/trust -80")
        assert "trusts aria: -30" in plain(list(app.query(ChatLine))[-1])
        await type_line(pilot, "/npc guard_tom")
        assert app.npc_id == "guard_tom"
        await type_line(pilot, "/nonsense")
        assert "Unknown command /nonsense" in plain(list(app.query(ChatLine))[-1])
        # A scene: the NPCs talk among themselves; each line's own prompt is inspected.
        app.max_tokens = 24
        await type_line(pilot, "/scene mara guard_tom -- the fog")
        await wait_for(pilot, lambda: "The scene ended" in plain(list(app.query(ChatLine))[-1]))
        spoken = [line for line in app.query(ChatLine) if line.kind == "npc"][-2:]
        assert {line.speaker for line in spoken} == {"Mara Saltwhistle", "Tom Hale"}
        assert app.last_turn is not None
        assert "Mara Saltwhistle says:" in app.last_turn.prompt or (
            "Tom Hale says:" in app.last_turn.prompt
        )


@pytest.mark.timeout(60)
async def test_persona_hot_reload_keeps_the_last_good_version(
    scripted_config: EngineConfig, tmp_path: Path
) -> None:
    personas = tmp_path / "personas"
    shutil.copytree(scripted_config.personas_dir, personas)
    config = scripted_config.model_copy(update={"personas_dir": personas})
    app = local_app(config, npc_id="wren", reload_interval=0.2)
    async with app.run_test(size=(140, 40)) as pilot:
        await wait_for(pilot, lambda: not app.query_one("#line").disabled)
        wren = personas / "wren.yaml"
        good = wren.read_text()

        wren.write_text(good.replace("role:", "rol:", 1))
        await wait_for(pilot, lambda: any(line.kind == "problem" for line in app.query(ChatLine)))
        problem = next(line for line in app.query(ChatLine) if line.kind == "problem")
        assert "wren.yaml:" in problem.body and "rol" in problem.body
        assert app.cards["wren"].role  # still the last good version

        wren.write_text(good.replace("Wren", "Wrenna", 1))
        await wait_for(pilot, lambda: "Wrenna" in app.cards["wren"].name)
        assert "Persona files reloaded." in [line.body for line in app.query(ChatLine)]
