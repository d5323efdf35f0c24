"""The request router: frames in from any transport, requests to their handlers.

It owns what every connection shares: admission limits, the generation scheduler (replies,
scene preparation, warm-ups and the world clock's busy check), the memory-call pool and
the world-tick queue. The WebSocket server (``npc_engine.server``) only moves frames in and
out; a test can drive a ``Connection`` with any ``send`` function.

Per connection, ``ping`` and ``cancel`` are answered as they arrive; every other request
is served in the order it came, by the connection's own task (``serve_in_order``), so a
slow ``event`` delays neither a ``cancel`` on its connection nor anything on another.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any, cast

from npc_engine import __version__
from npc_engine.config import ServerLimits
from npc_engine.dialogue import DialogueEngine
from npc_engine.errors import FieldError, NpcEngineError, UnknownNpcError, is_unavailable
from npc_engine.protocol import (
    Cancel,
    Encoding,
    Error,
    ErrorCode,
    Hello,
    Ok,
    Ping,
    Pong,
    ProtocolSession,
    Request,
    Welcome,
)
from npc_engine.scheduling import GenerationScheduler
from npc_engine.serving import handlers, lines  # noqa: F401  (they register their routes)
from npc_engine.serving.admission import Admission, Refusal
from npc_engine.serving.connection import Connection, Reply, SendFrame
from npc_engine.serving.routes import ROUTES, advertised
from npc_engine.serving.wire import npc_infos
from npc_engine.turns import npc_of
from npc_engine.world_ticks import TickQueue

log = logging.getLogger(__name__)
TRANSPORT_CAPABILITIES = ("msgpack",)
MEMORY_CALL_TIMEOUT = 60.0
UNAVAILABLE = lines.UNAVAILABLE


def refusal_of(exc: Exception) -> Refusal:
    """The error frame for an exception a handler raised (the one mapping for requests;
    a streamed line's failure is a ``reply.end`` instead: ``lines._line_over``)."""
    if isinstance(exc, UnknownNpcError | FieldError):  # the request named something wrong
        return Refusal(cast(ErrorCode, exc.code), str(exc), exc.details())
    if is_unavailable(exc):  # a Chroma server down: retry later, nothing broke
        return Refusal("unavailable", UNAVAILABLE)
    if isinstance(exc, NpcEngineError):
        return Refusal(cast(ErrorCode, exc.code), str(exc), exc.details())
    return Refusal("internal", f"Internal error: {type(exc).__name__}")


class Router:
    def __init__(
        self,
        engine: DialogueEngine,
        limits: ServerLimits,
        *,
        token: str | None = None,
        allow_inspect: bool = False,
    ) -> None:
        self.engine = engine
        self.limits = limits
        self.token = token
        self.admission = Admission(limits, allow_inspect)
        self.exports_dir = engine.config.data_dir / "exports"  # save.export / save.import
        # As many replies at once as the generator decodes together (its slots).
        features = engine.generator.features()
        warm_keys = features.warm_keys
        self.generation = GenerationScheduler(
            workers=max(features.parallel, 1),
            warm=(lambda: {npc_of(key) for key in warm_keys()}) if warm_keys else None,
        )
        self._io = ThreadPoolExecutor(max_workers=2, thread_name_prefix="npc-memory")
        # World ticks are long background work: their own thread, never the memory calls'.
        self._ticks = ThreadPoolExecutor(max_workers=1, thread_name_prefix="npc-world-tick")
        self.world_ticks = TickQueue(self._run_world_tick)
        self._stop_ticks = threading.Event()
        self.queued = 0  # generation jobs submitted and not over (replies, preparations)
        self.connections: set[Connection] = set()
        self._closed: set[Connection] = set()  # gone, with replies still stopping
        self.stopping = False

    # -- connections ---------------------------------------------------------------------

    def open(self, send_frame: SendFrame) -> Connection:
        conn = Connection(
            send_frame,
            ProtocolSession(token=self.token, max_frame_bytes=self.limits.max_frame_bytes),
            self.admission.connection_bucket(),
        )
        self.connections.add(conn)
        return conn

    def close(self, conn: Connection) -> None:
        """The client has gone: its replies stop (running: between tokens; queued:
        dropped) and end in their own time."""
        conn.ledger.cancel_all()
        self.connections.discard(conn)
        if conn.ledger.replies:
            self._closed.add(conn)

    def replies(self) -> list[Reply]:
        self._closed = {c for c in self._closed if c.ledger.replies}
        return [r for c in self.connections | self._closed for r in c.ledger.replies.values()]

    async def receive(self, conn: Connection, frame: str | bytes) -> tuple[int, str] | None:
        """Handle one frame. Returns the close code and reason when the transport must
        close the connection after it (a wrong token)."""
        outcome = conn.session.receive(frame)
        if outcome.error is not None:
            await conn.send(outcome.error, outcome.encoding)
            if outcome.close_code is not None:
                return outcome.close_code, outcome.error.code
            return None
        request = outcome.request
        if request is None:
            return None
        if isinstance(request, Hello):
            await conn.send(
                Welcome(
                    re=request.id,
                    server=f"npc-engine/{__version__}",
                    session=uuid.uuid4().hex,
                    capabilities=advertised(TRANSPORT_CAPABILITIES),
                    npcs=npc_infos(self.engine.registry),
                ),
            )
        elif isinstance(request, Ping):
            await conn.send(Pong(re=request.id))
        elif isinstance(request, Cancel):  # never waits behind anything
            conn.ledger.cancel(request.target)
            await conn.send(Ok(re=request.id))
        else:
            refusal = self.admission.on_arrival(conn.bucket, conn.pending.qsize())
            refusal = refusal or conn.ledger.queue(request)
            if refusal is not None:
                await self.refuse(conn, request, refusal, outcome.encoding)
                return None
            conn.pending.put_nowait((request, outcome.encoding))
        return None

    async def refuse(
        self,
        conn: Connection,
        request: Request,
        refusal: Refusal,
        encoding: Encoding | None = None,
    ) -> None:
        error = Error(
            re=request.id, code=refusal.code, message=refusal.message, details=refusal.details
        )
        await conn.send(error, encoding)

    async def serve_in_order(self, conn: Connection) -> None:
        """The connection's task: its queued requests, one at a time, in order."""
        while True:
            request, encoding = await conn.pending.get()
            conn.serving, conn.frame_encoding = True, encoding
            try:
                await ROUTES[type(request)].handler(self, conn, request)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                refusal = refusal_of(exc)
                if refusal.code == "internal":  # a bug in one request must not touch others
                    log.exception("request %s failed", request.id)
                await self.refuse(conn, request, refusal, encoding)
            finally:
                conn.serving = False
                conn.ledger.served(request)

    # -- what handlers share -------------------------------------------------------------

    async def in_io(self, function: Callable[[Any], Any], request: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._io, function, request)

    @staticmethod
    async def acknowledged(done: Future[list[str]]) -> list[str]:
        """Wait for a memory write without holding a thread while it queues."""
        return await asyncio.wait_for(asyncio.wrap_future(done), MEMORY_CALL_TIMEOUT)

    async def own_writes(self, conn: Connection) -> None:
        if conn.writes:
            waits = [asyncio.wrap_future(write) for write in list(conn.writes)]
            await asyncio.wait(waits, timeout=MEMORY_CALL_TIMEOUT)

    def one_less(self) -> None:
        self.queued -= 1

    async def end_all_replies(self) -> None:
        """End every running reply (reason cancelled) and wait for its work to stop."""
        replies = self.replies()
        for reply in replies:
            reply.cancel.set()
        tasks = [r.task for r in replies if r.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=self.limits.shutdown_grace)

    async def _run_world_tick(self, game_time: float | None) -> int:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._ticks,
            partial(
                self.engine.world_tick,
                game_time,
                wait_idle=self.generation.wait_idle,
                stop=self._stop_ticks,
            ),
        )

    def warm_in_background(self, npc_ids: list[str], report: Callable[[str], None]) -> None:
        """Warm NPCs at start (``serve --warm``) as background jobs: a say goes first."""
        started = time.perf_counter()
        jobs = [
            self.generation.submit(n, partial(self.engine.warm, n), background=True)
            for n in dict.fromkeys(npc_ids)
        ]
        reported = threading.Lock()

        def done(_job: Future[Any]) -> None:
            if all(job.done() for job in jobs) and reported.acquire(blocking=False):
                seconds = time.perf_counter() - started
                report(f"warmed {len(jobs)} NPC(s) in {seconds:.1f} s")

        for job in jobs:
            job.add_done_callback(done)

    # -- stopping ------------------------------------------------------------------------

    async def stop_replies(self) -> None:
        """Every reply ends with ``reply.end`` (code shutdown) within
        ``limits.shutdown_grace`` seconds."""
        self.stopping = True
        replies = self.replies()
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

    async def stop_work(self) -> None:
        """After the connections closed: a running world tick ends between NPCs, before
        the last flush (its writes land in it, none after it); memory is flushed."""
        self._stop_ticks.set()
        running_tick = self.world_ticks.running
        if running_tick is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait({running_tick}, timeout=self.limits.shutdown_grace + 10)
        loop = asyncio.get_running_loop()
        with contextlib.suppress(Exception):
            await loop.run_in_executor(None, self.engine.writer.flush, 60.0)
        # Workers finish what they run (each cancelled) within a token or a batch. Wait
        # for them, off the loop and bounded: whoever stops the router closes the model
        # next, and a worker still decoding into freed weights crashes the process.
        self.generation.close(wait=False)
        self._io.shutdown(wait=False)
        self._ticks.shutdown(wait=False)
        joined = loop.run_in_executor(None, self._join_workers)
        try:
            await asyncio.wait_for(joined, self.limits.shutdown_grace + 10)
        except TimeoutError:
            log.warning("workers still running after the shutdown grace; closing anyway")

    def _join_workers(self) -> None:
        self.generation.close(wait=True)
        self._io.shutdown(wait=True)
        self._ticks.shutdown(wait=True)
