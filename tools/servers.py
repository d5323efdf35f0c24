"""Real servers on loopback, for the tests and the benchmark: a Chroma server
(``chroma run``), llama.cpp's ``llama-server`` (built by tools/build_llama_server.sh),
llama-cpp-python's own OpenAI-compatible server, and ``npc-engine serve``. Each is started
on a free port and waited for; each context manager stops what it started."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
READY_SECONDS = 120.0


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
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
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
    command += ["-np", str(slots), "-c", str(n_ctx * slots), "-t", str(os.cpu_count() or 1)]
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
        process = subprocess.Popen(
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
