"""The WebSocket server: a thin asyncio layer around ``ProtocolSession`` and the engine.

Turns run on ``GenerationScheduler`` workers, one per conversation the generator decodes at
once (its batch slots), which keeps requests for the same (npc_id, player_id) in order and
never runs one conversation twice. Memory and Chroma calls run on a separate small pool.
Nothing blocking runs on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from npc_engine import __version__
from npc_engine.config import ServerLimits
from npc_engine.dialogue import DialogueEngine, TurnResult
from npc_engine.errors import NpcEngineError, UnknownNpcError
from npc_engine.memory.types import Memory
from npc_engine.protocol import (
    Cancel,
    Encoding,
    Error,
    ErrorCode,
    ErrorInfo,
    Event,
    Hello,
    MemoryForget,
    MemoryItem,
    MemoryItems,
    MemoryList,
    NpcInfo,
    NpcItems,
    NpcList,
    Ok,
    Ping,
    Pong,
    ProtocolSession,
    RecalledMemory,
    ReplyDelta,
    ReplyEnd,
    ReplyStart,
    Say,
    TurnInspection,
    Usage,
    Welcome,
    encode,
)
from npc_engine.scheduling import GenerationScheduler

log = logging.getLogger(__name__)
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
# Private-use close code (4000-4999), mirroring HTTP 408: the client sent nothing for
# ``limits.idle_timeout`` seconds and had no reply running.
IDLE_CLOSE_CODE = 4408


class _TokenBucket:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.capacity = rate, float(burst)
        self.tokens, self.stamp = float(burst), time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


@dataclass
class _Connection:
    """One client: its socket, protocol state and rate limit."""

    websocket: ServerConnection
    session: ProtocolSession
    bucket: _TokenBucket

    @property
    def key(self) -> int:
        return id(self.websocket)

    @property
    def encoding(self) -> Encoding:
        return self.session.encoding if self.session.hello_done else "json"

    async def send(self, message: Any, encoding: Encoding | None = None) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self.websocket.send(encode(message, encoding or self.encoding))


@dataclass
class _Reply:
    cancel: threading.Event = field(default_factory=threading.Event)
    task: asyncio.Task[None] | None = None


class NpcServer:
    def __init__(
        self,
        engine: DialogueEngine,
        *,
        host: str = "127.0.0.1",
        port: int = 8765,
        token: str | None = None,
        limits: ServerLimits | None = None,
        origins: list[str] | None = None,
    ) -> None:
        if host not in LOOPBACK and not token:
            raise NpcEngineError(
                f"Refusing to listen on {host} without a token: set --token (or NPC_ENGINE_TOKEN)."
            )
        self.engine = engine
        self.host, self.port, self.token = host, port, token
        self.limits = limits or ServerLimits()
        self.origins = origins
        # As many replies at once as the generator decodes together (its slots).
        slots = getattr(engine.generator, "slots", None)
        self._generation = GenerationScheduler(workers=len(slots) if slots else 1)
        self._io = ThreadPoolExecutor(max_workers=2, thread_name_prefix="npc-memory")
        self._queued = 0
        self._replies: dict[tuple[int, str], _Reply] = {}
        self._server: Server | None = None
        self.stopping = False

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        self._server = await serve(
            self._handle,
            self.host,
            self.port,
            max_size=self.limits.max_frame_bytes * 4,  # hard cap; above our limit: too_large
            ping_interval=self.limits.ping_interval,
            origins=self.origins,  # type: ignore[arg-type]
        )
        sockets = self._server.sockets
        if sockets:
            self.port = sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}/"

    async def stop(self) -> None:
        """Stop accepting, end every reply with ``reply.end`` (code shutdown), flush memory."""
        self.stopping = True
        if self._server is not None:
            # Stop listening, keep the open connections until their replies have ended.
            # (Not Server.close(close_connections=False): close() is idempotent, so the
            # later close() that must close the connections would do nothing.)
            self._server.server.close()
        for reply in list(self._replies.values()):
            reply.cancel.set()
        tasks = [r.task for r in self._replies.values() if r.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=30)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._io, self.engine.writer.flush, 60.0)
        self._generation.close()
        self._io.shutdown(wait=True)

    # -- connection ----------------------------------------------------------------------

    async def _handle(self, websocket: ServerConnection) -> None:
        conn = _Connection(
            websocket,
            ProtocolSession(token=self.token, max_frame_bytes=self.limits.max_frame_bytes),
            _TokenBucket(self.limits.rate_per_second, self.limits.rate_burst),
        )
        idle_timeout = self.limits.idle_timeout or None
        try:
            with contextlib.suppress(ConnectionClosed):
                while True:
                    try:
                        frame = await asyncio.wait_for(websocket.recv(), idle_timeout)
                    except TimeoutError:
                        if not self._has_replies(conn):
                            await websocket.close(IDLE_CLOSE_CODE, "idle timeout")
                            return
                        continue
                    await self._on_frame(conn, frame)
        finally:
            for (owner, _rid), reply in list(self._replies.items()):
                if owner == conn.key:
                    reply.cancel.set()  # running: stops between tokens; queued: dropped

    def _has_replies(self, conn: _Connection) -> bool:
        return any(owner == conn.key for owner, _ in self._replies)

    async def _on_frame(self, conn: _Connection, frame: str | bytes) -> None:
        outcome = conn.session.receive(frame)
        if outcome.error is not None:
            await conn.send(outcome.error, outcome.encoding)
            if outcome.close_code is not None:
                await conn.websocket.close(outcome.close_code, outcome.error.code)
            return
        request = outcome.request

        async def fail(code: ErrorCode, message: str, **details: Any) -> None:
            assert request is not None
            error = Error(re=request.id, code=code, message=message, details=details)
            await conn.send(error, outcome.encoding)

        if isinstance(request, Hello):
            await conn.send(
                Welcome(
                    re=request.id,
                    server=f"npc-engine/{__version__}",
                    session=uuid.uuid4().hex,
                    capabilities=["stream", "msgpack", "memory"],
                    npcs=self._npc_infos(),
                ),
            )
            return
        if isinstance(request, Ping):
            await conn.send(Pong(re=request.id))
            return
        if request is None:
            return
        if not conn.bucket.take():
            await fail("rate_limited", "Too many requests; slow down.")
            return
        try:
            if isinstance(request, Say):
                await self._say(conn, request, fail)
            elif isinstance(request, Cancel):
                reply = self._replies.get((conn.key, request.target))
                if reply is not None:
                    reply.cancel.set()
                await conn.send(Ok(re=request.id))
            elif isinstance(request, NpcList):
                await conn.send(NpcItems(re=request.id, npcs=self._npc_infos()))
            elif isinstance(request, Event):
                ids = await self._in_io(self._event, request)
                await conn.send(Ok(re=request.id, memory_ids=ids))
            elif isinstance(request, MemoryList):
                items = await self._in_io(self._memory_list, request)
                await conn.send(MemoryItems(re=request.id, items=items))
            elif isinstance(request, MemoryForget):
                count = await self._in_io(
                    lambda r: self.engine.forget(
                        r.npc_id, player_id=r.player_id, memory_ids=r.memory_ids, everything=r.all
                    ),
                    request,
                )
                await conn.send(Ok(re=request.id, count=count))
        except UnknownNpcError as exc:
            await fail("unknown_npc", str(exc), known=exc.known)
        except NpcEngineError as exc:
            await fail("invalid_request", str(exc))
        except Exception as exc:  # a bug in one request must not touch the others
            log.exception("request %s failed", request.id)
            await fail("internal", f"Internal error: {type(exc).__name__}")

    async def _in_io(self, function: Callable[[Any], Any], request: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._io, function, request)

    def _npc_infos(self) -> list[NpcInfo]:
        return [
            NpcInfo(id=npc_id, name=p.persona.name, role=p.persona.role, mood=p.persona.mood)
            for npc_id, p in sorted(self.engine.registry.personas.items())
        ]

    def _event(self, request: Event) -> list[str]:
        done = self.engine.add_event(
            request.npc_ids,
            request.text,
            player_id=request.player_id,
            importance=request.importance,
        )
        return done.result(60)

    def _memory_list(self, request: MemoryList) -> list[MemoryItem]:
        self.engine.persona(request.npc_id)
        self.engine.writer.flush(60)
        pairs: list[tuple[Memory, float | None]]
        if request.query:
            scored = self.engine.recall(
                request.npc_id, request.player_id, request.query, request.limit
            )
            pairs = [(s.memory, s.score) for s in scored]
        else:
            memories = self.engine.recent_memories(request.npc_id, request.player_id, request.limit)
            pairs = [(m, None) for m in memories]
        return [
            MemoryItem(
                id=m.id,
                text=m.text,
                kind=m.kind,
                importance=m.importance,
                player_id=m.player_id,
                created_at=m.created_at.isoformat().replace("+00:00", "Z"),
                score=score,
            )
            for m, score in pairs
        ]

    # -- say -----------------------------------------------------------------------------

    async def _say(self, conn: _Connection, request: Say, fail: Callable[..., Any]) -> None:
        self.engine.persona(request.npc_id)  # unknown_npc before anything is accepted
        if self.stopping:
            await fail("busy", "The server is shutting down.")
            return
        mine = sum(1 for owner, _ in self._replies if owner == conn.key)
        if mine >= self.limits.max_in_flight_per_connection:
            await fail("busy", "Too many requests in flight on this connection; retry later.")
            return
        if self._queued >= self.limits.max_queued_generations:
            await fail("busy", "The generation queue is full; retry later.")
            return
        conn.session.in_flight.add(request.id)
        reply = _Reply()
        self._replies[(conn.key, request.id)] = reply
        self._queued += 1
        turn_id = uuid.uuid4().hex
        await conn.send(ReplyStart(re=request.id, npc_id=request.npc_id, turn_id=turn_id))
        reply.task = asyncio.create_task(self._run_say(conn, request, reply))

    async def _run_say(self, conn: _Connection, request: Say, reply: _Reply) -> None:
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[str | None] = asyncio.Queue()

        def on_delta(piece: str) -> None:
            loop.call_soon_threadsafe(deltas.put_nowait, piece)

        def work() -> TurnResult | None:
            if reply.cancel.is_set():
                return None  # cancelled or disconnected while queued: dropped
            return self.engine.say(
                request.npc_id,
                request.text,
                player_id=request.player_id,
                context=request.context,
                max_tokens=request.max_tokens,
                on_delta=on_delta,
                cancel=reply.cancel,
            )

        sent: list[str] = []  # what the client has received, in order (seq = index)
        ended = False  # reply.end went out early (deadline): nothing more is sent
        sending = asyncio.Lock()  # deltas, the deadline and the end go out one at a time

        interval = self.limits.delta_interval_ms / 1000

        async def pump() -> None:
            last_sent = 0.0
            finished = False
            while not finished and (piece := await deltas.get()) is not None:
                pieces = [piece]
                # The first token goes out at once; later ones wait for their batch.
                while sent and (remaining := last_sent + interval - loop.time()) > 0:
                    try:
                        more = await asyncio.wait_for(deltas.get(), remaining)
                    except asyncio.TimeoutError:
                        break
                    if more is None:
                        finished = True
                        break
                    pieces.append(more)
                text = "".join(pieces)
                async with sending:
                    if not ended:
                        await conn.send(ReplyDelta(re=request.id, seq=len(sent), text=text))
                        sent.append(text)
                last_sent = loop.time()

        async def expire() -> None:
            nonlocal ended
            async with sending:
                if sent or ended:
                    return  # a token made it in time
                ended = True
                reply.cancel.set()  # queued: dropped; running: stops within one batch
                message = f"No first token within {request.deadline_ms} ms."
                await conn.send(await self._fallback_end(conn, request, sent, "deadline", message))

        expiring: list[asyncio.Future[None]] = []  # holds the task while it runs
        deadline = (
            loop.call_later(
                request.deadline_ms / 1000, lambda: expiring.append(asyncio.ensure_future(expire()))
            )
            if request.deadline_ms
            else None
        )
        pumping = asyncio.create_task(pump())
        end: ReplyEnd | None = None
        try:
            job = self._generation.submit(
                request.npc_id,
                work,
                player_id=request.player_id,
                background=request.priority == "background",
            )
            result = await asyncio.wrap_future(job)
            deltas.put_nowait(None)
            await pumping
            end = self._reply_end(request, result)
        except Exception as exc:
            log.exception("say %s failed", request.id)
            deltas.put_nowait(None)
            await pumping
            async with sending:
                if not ended:
                    message = f"{type(exc).__name__}: {exc}"
                    end = await self._fallback_end(conn, request, sent, "internal", message)
        finally:
            if deadline is not None:
                deadline.cancel()
            self._queued -= 1
            self._replies.pop((conn.key, request.id), None)
            conn.session.in_flight.discard(request.id)
        async with sending:
            if end is not None and not ended:
                await conn.send(end)
            ended = True

    async def _fallback_end(
        self, conn: _Connection, request: Say, sent: list[str], code: ErrorCode, message: str
    ) -> ReplyEnd:
        """End a failed reply: the fallback line continues what was already sent, if nothing
        was, so the stream stays consistent (seq without gaps, text = the deltas)."""
        line = "" if sent else self.engine.fallback_line(self.engine.persona(request.npc_id))
        if line:
            await conn.send(ReplyDelta(re=request.id, seq=len(sent), text=line))
            sent.append(line)
        return ReplyEnd(
            re=request.id,
            text="".join(sent),
            reason="error",
            error=ErrorInfo(code=code, message=message),
        )

    def _reply_end(self, request: Say, result: TurnResult | None) -> ReplyEnd:
        if result is None or result.reason == "cancelled":
            text = result.text if result is not None else ""
            if self.stopping:
                return ReplyEnd(
                    re=request.id,
                    text=text,
                    reason="error",
                    error=ErrorInfo(code="shutdown", message="The server is stopping."),
                )
            return ReplyEnd(re=request.id, text=text, reason="cancelled")
        timings = result.timings
        usage = Usage(
            prompt_tokens=result.prompt_tokens,
            cached_tokens=result.cached_tokens,
            completion_tokens=result.completion_tokens,
            ttft_ms=round(timings.ttft_ms) if timings.ttft_ms is not None else None,
            total_ms=round(timings.total_ms),
        )
        error = (
            ErrorInfo(code="internal", message=result.error or "generation failed")
            if result.reason == "error"
            else None
        )
        return ReplyEnd(
            re=request.id,
            text=result.text,
            reason=result.reason,
            emotion=result.emotion,
            action=result.action,
            usage=usage,
            error=error,
            inspect=self._inspection(result) if request.inspect else None,
        )

    @staticmethod
    def _inspection(result: TurnResult) -> TurnInspection:
        return TurnInspection(
            prompt=result.prompt,
            memories=[RecalledMemory(**scored.summary()) for scored in result.memories],
            dropped=result.dropped,
            retrieval_ms=result.timings.retrieval_ms,
            prompt_ms=result.timings.prompt_ms,
        )
