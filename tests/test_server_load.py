"""Many real clients at once, and a server killed mid-reply (real model, Chroma, loopback).

The load test checks correctness under load (every say ends exactly once, every delta
reaches its own request, nothing is lost); the figures it prints are for the record, not
asserted, since this machine is shared and noisy.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.asyncio.client import connect

from npc_engine.client import NpcClient
from npc_engine.config import EngineConfig, ServerLimits
from npc_engine.runtime import EngineRuntime
from npc_engine.server import NpcServer
from tests.conftest import start_server_process

pytestmark = pytest.mark.slow

# Enough to fill the 8 batch slots and the queue behind them many times over; kept small
# so the default run stays fast (tools/bench.py measures throughput side by side).
CONNECTIONS = 16
SAYS_PER_CONNECTION = 2
NPCS = ["mara", "guard_tom", "wren", "ysolde"]


class LoopLagMonitor:
    """Measures how late a 20 ms sleep wakes up on the server's event loop."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self.running = True

    async def run(self) -> None:
        while self.running:
            before = time.perf_counter()
            await asyncio.sleep(0.02)
            self.lags.append(time.perf_counter() - before - 0.02)


@pytest.fixture
def threaded_server(real_runtime: EngineRuntime) -> Iterator[tuple[NpcServer, LoopLagMonitor]]:
    """The server on its own event loop thread, as in production, with a lag monitor."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    limits = ServerLimits(max_queued_generations=CONNECTIONS * SAYS_PER_CONNECTION)
    server = NpcServer(real_runtime.engine, port=0, limits=limits)
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(30)
    monitor = LoopLagMonitor()
    monitoring = asyncio.run_coroutine_threadsafe(monitor.run(), loop)
    try:
        yield server, monitor
    finally:
        monitor.running = False
        monitoring.result(10)
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(120)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


async def one_player(url: str, player: int) -> list[dict[str, Any]]:
    """Pipeline says to different NPCs on one raw connection; check every frame."""
    async with connect(url, max_size=None) as websocket:
        await websocket.send(json.dumps({"type": "hello", "id": "h", "protocol": "1"}))
        await websocket.recv()
        requests: dict[str, dict[str, Any]] = {}
        for k in range(SAYS_PER_CONNECTION):
            request_id = f"s{k}"
            npc_id = NPCS[(player + k) % len(NPCS)]
            requests[request_id] = {
                "npc_id": npc_id,
                "line": f"Traveller {player} asks question {k}: any news?",
                "sent": time.perf_counter(),
                "deltas": [],
                "starts": 0,
                "ends": [],
            }
            say = {
                "type": "say",
                "id": request_id,
                "npc_id": npc_id,
                "player_id": f"player{player}",
                "text": requests[request_id]["line"],
                "max_tokens": 6,
            }
            await websocket.send(json.dumps(say))
        open_requests = set(requests)
        while open_requests:
            message = json.loads(await asyncio.wait_for(websocket.recv(), 600))
            state = requests[message["re"]]  # a frame for an unknown request fails here
            kind = message["type"]
            assert message["re"] in open_requests, f"frame after reply.end: {message}"
            if kind == "reply.start":
                assert message["npc_id"] == state["npc_id"]
                state["starts"] += 1
            elif kind == "reply.delta":
                assert message["seq"] == len(state["deltas"]), "gap or reorder in deltas"
                if not state["deltas"]:
                    state["ttft"] = time.perf_counter() - state["sent"]
                state["deltas"].append(message["text"])
            elif kind == "reply.end":
                state["ends"].append(message)
                state["total"] = time.perf_counter() - state["sent"]
                open_requests.discard(message["re"])
            else:
                raise AssertionError(f"unexpected frame {message}")
        return list(requests.values())


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


@pytest.mark.timeout(600)
async def test_many_connections_pipelining_says(
    threaded_server: tuple[NpcServer, LoopLagMonitor],
) -> None:
    server, monitor = threaded_server
    started = time.perf_counter()
    players = await asyncio.gather(*(one_player(server.url, p) for p in range(CONNECTIONS)))
    elapsed = time.perf_counter() - started

    says = [say for player in players for say in player]
    assert len(says) == CONNECTIONS * SAYS_PER_CONNECTION
    for say in says:
        assert say["starts"] == 1 and len(say["ends"]) == 1
        end = say["ends"][0]
        assert end["reason"] in ("stop", "length"), end
        assert "".join(say["deltas"]) == end["text"]

    # Nothing lost: every player's line is in the memory of the NPC it was said to.
    for player_index, player in enumerate(players):
        async with await NpcClient.connect(server.url) as client:  # one rate bucket each
            for say in player:
                items = await client.memory_list(
                    say["npc_id"], player_id=f"player{player_index}", limit=20
                )
                assert any(say["line"] in item["text"] for item in items), say["line"]

    ttfts = [say["ttft"] for say in says if "ttft" in say]
    lags = monitor.lags
    print(
        f"\nload: {len(says)} replies over {CONNECTIONS} connections in {elapsed:.1f} s "
        f"({len(says) / elapsed:.2f} replies/s); first token p50 {statistics.median(ttfts):.2f} s,"
        f" p95 {percentile(ttfts, 0.95):.2f} s (queue wait included); event-loop lag p50 "
        f"{statistics.median(lags) * 1000:.1f} ms, p99 {percentile(lags, 0.99) * 1000:.1f} ms,"
        f" max {max(lags) * 1000:.1f} ms over {len(lags)} samples"
    )


async def test_server_killed_mid_reply_keeps_acknowledged_memories(
    real_config: EngineConfig,
) -> None:
    process, url = start_server_process(real_config)
    acknowledged: list[str] = []
    try:
        async with await NpcClient.connect(url) as client:
            for n in range(5):
                acknowledged += await client.event(["mara"], f"Crate {n} of lamp oil arrived.")
            stream = await client.say("mara", "Tell me everything about the harbour.")
            async for _delta in stream:
                break  # a reply is streaming right now
            os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(30)
    assert len(acknowledged) == 5

    process, url = start_server_process(real_config)  # the data-dir lock died with it
    try:
        async with await NpcClient.connect(url) as client:
            stored = {item["id"] for item in await client.memory_list("mara", limit=100)}
            assert set(acknowledged) <= stored
            stream = await client.say("mara", "Still open?", max_tokens=8)
            assert (await stream.result())["reason"] in ("stop", "length")
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
