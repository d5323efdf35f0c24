"""Hypothesis against the live server: garbage frames never crash it, every one gets a
structured error, and the same connection then serves a normal ``say``."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect

from npc_engine.config import ServerLimits
from npc_engine.runtime import EngineRuntime
from npc_engine.server import NpcServer

pytestmark = pytest.mark.slow

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**31), 2**31) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
garbage = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=300),
    st.builds(json.dumps, json_values),
    st.builds(lambda v: msgpack.packb(v, use_bin_type=True), json_values),
    st.builds(lambda n: "x" * n, st.integers(4097, 9000)),
)


@pytest.fixture(scope="module")
def live_url(shared_runtime: EngineRuntime) -> Iterator[str]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    limits = ServerLimits(max_frame_bytes=4096, rate_per_second=1000, rate_burst=1000)
    server = NpcServer(shared_runtime.engine, port=0, limits=limits)
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(30)
    try:
        yield server.url
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(120)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def decode(frame: str | bytes) -> dict[str, object]:
    return msgpack.unpackb(frame) if isinstance(frame, bytes) else json.loads(frame)


async def garbage_then(url: str, frames: list[str | bytes], request: dict[str, object]) -> None:
    """Send garbage, check each frame got a structured error, then serve ``request``."""
    async with connect(url) as websocket:
        await websocket.send(json.dumps({"type": "hello", "id": "h", "protocol": "1"}))
        assert decode(await asyncio.wait_for(websocket.recv(), 10))["type"] == "welcome"
        for frame in frames:
            await websocket.send(frame)
            answer = decode(await asyncio.wait_for(websocket.recv(), 10))
            assert answer["type"] == "error" and isinstance(answer["code"], str)
        await websocket.send(json.dumps(request))
        message = decode(await asyncio.wait_for(websocket.recv(), 60))
        while message["type"] in ("reply.start", "reply.delta"):  # a say streams first
            message = decode(await asyncio.wait_for(websocket.recv(), 60))
        assert message["re"] == "ok" and message["type"] in ("npc.items", "reply.end"), message


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(frames=st.lists(garbage, min_size=1, max_size=4))
def test_garbage_gets_errors_and_the_connection_keeps_working(
    live_url: str, frames: list[str | bytes]
) -> None:
    asyncio.run(garbage_then(live_url, frames, {"type": "npc.list", "id": "ok"}))


@pytest.mark.timeout(120)
def test_after_garbage_the_connection_serves_a_real_say(live_url: str) -> None:
    frames: list[str | bytes] = ["[" * 10_000, b"\xc1", json.dumps({"type": 7}), "x" * 5000]
    say = {"type": "say", "id": "ok", "npc_id": "mara", "text": "Hi", "max_tokens": 4}
    asyncio.run(garbage_then(live_url, frames, say))
