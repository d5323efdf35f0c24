"""The handler registry: one handler per request type, each naming what it offers.

Adding a request type is one protocol model, one handler registered here with
``@handles``, and the client methods; ``welcome.capabilities`` is built from the registry.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from npc_engine.serving.connection import Connection
    from npc_engine.serving.router import Router

Handler = Callable[["Router", "Connection", Any], Awaitable[None]]


@dataclass(frozen=True)
class Route:
    handler: Handler
    capabilities: tuple[str, ...]


ROUTES: dict[type, Route] = {}


def handles(
    *request_types: type, capabilities: tuple[str, ...] = ()
) -> Callable[[Handler], Handler]:
    """Register the decorated coroutine as the handler of ``request_types``."""

    def register(handler: Handler) -> Handler:
        for request_type in request_types:
            if request_type in ROUTES:
                raise RuntimeError(f"{request_type.__name__} already has a handler")
            ROUTES[request_type] = Route(handler, capabilities)
        return handler

    return register


def advertised(transport: tuple[str, ...]) -> list[str]:
    """``welcome.capabilities``: the transport's, then each registered handler's, once."""
    names = list(transport)
    for route in ROUTES.values():
        names.extend(c for c in route.capabilities if c not in names)
    return names
