"""An asyncio client for protocol v1 (used by the tests and the playtest tool).

async with await NpcClient.connect("ws://127.0.0.1:8765/") as client:
    reply = await client.say("mara", "Any rooms free?", player_id="p1")
    async for delta in reply:
        print(delta, end="")
    end = await reply.result()
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from ssl import SSLContext
from types import TracebackType
from typing import Any

import msgpack
from pydantic import BaseModel
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from npc_engine.protocol import (
    Cancel,
    Event,
    Greet,
    Hello,
    MemoryForget,
    MemoryList,
    NpcList,
    NpcWarm,
    Ping,
    SaveCreate,
    SaveDelete,
    SaveExport,
    SaveImport,
    SaveList,
    SaveLoad,
    Say,
    SceneStart,
    StateGet,
    StateSet,
    WorldTick,
)
from npc_engine.protocol.requests import request_type


def _request(model: type[BaseModel], request_id: str, **fields: Any) -> dict[str, Any]:
    """A request built by its protocol model, the one the server reads it with: a bad id or
    an over-long text fails here (pydantic's ``ValidationError`` names the field) before
    anything is sent. Optional fields left as None are not sent."""
    given = {key: value for key, value in fields.items() if value is not None}
    built = model(type=request_type(model), id=request_id, **given)
    return built.model_dump(mode="json", exclude_unset=True)


class ProtocolError(Exception):
    """The server answered a request with an ``error`` message."""

    def __init__(self, message: dict[str, Any]) -> None:
        self.code = str(message.get("code"))
        self.details = message.get("details", {})
        self.message = message
        super().__init__(f"{self.code}: {message.get('message')}")


class ReplyStream:
    """The deltas of one reply, then its ``reply.end``."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.start: dict[str, Any] | None = None
        self._deltas: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._end: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    def _feed(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "reply.start":
            self.start = message
        elif kind == "reply.delta":
            self._deltas.put_nowait(message)
        elif kind == "reply.end":
            self._deltas.put_nowait(message)
            if not self._end.done():
                self._end.set_result(message)
        elif kind == "error" and not self._end.done():
            self._end.set_exception(ProtocolError(message))
            self._deltas.put_nowait(message)

    def _fail(self, error: Exception) -> None:
        if not self._end.done():
            self._end.set_exception(error)
            self._end.exception()  # delivered by iteration or result(); no "never retrieved"
            self._deltas.put_nowait({"type": "error"})

    async def __aiter__(self) -> AsyncIterator[str]:
        while True:
            message = await self._deltas.get()
            if message.get("type") != "reply.delta":
                if message.get("type") == "error":
                    failure = self._end.exception() if self._end.done() else None
                    raise failure or ProtocolError(message)
                return
            yield str(message["text"])

    async def result(self) -> dict[str, Any]:
        return await self._end

    def finished_by(self, message: dict[str, Any]) -> bool:
        return message.get("type") in ("reply.end", "error")


class SceneStream:
    """The lines of one scene, each once its ``reply.end`` came (a dict: ``npc_id``,
    ``text``, ``start``, ``end``), then the ``scene.end`` (``result()``)."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._lines: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._start: dict[str, Any] | None = None
        self._end: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    def _feed(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "reply.start":
            self._start = message
        elif kind == "reply.end":
            start = self._start or {}
            line = {"npc_id": start.get("npc_id"), "text": message.get("text", "")}
            self._lines.put_nowait({**line, "start": start, "end": message})
        elif kind in ("scene.end", "error") and not self._end.done():
            if kind == "error":
                self._end.set_exception(ProtocolError(message))
                self._end.exception()  # delivered by iteration or result()
            else:
                self._end.set_result(message)
            self._lines.put_nowait(None)

    def _fail(self, error: Exception) -> None:
        if not self._end.done():
            self._end.set_exception(error)
            self._end.exception()
            self._lines.put_nowait(None)

    def finished_by(self, message: dict[str, Any]) -> bool:
        return message.get("type") in ("scene.end", "error")

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        while True:
            line = await self._lines.get()
            if line is None:
                if self._end.exception() is not None:
                    raise self._end.exception()  # type: ignore[misc]
                return
            yield line

    async def result(self) -> dict[str, Any]:
        """The ``scene.end`` message (reason, turns)."""
        return await self._end


class NpcClient:
    def __init__(self, websocket: ClientConnection, encoding: str) -> None:
        self._ws = websocket
        self._encoding = encoding
        self._ids = itertools.count(1)
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._streams: dict[str, ReplyStream | SceneStream] = {}
        self._gone: ConnectionError | None = None  # set when the connection closes
        self._reader = asyncio.create_task(self._read())
        self.welcome: dict[str, Any] = {}

    @classmethod
    async def connect(
        cls,
        url: str = "ws://127.0.0.1:8765/",
        *,
        token: str | None = None,
        client_name: str = "npc-engine-python",
        encoding: str = "json",
        ssl: SSLContext | None = None,
    ) -> NpcClient:
        """``wss://`` URLs use TLS: the system's trusted CAs by default, or ``ssl`` (e.g. a
        context that trusts the studio's own certificate)."""
        websocket = await connect(url, max_size=None, ssl=ssl)
        return await cls.attach(websocket, token=token, client_name=client_name, encoding=encoding)

    @classmethod
    async def attach(
        cls,
        link: Any,
        *,
        token: str | None = None,
        client_name: str = "npc-engine-python",
        encoding: str = "json",
    ) -> NpcClient:
        """A client over an open connection: a WebSocket, or a ``serving.in_process``
        link to a router in this process. Says hello first."""
        client = cls(link, encoding)
        try:
            client.welcome = await client.ask(Hello, protocol="1", client=client_name, token=token)
        except BaseException:
            await client.close()
            raise
        return client

    async def __aenter__(self) -> NpcClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._ws.close()
        self._reader.cancel()

    def _next_id(self) -> str:
        return str(next(self._ids))

    async def send_raw(self, message: dict[str, Any]) -> None:
        if self._gone is not None:
            raise self._gone
        frame = (
            msgpack.packb(message, use_bin_type=True)
            if self._encoding == "msgpack"
            else json.dumps(message)
        )
        try:
            await self._ws.send(frame)
        except ConnectionClosed as exc:
            raise ConnectionError(f"connection closed: {exc}") from exc

    async def ask(self, model: type[BaseModel], **fields: Any) -> dict[str, Any]:
        """Send one request of ``model`` and wait for its single answer."""
        return await self.request(_request(model, self._next_id(), **fields))

    async def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send one request and wait for its single answer (raises ``ProtocolError``)."""
        request_id = message.setdefault("id", self._next_id())
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = answer
        await self.send_raw(message)
        reply = await answer
        if reply.get("type") == "error":
            raise ProtocolError(reply)
        return reply

    async def say(
        self,
        npc_id: str,
        text: str,
        *,
        player_id: str = "player",
        context: dict[str, Any] | None = None,
        max_tokens: int | None = None,
        inspect: bool | None = None,
        priority: str | None = None,
        deadline_ms: int | None = None,
        game_time: float | None = None,
        scene_id: str | None = None,
    ) -> ReplyStream:
        """With ``scene_id``: the player speaks in that running scene; the reply is the
        scene's next line (``reply.start`` names the NPC)."""
        return await self._stream(
            Say,
            npc_id=npc_id,
            player_id=player_id,
            text=text,
            context=context,
            max_tokens=max_tokens,
            inspect=inspect,
            priority=priority,
            deadline_ms=deadline_ms,
            game_time=game_time,
            scene_id=scene_id,
        )

    async def scene(
        self,
        scene_id: str,
        npc_ids: list[str],
        *,
        player_id: str | None = None,
        topic: str | None = None,
        max_turns: int | None = None,
        max_tokens: int | None = None,
        game_time: float | None = None,
        inspect: bool | None = None,
    ) -> SceneStream:
        """``scene.start``: the NPCs talk among themselves; iterate for their lines.
        ``cancel(stream.request_id)`` ends it."""
        request_id = self._next_id()
        stream = SceneStream(request_id)
        self._streams[request_id] = stream
        await self.send_raw(
            _request(
                SceneStart,
                request_id,
                scene_id=scene_id,
                npc_ids=npc_ids,
                player_id=player_id,
                topic=topic,
                max_turns=max_turns,
                max_tokens=max_tokens,
                game_time=game_time,
                inspect=inspect,
            )
        )
        return stream

    async def world_tick(self, game_time: float | None = None) -> int:
        """``world.tick``: rumours spread; returns how many were passed on."""
        return int((await self.ask(WorldTick, game_time=game_time))["spread"])

    async def greet(
        self,
        npc_id: str,
        *,
        player_id: str = "player",
        context: dict[str, Any] | None = None,
        inspect: bool | None = None,
        game_time: float | None = None,
    ) -> ReplyStream:
        """The player walks up: the persona's greeting at a first meeting (at once), else
        a greeting from what the NPC remembers. Streams like ``say``."""
        return await self._stream(
            Greet,
            npc_id=npc_id,
            player_id=player_id,
            context=context,
            inspect=inspect,
            game_time=game_time,
        )

    async def _stream(self, model: type[BaseModel], **fields: Any) -> ReplyStream:
        request_id = self._next_id()
        message = _request(model, request_id, **fields)
        stream = ReplyStream(request_id)
        self._streams[request_id] = stream
        await self.send_raw(message)
        return stream

    async def warm(self, npc_ids: list[str]) -> dict[str, Any]:
        """``npc.warm`` (``["*"]``: every NPC): returns ``{"warmed": [...], "ms": ...}``."""
        return await self.ask(NpcWarm, npc_ids=npc_ids)

    async def save_create(self, save_id: str) -> dict[str, Any]:
        return await self.ask(SaveCreate, save_id=save_id)

    async def save_load(self, save_id: str) -> dict[str, Any]:
        return await self.ask(SaveLoad, save_id=save_id)

    async def save_list(self) -> list[dict[str, Any]]:
        return list((await self.ask(SaveList))["saves"])

    async def save_delete(self, save_id: str) -> dict[str, Any]:
        return await self.ask(SaveDelete, save_id=save_id)

    async def save_export(self, save_id: str) -> str:
        """Writes the save as one file in the server's exports folder; returns its name there
        (what ``save_import`` takes)."""
        return str((await self.ask(SaveExport, save_id=save_id))["path"])

    async def save_import(self, save_id: str, file: str) -> dict[str, Any]:
        """Reads ``file`` (a name in the server's exports folder) as ``save_id``."""
        return await self.ask(SaveImport, save_id=save_id, file=file)

    async def cancel(self, target: str) -> dict[str, Any]:
        return await self.ask(Cancel, target=target)

    async def event(
        self,
        npc_ids: list[str],
        text: str,
        *,
        player_id: str | None = None,
        importance: int | None = None,
        game_time: float | None = None,
    ) -> list[str]:
        written = await self.ask(
            Event,
            npc_ids=npc_ids,
            text=text,
            player_id=player_id,
            importance=importance,
            game_time=game_time,
        )
        return list(written["memory_ids"])

    async def memory_list(
        self,
        npc_id: str,
        *,
        player_id: str | None = None,
        query: str | None = None,
        limit: int = 10,
    ) -> list[dict[str, Any]]:
        listed = await self.ask(
            MemoryList, npc_id=npc_id, limit=limit, player_id=player_id, query=query
        )
        return list(listed["items"])

    async def memory_forget(self, npc_id: str, **what: Any) -> int:
        return int((await self.ask(MemoryForget, npc_id=npc_id, **what))["count"])

    async def set_state(
        self,
        player_id: str,
        *,
        npc_id: str | None = None,
        trust: int | None = None,
        trust_delta: int | None = None,
        flags: dict[str, Any] | None = None,
        game_time: float | None = None,
    ) -> dict[str, Any]:
        """``state.set``: trust (needs ``npc_id``) and flags (``None`` deletes one); returns
        the ``state`` answer (trust, flags, unlocked entries)."""
        return await self.ask(
            StateSet,
            player_id=player_id,
            npc_id=npc_id,
            trust=trust,
            trust_delta=trust_delta,
            flags=flags,
            game_time=game_time,
        )

    async def get_state(self, player_id: str, *, npc_id: str | None = None) -> dict[str, Any]:
        """``state.get``: the player's flags, and with ``npc_id`` that NPC's trust."""
        return await self.ask(StateGet, player_id=player_id, npc_id=npc_id)

    async def npcs(self) -> list[dict[str, Any]]:
        return list((await self.ask(NpcList))["npcs"])

    async def ping(self) -> dict[str, Any]:
        return await self.ask(Ping)

    async def _read(self) -> None:
        reason = "the client closed it"
        try:
            await self._dispatch_frames()
            reason = f"close code {self._ws.close_code}"
        except ConnectionClosed as exc:
            reason = str(exc)
        finally:
            # Nobody may wait forever on a connection that is gone, whatever its close code.
            gone = self._gone = ConnectionError(f"connection closed: {reason}")
            for waiter in self._waiting.values():
                if not waiter.done():
                    waiter.set_exception(gone)
            for stream in self._streams.values():
                stream._fail(gone)
            self._waiting.clear()
            self._streams.clear()

    async def _dispatch_frames(self) -> None:
        async for frame in self._ws:
            message = msgpack.unpackb(frame) if isinstance(frame, bytes) else json.loads(frame)
            request_id = message.get("re")
            stream = self._streams.get(request_id) if request_id else None
            if stream is not None:
                stream._feed(message)
                if stream.finished_by(message):
                    self._streams.pop(request_id, None)
                continue
            waiter = self._waiting.pop(request_id, None) if request_id else None
            if waiter is not None and not waiter.done():
                waiter.set_result(message)
