"""A whole-request deadline for the ``openai`` backend's HTTP: every connect, read and
write of a thread's request ends by one time (``request_deadline``), so a server that
trickles a byte now and then cannot hold a slot past it. httpx takes only per-read
timeouts and names no public hook for its network backend, hence this small wrapper of
the connection pool's backend (written by hand: no library does this)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)


def http_library() -> Any:
    """The httpx the openai client runs on (newer releases ship their own fork, httpx2,
    whose errors are not httpx's)."""
    import importlib

    import openai

    for base in openai.DefaultHttpxClient.__mro__[1:]:
        name = base.__module__.split(".")[0]
        if name.startswith("httpx"):
            return importlib.import_module(name)
    import httpx  # pragma: no cover

    return httpx  # pragma: no cover


class _Deadline(threading.local):
    """The monotonic time by which this thread's request to the server must be done."""

    at: float | None = None


_deadline = _Deadline()


@contextlib.contextmanager
def request_deadline(seconds: float) -> Iterator[None]:
    """Every connect, write and read of this thread's requests ends by ``seconds`` from now
    (httpx's own timeouts are per read: a trickling server never trips them)."""
    outer = _deadline.at
    at = time.monotonic() + seconds
    _deadline.at = at if outer is None else min(outer, at)
    try:
        yield
    finally:
        _deadline.at = outer


def _bounded(timeout: float | None, what: str, core: Any) -> float | None:
    """``timeout`` cut to what is left of this thread's deadline; past it, a timeout."""
    if _deadline.at is None:
        return timeout
    left = _deadline.at - time.monotonic()
    if left <= 0:
        error = core.ConnectTimeout if what == "connect" else core.ReadTimeout
        raise error(f"the request's deadline passed ({what})")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream:
    """An httpcore network stream whose every read and write ends by the deadline."""

    def __init__(self, inner: Any, core: Any) -> None:
        self.inner = inner
        self.core = core

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        data: bytes = self.inner.read(max_bytes, _bounded(timeout, "read", self.core))
        return data

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.inner.write(buffer, _bounded(timeout, "write", self.core))

    def close(self) -> None:
        self.inner.close()

    def start_tls(
        self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None
    ) -> _DeadlineStream:
        bounded = _bounded(timeout, "connect", self.core)
        return _DeadlineStream(
            self.inner.start_tls(ssl_context, server_hostname, bounded), self.core
        )

    def get_extra_info(self, info: str) -> Any:
        return self.inner.get_extra_info(info)


class _DeadlineBackend:
    """An httpcore network backend whose connections honour ``request_deadline``."""

    def __init__(self, inner: Any, core: Any) -> None:
        self.inner = inner
        self.core = core

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> _DeadlineStream:
        bounded = _bounded(timeout, "connect", self.core)
        stream = self.inner.connect_tcp(host, port, bounded, local_address, socket_options)
        return _DeadlineStream(stream, self.core)

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Any = None
    ) -> _DeadlineStream:
        bounded = _bounded(timeout, "connect", self.core)
        stream = self.inner.connect_unix_socket(path, bounded, socket_options)
        return _DeadlineStream(stream, self.core)

    def sleep(self, seconds: float) -> None:
        self.inner.sleep(seconds)


def deadline_client() -> Any:
    """The openai client's httpx client, its sockets honouring ``request_deadline``: the
    connection pool's network backend cuts each connect, read and write to the time left
    (httpx takes no whole-request timeout, and names no public hook for its backend)."""
    import importlib

    import openai

    http = http_library()
    transport = http.HTTPTransport(
        limits=http.Limits(max_connections=1000, max_keepalive_connections=100)
    )
    pool = getattr(transport, "_pool", None)
    inner = getattr(pool, "_network_backend", None)
    if inner is None:  # pragma: no cover - an httpx that changed: per-read timeouts only
        log.warning("the openai backend's whole-request deadline is off (httpx changed)")
    else:
        core = importlib.import_module(type(pool).__module__.split(".")[0])
        pool._network_backend = _DeadlineBackend(inner, core)  # type: ignore[union-attr]
    return openai.DefaultHttpxClient(transport=transport)
