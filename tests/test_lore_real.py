"""Issue 14 on the real path: cards imported with the command a writer runs, then the real
server (the tiny GGUF, Chroma on disk, MiniLM) talking to them over protocol v1, with the
lorebook entries of each line in ``inspect``."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest

from npc_engine.client import NpcClient
from npc_engine.config import EngineConfig

from .conftest import SAMPLE_PERSONAS, run_cli, start_server_process
from .test_cards import card_v2, card_v3, encoded, write_charx, write_png


@pytest.mark.timeout(600)
def test_imported_cards_validate_and_talk_over_protocol_with_their_lore(
    real_config: EngineConfig, tmp_path: Path
) -> None:
    personas = tmp_path / "personas"
    shutil.copytree(SAMPLE_PERSONAS, personas)
    cards = {
        "brine_v2": write_png(tmp_path / "v2.png", chara=encoded(card_v2())),
        "brine_v3": write_png(tmp_path / "v3.png", ccv3=encoded(card_v3())),
        "brine_charx": write_charx(tmp_path / "brine.charx", card_v3()),
    }
    for npc_id, path in cards.items():
        done = run_cli("import", str(path), "--out", str(personas), "--id", npc_id)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"wrote {personas / npc_id}.yaml" in done.stdout
    checked = run_cli("validate", "--no-sizes", str(personas))
    assert checked.returncode == 0, checked.stdout
    assert "OK: 7 persona(s)" in checked.stdout

    async def talk(url: str) -> dict[str, Any]:
        async with await NpcClient.connect(url) as client:
            out: dict[str, Any] = {}
            for npc_id in cards:
                greeting = await (await client.greet(npc_id, player_id="p1")).result()
                said = await (
                    await client.say(
                        npc_id,
                        "Is there really a kraken out there?",
                        player_id="p1",
                        max_tokens=24,
                        inspect=True,
                    )
                ).result()
                out[npc_id] = {"greeting": greeting, "said": said}
            out["mara"] = await (
                await client.say(
                    "mara", "Who kept the lighthouse?", player_id="p1", max_tokens=24, inspect=True
                )
            ).result()
            return out

    config = real_config.model_copy(update={"personas_dir": personas})
    process, url = start_server_process(config, "--allow-inspect")
    try:
        replies = asyncio.run(asyncio.wait_for(talk(url), 400))
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(60)
    for npc_id in cards:
        greeting, said = replies[npc_id]["greeting"], replies[npc_id]["said"]
        # the card's first message (or its alternate), macros resolved, with no model call
        assert greeting["text"] in (
            "Another landlubber. What do you want, the player?",
            "Arr. Sit down, the player.",
        )
        assert greeting["usage"]["completion_tokens"] == 0
        assert said["reason"] in ("stop", "length") and said["text"].strip()
        lore = {item["id"]: item for item in said["inspect"]["lore"]}
        kraken = lore[f"{npc_id}.kraken"]
        assert kraken["why"].startswith("key 'kraken'")
        prompt = said["inspect"]["prompt"]
        assert "kraken sleeps under Gull Point" in prompt
        assert "Rum is paid for in silver." in prompt.split("# You are Captain Brine")[0]  # always
        assert "You are Captain Brine." not in prompt  # a card's system prompt is kept aside
    mara = replies["mara"]
    assert [item["id"] for item in mara["inspect"]["lore"]] == ["lighthouse"]
    assert "kraken" not in json.dumps(mara["inspect"])  # Brine's own lore stays his
