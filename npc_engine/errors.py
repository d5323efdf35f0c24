"""Errors that reach the user as one clear message (the CLI prints them without a traceback)."""

from __future__ import annotations

from typing import Any, ClassVar


class NpcEngineError(Exception):
    """Base class: the message is written for the person running the engine.

    ``code`` is the protocol error code a client gets for it and ``details()`` the error's
    ``details`` (one mapping for every request: ``serving.router.refusal_of``)."""

    code: ClassVar[str] = "invalid_request"

    def details(self) -> dict[str, Any]:
        return {}


class FieldError(NpcEngineError):
    """A request the engine refuses because of one field (named, for ``details.field``)."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name

    def details(self) -> dict[str, Any]:
        return {"field": self.field}


class ConfigError(NpcEngineError):
    """The configuration (flags, environment, config file) is invalid."""


class ModelUnavailableError(NpcEngineError):
    """A model file is missing, corrupt, or cannot be fetched."""


class DataDirInUseError(NpcEngineError):
    """Another engine process owns the data directory."""


class UnknownNpcError(NpcEngineError):
    """No persona with the requested id is loaded."""

    code = "unknown_npc"

    def __init__(self, npc_id: str, known: list[str]) -> None:
        self.npc_id = npc_id
        self.known = known
        listing = ", ".join(known) if known else "none loaded"
        super().__init__(f"No NPC with id {npc_id!r}. Known: {listing}.")

    def details(self) -> dict[str, Any]:
        return {"known": self.known}


class GenerationError(NpcEngineError):
    """The generation backend failed while producing a reply."""


class UnavailableError(NpcEngineError):
    """A server the engine needs (a Chroma server, a generation server) cannot be reached
    now; the request may be retried (protocol error code ``unavailable``)."""

    code = "unavailable"


class GenerationUnavailableError(GenerationError, UnavailableError):
    """The generation server cannot be reached (after the configured retries)."""


class StoreUnavailableError(UnavailableError):
    """The memory store (a Chroma server) cannot be reached now; the request may be retried."""


def is_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) means a server the engine needs is unreachable:
    refused, reset or timed out (httpx's transport errors), not a refusal of the request."""
    import httpx

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, UnavailableError | httpx.TransportError):
            return True
        # The openai client may ship its own copy of httpx (httpx2): same class names.
        if type(current).__module__.startswith("httpx") and any(
            base.__name__ == "TransportError" for base in type(current).__mro__
        ):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False
