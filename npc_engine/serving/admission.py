"""Admission, sans I/O: which requests are refused before any work, and why.

Two gates. A request that arrives passes rate limits and the connection's queue depth;
a request that streams lines (say, greet, scene.start) is also checked when its turn comes:
inspect authorisation, shutdown, replies in flight, the generation queue, a reused id.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from npc_engine.config import ServerLimits
from npc_engine.protocol import ErrorCode, Greet, Say, SceneStart

LineRequest = Say | Greet | SceneStart


class TokenBucket:
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


@dataclass(frozen=True)
class Refusal:
    """Why a request is refused: becomes an ``error`` frame answering it."""

    code: ErrorCode
    message: str
    details: dict[str, Any] = field(default_factory=dict)


def id_in_flight(request_id: str) -> Refusal:
    """The one wording of a reused id (the protocol layer writes the same for arrivals)."""
    message = f"Request id {request_id!r} is still in flight."
    return Refusal("invalid_request", message, {"field": "id"})


class Admission:
    """The limits of one server: per connection and over all of them."""

    def __init__(self, limits: ServerLimits, allow_inspect: bool) -> None:
        self.limits = limits
        self.allow_inspect = allow_inspect
        self.server_bucket = TokenBucket(limits.server_rate_per_second, limits.server_rate_burst)

    def connection_bucket(self) -> TokenBucket:
        return TokenBucket(self.limits.rate_per_second, self.limits.rate_burst)

    def on_arrival(self, bucket: TokenBucket, waiting: int) -> Refusal | None:
        """A request other than hello, ping and cancel, as it arrives."""
        if not bucket.take():
            return Refusal("rate_limited", "Slow down.")
        if not self.server_bucket.take():
            return Refusal("rate_limited", "The server is receiving too many requests; slow down.")
        if waiting >= self.limits.max_pending_per_connection:
            return Refusal("busy", "Too many requests waiting on this connection; retry later.")
        return None

    def on_accept(
        self,
        request: LineRequest,
        *,
        authenticated: bool,
        stopping: bool,
        replies_here: int,
        queued_generations: int,
        id_taken: bool,
    ) -> Refusal | None:
        """A request that streams lines, when its turn to be accepted comes."""
        if request.inspect and not (self.allow_inspect or authenticated):
            return Refusal(
                "unauthorized",
                "inspect shows the whole prompt, secrets included: start the server with "
                "--allow-inspect, or connect with its token.",
            )
        if stopping:
            return Refusal("busy", "The server is shutting down.")
        if replies_here >= self.limits.max_in_flight_per_connection:
            return Refusal("busy", "Too many requests in flight on this connection; retry later.")
        if queued_generations >= self.limits.max_queued_generations:
            return Refusal("busy", "The generation queue is full; retry later.")
        if id_taken:
            return id_in_flight(request.id)
        return None

    def scene_line_waiting(self, waiting: int) -> Refusal | None:
        if waiting >= self.limits.max_in_flight_per_connection:
            return Refusal("busy", "Too many lines waiting in the scene.")
        return None
