"""Faults behind a real server: a slow memory store, a generation that fails (the real
model's, mid-way and before its first token), a turn that ignores cancel during shutdown, a
client whose server closes normally, and many player ids. Real Chroma and loopback sockets
throughout; where a fault is injected, it wraps the real part."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from npc_engine.client import NpcClient
from npc_engine.config import ServerLimits, load_config
from npc_engine.dialogue import DialogueEngine
from npc_engine.generation.base import GenerationParams, GenerationStats, RenderedPrompt
from npc_engine.memory.types import Memory
from npc_engine.runtime import EngineRuntime
from npc_engine.server import NpcServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


class SlowStore:
    """The real store, with adds held until ``gate`` opens."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.gate = threading.Event()
        self.gate.set()

    def add(self, memories: Sequence[Memory]) -> None:
        assert self.gate.wait(60)
        self._store.add(memories)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


class FaultyGenerator:
    """The real generator; fails after ``fail_after`` pieces of text (0: before any), or
    with ``hold`` set, streams one piece and then waits, deaf to cancel."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.fail_after: int | None = None
        self.hold: threading.Event | None = None
        self.held = threading.Event()

    def generate(
        self,
        prompt: RenderedPrompt,
        params: GenerationParams,
        on_text: Callable[[str], None],
        cancel: threading.Event | None = None,
    ) -> GenerationStats:
        if self.hold is not None:
            on_text("Well")
            self.held.set()
            assert self.hold.wait(60)
            return GenerationStats(finish_reason="stop")
        if self.fail_after == 0:
            raise RuntimeError("the GPU fell off")
        seen = 0

        def counting(piece: str) -> None:
            nonlocal seen
            on_text(piece)
            seen += 1
            if self.fail_after is not None and seen >= self.fail_after:
                raise RuntimeError("the GPU fell off mid-reply")

        return self._real.generate(prompt, params, counting, cancel)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@pytest.fixture
def faulty(
    shared_runtime: EngineRuntime,
) -> Iterator[tuple[DialogueEngine, FaultyGenerator, SlowStore]]:
    """An engine of the real parts (model, Chroma) with the fault wrappers around them."""
    real = shared_runtime.engine
    generator = FaultyGenerator(real.generator)
    store = SlowStore(real.store)
    engine = DialogueEngine(real.registry, generator, store, real.config)  # type: ignore[arg-type]
    yield engine, generator, store
    store.gate.set()
    engine.writer.close()  # the real store and model belong to the shared runtime


async def test_a_slow_write_delays_no_ping_cancel_or_other_connection(
    faulty: tuple[DialogueEngine, FaultyGenerator, SlowStore],
) -> None:
    engine, _generator, store = faulty
    server = NpcServer(engine, port=0)
    await server.start()
    try:
        async with connect(server.url) as slow, await NpcClient.connect(server.url) as other:
            await slow.send(json.dumps({"type": "hello", "id": "h", "protocol": "1"}))
            await slow.recv()
            store.gate.clear()
            event = {"type": "event", "id": "e", "npc_ids": ["mara"], "text": "A storm came."}
            await slow.send(json.dumps(event))
            await slow.send(json.dumps({"type": "ping", "id": "p"}))
            await slow.send(json.dumps({"type": "cancel", "id": "c", "target": "nothing"}))
            answers = [json.loads(await asyncio.wait_for(slow.recv(), 30)) for _ in range(2)]
            assert [a["re"] for a in answers] == ["p", "c"]  # not behind the event
            items = await asyncio.wait_for(other.memory_list("wren", limit=3), 30)
            assert isinstance(items, list)  # another connection's read: not behind it either
            store.gate.set()
            acked = json.loads(await asyncio.wait_for(slow.recv(), 60))
            assert acked["re"] == "e" and acked["type"] == "ok"
    finally:
        store.gate.set()
        await server.stop()


@pytest.mark.parametrize("fail_after", [0, 2], ids=["before-first-token", "mid-reply"])
async def test_a_real_generation_failure_ends_the_reply_consistently(
    faulty: tuple[DialogueEngine, FaultyGenerator, SlowStore], fail_after: int
) -> None:
    engine, generator, _store = faulty
    generator.fail_after = fail_after
    server = NpcServer(engine, port=0, limits=ServerLimits(delta_interval_ms=0))
    await server.start()
    try:
        async with await NpcClient.connect(server.url) as client:
            stream = await client.say("mara", "Tell me about the harbour.", max_tokens=24)
            deltas = [delta async for delta in stream]
            end = await stream.result()
            assert end["reason"] == "error" and end["error"]["code"] == "internal"
            assert "".join(deltas) == end["text"] and end["text"]
            fallbacks = engine.persona("mara").persona.fallback_lines
            if fail_after == 0:
                assert end["text"] in fallbacks  # the persona speaks, not silence
            else:
                assert len(deltas) >= 2 and end["text"] not in fallbacks  # what was sent stays
            generator.fail_after = None
            again = await client.say("mara", "Hello again.", max_tokens=8)
            assert (await again.result())["reason"] in ("stop", "length")
    finally:
        await server.stop()


async def test_shutdown_ends_a_turn_that_ignores_cancel_within_the_grace(
    faulty: tuple[DialogueEngine, FaultyGenerator, SlowStore],
) -> None:
    engine, generator, _store = faulty
    generator.hold = threading.Event()
    server = NpcServer(engine, port=0, limits=ServerLimits(shutdown_grace=0.5))
    await server.start()
    try:
        client = await NpcClient.connect(server.url)
        stream = await client.say("mara", "Hello?", max_tokens=8)
        assert await asyncio.get_running_loop().run_in_executor(None, generator.held.wait, 30)
        stopping = asyncio.create_task(server.stop())
        end = await asyncio.wait_for(stream.result(), 30)
        # The turn is still stuck in the generator, yet the reply has ended.
        assert not generator.hold.is_set()
        assert end["reason"] == "error" and end["error"]["code"] == "shutdown"
        assert end["text"] == "Well"
        await asyncio.wait_for(stopping, 30)
        with pytest.raises(ConnectionError):
            await client.ping()
    finally:
        generator.hold.set()


async def test_client_calls_fail_on_a_normal_close() -> None:
    """A server that closes with 1000 (no error) while a call waits: the call fails."""

    async def close_on_ping(websocket: ServerConnection) -> None:
        async for frame in websocket:
            message = json.loads(frame)
            if message["type"] == "hello":
                await websocket.send(
                    json.dumps(
                        {
                            "type": "welcome",
                            "re": message["id"],
                            "protocol": "1",
                            "server": "x",
                            "session": "s",
                            "capabilities": [],
                            "npcs": [],
                        }
                    )
                )
            else:
                await websocket.close(1000, "bye")

    async with serve(close_on_ping, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        client = await NpcClient.connect(f"ws://127.0.0.1:{port}/")
        with pytest.raises(ConnectionError, match="1000"):
            await asyncio.wait_for(client.ping(), 30)
        await client.close()


def rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.timeout(600)
async def test_ten_thousand_player_ids_keep_ram_and_handles_bounded(tmp_path: Path) -> None:
    """Each of 10,000 new player ids sends an event and lists memories against one NPC."""
    from npc_engine.runtime import open_engine

    config = load_config(
        personas_dir=Path(__file__).resolve().parent.parent / "personas",
        data_dir=tmp_path / "data",
        parallel=1,
        max_conversations=200,
    )
    runtime = open_engine(config)
    limits = ServerLimits(
        rate_per_second=10_000,
        rate_burst=10_000,
        server_rate_per_second=100_000,
        server_rate_burst=100_000,
    )
    server = NpcServer(runtime.engine, port=0, limits=limits)
    await server.start()
    players = 10_000
    connections = 8
    try:

        async def player_range(client: NpcClient, start: int, stop: int) -> None:
            for index in range(start, stop):
                player = f"player-{index}"
                event = client.event(["mara"], f"{player} paid a toll.", player_id=player)
                listing = client.memory_list("mara", player_id=player, limit=2)
                await asyncio.gather(event, listing)

        clients = [await NpcClient.connect(server.url) for _ in range(connections)]
        warm = players // 20  # the first 500 players: caches and Chroma warm up
        await asyncio.gather(
            *(
                player_range(c, i * warm // connections, (i + 1) * warm // connections)
                for i, c in enumerate(clients)
            )
        )
        baseline_rss, baseline_fds = rss_bytes(), len(os.listdir("/proc/self/fd"))
        rest = players - warm
        await asyncio.gather(
            *(
                player_range(
                    c, warm + i * rest // connections, warm + (i + 1) * rest // connections
                )
                for i, c in enumerate(clients)
            )
        )
        grown_rss = rss_bytes() - baseline_rss
        grown_fds = len(os.listdir("/proc/self/fd")) - baseline_fds
        print(
            f"10,000 player ids: RSS +{grown_rss / 2**20:.1f} MiB after warm-up, fds +{grown_fds}"
        )
        assert grown_fds <= 16
        assert grown_rss < 150 * 2**20  # 9,500 players: was ~1.1 GB (116 MB per 1,000)
        items = await clients[0].memory_list("mara", player_id="player-9999", limit=5)
        assert [item["text"] for item in items] == ["player-9999 paid a toll."]
        for client in clients:
            await client.close()
    finally:
        await server.stop()
        runtime.close()
