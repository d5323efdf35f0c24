"""A connection to a ``Router`` in this process, with no socket: what ``NpcClient`` needs of
a WebSocket (``send``, the frames as an async iterator, ``close``, ``close_code``). The
playtest's in-process session talks to the engine through it, so it goes the way a game's
requests go (admission, the line scheduler, scenes, the same frames), not a second path."""

from __future__ import annotations

import asyncio
import contextvars

from pydantic import BaseModel

from npc_engine.protocol import Encoding, encode
from npc_engine.serving.router import Router

NORMAL_CLOSE = 1000


class InProcessLink:
    def __init__(self, router: Router) -> None:
        self._router = router
        self._frames: asyncio.Queue[str | bytes | None] = asyncio.Queue()
        self.close_code: int | None = None
        self.connection = router.open(self._deliver)
        # Its own context: the task serves the connection for its whole life, whatever
        # the caller's (a UI framework's worker) does with its own.
        self._serving = asyncio.create_task(
            router.serve_in_order(self.connection), context=contextvars.Context()
        )

    async def _deliver(self, message: BaseModel, encoding: Encoding) -> None:
        if self.close_code is None:
            self._frames.put_nowait(encode(message, encoding))

    async def send(self, frame: str | bytes) -> None:
        if self.close_code is not None:
            raise ConnectionError(f"connection closed: close code {self.close_code}")
        close = await self._router.receive(self.connection, frame)
        if close is not None:
            self._shut(close[0])

    async def close(self) -> None:
        self._shut(NORMAL_CLOSE)

    def _shut(self, code: int) -> None:
        if self.close_code is not None:
            return
        self.close_code = code
        self._serving.cancel()
        self._router.close(self.connection)
        self._frames.put_nowait(None)  # the reader's iteration ends

    def __aiter__(self) -> InProcessLink:
        return self

    async def __anext__(self) -> str | bytes:
        frame = await self._frames.get()
        if frame is None:
            raise StopAsyncIteration
        return frame
