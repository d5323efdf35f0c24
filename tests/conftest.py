from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from npc_engine.config import EngineConfig, load_config
from npc_engine.model_registry import TINY_CHAT_MODEL

REPO = Path(__file__).resolve().parent.parent
SAMPLE_PERSONAS = REPO / "personas"
sys.path.insert(0, str(REPO / "tools"))  # real servers on loopback: tools/servers.py
import servers  # noqa: E402

# The KV cells of NPC prompt heads (see generation.prefix_store) live in one folder for the
# whole run, shared by the test processes and every server or CLI they start (inherited
# through the environment): each NPC's head is read once per run, as on a player's machine,
# never from the developer's own cache. Tests of cold behaviour turn it off or use their own.
HEAD_CACHE_ENV = "NPC_ENGINE_HEAD_CACHE_DIR"
HEAD_CACHE = Path(tempfile.mkdtemp(prefix="npc-engine-test-kv-heads-"))
os.environ[HEAD_CACHE_ENV] = str(HEAD_CACHE)
atexit.register(shutil.rmtree, HEAD_CACHE, ignore_errors=True)
# The lorebook's vectors likewise: one file for the run (each engine would otherwise embed
# the sample world's 29 entries again, ~0.9 s of 2 cores, in every fresh data_dir).
LORE_VECTORS_ENV = "NPC_ENGINE_LORE_VECTOR_CACHE"
LORE_VECTORS = Path(tempfile.mkdtemp(prefix="npc-engine-test-lore-vectors-"))
os.environ[LORE_VECTORS_ENV] = str(LORE_VECTORS / "lore-vectors.sqlite3")
atexit.register(shutil.rmtree, LORE_VECTORS, ignore_errors=True)

# Tests pick their model. Wiring tests (the protocol, memory, saves, servers, clients) run on
# the tiny SmolLM2-135M: what they check does not depend on reply quality, and the default
# Qwen2.5-0.5B reads a prompt about 4x slower on 2 cores, which would take the run past its
# 10 minutes. The setting travels through the environment, so every CLI and server a test
# starts uses it too. Tests of what the player hears (tests/test_eval_default_model.py) name
# the default model themselves.
TEST_MODEL_ENV = "NPC_ENGINE_MODEL"
os.environ[TEST_MODEL_ENV] = TINY_CHAT_MODEL
KEPT_ENV = {HEAD_CACHE_ENV, LORE_VECTORS_ENV, TEST_MODEL_ENV}

# With pytest-xdist (-n N) the cores are shared out between the workers: llama.cpp and
# onnxruntime each start a thread per core and spin while they wait, so two workers with
# every core each ran no faster than one (measured: user time +38 %, the same wall time).
# The share travels through the environment to every server and CLI a worker starts.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _share = str(max(1, (os.cpu_count() or 1) // _WORKERS))
    for _name in ("NPC_ENGINE_N_THREADS", "NPC_ENGINE_MEMORY__EMBED_THREADS"):
        os.environ[_name] = _share
        KEPT_ENV.add(_name)
    for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_name, _share)


# The in-memory store ranks by bag-of-words cosine, not MiniLM's: the relevance bars are
# calibrated for MiniLM (tools/recall_probe.py --calibrate), so tests on it lower them.
FAKE_STORE_RETRIEVAL = {"min_relevance": -1.0, "min_relevance_small_talk": -1.0}


# llama-server is built in the background by tools/dev.sh test while everything else runs
# (~15 min on 2 cores the first time): the tests that use it run last and wait for it. The
# wait is outside their time limit (pytest-timeout starts its clock inside this hook).
LLAMA_SERVER_BUILD_WAIT = 40 * 60.0


def _needs_llama_server(item: pytest.Item) -> bool:
    """A test that uses llama-server asks for a fixture named llama_server…"""
    return any(name.startswith("llama_server") for name in getattr(item, "fixturenames", ()))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name.endswith("_real.py"):  # the real model, Chroma and servers
            item.add_marker(pytest.mark.slow)
    items.sort(key=_needs_llama_server)  # stable: the order is otherwise kept


_llama_server_build_said: list[str] = []


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    if _needs_llama_server(item) and not _llama_server_build_said:
        if servers.llama_server_binary() is None:
            print("\nwaiting for the llama-server build (tools/dev.sh test started it) …")
        _llama_server_build_said.append(
            servers.wait_for_llama_server_build(LLAMA_SERVER_BUILD_WAIT)
        )
    yield


@pytest.fixture(scope="session")
def llama_server_build_log() -> str:
    """What the background build said, for a test that finds no llama-server."""
    return _llama_server_build_said[0] if _llama_server_build_said else ""


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Whatever a test started and did not stop (it was killed at its time limit, say)
    stops here, so no server outlives the run."""
    leftovers = servers.reap()
    if leftovers:
        print(f"\nstopped {len(leftovers)} process(es) that tests left running:")
        for command in leftovers:
            print(f"  {command}")


def fake_engine(
    generator: Any = None,
    *,
    personas: Path = SAMPLE_PERSONAS,
    store: Any = None,
    reply: str = "Aye.",
    fake_retrieval: bool = True,
    **config: Any,
) -> Any:
    """A ``DialogueEngine`` on the fakes, no model: the scripted generator (answering
    ``reply`` unless one is given) and the in-memory store. ``fake_retrieval``: recall keeps
    every memory (the fake store's vectors are not MiniLM's: its scores are not meaningful)."""
    from npc_engine.dialogue import DialogueEngine
    from npc_engine.generation.scripted import ScriptedGenerator
    from npc_engine.memory.in_memory import InMemoryStore
    from npc_engine.persona.loader import load_personas

    if fake_retrieval:
        config.setdefault("retrieval", FAKE_STORE_RETRIEVAL)
    return DialogueEngine(
        load_personas(personas),
        generator if generator is not None else ScriptedGenerator(respond=lambda _p: reply),
        store if store is not None else InMemoryStore(),
        load_config(**config),
    )


@pytest.fixture
def sample_personas() -> Path:
    return SAMPLE_PERSONAS


@pytest.fixture
def real_config(tmp_path: Path) -> EngineConfig:
    """Real model, real Chroma on disk in a fresh folder; deterministic sampling."""
    return load_config(
        personas_dir=SAMPLE_PERSONAS,
        data_dir=tmp_path / "data",
        seed=1234,
        temperature=0.0,
        n_ctx=2048,
    )


@pytest.fixture
def real_runtime(real_config: EngineConfig) -> Iterator[object]:
    from npc_engine.runtime import open_engine

    runtime = open_engine(real_config)
    try:
        yield runtime
    finally:
        runtime.close()


@pytest.fixture(scope="module")
def shared_runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """One real engine (model, Chroma on disk) for a module's tests that need no isolation:
    loading the model and Chroma for every test was most of the suite's time."""
    from npc_engine.runtime import open_engine

    config = load_config(
        personas_dir=SAMPLE_PERSONAS,
        data_dir=tmp_path_factory.mktemp("shared") / "data",
        seed=1234,
        temperature=0.0,
        n_ctx=2048,
    )
    runtime = open_engine(config)
    try:
        yield runtime
    finally:
        runtime.close()


@pytest.fixture(autouse=True)
def isolated_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never see the developer's NPC_ENGINE_* settings (they would change results);
    only the run's own head cache and test model stay."""
    for name in list(os.environ):
        if name.startswith("NPC_ENGINE_") and name not in KEPT_ENV:
            monkeypatch.delenv(name)


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run ``npc-engine`` in a new process, as a user would. A native crash (SIGSEGV,
    SIGABRT) prints every thread's Python stack into the captured stderr: the playtest's
    restart crashed in two fresh-clone runs (munmap_chunk, then a double free) and
    never when run alone."""
    full_env = {"PYTHONFAULTHANDLER": "1", **os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "npc_engine.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
    )


def start_server_process(config: EngineConfig, *extra: str) -> tuple[subprocess.Popen[str], str]:
    """Start ``npc-engine serve`` on a free loopback port; returns the process and its URL."""
    started = servers.start_engine(config.personas_dir, config.data_dir, *extra)
    return started.process, started.url
