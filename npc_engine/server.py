"""The WebSocket server: moves bytes between sockets and the sans-I/O layers.

``ProtocolSession`` turns frames into typed requests, ``ReplyStream`` turns what a turn
produces into ``reply.*`` frames; this module only reads and writes sockets, runs timers
and hands work to threads. Turns run on ``GenerationScheduler`` workers, one per
conversation the generator decodes at once (its batch slots), which keeps requests for the
same (npc_id, player_id) in order and never runs one conversation twice. Memory and Chroma
calls run on a separate small pool. Nothing blocking runs on the event loop.

Per connection, ``ping`` and ``cancel`` are answered as they arrive; every other request
is served in the order it came, by the connection's own task, so a slow ``event`` delays
neither a ``cancel`` on its connection nor anything on another.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from http import HTTPStatus
from pathlib import Path
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request as HttpRequest
from websockets.http11 import Response as HttpResponse

from npc_engine import __version__
from npc_engine.config import ServerLimits
from npc_engine.dialogue import DialogueEngine, StateView, TurnResult, npc_of
from npc_engine.errors import FieldError, NpcEngineError, UnknownNpcError, is_unavailable
from npc_engine.lore import lore_summary
from npc_engine.memory.saves import SaveError, read_save_file
from npc_engine.memory.types import Memory
from npc_engine.protocol import (
    Cancel,
    ChosenLoreItem,
    Encoding,
    Error,
    ErrorCode,
    Event,
    GameAction,
    Greet,
    Hello,
    MemoryForget,
    MemoryItem,
    MemoryItems,
    MemoryList,
    NpcInfo,
    NpcItems,
    NpcList,
    NpcWarm,
    Ok,
    Ping,
    Pong,
    ProtocolSession,
    RecalledMemory,
    ReplyStart,
    Request,
    SaveCreate,
    SaveDelete,
    SaveExport,
    SaveImport,
    SaveItem,
    SaveItems,
    SaveList,
    SaveLoad,
    Say,
    SceneEnd,
    SceneStart,
    State,
    StateGet,
    StateSet,
    Stats,
    StatsReport,
    TurnInspection,
    Usage,
    Welcome,
    WorldTick,
    encode,
)
from npc_engine.reply_stream import FinishedTurn, ReplyMessage, ReplyStream
from npc_engine.scenes import Scene
from npc_engine.scheduling import GenerationScheduler
from npc_engine.world_ticks import TickQueue

log = logging.getLogger(__name__)
PREPARED_SPEAKERS = 2  # NPCs of a scene prepared while another speaks
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
# Private-use close code (4000-4999), mirroring HTTP 408: the client sent nothing for
# ``limits.idle_timeout`` seconds and had no reply running.
IDLE_CLOSE_CODE = 4408
MEMORY_CALL_TIMEOUT = 60.0
UNAVAILABLE = "The memory store cannot be reached; try again shortly."


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
    """One client: its socket, protocol state, rate limit and ordered request queue."""

    websocket: ServerConnection
    session: ProtocolSession
    bucket: _TokenBucket
    pending: asyncio.Queue[tuple[Request, Encoding]] = field(default_factory=asyncio.Queue)
    # Says waiting in ``pending`` (a cancel may overtake them), and those cancelled so.
    # Each leaves both when it is served, whatever happens to it (``_serve_in_order``).
    queued_says: dict[str, Request] = field(default_factory=dict)
    cancelled_early: set[str] = field(default_factory=set)
    # Memory writes this connection caused and that are not stored yet: its reads wait for
    # these alone, not for every other connection's writes.
    writes: set[Future[list[str]]] = field(default_factory=set)
    serving: bool = False  # a request is being served (a long world.tick, a save)

    def track(self, write: Future[list[str]] | None) -> None:
        if write is not None and not write.done():
            self.writes.add(write)
            write.add_done_callback(self.writes.discard)

    @property
    def key(self) -> int:
        return id(self.websocket)

    @property
    def encoding(self) -> Encoding:
        return self.session.encoding if self.session.hello_done else "json"

    @property
    def authenticated(self) -> bool:
        """It presented the server's token (a server without one has nobody to trust)."""
        return self.session.hello_done and self.session.token is not None

    async def send(self, message: Any, encoding: Encoding | None = None) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self.websocket.send(encode(message, encoding or self.encoding))


@dataclass
class _Reply:
    cancel: threading.Event = field(default_factory=threading.Event)
    task: asyncio.Task[None] | None = None
    # What happened to the turn, in order: ("text", piece), ("done", future),
    # ("deadline", None), ("shutdown", None).
    inbox: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)


@dataclass
class _SceneRun:
    """A running scene: its lines share one cancel (the scene's, or any say in it)."""

    scene: Scene
    request: SceneStart
    reply: _Reply
    # Player lines said into the scene and not answered yet, in order.
    says: deque[Say] = field(default_factory=deque)


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    """A server TLS context from PEM files (the standard library's defaults, TLS 1.2+)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise NpcEngineError(f"Cannot load the TLS certificate {cert} / key {key}: {exc}") from exc
    return context


def refuse_public_without_token(host: str, token: str | None) -> None:
    """Off loopback, anyone on the network could talk to the NPCs: a token is required."""
    if host not in LOOPBACK and not token:
        raise NpcEngineError(
            f"Refusing to listen on {host} without a token: set --token (or NPC_ENGINE_TOKEN)."
        )


def memory_item(memory: Memory, score: float | None = None) -> MemoryItem:
    return MemoryItem(
        id=memory.id,
        text=memory.text,
        kind=memory.kind,
        importance=memory.importance,
        player_id=memory.player_id,
        created_at=memory.created_at.isoformat().replace("+00:00", "Z"),
        score=score,
        source=memory.source,
    )


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
        allow_inspect: bool = False,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        refuse_public_without_token(host, token)
        self.engine = engine
        self.host, self.port, self.token = host, port, token
        self.limits = limits or ServerLimits()
        # Browsers always send Origin, native game clients never do: no header is allowed,
        # an origin only when listed (a page the player visits must not reach the server).
        self.origins: list[str | None] = [None, *(origins or [])]
        self.allow_inspect = allow_inspect
        self.exports_dir = engine.config.data_dir / "exports"  # save.export / save.import
        self.ssl_context = ssl_context
        # As many replies at once as the generator decodes together (its slots).
        slots = getattr(engine.generator, "slots", None)
        warm_keys = getattr(engine.generator, "warm_keys", None)
        self._generation = GenerationScheduler(
            workers=len(slots) if slots else 1,
            warm=(lambda: {npc_of(key) for key in warm_keys()}) if warm_keys else None,
        )
        self._io = ThreadPoolExecutor(max_workers=2, thread_name_prefix="npc-memory")
        # World ticks are long background work: their own thread, never the memory calls'.
        self._ticks = ThreadPoolExecutor(max_workers=1, thread_name_prefix="npc-world-tick")
        self._world_ticks = TickQueue(self._run_world_tick)
        self._stop_ticks = threading.Event()
        self._queued = 0
        self._replies: dict[tuple[int, str], _Reply] = {}
        self._scenes: dict[tuple[int, str], _SceneRun] = {}  # bounded like _replies
        self._server_bucket = _TokenBucket(
            self.limits.server_rate_per_second, self.limits.server_rate_burst
        )
        self._server: Server | None = None
        self.stopping = False

    async def _run_world_tick(self, game_time: float | None) -> int:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._ticks,
            partial(
                self.engine.world_tick,
                game_time,
                busy=self._generation.busy,
                stop=self._stop_ticks,
            ),
        )

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        self._server = await serve(
            self._handle,
            self.host,
            self.port,
            max_size=self.limits.max_frame_bytes * 4,  # hard cap; above our limit: too_large
            ping_interval=self.limits.ping_interval,
            origins=self.origins,  # type: ignore[arg-type]
            process_request=self._admit,
            ssl=self.ssl_context,
        )
        sockets = self._server.sockets
        if sockets:
            self.port = sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        scheme = "wss" if self.ssl_context is not None else "ws"
        return f"{scheme}://{self.host}:{self.port}/"

    def _admit(self, connection: ServerConnection, request: HttpRequest) -> HttpResponse | None:
        """Refuse a handshake when ``limits.max_connections`` are open (this one is not
        counted yet: websockets adds a connection once its handshake succeeded)."""
        assert self._server is not None
        if len(self._server.all_connections) >= self.limits.max_connections:
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "Too many connections.\n")
        return None

    async def stop(self) -> None:
        """Stop accepting; every reply ends with ``reply.end`` (code shutdown) within
        ``limits.shutdown_grace`` seconds; memory is flushed. Never blocks the loop."""
        self.stopping = True
        if self._server is not None:
            # Stop listening, keep the open connections until their replies have ended.
            # (Not Server.close(close_connections=False): close() is idempotent, so the
            # later close() that must close the connections would do nothing.)
            self._server.server.close()
        replies = list(self._replies.values())
        for reply in replies:
            reply.cancel.set()  # queued: dropped; running: stops within a token or batch
        tasks = [r.task for r in replies if r.task is not None]
        if tasks:
            _done, late = await asyncio.wait(tasks, timeout=self.limits.shutdown_grace)
            for reply in replies:
                if reply.task in late:
                    reply.inbox.put_nowait(("shutdown", None))
            if late:
                await asyncio.wait(late, timeout=1.0)
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5.0)
        # A world tick running ends between NPCs, before the last flush (its writes land
        # in it, none after it).
        self._stop_ticks.set()
        running_tick = self._world_ticks.running
        if running_tick is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait({running_tick}, timeout=self.limits.shutdown_grace + 10)
        loop = asyncio.get_running_loop()
        with contextlib.suppress(Exception):
            await loop.run_in_executor(None, self.engine.writer.flush, 60.0)
        # Workers finish what they run (each cancelled) in their own time, off the loop.
        self._generation.close(wait=False)
        self._io.shutdown(wait=False)
        self._ticks.shutdown(wait=False)

    # -- connection ----------------------------------------------------------------------

    async def _handle(self, websocket: ServerConnection) -> None:
        conn = _Connection(
            websocket,
            ProtocolSession(token=self.token, max_frame_bytes=self.limits.max_frame_bytes),
            _TokenBucket(self.limits.rate_per_second, self.limits.rate_burst),
        )
        in_order = asyncio.create_task(self._serve_in_order(conn))
        idle_timeout = self.limits.idle_timeout or None
        try:
            with contextlib.suppress(ConnectionClosed):
                while True:
                    try:
                        frame = await asyncio.wait_for(websocket.recv(), idle_timeout)
                    except TimeoutError:  # TimeoutError is not it before 3.11
                        busy = self._has_replies(conn) or conn.serving
                        if not busy and conn.pending.empty():
                            await websocket.close(IDLE_CLOSE_CODE, "idle timeout")
                            return
                        continue
                    await self._on_frame(conn, frame)
        finally:
            in_order.cancel()
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
        if request is None:
            return
        if isinstance(request, Hello):
            await conn.send(
                Welcome(
                    re=request.id,
                    server=f"npc-engine/{__version__}",
                    session=uuid.uuid4().hex,
                    capabilities=[
                        "stream",
                        "msgpack",
                        "memory",
                        "state",
                        "saves",
                        "greet",
                        "warm",
                        "actions",
                        "scenes",
                        "rumours",
                    ],
                    npcs=self._npc_infos(),
                ),
            )
        elif isinstance(request, Ping):
            await conn.send(Pong(re=request.id))
        elif isinstance(request, Cancel):  # never waits behind anything
            reply = self._replies.get((conn.key, request.target))
            if reply is not None:
                reply.cancel.set()
            elif request.target in conn.queued_says:  # not accepted yet: cancel on arrival
                conn.cancelled_early.add(request.target)
            await conn.send(Ok(re=request.id))
        elif not conn.bucket.take():
            await self._fail(conn, request, outcome.encoding, "rate_limited", "Slow down.")
        elif not self._server_bucket.take():
            message = "The server is receiving too many requests; slow down."
            await self._fail(conn, request, outcome.encoding, "rate_limited", message)
        elif conn.pending.qsize() >= self.limits.max_pending_per_connection:
            message = "Too many requests waiting on this connection; retry later."
            await self._fail(conn, request, outcome.encoding, "busy", message)
        else:
            if isinstance(request, Say | Greet | SceneStart):
                if request.id in conn.queued_says:
                    message = f"Request id {request.id!r} is still in flight."
                    code: ErrorCode = "invalid_request"
                    await self._fail(conn, request, outcome.encoding, code, message, field="id")
                    return
                conn.queued_says[request.id] = request
            conn.pending.put_nowait((request, outcome.encoding))

    async def _fail(
        self,
        conn: _Connection,
        request: Request,
        encoding: Encoding,
        code: ErrorCode,
        message: str,
        **details: Any,
    ) -> None:
        error = Error(re=request.id, code=code, message=message, details=details)
        await conn.send(error, encoding)

    async def _serve_in_order(self, conn: _Connection) -> None:
        while True:
            request, encoding = await conn.pending.get()
            conn.serving = True
            try:
                await self._serve(conn, request, encoding)
            except UnknownNpcError as exc:
                await self._fail(conn, request, encoding, "unknown_npc", str(exc), known=exc.known)
            except FieldError as exc:
                code: ErrorCode = "invalid_request"
                await self._fail(conn, request, encoding, code, str(exc), field=exc.field)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if is_unavailable(exc):  # a Chroma server down: retry later, nothing broke
                    await self._fail(conn, request, encoding, "unavailable", UNAVAILABLE)
                elif isinstance(exc, NpcEngineError):
                    await self._fail(conn, request, encoding, "invalid_request", str(exc))
                else:  # a bug in one request must not touch the others
                    log.exception("request %s failed", request.id)
                    message = f"Internal error: {type(exc).__name__}"
                    await self._fail(conn, request, encoding, "internal", message)
            finally:
                conn.serving = False
                # Refused before it was admitted (unknown NPC, bad scene): its id is free
                # again. Only this request's entry: the same id may be queued anew since.
                if conn.queued_says.get(request.id) is request:
                    del conn.queued_says[request.id]
                    conn.cancelled_early.discard(request.id)

    async def _serve(self, conn: _Connection, request: Request, encoding: Encoding) -> None:
        if isinstance(request, Say) and request.scene_id is not None:
            await self._scene_say(conn, request, encoding)
        elif isinstance(request, Say | Greet):
            await self._say(conn, request, encoding)
        elif isinstance(request, SceneStart):
            await self._scene_start(conn, request, encoding)
        elif isinstance(request, WorldTick):
            spread = await self._world_ticks.tick(request.game_time)
            await conn.send(Ok(re=request.id, spread=spread))
        elif isinstance(request, NpcWarm):
            await self._warm(conn, request)
        elif isinstance(request, SaveCreate | SaveLoad | SaveList | SaveDelete):
            await self._own_writes(conn)
            await self._save(conn, request)
        elif isinstance(request, SaveExport | SaveImport):
            await self._own_writes(conn)
            await self._save_file(conn, request)
        elif isinstance(request, NpcList):
            await conn.send(NpcItems(re=request.id, npcs=self._npc_infos()))
        elif isinstance(request, Stats):
            await conn.send(self._stats(request))
        elif isinstance(request, Event):
            # Off the loop: it reads the player's game time (the store, or a save loading).
            done = await self._in_io(
                lambda r: self.engine.add_event(
                    r.npc_ids,
                    r.text,
                    player_id=r.player_id,
                    importance=r.importance,
                    game_time=r.game_time,
                ),
                request,
            )
            conn.track(done)
            ids = await self._acknowledged(done)
            await conn.send(Ok(re=request.id, memory_ids=ids))
        elif isinstance(request, MemoryList):
            self.engine.persona(request.npc_id)
            await self._own_writes(conn)  # a connection reads what it wrote
            items = await self._in_io(self._memory_list, request)
            await conn.send(MemoryItems(re=request.id, items=items))
        elif isinstance(request, MemoryForget):
            self.engine.persona(request.npc_id)
            await self._own_writes(conn)
            count = await self._in_io(
                lambda r: self.engine.forget(
                    r.npc_id, player_id=r.player_id, memory_ids=r.memory_ids, everything=r.all
                ),
                request,
            )
            await conn.send(Ok(re=request.id, count=count))
        elif isinstance(request, StateSet | StateGet):
            await self._own_writes(conn)
            view = await self._in_io(self._state, request)
            await conn.send(
                State(
                    re=request.id,
                    npc_id=view.npc_id,
                    player_id=view.player_id,
                    trust=view.trust,
                    flags=view.flags,
                    unlocked=list(view.unlocked) if view.unlocked is not None else None,
                    facts=[memory_item(f) for f in view.facts] if view.facts is not None else None,
                )
            )

    # -- scenes --------------------------------------------------------------------------

    async def _admit_line(
        self, conn: _Connection, request: Say | Greet | SceneStart, encoding: Encoding
    ) -> bool:
        """The checks every request that streams lines passes before it is accepted."""
        conn.queued_says.pop(request.id, None)

        async def fail(code: ErrorCode, message: str, **details: Any) -> bool:
            await self._fail(conn, request, encoding, code, message, **details)
            return False

        if request.inspect and not (self.allow_inspect or conn.authenticated):
            return await fail(
                "unauthorized",
                "inspect shows the whole prompt, secrets included: start the server with "
                "--allow-inspect, or connect with its token.",
            )
        if self.stopping:
            return await fail("busy", "The server is shutting down.")
        mine = sum(1 for owner, _ in self._replies if owner == conn.key)
        if mine >= self.limits.max_in_flight_per_connection:
            return await fail(
                "busy", "Too many requests in flight on this connection; retry later."
            )
        if self._queued >= self.limits.max_queued_generations:
            return await fail("busy", "The generation queue is full; retry later.")
        if request.id in conn.session.in_flight:
            message = f"Request id {request.id!r} is still in flight."
            return await fail("invalid_request", message, field="id")
        return True

    async def _scene_start(
        self, conn: _Connection, request: SceneStart, encoding: Encoding
    ) -> None:
        cancelled = request.id in conn.cancelled_early
        conn.cancelled_early.discard(request.id)
        for npc_id in request.npc_ids:
            self.engine.persona(npc_id)  # unknown_npc before anything is accepted
        if (conn.key, request.scene_id) in self._scenes:
            raise FieldError("scene_id", f"scene {request.scene_id!r} is already running")
        scene = self.engine.start_scene(
            request.scene_id,
            request.npc_ids,
            player_id=request.player_id,
            topic=request.topic,
            max_turns=request.max_turns,
        )
        if not await self._admit_line(conn, request, encoding):
            return
        conn.session.in_flight.add(request.id)
        run = _SceneRun(scene, request, _Reply())
        if cancelled:
            run.reply.cancel.set()
        self._replies[(conn.key, request.id)] = run.reply
        self._scenes[(conn.key, request.scene_id)] = run
        run.reply.task = asyncio.create_task(self._run_scene(conn, run))

    async def _scene_say(self, conn: _Connection, request: Say, encoding: Encoding) -> None:
        """A player line into a running scene: queued for the scene's next line."""
        conn.queued_says.pop(request.id, None)
        assert request.scene_id is not None
        run = self._scenes.get((conn.key, request.scene_id))
        if run is None:
            raise FieldError("scene_id", f"no scene {request.scene_id!r} is running here")
        if run.scene.player_id != request.player_id:
            raise FieldError("player_id", "the player must be the scene's player_id")
        if request.npc_id not in run.scene.npc_ids:
            raise FieldError("npc_id", "the say must face one of the scene's NPCs")
        if request.id in conn.session.in_flight:
            raise FieldError("id", f"Request id {request.id!r} is still in flight.")
        if len(run.says) >= self.limits.max_in_flight_per_connection:
            await self._fail(
                conn, request, encoding, "busy", "Too many lines waiting in the scene."
            )
            return
        conn.session.in_flight.add(request.id)
        self._replies[(conn.key, request.id)] = run.reply  # its cancel ends the scene
        run.says.append(request)
        run.reply.inbox.put_nowait(("player", None))  # wakes a scene between lines

    async def _run_scene(self, conn: _Connection, run: _SceneRun) -> None:
        scene, request = run.scene, run.request
        reason = "error"
        try:
            while True:
                if run.reply.cancel.is_set():
                    reason = "cancelled"
                    break
                say = run.says.popleft() if run.says else None
                if say is not None:
                    heard = self.engine.scene_hears_player(scene, say.text, say.game_time)
                    conn.track(heard)
                else:
                    over = scene.over()
                    if over is not None:
                        reason = over
                        break
                speaker = say.npc_id if say is not None else None
                ok = await self._scene_line(conn, run, say, speaker)
                if say is not None:
                    self._replies.pop((conn.key, say.id), None)
                    conn.session.in_flight.discard(say.id)
                if not ok:
                    reason = "cancelled" if run.reply.cancel.is_set() else "error"
                    break
        except Exception:
            log.exception("scene %s failed", scene.scene_id)
            reason = "error"
        finally:
            for say in run.says:  # lines the scene ended before answering
                self._replies.pop((conn.key, say.id), None)
                conn.session.in_flight.discard(say.id)
                await self._fail(
                    conn,
                    say,
                    conn.encoding,
                    "invalid_request",
                    "The scene ended.",
                    field="scene_id",
                )
            self._scenes.pop((conn.key, scene.scene_id), None)
            self._replies.pop((conn.key, request.id), None)
            conn.session.in_flight.discard(request.id)
            await conn.send(
                SceneEnd(re=request.id, scene_id=scene.scene_id, reason=reason, turns=scene.spoken)
            )

    async def _scene_line(
        self, conn: _Connection, run: _SceneRun, say: Say | None, facing: str | None
    ) -> bool:
        """The next NPC's line, streamed as the reply to ``say`` (a player line) or to the
        scene request. False: it did not end normally (cancelled, failed, shutdown)."""
        scene, request = run.scene, run.request
        reply_to = say.id if say is not None else request.id
        speaker = await self._in_io(lambda f: self.engine.next_in_scene(scene, f), facing)
        while not run.reply.inbox.empty():  # wake-ups for player lines already taken in
            run.reply.inbox.get_nowait()
        stream = ReplyStream(
            reply_to,
            fallback_line=lambda: self.engine.fallback_line(self.engine.persona(speaker)),
            delta_interval=self.limits.delta_interval_ms / 1000,
            scene_id=scene.scene_id,
        )
        await conn.send(
            ReplyStart(
                re=reply_to, npc_id=speaker, turn_id=uuid.uuid4().hex, scene_id=scene.scene_id
            )
        )
        inspect = request.inspect or (say is not None and say.inspect)

        player = scene.player_id or ""
        loop = asyncio.get_running_loop()
        waiting = self.engine.likely_next(scene, speaker, PREPARED_SPEAKERS)

        def prepare(npc_id: str) -> None:
            if not run.reply.cancel.is_set():  # the scene ended: nothing to prepare for
                self.engine.prepare_scene_line(scene, npc_id)

        def prepare_next() -> None:
            # The NPCs likely to speak next read what they heard so far, in spare batch
            # slots, while this line decodes (from its first token: never delaying it).
            # Counted as queued generations, like replies, until they have run.
            while waiting:
                npc_id = waiting.pop()
                self._queued += 1
                job = self._generation.submit(
                    npc_id,
                    partial(prepare, npc_id),
                    player_id=f"scene:{scene.scene_id}",
                    background=True,
                )
                job.add_done_callback(lambda _job: loop.call_soon_threadsafe(self._one_less))

        def work(on_delta: Callable[[str], None]) -> TurnResult | None:
            if run.reply.cancel.is_set():
                return None

            def first_then_prepare(piece: str) -> None:
                if waiting:
                    loop.call_soon_threadsafe(prepare_next)
                on_delta(piece)

            return self.engine.scene_line(
                scene,
                speaker,
                max_tokens=request.max_tokens,
                on_delta=first_then_prepare,
                cancel=run.reply.cancel,
                game_time=(say.game_time if say is not None else None) or request.game_time,
            )

        result = await self._pump(
            conn,
            stream,
            run.reply,
            lambda: self._submit(run.reply, speaker, player, work),
            lambda job: self._turn_over(stream, reply_to, inspect, job),
        )
        return result is not None and result.reason in ("stop", "length")

    async def _warm(self, conn: _Connection, request: NpcWarm) -> None:
        """Warm each NPC as a background generation job (a say waiting goes first)."""
        ids = self.engine.registry.ids() if "*" in request.npc_ids else request.npc_ids
        for npc_id in ids:
            self.engine.persona(npc_id)  # unknown_npc before any work
        started = time.perf_counter()
        warmed = []
        for npc_id in dict.fromkeys(ids):
            job = self._generation.submit(
                npc_id, partial(self.engine.warm, npc_id), background=True
            )
            if await asyncio.wrap_future(job):
                warmed.append(npc_id)
        ms = round((time.perf_counter() - started) * 1000)
        await conn.send(Ok(re=request.id, warmed=warmed, ms=ms))

    def warm_in_background(self, npc_ids: list[str], report: Callable[[str], None]) -> None:
        """Warm NPCs at start (``serve --warm``) as background jobs: a say goes first."""
        started = time.perf_counter()
        jobs = [
            self._generation.submit(n, partial(self.engine.warm, n), background=True)
            for n in dict.fromkeys(npc_ids)
        ]

        reported = threading.Lock()

        def done(_job: Future[Any]) -> None:
            if all(job.done() for job in jobs) and reported.acquire(blocking=False):
                seconds = time.perf_counter() - started
                report(f"warmed {len(jobs)} NPC(s) in {seconds:.1f} s")

        for job in jobs:
            job.add_done_callback(done)

    async def _end_all_replies(self) -> None:
        """End every running reply (reason cancelled) and wait for its work to stop."""
        replies = list(self._replies.values())
        for reply in replies:
            reply.cancel.set()
        tasks = [r.task for r in replies if r.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=self.limits.shutdown_grace)

    async def _save(
        self, conn: _Connection, request: SaveCreate | SaveLoad | SaveList | SaveDelete
    ) -> None:
        engine = self.engine
        if isinstance(request, SaveList):
            infos = await self._in_io(lambda _r: engine.list_saves(), request)
            items = [
                SaveItem(save_id=i.save_id, created_at=i.iso_created_at(), memories=i.memories)
                for i in infos
            ]
            await conn.send(SaveItems(re=request.id, saves=items))
        elif isinstance(request, SaveCreate):
            info = await self._in_io(lambda r: engine.create_save(r.save_id), request)
            await conn.send(Ok(re=request.id, save_id=info.save_id, memories=info.memories))
        elif isinstance(request, SaveLoad):
            known = await self._in_io(lambda _r: engine.list_saves(), request)
            if request.save_id not in {i.save_id for i in known}:
                raise SaveError("save_id", f"No save with id {request.save_id!r}.")
            await self._end_all_replies()
            info = await self._in_io(lambda r: engine.load_save(r.save_id), request)
            await conn.send(Ok(re=request.id, save_id=info.save_id, memories=info.memories))
        else:
            if not await self._in_io(lambda r: engine.delete_save(r.save_id), request):
                raise SaveError("save_id", f"No save with id {request.save_id!r}.")
            await conn.send(Ok(re=request.id, save_id=request.save_id))

    async def _save_file(self, conn: _Connection, request: SaveExport | SaveImport) -> None:
        """Exports live in one folder of the data directory; a request names a file in it,
        never a path (a client must not read or write elsewhere)."""
        folder = self.exports_dir
        if isinstance(request, SaveExport):

            def export(r: SaveExport) -> Path:
                data = self.engine.export_save(r.save_id)
                folder.mkdir(parents=True, exist_ok=True)
                target = folder / f"{r.save_id}.npcsave"
                unfinished = target.with_suffix(".partial")
                unfinished.write_bytes(data)
                unfinished.replace(target)
                return target

            path = await self._in_io(export, request)
            # The file's name in the exports folder (what save.import takes), never the
            # data directory's absolute path: the client has no business knowing it.
            await conn.send(Ok(re=request.id, save_id=request.save_id, path=path.name))
            return
        source = folder / request.file
        if not source.is_file():
            raise SaveError("file", f"No file {request.file!r} among the exports.")
        info = await self._in_io(
            lambda r: self.engine.import_save(r.save_id, read_save_file(source)), request
        )
        await conn.send(Ok(re=request.id, save_id=info.save_id, memories=info.memories))

    def _state(self, request: StateSet | StateGet) -> StateView:
        if isinstance(request, StateGet):
            return self.engine.get_state(request.player_id, request.npc_id)
        return self.engine.set_state(
            request.player_id,
            npc_id=request.npc_id,
            trust=request.trust,
            trust_delta=request.trust_delta,
            flags=request.flags,
            game_time=request.game_time,
        )

    @staticmethod
    async def _acknowledged(done: Future[list[str]]) -> list[str]:
        """Wait for a memory write without holding a thread while it queues."""
        return await asyncio.wait_for(asyncio.wrap_future(done), MEMORY_CALL_TIMEOUT)

    async def _own_writes(self, conn: _Connection) -> None:
        if conn.writes:
            waits = [asyncio.wrap_future(write) for write in list(conn.writes)]
            await asyncio.wait(waits, timeout=MEMORY_CALL_TIMEOUT)

    def _one_less(self) -> None:
        self._queued -= 1

    async def _in_io(self, function: Callable[[Any], Any], request: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._io, function, request)

    def _npc_infos(self) -> list[NpcInfo]:
        return [
            NpcInfo(id=npc_id, name=p.persona.name, role=p.persona.role, mood=p.persona.mood)
            for npc_id, p in sorted(self.engine.registry.personas.items())
        ]

    def _stats(self, request: Stats) -> StatsReport:
        connections = len(self._server.connections) if self._server is not None else 0
        return StatsReport(
            re=request.id,
            connections=connections,
            replies=len(self._replies),
            queued_generations=self._queued,
            conversations=self.engine.conversation_count(),
            memory_write_failures=self.engine.memory_write_failures,
        )

    def _memory_list(self, request: MemoryList) -> list[MemoryItem]:
        pairs: list[tuple[Memory, float | None]]
        if request.query:
            scored = self.engine.find(
                request.npc_id, request.player_id, request.query, request.limit
            )
            pairs = [(s.memory, s.score) for s in scored]
        else:
            memories = self.engine.recent_memories(request.npc_id, request.player_id, request.limit)
            pairs = [(m, None) for m in memories]
        return [memory_item(m, score) for m, score in pairs]

    # -- say -----------------------------------------------------------------------------

    async def _say(self, conn: _Connection, request: Say | Greet, encoding: Encoding) -> None:
        cancelled = request.id in conn.cancelled_early
        conn.cancelled_early.discard(request.id)
        self.engine.persona(request.npc_id)  # unknown_npc before anything is accepted
        if not await self._admit_line(conn, request, encoding):
            return
        conn.session.in_flight.add(request.id)
        reply = _Reply()
        if cancelled:
            reply.cancel.set()  # it ends at once with reason cancelled
        self._replies[(conn.key, request.id)] = reply
        turn_id = uuid.uuid4().hex
        await conn.send(ReplyStart(re=request.id, npc_id=request.npc_id, turn_id=turn_id))
        reply.task = asyncio.create_task(self._run_say(conn, request, reply))

    def _submit_turn(self, request: Say | Greet, reply: _Reply) -> Future[TurnResult | None]:
        def work(on_delta: Callable[[str], None]) -> TurnResult | None:
            if reply.cancel.is_set():
                # Cancelled (or its client gone) while queued: the NPC heard the line and
                # never answered, exactly what a cancel during the reply stores.
                if isinstance(request, Say):
                    self.engine.hear(request.npc_id, request.text, player_id=request.player_id)
                return None
            turn = (
                partial(self.engine.greet, request.npc_id)
                if isinstance(request, Greet)
                else partial(self.engine.say, request.npc_id, request.text)
            )
            return turn(
                player_id=request.player_id,
                context=request.context,
                max_tokens=request.max_tokens,
                on_delta=on_delta,
                cancel=reply.cancel,
                game_time=request.game_time,
            )

        background = request.priority == "background"
        return self._submit(reply, request.npc_id, request.player_id, work, background)

    def _submit(
        self,
        reply: _Reply,
        npc_id: str,
        player_id: str,
        work: Callable[[Callable[[str], None]], TurnResult | None],
        background: bool = False,
    ) -> Future[TurnResult | None]:
        """Queue one NPC line on the generation scheduler; its text and its end arrive in
        ``reply.inbox``."""
        loop = asyncio.get_running_loop()

        def on_delta(piece: str) -> None:
            loop.call_soon_threadsafe(reply.inbox.put_nowait, ("text", piece))

        self._queued += 1
        job: Future[TurnResult | None] = self._generation.submit(
            npc_id, partial(work, on_delta), player_id=player_id, background=background
        )

        def release(_job: Future[TurnResult | None]) -> None:
            self._queued -= 1  # when the work is really over, not when the reply ended

        def report(_job: Future[TurnResult | None]) -> None:
            reply.inbox.put_nowait(("done", _job))

        job.add_done_callback(lambda f: loop.call_soon_threadsafe(release, f))
        job.add_done_callback(lambda f: loop.call_soon_threadsafe(report, f))
        return job

    async def _run_say(self, conn: _Connection, request: Say | Greet, reply: _Reply) -> None:
        stream = ReplyStream(
            request.id,
            fallback_line=lambda: self.engine.fallback_line(self.engine.persona(request.npc_id)),
            delta_interval=self.limits.delta_interval_ms / 1000,
        )
        try:
            await self._pump(
                conn,
                stream,
                reply,
                lambda: self._submit_turn(request, reply),
                lambda job: self._turn_over(stream, request.id, request.inspect, job),
                request.deadline_ms,
            )
        finally:
            self._replies.pop((conn.key, request.id), None)
            conn.session.in_flight.discard(request.id)

    async def _pump(
        self,
        conn: _Connection,
        stream: ReplyStream,
        reply: _Reply,
        submit: Callable[[], Future[TurnResult | None]],
        finish: Callable[[Future[TurnResult | None]], list[ReplyMessage]],
        deadline_ms: int | None = None,
    ) -> TurnResult | None:
        """Run one line: submit its work, send its frames as they come, until its
        ``reply.end``. Returns what the engine reported (None: it did not run)."""
        loop = asyncio.get_running_loop()
        deadline = None
        outcome: TurnResult | None = None
        try:
            if self.stopping:
                await self._send_all(conn, stream.shutdown())
                return None
            submit()
            if deadline_ms:
                deadline = loop.call_later(
                    deadline_ms / 1000, reply.inbox.put_nowait, ("deadline", None)
                )
            while not stream.ended:
                due = stream.due()
                timeout = None if due is None else max(due - loop.time(), 0.0)
                try:
                    kind, value = await asyncio.wait_for(reply.inbox.get(), timeout)
                except TimeoutError:
                    await self._send_all(conn, stream.tick(loop.time()))
                    continue
                if kind == "player":  # a scene's wake-up for a player line: not this line's
                    continue
                if kind == "text":
                    out = stream.text(value, loop.time())
                elif kind == "deadline":
                    out = stream.deadline_passed(deadline_ms or 0)
                elif kind == "shutdown":
                    out = stream.shutdown()
                else:
                    out = finish(value)
                    if not value.exception() and value.result() is not None:
                        outcome = value.result()
                        conn.track(outcome.memory_write)
                        if self.engine.shared_store and outcome.memory_write is not None:
                            # Replicas share the store: reply.end promises the turn is
                            # stored, so the next turn may go to any replica.
                            await self._own_writes(conn)
                if stream.ended and kind in ("deadline", "shutdown"):
                    reply.cancel.set()  # ended early: stop the work (a scene's too)
                await self._send_all(conn, out)
        finally:
            if deadline is not None:
                deadline.cancel()
        return outcome

    def _turn_over(
        self,
        stream: ReplyStream,
        request_id: str,
        inspect: bool,
        job: Future[TurnResult | None],
    ) -> list[ReplyMessage]:
        try:
            result = job.result()
        except Exception as exc:
            if is_unavailable(exc):
                return stream.failed("unavailable", UNAVAILABLE)
            log.error("turn %s failed", request_id, exc_info=exc)
            # The engine's own errors are written for clients; anything else may carry
            # paths, hosts or prompt text: the log has it, the client gets its kind.
            if isinstance(exc, NpcEngineError):
                return stream.failed("internal", str(exc))
            return stream.failed("internal", f"Internal error: {type(exc).__name__}")
        if result is None:  # dropped while queued
            return stream.finished(FinishedTurn("cancelled"), stopping=self.stopping)
        return stream.finished(self._finished_turn(inspect, result), stopping=self.stopping)

    async def _send_all(self, conn: _Connection, messages: list[ReplyMessage]) -> None:
        for message in messages:
            await conn.send(message)

    def _finished_turn(self, inspect: bool, result: TurnResult) -> FinishedTurn:
        timings = result.timings
        return FinishedTurn(
            reason=result.reason,
            guard=result.guard.kind if result.guard is not None else None,
            emotion=result.emotion,
            action=result.action,
            game_action=GameAction(**result.game_action.as_dict())
            if result.game_action is not None
            else None,
            usage=Usage(
                prompt_tokens=result.prompt_tokens,
                cached_tokens=result.cached_tokens,
                completion_tokens=result.completion_tokens,
                ttft_ms=round(timings.ttft_ms) if timings.ttft_ms is not None else None,
                total_ms=round(timings.total_ms),
            ),
            error=result.error,
            error_code=result.error_code,
            inspect=self._inspection(result) if inspect else None,
        )

    @staticmethod
    def _inspection(result: TurnResult) -> TurnInspection:
        return TurnInspection(
            prompt=result.prompt,
            memories=[RecalledMemory(**scored.summary()) for scored in result.memories],
            lore=[ChosenLoreItem(**item) for item in lore_summary(result.lore)],
            dropped=result.dropped,
            retrieval_ms=result.timings.retrieval_ms,
            prompt_ms=result.timings.prompt_ms,
            trust=result.standing.trust if result.standing is not None else None,
            flags=dict(result.standing.flags) if result.standing is not None else None,
            unlocked=list(result.unlocked),
            guard_entry=result.guard.entry if result.guard else None,
            guard_reason=result.guard.reason if result.guard else None,
            guard_withheld=result.guard.withheld if result.guard else None,
        )
