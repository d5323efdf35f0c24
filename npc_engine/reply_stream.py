"""One reply's frames, sans I/O: what happened in, protocol messages out.

Every guarantee protocol v1 makes about a reply lives here, so it is unit-tested and fuzzed
without a socket or a model: ``seq`` counts from 0 without gaps, the deltas concatenate to
``reply.end.text``, exactly one ``reply.end`` goes out and nothing after it, a deadline that
passes before the first token sends the persona's fallback line at once, a failure before
any text sends the fallback line, and after the first delta (sent at once) text is gathered
for up to ``delta_interval`` seconds into one ``reply.delta``.

The asyncio server only feeds events in (with the loop's clock), sends what comes out and
arms a timer for ``due()``. (The split is python-websockets': protocol state machines that
never touch a socket, and a thin I/O layer around them.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from npc_engine.protocol import (
    ErrorCode,
    ErrorInfo,
    GameAction,
    ReplyDelta,
    ReplyEnd,
    TurnInspection,
    Usage,
)

ReplyMessage = ReplyDelta | ReplyEnd


@dataclass
class FinishedTurn:
    """What the engine reports about a turn that ran (its text came through ``text``)."""

    reason: str  # stop | length | cancelled | error
    guard: Literal["secret", "out_of_world"] | None = None  # the guard cut the reply
    emotion: str | None = None
    action: dict[str, Any] | None = None
    usage: Usage | None = None
    error: str | None = None
    error_code: ErrorCode = "internal"
    inspect: TurnInspection | None = None
    game_action: GameAction | None = None


def end_message(
    request_id: str, text: str, turn: FinishedTurn, scene_id: str | None = None
) -> ReplyEnd:
    """The ``reply.end`` of a turn that ran: the one shape every front end reports a
    finished turn in (the server's frames, ``say --json``, the playtest's turn view)."""
    error = None
    if turn.reason == "error":
        error = ErrorInfo(code=turn.error_code, message=turn.error or "generation failed")
    reason = turn.reason if turn.reason in ("stop", "length", "error", "cancelled") else "stop"
    return ReplyEnd(
        re=request_id,
        text=text,
        reason=reason,
        guard=turn.guard,
        emotion=turn.emotion,
        action=turn.action,
        game_action=turn.game_action,
        usage=turn.usage,
        error=error,
        inspect=turn.inspect,
        scene_id=scene_id,
    )


@dataclass
class ReplyStream:
    """The frames of one accepted ``say`` (its ``reply.start`` has gone out)."""

    request_id: str
    fallback_line: Callable[[], str]
    delta_interval: float = 0.015
    scene_id: str | None = None  # a line of a scene: every frame names it
    sent: list[str] = field(default_factory=list)  # the text of each delta sent, by seq
    ended: bool = False
    _buffer: str = ""
    _last_sent: float = 0.0

    @property
    def text_sent(self) -> str:
        return "".join(self.sent)

    def due(self) -> float | None:
        """When gathered text must go out (loop time), or None when nothing waits."""
        if self.ended or not self._buffer:
            return None
        return self._last_sent + self.delta_interval

    def text(self, piece: str, now: float) -> list[ReplyMessage]:
        """The model produced ``piece``."""
        if self.ended or not piece:
            return []
        self._buffer += piece
        if not self.sent or now >= self._last_sent + self.delta_interval:
            return self._flush(now)
        return []

    def tick(self, now: float) -> list[ReplyMessage]:
        """The timer armed for ``due()`` fired."""
        due = self.due()
        if due is None or now < due:
            return []
        return self._flush(now)

    def finished(self, turn: FinishedTurn, *, stopping: bool = False) -> list[ReplyMessage]:
        """The turn ended; its text came in through ``text`` before this."""
        if self.ended:
            return []
        out = self._flush(self._last_sent)
        if turn.reason == "cancelled":
            if stopping:
                return out + self._end("error", ErrorInfo(code="shutdown", message=_SHUTDOWN))
            return out + self._end("cancelled")
        self.ended = True
        return [*out, end_message(self.request_id, self.text_sent, turn, self.scene_id)]

    def failed(self, code: ErrorCode, message: str) -> list[ReplyMessage]:
        """The turn could not run: the fallback line stands in if nothing was sent."""
        if self.ended:
            return []
        out = self._flush(self._last_sent)
        if not self.sent:
            out += self._send(self.fallback_line(), self._last_sent)
        return out + self._end("error", ErrorInfo(code=code, message=message))

    def deadline_passed(self, deadline_ms: int) -> list[ReplyMessage]:
        """No first token in time: the fallback line now; a token that made it wins."""
        if self.ended or self.sent or self._buffer:
            return []
        return self.failed("deadline", f"No first token within {deadline_ms} ms.")

    def shutdown(self) -> list[ReplyMessage]:
        """The server is stopping and the turn did not end in time: end it now."""
        if self.ended:
            return []
        out = self._flush(self._last_sent)
        return out + self._end("error", ErrorInfo(code="shutdown", message=_SHUTDOWN))

    def _flush(self, now: float) -> list[ReplyMessage]:
        if not self._buffer:
            return []
        text, self._buffer = self._buffer, ""
        return self._send(text, now)

    def _send(self, text: str, now: float) -> list[ReplyMessage]:
        if not text:
            return []
        delta = ReplyDelta(
            re=self.request_id, seq=len(self.sent), text=text, scene_id=self.scene_id
        )
        self.sent.append(text)
        self._last_sent = now
        return [delta]

    def _end(self, reason: str, error: ErrorInfo | None = None) -> list[ReplyMessage]:
        self.ended = True
        return [
            ReplyEnd(
                re=self.request_id,
                text=self.text_sent,
                reason=reason,
                error=error,
                scene_id=self.scene_id,
            )
        ]


_SHUTDOWN = "The server is stopping."
