"""Protocol v1, one connection sans I/O: the handshake, the frame encoding, frames in and
typed requests or structured errors out."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import msgpack
from pydantic import ValidationError

from npc_engine.protocol.messages import Error
from npc_engine.protocol.requests import (
    DEFAULT_MAX_FRAME_BYTES,
    REQUEST_ADAPTER,
    REQUEST_TYPES,
    SUPPORTED_PROTOCOLS,
    Encoding,
    ErrorCode,
    Hello,
    MemoryForget,
    Request,
)


@dataclass
class Outcome:
    """What one incoming frame produced: a request to serve, or an error to send back."""

    request: Request | None = None
    error: Error | None = None
    encoding: Encoding = "json"  # the encoding of the frame (errors answer in it)
    close_code: int | None = None  # set when the connection must be closed after sending


def _error(code: ErrorCode, message: str, re: str | None, **details: Any) -> Error:
    return Error(re=re, code=code, message=message, details=details)


@dataclass
class ProtocolSession:
    """The state of one connection: handshake, encoding, request ids in flight."""

    token: str | None = None
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    hello_done: bool = False
    encoding: Encoding = "json"
    in_flight: set[str] = field(default_factory=set)

    def receive(self, frame: str | bytes) -> Outcome:
        frame_encoding: Encoding = "msgpack" if isinstance(frame, bytes) else "json"
        size = len(frame) if isinstance(frame, bytes) else len(frame.encode("utf-8"))
        if size > self.max_frame_bytes:
            return Outcome(
                error=_error(
                    "too_large",
                    f"Frame of {size} bytes exceeds the limit of {self.max_frame_bytes}.",
                    None,
                    limit=self.max_frame_bytes,
                ),
                encoding=frame_encoding,
            )
        try:
            data = self._decode(frame)
        except ValueError as exc:
            return Outcome(error=_error("bad_frame", str(exc), None), encoding=frame_encoding)
        request_id = data.get("id") if isinstance(data.get("id"), str) and data.get("id") else None
        kind = data.get("type")

        def fail(code: ErrorCode, message: str, **details: Any) -> Outcome:
            return Outcome(
                error=_error(code, message, request_id, **details), encoding=frame_encoding
            )

        if not self.hello_done and kind not in ("hello", "ping"):
            return fail("hello_required", "Send hello first.")
        if request_id is None:
            return fail("invalid_request", "Every request needs a string id.", field="id")
        if not isinstance(kind, str) or kind not in REQUEST_TYPES:
            return fail("unknown_type", f"Unknown message type {kind!r}.", type=str(kind))
        if request_id in self.in_flight:
            return fail(
                "invalid_request", f"Request id {request_id!r} is still in flight.", field="id"
            )
        try:
            request = REQUEST_ADAPTER.validate_python(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"][1:]) or "type"
            return fail("invalid_request", f"{where}: {first['msg']}", field=where)
        if isinstance(request, Hello):
            return self._hello(request, frame_encoding)
        if isinstance(request, MemoryForget) and not (
            request.player_id is not None or request.memory_ids is not None or request.all
        ):
            return fail(
                "invalid_request",
                "memory.forget needs player_id, memory_ids or all: true.",
                field="all",
            )
        return Outcome(request=request, encoding=frame_encoding)

    def _hello(self, hello: Hello, frame_encoding: Encoding) -> Outcome:
        def fail(
            code: ErrorCode, message: str, close: int | None = None, **details: Any
        ) -> Outcome:
            return Outcome(
                error=_error(code, message, hello.id, **details),
                encoding=frame_encoding,
                close_code=close,
            )

        if self.hello_done:
            return fail("invalid_request", "hello was already sent on this connection.")
        if hello.protocol not in SUPPORTED_PROTOCOLS:
            return fail(
                "unsupported_protocol",
                f"Protocol {hello.protocol!r} is not supported.",
                supported=SUPPORTED_PROTOCOLS,
            )
        if self.token is not None and hello.token != self.token:
            return fail("unauthorized", "Missing or wrong token.", close=4401)
        self.hello_done = True
        self.encoding = frame_encoding
        return Outcome(request=hello, encoding=frame_encoding)

    @staticmethod
    def _decode(frame: str | bytes) -> dict[str, Any]:
        if isinstance(frame, bytes):
            try:
                data = msgpack.unpackb(frame, raw=False, strict_map_key=False)
            except Exception as exc:
                raise ValueError(f"Binary frame is not MessagePack: {exc}") from None
        else:
            try:
                data = json.loads(frame)
            except ValueError as exc:
                raise ValueError(f"Text frame is not JSON: {exc}") from None
            except RecursionError:  # "[" * 100_000: the C decoder recurses per level
                raise ValueError("Text frame is nested too deeply.") from None
        if not isinstance(data, dict):
            raise ValueError("A frame must hold one object (a map) with a 'type'.")
        return data
