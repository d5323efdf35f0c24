"""World ticks requested by many clients: at most one runs and at most one waits.

A tick reads every NPC's new memories (seconds at a large world), so ticks asked for while
one runs must not queue one per request: they join the one waiting, which runs at the
latest game time asked. Every request gets the count of the tick that served it. The
queue is bounded by construction whatever the number of connections.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field


@dataclass
class _NextTick:
    game_time: float | None
    done: asyncio.Future[int] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    def ask(self, game_time: float | None) -> None:
        if game_time is not None:
            self.game_time = game_time if self.game_time is None else max(self.game_time, game_time)


class TickQueue:
    def __init__(self, run: Callable[[float | None], Awaitable[int]]) -> None:
        """``run``: one world tick at a game time (None: the wall clock)."""
        self._run = run
        self._waiting: _NextTick | None = None
        self._runner: asyncio.Task[None] | None = None
        self.joined = 0  # requests served by a tick another request asked for (stats, tests)

    async def tick(self, game_time: float | None) -> int:
        """Ask for a tick; returns how many rumours the tick that served it passed on."""
        if self._waiting is None:
            self._waiting = _NextTick(game_time)
        else:
            self._waiting.ask(game_time)
            self.joined += 1
        mine = self._waiting
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._drain())
        # shield: one impatient caller must not cancel the tick the others wait for.
        return await asyncio.shield(mine.done)

    async def _drain(self) -> None:
        while self._waiting is not None:
            current, self._waiting = self._waiting, None
            try:
                current.done.set_result(await self._run(current.game_time))
            except Exception as exc:  # every request of this tick gets the error
                current.done.set_exception(exc)
            except asyncio.CancelledError:
                current.done.cancel()
                raise

    @property
    def running(self) -> asyncio.Task[None] | None:
        return self._runner if self._runner is not None and not self._runner.done() else None
