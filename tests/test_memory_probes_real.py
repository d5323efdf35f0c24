"""Issue 16's probes through the real server: real Chroma on disk, the real MiniLM embedder,
real WebSocket clients on loopback. Replies come from the scripted backend (a fixed line):
what is measured is memory, and the model would add minutes without changing it."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from npc_engine.client import NpcClient
from npc_engine.config import load_config
from npc_engine.memory.facts import fact_memories
from npc_engine.memory.types import utc_now
from npc_engine.runtime import open_engine
from npc_engine.server import NpcServer
from npc_engine.turns import player_line_memory

from .conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
from recall_probe import (
    ACKNOWLEDGED,
    PROBE_LIMITS,
    load_probes,
    print_server,
    serve_and_probe,
)


# The first 30 of the 60 facts: 1,670 turns, ~90 s on 2 cores (all 60 took ~170 s;
# `tools/recall_probe.py --server` runs them). Each player's memories are its own, so these
# 30 and their paired never-told questions measure as in the whole run; issue 16's bars are
# kept (recall@3 >= 0.97 of 30 allows no miss).
@pytest.mark.timeout(450)
def test_recall_updates_and_abstention_probes(tmp_path: Path) -> None:
    """30 facts told once, recalled after 10 and 50 unrelated turns (recall@3 >= 0.97;
    asked in the third person as designers do, >= 0.95);
    30 never-told questions (at most 1 memory recalled in all); 20 fact updates (the
    newer value wins in >= 95 %)."""
    outcome = serve_and_probe(tmp_path, (10, 50), facts=30)
    print_server(outcome)
    for turns, result in outcome.recall.items():
        assert result.total == 30
        assert result.recall >= 0.97, (turns, result.misses)
        # The same facts asked as a designer asks them: "Where did the player grow up?"
        designer = outcome.designer[turns]
        assert designer.recall >= 0.95, (turns, designer.misses)
        assert outcome.injected_total[turns] <= 1, outcome.injected[turns]
        assert len(outcome.injected[turns]) == 30
    assert outcome.updates.hits >= 0.95 * outcome.updates.total, outcome.updates.misses


@pytest.mark.timeout(900)
def test_a_thousand_turns_with_one_player_halve_the_store_and_lose_no_fact(
    tmp_path: Path,
) -> None:
    probes = load_probes()
    facts = probes["facts"][:20]
    chatter = [said for said, _answer in probes["chatter"]]
    config = load_config(
        personas_dir=REPO / "personas",
        data_dir=tmp_path,
        generation={"backend": "scripted", "scripted_reply": ACKNOWLEDGED},
    )
    runtime = open_engine(config)

    async def play() -> list[str]:
        # Turns back to back, as fast as the engine answers: more than a game sends, so
        # the per-connection rate limit (20/s) is raised for this client.
        server = NpcServer(runtime.engine, port=0, limits=PROBE_LIMITS)
        await server.start()
        lost = []
        try:
            async with await NpcClient.connect(server.url) as client:
                for turn in range(1000):
                    said = (
                        facts[turn // 50]["told"]
                        if turn % 50 == 0
                        else chatter[turn % len(chatter)]
                    )
                    await (await client.say("mara", said, player_id="hero")).result()
                for fact in facts:
                    # The fact in the player's words, or the fact memory made from them:
                    # among the 5 recalled (20 facts of one player compete for places).
                    line = player_line_memory("mara", "hero", fact["told"], utc_now())
                    wanted = {line.text, *(m.text for m in fact_memories(line))}
                    items = await client.memory_list(
                        "mara", player_id="hero", query=fact["asked"], limit=5
                    )
                    if not wanted & {i["text"] for i in items}:
                        lost.append((fact["asked"], [i["text"] for i in items]))
        finally:
            await server.stop()
        return lost

    try:
        lost = asyncio.run(play())
        runtime.engine.writer.flush(120)
        kept = runtime.engine.store.count("mara")
        current = {
            m.text for m in runtime.engine.store.of_player("mara", "hero") if not m.superseded_by
        }
        summaries = [
            m for m in runtime.engine.store.of_player("mara", "hero") if m.kind == "summary"
        ]
    finally:
        runtime.close()
    made = 2000  # each turn: the player's line and the reply (and a few facts besides)
    print(
        f"\n1,000 turns on Chroma: {made}+ memories made, {kept} kept, {len(summaries)} summaries"
    )
    assert kept <= 0.5 * made
    for fact in facts:  # every fact still stored as current, in the player's words
        assert f'The player hero told me: "{fact["told"]}"' in current
    assert lost == [], "\n".join(f"{question} -> {texts}" for question, texts in lost)
