"""Real servers on loopback, for the tests and the benchmark: a Chroma server
(``chroma run``), llama.cpp's ``llama-server`` (built by tools/build_llama_server.sh),
llama-cpp-python's own OpenAI-compatible server, and ``npc-engine serve``. Each is started
on a free port and waited for; each context manager stops what it started.

Every process started here dies with the process that started it, however that one ends
(a test killed at its time limit, a benchmark interrupted, pytest killed): on Linux the
kernel sends it SIGKILL when its parent goes (``PR_SET_PDEATHSIG``), and ``reap()`` stops
whatever is still running at the end of a test session."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
READY_SECONDS = 120.0
_PR_SET_PDEATHSIG = 1
_started: weakref.WeakSet[subprocess.Popen[Any]] = weakref.WeakSet()


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: ask the kernel for SIGKILL when the parent
    dies (no library offers this; it is one prctl call). A no-op off Linux."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)


def popen(command: list[str], **options: Any) -> subprocess.Popen[Any]:
    """``subprocess.Popen`` for a helper process: killed with its parent, reaped at the end
    of the session if nobody stopped it."""
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    process = subprocess.Popen(command, preexec_fn=preexec, **options)
    _started.add(process)
    return process


def reap() -> list[str]:
    """Stop every process started here that is still running; say which they were."""
    leftovers = [process for process in list(_started) if process.poll() is None]
    for process in leftovers:
        stop(process)
    return [" ".join(map(str, process.args))[:200] for process in leftovers]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until_answers(url: str, process: subprocess.Popen[bytes], seconds: float) -> None:
    """Until ``url`` answers 2xx (a server still loading answers 503: not yet)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {seconds} s")


def stop(process: subprocess.Popen[bytes] | subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(20)


@contextmanager
def running(command: list[str], ready: str) -> Iterator[subprocess.Popen[bytes]]:
    process = popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_answers(ready, process, READY_SECONDS)
        yield process
    finally:
        stop(process)


@dataclass
class ChromaServer:
    """``chroma run`` on a loopback port, stoppable and restartable on the same data."""

    path: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        command = [str(BIN / "chroma"), "run", "--path", str(self.path)]
        command += ["--host", "127.0.0.1", "--port", str(self.port)]
        self.process = popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until_answers(f"{self.url}/api/v2/heartbeat", self.process, READY_SECONDS)

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)


@contextmanager
def chroma_server(path: Path) -> Iterator[ChromaServer]:
    server = ChromaServer(path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


LLAMA_SERVER_BUILD_ENV = "LLAMA_SERVER_BUILD_STATUS"


def wait_for_llama_server_build(seconds: float) -> str:
    """When ``tools/dev.sh test`` builds llama-server in the background, wait until the
    build has ended (its exit status file appears); returns the end of its log."""
    status = os.environ.get(LLAMA_SERVER_BUILD_ENV)
    if not status:
        return ""
    done = Path(status + ".exit")
    deadline = time.monotonic() + seconds
    while not done.exists() and time.monotonic() < deadline:
        time.sleep(1)
    log = Path(status + ".log")
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    if not done.exists():
        return f"still building after {seconds:.0f} s; its log ends:\n{tail}"
    return f"the build exited {done.read_text().strip()}; its log ends:\n{tail}"


def llama_server_binary() -> Path | None:
    """The llama-server tools/build_llama_server.sh cached, or NPC_ENGINE_LLAMA_SERVER."""
    explicit = os.environ.get("NPC_ENGINE_LLAMA_SERVER")
    if explicit:
        return Path(explicit)
    import llama_cpp

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    found = cache / "npc-engine" / "llama-server" / llama_cpp.__version__ / "llama-server"
    return found if found.is_file() else None


@contextmanager
def llama_server(binary: Path, model: Path, slots: int, n_ctx: int, *extra: str) -> Iterator[str]:
    """llama-server with ``slots`` parallel slots of ``n_ctx`` tokens (and ``extra``
    flags); yields its /v1 URL."""
    port = free_port()
    command = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port)]
    # The cores this run may use (tests/conftest.py shares them out between test workers).
    threads = os.environ.get("NPC_ENGINE_N_THREADS") or str(os.cpu_count() or 1)
    command += ["-np", str(slots), "-c", str(n_ctx * slots), "-t", threads]
    command += ["--no-webui", "--log-disable", *extra]
    with running(command, f"http://127.0.0.1:{port}/health"):
        yield f"http://127.0.0.1:{port}/v1"


@contextmanager
def llama_cpp_server(model: Path, n_ctx: int, threads: int | None = None) -> Iterator[str]:
    """llama-cpp-python's OpenAI-compatible server (the `server` extra); yields its /v1 URL."""
    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(model)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx)]
    if threads:
        command += ["--n_threads", str(threads), "--n_threads_batch", str(threads)]
    command += ["--verbose", "False"]
    with running(command, f"http://127.0.0.1:{port}/v1/models"):
        yield f"http://127.0.0.1:{port}/v1"


@dataclass
class EngineProcess:
    process: subprocess.Popen[str]
    url: str


def start_engine(
    personas: Path,
    data_dir: Path,
    *flags: str,
    settings: dict[str, str] | None = None,
    inherit_settings: bool = True,
    log: Path | None = None,
) -> EngineProcess:
    """``npc-engine serve`` on a free loopback port, configured by ``flags`` and by
    ``NPC_ENGINE_…`` environment ``settings`` (as a deployment is); without
    ``inherit_settings`` none of this process's own NPC_ENGINE_ variables reach it. Its
    stderr goes to ``log`` (a long-running engine must not fill an unread pipe), or to a
    pipe the caller reads."""
    env = dict(os.environ)
    if not inherit_settings:
        env = {k: v for k, v in env.items() if not k.startswith("NPC_ENGINE_")}
    env.update(settings or {})
    command = [sys.executable, "-m", "npc_engine.cli", "serve", "--port", "0"]
    command += ["--personas", str(personas), "--data-dir", str(data_dir), *flags]
    with open(log, "w") if log is not None else nullcontext(subprocess.PIPE) as errors:
        process = popen(
            command,
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
            cwd=REPO,
            env=env,
        )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("npc-engine serving ws://"):
        process.kill()
        said = log.read_text() if log is not None else process.communicate()[1]
        raise RuntimeError(f"serve did not start: {line!r} {said[-3000:]}")
    return EngineProcess(process, line.split()[2])
