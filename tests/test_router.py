"""The request router without a socket: a connection whose frames land in a list.

The WebSocket server only moves frames to and from ``Router``; these tests drive the
router as any transport would, on the scripted generator and the in-memory store.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from npc_engine.config import ServerLimits, load_config
from npc_engine.dialogue import DialogueEngine
from npc_engine.generation.scripted import ScriptedGenerator
from npc_engine.memory.in_memory import InMemoryStore
from npc_engine.persona.loader import load_personas
from npc_engine.protocol import REQUEST_TYPES, Encoding, encode
from npc_engine.protocol.requests import request_type
from npc_engine.serving.connection import Connection
from npc_engine.serving.router import Router
from npc_engine.serving.routes import ROUTES

from .conftest import FAKE_STORE_RETRIEVAL

pytestmark = pytest.mark.timeout(30)
ANSWERED_ON_ARRIVAL = {"hello", "ping", "cancel"}  # by the router itself, never queued


class Client:
    """A transport of frames in a list: what a socket would carry, decoded."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.frames: list[dict[str, Any]] = []
        self.arrived = asyncio.Event()
        self.conn: Connection = router.open(self._send)
        self.task = asyncio.create_task(router.serve_in_order(self.conn))

    async def _send(self, message: BaseModel, encoding: Encoding) -> None:
        self.frames.append({**json.loads(encode(message, "json")), "encoding": encoding})
        self.arrived.set()

    async def send(self, **frame: Any) -> None:
        await self.router.receive(self.conn, json.dumps(frame))

    async def until(self, **match: Any) -> dict[str, Any]:
        while True:
            for frame in self.frames:
                if all(frame.get(k) == v for k, v in match.items()):
                    return frame
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), 10)

    def close(self) -> None:
        self.task.cancel()
        self.router.close(self.conn)


def make_router(sample_personas: Path, generator: ScriptedGenerator, **limits: Any) -> Router:
    config = load_config(retrieval=FAKE_STORE_RETRIEVAL)
    engine = DialogueEngine(load_personas(sample_personas), generator, InMemoryStore(), config)
    return Router(engine, ServerLimits(**limits))


def test_every_request_type_has_exactly_one_handler() -> None:
    routed = {request_type(model) for model in ROUTES}
    assert routed == set(REQUEST_TYPES) - ANSWERED_ON_ARRIVAL


async def _hello(client: Client) -> dict[str, Any]:
    await client.send(type="hello", id="h", protocol="1")
    return await client.until(re="h")


def test_a_say_streams_its_reply_without_a_socket(sample_personas: Path) -> None:
    async def run() -> None:
        router = make_router(sample_personas, ScriptedGenerator(["Aye, one room left."]))
        client = Client(router)
        welcome = await _hello(client)
        assert welcome["type"] == "welcome"
        assert {"stream", "memory", "state", "saves", "scenes", "msgpack"} <= set(
            welcome["capabilities"]
        )
        await client.send(type="say", id="s1", npc_id="mara", player_id="p1", text="Rooms?")
        end = await client.until(type="reply.end", re="s1")
        deltas = [f["text"] for f in client.frames if f["type"] == "reply.delta"]
        assert "".join(deltas) == end["text"] == "Aye, one room left."
        assert not router.connections.pop().ledger.replies  # the id is free again
        client.close()
        await router.stop_work()

    asyncio.run(run())


def test_refusals_name_their_reason_and_leave_the_connection_working(
    sample_personas: Path,
) -> None:
    async def run() -> None:
        router = make_router(sample_personas, ScriptedGenerator(respond=lambda _p: "Aye."))
        client = Client(router)
        await _hello(client)
        await client.send(type="say", id="x", npc_id="nobody", player_id="p1", text="Hi")
        unknown = await client.until(re="x", type="error")
        assert unknown["code"] == "unknown_npc" and "mara" in unknown["details"]["known"]
        await client.send(type="state.get", id="g", player_id="bad id!")
        refused = await client.until(re="g", type="error")
        assert refused["code"] == "invalid_request"
        await client.send(type="say", id="ok", npc_id="mara", player_id="p1", text="Hi")
        assert (await client.until(re="ok", type="reply.end"))["text"] == "Aye."
        client.close()
        await router.stop_work()

    asyncio.run(run())


def test_a_cancel_overtakes_a_queued_say(sample_personas: Path) -> None:
    async def run() -> None:
        router = make_router(sample_personas, ScriptedGenerator(respond=lambda _p: "Aye."))
        client = Client(router)
        await _hello(client)
        # Both arrive before the connection's task serves the first: the second is queued
        # when its cancel comes, and ends as cancelled without running.
        await client.send(type="event", id="e", npc_ids=["mara"], text="Fog at dawn.")
        await client.send(type="say", id="s", npc_id="mara", player_id="p1", text="Hi")
        await client.send(type="cancel", id="c", target="s")
        end = await client.until(re="s", type="reply.end")
        assert end["reason"] == "cancelled"
        assert (await client.until(re="c"))["type"] == "ok"
        client.close()
        await router.stop_work()

    asyncio.run(run())


def test_the_connection_queue_is_bounded(sample_personas: Path) -> None:
    async def run() -> None:
        router = make_router(
            sample_personas,
            ScriptedGenerator(respond=lambda _p: "Aye."),
            max_pending_per_connection=2,
        )
        client = Client(router)
        await _hello(client)
        client.task.cancel()  # nothing is served: requests wait in the queue
        for n in range(3):
            await client.send(type="npc.list", id=f"n{n}")
        busy = await client.until(re="n2")
        assert busy["type"] == "error" and busy["code"] == "busy"
        router.close(client.conn)
        await router.stop_work()

    asyncio.run(run())


def test_every_engine_error_carries_a_protocol_error_code() -> None:
    import typing

    import npc_engine.cards  # noqa: F401  (defines errors of its own)
    from npc_engine.errors import NpcEngineError, UnknownNpcError
    from npc_engine.protocol import ErrorCode
    from npc_engine.serving.router import refusal_of

    codes = set(typing.get_args(ErrorCode))
    pending, seen = [NpcEngineError], []
    while pending:
        cls = pending.pop()
        seen.append(cls)
        pending += cls.__subclasses__()
    assert len(seen) > 8
    assert all(cls.code in codes for cls in seen), [c for c in seen if c.code not in codes]
    refusal = refusal_of(UnknownNpcError("nobody", ["mara"]))
    assert (refusal.code, refusal.details) == ("unknown_npc", {"known": ["mara"]})


def test_a_refusal_answers_in_the_encoding_of_the_frame_it_refuses(sample_personas: Path) -> None:
    """protocol.md: an error answering a frame uses that frame's encoding, also when the
    refusal comes when the request's turn to be accepted comes (inspect, queue, id)."""
    import msgpack

    async def run() -> None:
        router = make_router(sample_personas, ScriptedGenerator(respond=lambda _p: "Aye."))
        client = Client(router)
        hello = {"type": "hello", "id": "h", "protocol": "1"}
        await router.receive(client.conn, msgpack.packb(hello, use_bin_type=True))
        assert (await client.until(re="h"))["encoding"] == "msgpack"
        await client.send(
            type="say", id="i", npc_id="mara", player_id="p1", text="Hi", inspect=True
        )
        refused = await client.until(re="i")
        assert (refused["code"], refused["encoding"]) == ("unauthorized", "json")
        await client.send(type="say", id="x", npc_id="nobody", player_id="p1", text="Hi")
        assert (await client.until(re="x"))["encoding"] == "json"
        client.close()
        await router.stop_work()

    asyncio.run(run())


def test_the_python_client_talks_to_a_router_in_process(sample_personas: Path) -> None:
    """The playtest's in-process session: NpcClient over serving.in_process, no socket."""
    from npc_engine.client import NpcClient, ProtocolError
    from npc_engine.serving.in_process import InProcessLink

    async def run() -> None:
        router = make_router(sample_personas, ScriptedGenerator(respond=lambda _p: "Aye."))
        link = InProcessLink(router)
        client = await NpcClient.attach(link, client_name="test")
        try:
            assert client.welcome["type"] == "welcome"
            stream = await client.say("mara", "Any rooms?", player_id="p1")
            text = "".join([piece async for piece in stream])
            end = await stream.result()
            assert text == end["text"] == "Aye."
            with pytest.raises(ProtocolError, match="unknown_npc"):
                await (await client.say("nobody", "Hello?", player_id="p1")).result()
            assert (await client.ping())["type"] == "pong"  # the connection still works
            # Requests are built by the protocol models: a bad id fails here, naming the
            # field, and nothing is sent.
            sent: list[str | bytes] = []
            forward = link.send

            async def counted(frame: str | bytes) -> None:
                sent.append(frame)
                await forward(frame)

            link.send = counted  # type: ignore[method-assign]
            with pytest.raises(ValidationError, match="player_id"):
                await client.say("mara", "Hello?", player_id="no spaces allowed")
            assert sent == []
            assert (await client.ping())["type"] == "pong" and len(sent) == 1
        finally:
            await client.close()
            await router.stop_replies()
            await router.stop_work()
        assert link.close_code == 1000 and link.connection not in router.connections

    asyncio.run(run())


def test_each_ok_carries_only_the_fields_of_its_request(sample_personas: Path) -> None:
    """``ok`` is one type on the wire; what it carries is its request's (``OK_ANSWERS``),
    with no null fields of the others."""
    from npc_engine.protocol import OK_ANSWERS

    def fields_of(kind: str) -> set[str]:
        return set(OK_ANSWERS[kind].model_fields)

    async def run() -> None:
        router = make_router(sample_personas, ScriptedGenerator(["Aye."]))
        client = Client(router)
        await _hello(client)
        requests = {
            "event": {"npc_ids": ["mara"], "text": "A storm broke the pier."},
            "memory.forget": {"npc_id": "mara", "player_id": "p1"},
            "npc.warm": {"npc_ids": ["mara"]},
            "world.tick": {},
            "cancel": {"target": "nothing-running"},
        }
        for index, (kind, fields) in enumerate(requests.items()):
            await client.send(type=kind, id=f"r{index}", **fields)
            answer = await client.until(re=f"r{index}")
            answer.pop("encoding")
            assert answer["type"] == "ok", answer
            assert set(answer) == fields_of(kind), (kind, answer)
        assert fields_of("cancel") == {"type", "re"}
        assert fields_of("save.create") == {"type", "re", "save_id", "memories"}
        client.close()
        await router.stop_work()

    asyncio.run(run())
