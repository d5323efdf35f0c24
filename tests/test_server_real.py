"""Protocol v1 over real loopback WebSockets, with the real model and Chroma behind it."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import pytest
from websockets.asyncio.client import connect

from npc_engine.client import NpcClient, ProtocolError
from npc_engine.config import EngineConfig, ServerLimits
from npc_engine.expression import EMOTIONS
from npc_engine.runtime import EngineRuntime
from npc_engine.sentences import hold_window
from npc_engine.server import NpcServer
from tests.conftest import start_server_process

pytestmark = pytest.mark.slow


@pytest.fixture
async def server(shared_runtime: EngineRuntime) -> AsyncIterator[NpcServer]:
    instance = NpcServer(
        shared_runtime.engine, port=0, limits=ServerLimits(max_frame_bytes=4096), allow_inspect=True
    )
    await instance.start()
    try:
        yield instance
    finally:
        await instance.stop()


async def raw_exchange(url: str, frames: list[Any]) -> list[Any]:
    """Send frames one by one on one connection; collect one answer per frame."""
    answers = []
    async with connect(url) as websocket:
        for frame in frames:
            await websocket.send(frame)
            answer = await asyncio.wait_for(websocket.recv(), 30)
            answers.append(
                msgpack.unpackb(answer) if isinstance(answer, bytes) else json.loads(answer)
            )
    return answers


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
async def test_say_streams_a_reply(server: NpcServer, encoding: str) -> None:
    async with await NpcClient.connect(server.url, encoding=encoding) as client:
        assert client.welcome["type"] == "welcome"
        assert {npc["id"] for npc in client.welcome["npcs"]} == {
            "mara",
            "guard_tom",
            "wren",
            "ysolde",
        }
        stream = await client.say("mara", "Any rooms free tonight?", player_id="p1", max_tokens=16)
        deltas = [delta async for delta in stream]
        end = await stream.result()
        assert stream.start is not None and stream.start["npc_id"] == "mara"
        assert end["reason"] in ("stop", "length")
        assert "".join(deltas) == end["text"] and end["text"]
        assert end["usage"]["prompt_tokens"] > 0
        assert end["emotion"] in EMOTIONS


async def test_memory_event_list_forget(server: NpcServer) -> None:
    async with await NpcClient.connect(server.url) as client:
        ids = await client.event(["*"], "The bell of the chapel cracked.", importance=6)
        assert len(ids) == 4
        stream = await client.say("guard_tom", "My name is Aria.", player_id="aria", max_tokens=8)
        await stream.result()
        items = await client.memory_list("guard_tom", player_id="aria", query="what is my name?")
        assert any("My name is Aria" in item["text"] for item in items)
        assert all(item["score"] is not None for item in items)
        newest = await client.memory_list("guard_tom")
        assert [item["text"] for item in newest] == ["The bell of the chapel cracked."]
        about_aria = [
            item
            for item in await client.memory_list("guard_tom", player_id="aria", limit=100)
            if item["player_id"] == "aria"
        ]
        assert len(about_aria) >= 1
        assert await client.memory_forget("guard_tom", player_id="aria") == len(about_aria)
        remaining = await client.memory_list("guard_tom", player_id="aria", limit=100)
        assert [item["player_id"] for item in remaining] == [None]
        with pytest.raises(ProtocolError) as info:
            await client.memory_forget("guard_tom")
        assert info.value.code == "invalid_request"


async def test_cancel_ends_with_cancelled(server: NpcServer) -> None:
    async with await NpcClient.connect(server.url) as client:
        stream = await client.say("wren", "Tell me everything about the marsh.", max_tokens=200)
        async for _delta in stream:
            await client.cancel(stream.request_id)
            break
        end = await stream.result()
        assert end["reason"] == "cancelled"
        assert (await client.cancel("unknown-id"))["type"] == "ok"


async def test_ping_is_answered_while_replies_stream(server: NpcServer) -> None:
    async with (
        await NpcClient.connect(server.url) as talker,
        await NpcClient.connect(server.url) as pinger,
    ):
        streams = [
            await talker.say("ysolde", "Tell me a long tale.", max_tokens=120) for _ in range(2)
        ]
        await asyncio.sleep(0.3)
        lags = []
        for _ in range(5):
            started = time.perf_counter()
            await pinger.ping()
            lags.append(time.perf_counter() - started)
        assert max(lags) < 0.5, lags
        for stream in streams:
            await stream.result()


async def test_error_codes_keep_the_connection_open(server: NpcServer) -> None:
    hello = json.dumps({"type": "hello", "id": "h", "protocol": "1"})
    answers = await raw_exchange(
        server.url,
        [
            json.dumps({"type": "npc.list", "id": "0"}),
            hello,
            "not json",
            b"\xc1\xc1",
            "x" * 5000,
            json.dumps({"type": "teleport", "id": "1"}),
            json.dumps({"type": "say", "id": "2", "npc_id": "marra", "text": "hi"}),
            json.dumps({"type": "say", "id": "3", "npc_id": "mara"}),
            json.dumps({"type": "ping", "id": "4"}),
        ],
    )
    codes = [a.get("code", a["type"]) for a in answers]
    assert codes == [
        "hello_required",
        "welcome",
        "bad_frame",
        "bad_frame",
        "too_large",
        "unknown_type",
        "unknown_npc",
        "invalid_request",
        "pong",
    ]
    assert answers[6]["re"] == "2" and "Known: guard_tom, mara" in answers[6]["message"]
    unsupported = await raw_exchange(
        server.url, [json.dumps({"type": "hello", "id": "1", "protocol": "7"})]
    )
    assert unsupported[0]["code"] == "unsupported_protocol"


async def test_token_is_required_when_set(shared_runtime: EngineRuntime) -> None:
    guarded = NpcServer(shared_runtime.engine, port=0, token="s3cret")
    await guarded.start()
    try:
        with pytest.raises(ProtocolError) as info:
            await NpcClient.connect(guarded.url, token="wrong")
        assert info.value.code == "unauthorized"
        async with await NpcClient.connect(guarded.url, token="s3cret") as client:
            assert (await client.ping())["type"] == "pong"
    finally:
        await guarded.stop()


def test_non_loopback_without_token_is_refused(shared_runtime: EngineRuntime) -> None:
    from npc_engine.errors import NpcEngineError

    with pytest.raises(NpcEngineError, match="without a token"):
        NpcServer(shared_runtime.engine, host="0.0.0.0")


def test_serve_command_prints_url_and_stops_on_sigterm(real_config: EngineConfig) -> None:
    process, url = start_server_process(real_config)

    async def talk() -> str:
        async with await NpcClient.connect(url) as client:
            stream = await client.say("mara", "Hello!", max_tokens=8)
            return str((await stream.result())["reason"])

    assert asyncio.run(talk()) in ("stop", "length")
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0


async def test_failure_mid_reply_still_ends_consistently(
    server: NpcServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_say(*_args: Any, on_delta: Any = None, **_kwargs: Any) -> Any:
        on_delta("Half a sentence")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(server.engine, "say", broken_say)
    async with await NpcClient.connect(server.url) as client:
        stream = await client.say("mara", "Hello?")
        deltas = [delta async for delta in stream]
        end = await stream.result()
        assert end["reason"] == "error" and end["error"]["code"] == "internal"
        assert deltas == ["Half a sentence"] == [end["text"]]
        assert "disk on fire" not in end["error"]["message"]  # the log has it, not clients
        assert (await client.ping())["type"] == "pong"


async def test_idle_connections_are_closed_but_not_while_a_reply_runs(
    shared_runtime: EngineRuntime,
) -> None:
    idle = NpcServer(shared_runtime.engine, port=0, limits=ServerLimits(idle_timeout=0.4))
    await idle.start()
    try:
        async with connect(idle.url) as websocket:
            await websocket.send(json.dumps({"type": "hello", "id": "1", "protocol": "1"}))
            await websocket.recv()
            await asyncio.wait_for(websocket.wait_closed(), 10)
            assert websocket.close_code == 4408
        async with await NpcClient.connect(idle.url) as client:
            # A reply longer than the idle timeout: the silent client is not cut off.
            stream = await client.say("mara", "Tell me a long story.", max_tokens=48)
            await asyncio.sleep(0.6)
            end = await stream.result()
            assert end["reason"] in ("stop", "length")
    finally:
        await idle.stop()


async def test_playtest_remote_session_gets_prompt_and_scored_memories(server: NpcServer) -> None:
    from npc_engine.playtest.remote_session import RemoteSession

    session = await RemoteSession.open(server.url, None)
    try:
        cards = {card.id: card for card in await session.npcs()}
        assert cards["mara"].mood and cards["mara"].name == "Mara Saltwhistle"
        await session.event(["mara"], "A whale was seen in the harbour.", None, 6)
        deltas: list[str] = []
        turn = await session.say(
            "mara", "p9", "Did you see the whale?", max_tokens=8, on_delta=deltas.append
        )
        assert turn.text == "".join(deltas) and turn.reason in ("stop", "length")
        assert "Did you see the whale?" in turn.prompt
        recalled = [m for m in turn.memories if "whale" in m.text]
        assert recalled and recalled[0].score is not None and recalled[0].relevance is not None
        assert turn.prompt_tokens > 0 and turn.ttft_ms is not None
    finally:
        await session.close()


async def test_deadline_sends_the_fallback_at_once_and_drops_the_generation(
    server: NpcServer,
) -> None:
    async with await NpcClient.connect(server.url) as client:
        busy = await client.say("mara", "Tell me a long story about the sea.", max_tokens=60)
        # Queued behind a running reply: no token can come within 50 ms.
        stream = await client.say("wren", "Quick, a remedy!", deadline_ms=50)
        deltas = [delta async for delta in stream]
        end = await stream.result()
        assert end["reason"] == "error" and end["error"]["code"] == "deadline"
        assert deltas == [end["text"]] and end["text"]  # the persona's fallback line
        assert (await busy.result())["reason"] in ("stop", "length")
        after = await client.say("wren", "Hello?", max_tokens=8)
        assert (await after.result())["reason"] in ("stop", "length")


async def test_client_calls_fail_instead_of_hanging_when_the_server_goes(
    shared_runtime: EngineRuntime,
) -> None:
    doomed = NpcServer(shared_runtime.engine, port=0)
    await doomed.start()
    client = await NpcClient.connect(doomed.url)
    stream = await client.say("mara", "Tell me a long story about the sea.", max_tokens=200)
    async for _delta in stream:
        break
    await doomed.stop()  # ends the reply (shutdown), then closes every connection
    end = await asyncio.wait_for(stream.result(), 30)
    assert end["reason"] == "error" and end["error"]["code"] == "shutdown"
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(client.ping(), 30)
    await client.close()


async def test_deltas_after_the_first_are_gathered_per_interval(
    shared_runtime: EngineRuntime,
) -> None:
    """One frame per token with interval 0; with 250 ms, the first token alone, then batches.
    (The output guard is off here: it releases whole words, and token-by-token streaming is
    what is measured.)"""
    counts = {}
    guard = shared_runtime.engine.config.guard
    for interval_ms in (0.0, 250.0):
        guard.enabled = False  # on again after each round: the engine is shared
        server = NpcServer(
            shared_runtime.engine, port=0, limits=ServerLimits(delta_interval_ms=interval_ms)
        )
        await server.start()
        try:
            async with await NpcClient.connect(server.url) as client:
                started = time.perf_counter()
                stream = await client.say(
                    "wren", "Tell me everything about the marsh.", player_id=f"p{interval_ms}"
                )
                deltas = [delta async for delta in stream]
                elapsed = time.perf_counter() - started
                end = await stream.result()
        finally:
            await server.stop()
            guard.enabled = True
        tokens = end["usage"]["completion_tokens"]
        assert tokens >= 12, end  # long enough for batching to show
        assert "".join(deltas) == end["text"]
        counts[interval_ms] = (len(deltas), tokens, elapsed)
    plain, plain_tokens, _ = counts[0.0]
    gathered, _, elapsed = counts[250.0]
    # About one per token (a few tokens are empty text), except near max_tokens, where the
    # unfinished sentence is held and sent whole (sentences.hold_window).
    free = plain_tokens - hold_window(
        shared_runtime.engine.persona("wren").persona.generation.max_tokens
        or shared_runtime.engine.config.max_tokens
    )
    assert plain >= free * 0.6
    assert gathered <= 2 + elapsed / 0.25  # the first, then at most one per interval
    assert gathered < plain
