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
from npc_engine.config import GuardConfig, ServerLimits, load_config
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
    """The real generator; fails after ``fail_after`` pieces of text (0: before any; at
    the reply's end if it is shorter), or with ``hold`` set, streams one piece and then
    waits, deaf to cancel."""

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

        stats = self._real.generate(prompt, params, counting, cancel)
        if self.fail_after is not None and seen:
            # The reply ended before that piece (its length follows the CPU and what the
            # shared conversation held): the fault comes after its last piece instead.
            raise RuntimeError("the GPU fell off at the end of the reply")
        return stats

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@pytest.fixture
def faulty(
    shared_runtime: EngineRuntime,
) -> Iterator[tuple[DialogueEngine, FaultyGenerator, SlowStore]]:
    """An engine of the real parts (model, Chroma) with the fault wrappers around them. The
    output guard is off: these tests count what the server streams token by token, and the
    guard releases whole words (it has tests of its own)."""
    real = shared_runtime.engine
    generator = FaultyGenerator(real.generator)
    store = SlowStore(real.store)
    config = real.config.model_copy(update={"guard": GuardConfig(enabled=False)})
    engine = DialogueEngine(real.registry, generator, store, config)  # type: ignore[arg-type]
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


async def test_a_cancel_that_overtakes_its_queued_say_still_cancels_it(
    faulty: tuple[DialogueEngine, FaultyGenerator, SlowStore],
) -> None:
    engine, _generator, store = faulty
    server = NpcServer(engine, port=0)
    await server.start()
    try:
        async with connect(server.url) as websocket:
            await websocket.send(json.dumps({"type": "hello", "id": "h", "protocol": "1"}))
            await websocket.recv()
            store.gate.clear()  # the event holds the ordered queue; the say waits behind it
            event = {"type": "event", "id": "e", "npc_ids": ["mara"], "text": "Fog rolled in."}
            say = {"type": "say", "id": "s", "npc_id": "mara", "text": "Hello?", "max_tokens": 8}
            for frame in (event, say, {"type": "cancel", "id": "c", "target": "s"}):
                await websocket.send(json.dumps(frame))
            assert json.loads(await asyncio.wait_for(websocket.recv(), 30))["re"] == "c"
            store.gate.set()
            frames = []
            while not frames or frames[-1]["type"] != "reply.end":
                frames.append(json.loads(await asyncio.wait_for(websocket.recv(), 60)))
            assert [f["type"] for f in frames if f.get("re") == "s"] == ["reply.start", "reply.end"]
            assert frames[-1]["reason"] == "cancelled"
    finally:
        store.gate.set()
        await server.stop()


@pytest.mark.parametrize("fail_after", [0, 6], ids=["before-first-token", "mid-reply"])
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
                assert deltas and end["text"] not in fallbacks  # what was sent stays
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


@pytest.mark.timeout(400)
def test_ten_thousand_player_ids_keep_ram_and_handles_bounded(tmp_path: Path) -> None:
    """10,000 new player ids, each with a memory and a listing against one NPC, through the
    real engine and Chroma on disk. (Memories go in with precomputed vectors in batches, as
    the writer batches them: embedding 10,000 lines would only add minutes, not state.)"""
    import numpy as np

    from npc_engine.runtime import open_engine

    config = load_config(
        personas_dir=Path(__file__).resolve().parent.parent / "personas",
        data_dir=tmp_path / "data",
        generation={"backend": "scripted"},
        max_conversations=50,
    )
    runtime = open_engine(config)
    engine, store = runtime.engine, runtime.engine.store
    rng = np.random.default_rng(3)
    players = [f"player-{index}" for index in range(10_000)]

    def visit(chunk: list[str]) -> None:
        vectors = rng.normal(size=(len(chunk), 384)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        memories = [Memory(npc_id="mara", text=f"{p} paid a toll.", player_id=p) for p in chunk]
        store.add_with_embeddings(memories, vectors.tolist())  # type: ignore[attr-defined]
        for player in chunk[::20]:  # a listing for every 20th player keeps this test short
            assert engine.recent_memories("mara", player, 2)[0].player_id == player

    try:
        visit(players[:500])  # caches and Chroma warm up
        for player in players[:60]:
            engine.say("mara", "Hello there.", player_id=player)  # conversations in RAM
        baseline_rss, baseline_fds = rss_bytes(), len(os.listdir("/proc/self/fd"))
        for start in range(500, len(players), 500):
            visit(players[start : start + 500])
        for player in players[-60:]:
            engine.say("mara", "Hello there.", player_id=player)
        grown_rss = rss_bytes() - baseline_rss
        grown_fds = len(os.listdir("/proc/self/fd")) - baseline_fds
        mib = grown_rss / 2**20
        print(f"\n10,000 player ids: RSS +{mib:.1f} MiB after the first 500, fds +{grown_fds}")
        assert grown_fds <= 8  # a collection per player opened 4 files each
        assert grown_rss < 100 * 2**20  # a collection per player: ~2.5 MB each
        assert engine.conversation_count() == 50
        engine.writer.flush()
        found = store.search("mara", "player-9999", "who paid a toll?", 10)
        assert {c.memory.player_id for c in found} == {"player-9999"}  # never another's
        assert "player-9999 paid a toll." in [c.memory.text for c in found]
    finally:
        runtime.close()
