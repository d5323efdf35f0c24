"""Regenerate docs/playtest.svg: the playtest UI after a real turn, with the inspector open.

    .venv/bin/python tools/playtest_screenshot.py [OUT.svg]

Runs the tool in-process on the default model with a scratch memory folder, injects an
event, asks about it, opens the inspector and saves Textual's own SVG screenshot.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

from npc_engine.config import load_config
from npc_engine.playtest.app import PlaytestApp
from npc_engine.playtest.local_session import LocalSession
from npc_engine.playtest.session import PlaytestSession

REPO = Path(__file__).resolve().parent.parent


async def main(out: Path) -> None:
    config = load_config(
        personas_dir=REPO / "personas",
        data_dir=Path(tempfile.mkdtemp(prefix="npc-shot-")),
        seed=7,
        temperature=0.0,
    )

    async def open_session(progress: object) -> PlaytestSession:
        return await LocalSession.open(config, lambda _message: None)

    app = PlaytestApp(open_session, npc_id="mara", player_id="aria", reload_interval=0)
    async with app.run_test(size=(170, 46)) as pilot:
        while app.query_one("#line").disabled:
            await pilot.pause(0.1)
        for line in (
            "/event A storm tore the sails of the ferry this morning.",
            "Hello! I'm Aria. What happened to the ferry?",
        ):
            app.query_one("#line").value = line  # type: ignore[attr-defined]
            await pilot.press("enter")
            await pilot.pause(0.5)
            while app.replying:
                await pilot.pause(0.1)
        await pilot.press("f2")
        await pilot.pause(0.3)
        out.write_text(app.export_screenshot(title="npc-engine playtest"), encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "docs/playtest.svg"))
