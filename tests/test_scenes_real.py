"""Issue 15 on the real path: the tiny GGUF, Chroma on disk and MiniLM, the WebSocket server
in its own process, the Python client: scenes over protocol v1, and rumours spreading."""

from __future__ import annotations

import asyncio
import itertools
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml

from npc_engine.client import NpcClient, ProtocolError
from npc_engine.config import EngineConfig

from .conftest import SAMPLE_PERSONAS, start_server_process

TRIO = ["mara", "guard_tom", "wren"]


async def frames_of(client: NpcClient, scene_id: str, **fields: Any) -> dict[str, Any]:
    stream = await client.scene(scene_id, TRIO, **fields)
    lines = [line async for line in stream]
    return {"lines": lines, "end": await stream.result()}


@pytest.mark.timeout(600)
def test_scenes_over_protocol_stream_lines_take_player_lines_and_cancel(
    real_config: EngineConfig,
) -> None:
    async def play(url: str) -> dict[str, Any]:
        async with await NpcClient.connect(url) as client:
            assert "scenes" in client.welcome["capabilities"]
            out: dict[str, Any] = {}
            out["scene"] = await frames_of(
                client, "gate", topic="the burned pier", max_turns=4, max_tokens=24
            )
            out["memories"] = {npc: await client.memory_list(npc, limit=10) for npc in TRIO}
            # the player joins: the next line answers the player's say
            stream = await client.scene(
                "inn",
                TRIO,
                player_id="p1",
                topic="a room for the night",
                max_turns=3,
                max_tokens=24,
            )
            lines = stream.__aiter__()
            first = await lines.__anext__()
            reply = await client.say(
                "mara",
                "Tom, is the road north safe tonight?",
                player_id="p1",
                scene_id="inn",
                max_tokens=24,
            )
            answered = await reply.result()
            out["joined"] = {"first": first, "start": reply.start, "end": answered}
            out["joined"]["rest"] = [line async for line in lines]
            out["joined"]["scene_end"] = await stream.result()
            out["player_memories"] = await client.memory_list(
                "wren", player_id="p1", query="road north", limit=10
            )
            # cancel: the scene ends at once, reason cancelled
            stream = await client.scene("long", TRIO, max_turns=40, max_tokens=48)
            lines = stream.__aiter__()
            await lines.__anext__()
            await client.cancel(stream.request_id)
            out["cancelled"] = await stream.result()
            # a say into a scene that is not running is refused, naming the field
            try:
                await (await client.say("mara", "Hi", scene_id="nope")).result()
            except ProtocolError as exc:
                out["refused"] = exc.message
            return out

    process, url = start_server_process(real_config)
    try:
        out = asyncio.run(asyncio.wait_for(play(url), 480))
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(60)

    scene = out["scene"]
    assert scene["end"]["reason"] in ("max_turns", "ended")
    assert scene["end"]["scene_id"] == "gate" and scene["end"]["turns"] == len(scene["lines"])
    speakers = [line["npc_id"] for line in scene["lines"]]
    assert len(set(speakers)) >= 2
    assert all(a != b for a, b in itertools.pairwise(speakers))  # never twice
    for line in scene["lines"]:
        assert line["start"]["scene_id"] == line["end"]["scene_id"] == "gate"
        assert line["text"].strip() and line["end"]["reason"] in ("stop", "length")
    # every participant remembers the scene (a line as memory: one line, quotes as ')
    said = " ".join(scene["lines"][0]["text"].split()).replace('"', "'")[:20]
    for npc in TRIO:
        texts = [m["text"] for m in out["memories"][npc]]
        assert any(said in text for text in texts), (npc, said, texts)

    joined = out["joined"]
    assert joined["start"]["scene_id"] == "inn"
    assert joined["start"]["npc_id"] == "guard_tom"  # addressed by name
    assert joined["end"]["text"].strip() and joined["end"]["scene_id"] == "inn"
    assert joined["scene_end"]["reason"] in ("max_turns", "ended")
    heard = [m["text"] for m in out["player_memories"]]
    assert any(t.startswith("The player p1 told me") and "road north" in t for t in heard), heard

    assert out["cancelled"]["reason"] == "cancelled" and out["cancelled"]["turns"] < 40
    assert out["refused"]["code"] == "invalid_request"
    assert out["refused"]["details"]["field"] == "scene_id"


@pytest.mark.timeout(600)
def test_news_told_to_mara_reaches_tom_as_a_rumour_not_the_hermit(
    real_config: EngineConfig, tmp_path: Path
) -> None:
    personas = tmp_path / "personas"
    shutil.copytree(SAMPLE_PERSONAS, personas)
    (personas / "hermit.yaml").write_text(
        yaml.safe_dump(
            {"name": "Pell", "role": "Hermit of the dunes", "description": "Talks to nobody."}
        )
    )
    config = real_config.model_copy(update={"personas_dir": personas})
    news = "The Duke's tax cutter sank off Gull Point last night and every soul drowned!"

    async def play(url: str) -> dict[str, Any]:
        async with await NpcClient.connect(url) as client:
            await (await client.say("mara", news, player_id="p1", max_tokens=24)).result()
            spread = [await client.world_tick(game_time=600), await client.world_tick(660)]
            asked, stranger = [
                await (
                    await client.say(
                        "guard_tom",
                        "Any news about the Duke's cutter?",
                        player_id=player,
                        max_tokens=24,
                        inspect=True,
                    )
                ).result()
                for player in ("p1", "p2")
            ]
            return {
                "spread": spread,
                "asked": asked,
                "stranger": stranger,
                # a rumour of p1's words is among what each NPC remembers with p1
                **{
                    name: await client.memory_list(
                        npc, player_id=player, query="the tax cutter sank"
                    )
                    for name, npc, player in (
                        ("tom", "guard_tom", "p1"),
                        ("tom_with_p2", "guard_tom", "p2"),
                        ("hermit", "hermit", "p1"),
                        ("ysolde", "ysolde", "p1"),
                    )
                },
            }

    process, url = start_server_process(config, "--allow-inspect")
    try:
        out = asyncio.run(asyncio.wait_for(play(url), 480))
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(60)
    assert out["spread"][0] >= 1
    rumours = [m for m in out["tom"] if m["kind"] == "rumour"]
    assert rumours and rumours[0]["source"] == "mara"
    assert rumours[0]["text"].startswith("Mara Saltwhistle said the player p1 claims:")
    # Tom recalls it as "Mara said…" on the real model's turn, with the player whose words
    # it carries; never in another player's conversation (docs/security.md)
    recalled = out["asked"]["inspect"]["memories"]
    assert any(m["text"].startswith("Mara Saltwhistle said") for m in recalled), recalled
    assert "Mara Saltwhistle said" in out["asked"]["inspect"]["prompt"]
    assert "Mara Saltwhistle said" not in out["stranger"]["inspect"]["prompt"]
    assert not any(m["kind"] == "rumour" for m in out["tom_with_p2"])  # p1's words only
    assert not any("cutter" in m["text"] for m in out["hermit"])  # no path from Mara
    assert not any(m["kind"] == "rumour" for m in out["ysolde"])  # Mara does not trust her
