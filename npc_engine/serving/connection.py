"""One client connection's state, free of the transport that carries its frames."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from npc_engine.protocol import Encoding, Greet, ProtocolSession, Request, Say, SceneStart
from npc_engine.scenes import Scene
from npc_engine.serving.admission import Refusal, TokenBucket, id_in_flight


@dataclass
class Reply:
    """A streamed reply (or a whole scene) that was accepted and has not ended."""

    cancel: threading.Event = field(default_factory=threading.Event)
    task: asyncio.Task[None] | None = None
    # What happened to the line, in order: ("text", piece), ("done", future),
    # ("deadline", None), ("shutdown", None), ("player", None).
    inbox: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)


@dataclass
class SceneRun:
    """A running scene: its lines share one cancel (the scene's, or any say in it)."""

    scene: Scene
    request: SceneStart
    reply: Reply
    # Player lines said into the scene and not answered yet, in order.
    says: deque[Say] = field(default_factory=deque)


@dataclass
class RequestLedger:
    """Every request id of one connection, from its arrival to its last frame.

    A line request (say, greet, scene.start) is *queued* from its arrival until its turn
    to be accepted; a cancel may overtake it then (*cancelled early*). Once accepted, its
    id is in flight (``session.in_flight``: the protocol layer refuses the id on arrival)
    with its ``Reply`` until the reply ends. Scene says share their scene's reply.
    """

    session: ProtocolSession
    queued: dict[str, Request] = field(default_factory=dict)
    cancelled_early: set[str] = field(default_factory=set)
    replies: dict[str, Reply] = field(default_factory=dict)

    def queue(self, request: Request) -> Refusal | None:
        if isinstance(request, Say | Greet | SceneStart):
            if request.id in self.queued:
                return id_in_flight(request.id)
            self.queued[request.id] = request
        return None

    def cancel(self, target: str) -> None:
        reply = self.replies.get(target)
        if reply is not None:
            reply.cancel.set()  # running: stops between tokens; queued work: dropped
        elif target in self.queued:  # not accepted yet: cancelled on acceptance
            self.cancelled_early.add(target)

    def take(self, request: Request) -> bool:
        """Its turn came: it leaves the queue. True when a cancel overtook it."""
        self.queued.pop(request.id, None)
        if request.id in self.cancelled_early:
            self.cancelled_early.discard(request.id)
            return True
        return False

    def in_flight(self, request_id: str) -> bool:
        return request_id in self.session.in_flight

    def accept(self, request_id: str, reply: Reply) -> None:
        self.session.in_flight.add(request_id)
        self.replies[request_id] = reply

    def finish(self, request_id: str) -> None:
        self.replies.pop(request_id, None)
        self.session.in_flight.discard(request_id)

    def served(self, request: Request) -> None:
        """Refused before it was accepted (unknown NPC, bad scene): its id is free again.
        Only this request's entry: the same id may have been queued anew since."""
        if self.queued.get(request.id) is request:
            del self.queued[request.id]
            self.cancelled_early.discard(request.id)

    def cancel_all(self) -> None:
        for reply in self.replies.values():
            reply.cancel.set()


SendFrame = Callable[[BaseModel, Encoding], Awaitable[None]]


@dataclass(eq=False)  # identity: each connection is one client
class Connection:
    """One client: protocol state, rate limit, ordered request queue and replies."""

    send_frame: SendFrame  # the transport's: never raises when the client has gone
    session: ProtocolSession
    bucket: TokenBucket
    pending: asyncio.Queue[tuple[Request, Encoding]] = field(default_factory=asyncio.Queue)
    ledger: RequestLedger = field(init=False)
    scenes: dict[str, SceneRun] = field(default_factory=dict)  # bounded like the replies
    # Memory writes this connection caused and that are not stored yet: its reads wait for
    # these alone, not for every other connection's writes.
    writes: set[Future[list[str]]] = field(default_factory=set)
    serving: bool = False  # a request is being served (a long world.tick, a save)
    # The encoding of the frame of the request being served: its errors answer in it.
    frame_encoding: Encoding = "json"

    def __post_init__(self) -> None:
        self.ledger = RequestLedger(self.session)

    def track(self, write: Future[list[str]] | None) -> None:
        if write is not None and not write.done():
            self.writes.add(write)
            write.add_done_callback(self.writes.discard)

    @property
    def encoding(self) -> Encoding:
        return self.session.encoding if self.session.hello_done else "json"

    @property
    def authenticated(self) -> bool:
        """It presented the server's token (a server without one has nobody to trust)."""
        return self.session.hello_done and self.session.token is not None

    @property
    def busy(self) -> bool:
        return bool(self.ledger.replies) or self.serving or not self.pending.empty()

    async def send(self, message: BaseModel, encoding: Encoding | None = None) -> None:
        await self.send_frame(message, encoding or self.encoding)
