from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from npc_engine.config import EngineConfig, load_config

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


# The in-memory store ranks by bag-of-words cosine, not MiniLM's: the relevance bars are
# calibrated for MiniLM (tools/recall_probe.py --calibrate), so tests on it lower them.
FAKE_STORE_RETRIEVAL = {"min_relevance": -1.0, "min_relevance_small_talk": -1.0}


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
    only the run's own head cache stays."""
    for name in list(os.environ):
        if name.startswith("NPC_ENGINE_") and name != HEAD_CACHE_ENV:
            monkeypatch.delenv(name)


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run ``npc-engine`` in a new process, as a user would."""
    full_env = {**os.environ, **(env or {})}
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
