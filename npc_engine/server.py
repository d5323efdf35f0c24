"""The WebSocket server: moves frames between sockets and the request router.

``serving.Router`` serves requests (sans socket: admission, handlers, replies); this module
accepts connections, refuses handshakes over the connection limit or from origins not
allowed, reads frames with an idle timeout, writes what the router sends, and stops in
order. Nothing blocking runs on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from http import HTTPStatus

from pydantic import BaseModel
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request as HttpRequest
from websockets.http11 import Response as HttpResponse

from npc_engine.config import ServerLimits
from npc_engine.dialogue import DialogueEngine
from npc_engine.errors import NpcEngineError
from npc_engine.protocol import Encoding, encode
from npc_engine.serving.router import Router

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
# Private-use close code (4000-4999), mirroring HTTP 408: the client sent nothing for
# ``limits.idle_timeout`` seconds and had no reply running.
IDLE_CLOSE_CODE = 4408


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
        self.host, self.port = host, port
        self.limits = limits or ServerLimits()
        # Browsers always send Origin, native game clients never do: no header is allowed,
        # an origin only when listed (a page the player visits must not reach the server).
        self.origins: list[str | None] = [None, *(origins or [])]
        self.ssl_context = ssl_context
        self.router = Router(engine, self.limits, token=token, allow_inspect=allow_inspect)
        self._server: Server | None = None

    @property
    def url(self) -> str:
        scheme = "wss" if self.ssl_context is not None else "ws"
        return f"{scheme}://{self.host}:{self.port}/"

    def warm_in_background(self, npc_ids: list[str], report: Callable[[str], None]) -> None:
        self.router.warm_in_background(npc_ids, report)

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
        if self._server is not None:
            # Stop listening, keep the open connections until their replies have ended.
            # (Not Server.close(close_connections=False): close() is idempotent, so the
            # later close() that must close the connections would do nothing.)
            self._server.server.close()
        await self.router.stop_replies()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5.0)
        await self.router.stop_work()

    async def _handle(self, websocket: ServerConnection) -> None:
        async def send_frame(message: BaseModel, encoding: Encoding) -> None:
            with contextlib.suppress(ConnectionClosed):
                await websocket.send(encode(message, encoding))

        conn = self.router.open(send_frame)
        in_order = asyncio.create_task(self.router.serve_in_order(conn))
        idle_timeout = self.limits.idle_timeout or None
        try:
            with contextlib.suppress(ConnectionClosed):
                while True:
                    try:
                        frame = await asyncio.wait_for(websocket.recv(), idle_timeout)
                    except TimeoutError:  # TimeoutError is not it before 3.11
                        if not conn.busy:
                            await websocket.close(IDLE_CLOSE_CODE, "idle timeout")
                            return
                        continue
                    close = await self.router.receive(conn, frame)
                    if close is not None:
                        await websocket.close(*close)
                        return
        finally:
            in_order.cancel()
            self.router.close(conn)
