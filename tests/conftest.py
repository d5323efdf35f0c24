from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from npc_engine.config import EngineConfig, load_config

REPO = Path(__file__).resolve().parent.parent
SAMPLE_PERSONAS = REPO / "personas"


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
