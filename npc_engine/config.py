"""Engine configuration: flags > environment (``NPC_ENGINE_…``) > config file > defaults.

One pydantic-settings model validates all three sources, so a typo in the config file or
an out-of-range environment value is reported the same way as a bad flag.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import platformdirs
from pydantic import Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from npc_engine.config_sections import (
    ActionConfig,
    GenerationConfig,
    GuardConfig,
    LoreConfig,
    MemoryConfig,
    RetrievalConfig,
    RumourConfig,
    ServerLimits,
)
from npc_engine.errors import ConfigError
from npc_engine.model_registry import DEFAULT_CHAT_MODEL

CONFIG_FILE_ENV = "NPC_ENGINE_CONFIG"
DEFAULT_CONFIG_FILE = Path("npc-engine.yaml")


class EngineConfig(BaseSettings):
    """Every setting of the engine, with its default."""

    model_config = SettingsConfigDict(
        env_prefix="NPC_ENGINE_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    personas_dir: Path = Field(Path("personas"), description="Folder of persona YAML files.")
    data_dir: Path = Field(
        Path(platformdirs.user_data_dir("npc-engine")),
        description="Where memories are stored (Chroma). One engine process owns it.",
    )
    cache_dir: Path = Field(
        Path(platformdirs.user_cache_dir("npc-engine")) / "models",
        description="Where verified model files are cached.",
    )
    model: str = Field(
        DEFAULT_CHAT_MODEL,
        description="A known model id (see `npc-engine models`) or a path to any GGUF file.",
    )
    chat_format: str | None = Field(
        None,
        description="llama-cpp-python chat format for a GGUF without a chat template "
        "(e.g. chatml, llama-3, gemma). Never guessed.",
    )
    n_ctx: int = Field(4096, ge=256, le=131072)
    n_threads: int | None = Field(None, ge=1, description="Decode threads (default: all cores).")
    n_gpu_layers: int = Field(0, ge=-1, description="Layers offloaded to the GPU (-1 = all).")
    seed: int = Field(-1, description="Sampling seed; -1 picks a random one per reply.")
    temperature: float = Field(0.7, ge=0, le=2)
    top_p: float = Field(0.95, gt=0, le=1)
    repeat_penalty: float = Field(1.1, ge=0)
    dry_multiplier: float | None = Field(
        None,
        ge=0,
        le=5,
        description="DRY repetition penalty: stops a reply from copying a long run of "
        "its prompt (its last reply, an example line, the player's words). 0 turns it "
        "off; unset: the model's own default (`npc-engine models`, docs/models.md).",
    )
    dry_allowed_length: int = Field(
        2, ge=1, le=32, description="Tokens a reply may repeat before DRY penalises."
    )
    max_tokens: int = Field(80, ge=1, le=2048, description="Default cap on a reply.")
    stop: list[str] = Field(default_factory=list, description="Extra stop strings.")
    history_turns: int = Field(
        12, ge=0, description="Earlier turns of the conversation kept in the prompt at most."
    )
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    guard: GuardConfig = Field(default_factory=GuardConfig)
    actions: ActionConfig = Field(default_factory=ActionConfig)
    lore: LoreConfig = Field(default_factory=LoreConfig)
    rumours: RumourConfig = Field(default_factory=RumourConfig)
    parallel: int = Field(
        8,
        ge=1,
        le=64,
        description="Conversations decoded together in one batch (each gets n_ctx tokens of "
        "KV cache); 1 serves one reply at a time with the least memory.",
    )
    snapshot_ram_mb: int = Field(
        1024,
        ge=0,
        description="RAM for per-conversation KV-cache snapshots (switching NPCs without "
        "re-reading their prompts); 0 disables them.",
    )
    snapshot_disk_mb: int = Field(
        0,
        ge=0,
        description="Disk for snapshots evicted from RAM (in data_dir/kv-snapshots); 0: none.",
    )
    head_cache_mb: int = Field(
        1024,
        ge=0,
        description="Disk for the KV cells of each NPC's prompt head (world, persona, "
        "examples), so an NPC's first line after a restart skips re-reading them; 0 "
        "disables it.",
    )
    head_cache_dir: Path = Field(
        Path(platformdirs.user_cache_dir("npc-engine")) / "kv-heads",
        description="Where head_cache_mb lives: a cache shared by every data_dir, keyed by "
        "the GGUF file and the llama.cpp version; deleting it loses nothing.",
    )
    lore_vector_cache: Path | None = Field(
        Path(platformdirs.user_cache_dir("npc-engine")) / "lore-vectors.sqlite3",
        description="The lorebook's vectors, shared by every data_dir on this machine, so a "
        "new one does not embed the same entries again; keyed by the embedding model and "
        "the text; deleting it loses nothing. null: none.",
    )

    # Server settings (used by `npc-engine serve`).
    host: str = "127.0.0.1"
    port: int = Field(8765, ge=0, le=65535)
    token: str | None = None
    origins: list[str] = Field(
        default_factory=list,
        description="Browser origins allowed to connect (e.g. https://mygame.itch.io). A "
        "handshake without an Origin header (native game clients) is always allowed; one "
        "with an origin not listed is refused (HTTP 403).",
    )
    allow_inspect: bool = Field(
        False,
        description="Serve say.inspect (the exact prompt, secrets included) to every "
        "connection; without it only connections that presented the token get it.",
    )
    warm: list[str] = Field(
        default_factory=list,
        description="NPC ids whose prompts `serve` prepares at start (['all']: every NPC).",
    )
    tls_cert: Path | None = Field(None, description="PEM certificate chain: serve wss://.")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert.")
    max_conversations: int = Field(
        2000,
        ge=1,
        description="Conversations whose recent turns are kept in RAM (least recently used "
        "out); a conversation that falls out starts its next prompt without earlier turns "
        "(its memories stay in the store).",
    )
    limits: ServerLimits = Field(default_factory=ServerLimits)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        config_file = _config_file_path()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if config_file is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config_file))
        return tuple(sources)


_explicit_config_file: Path | None = None


def _config_file_path() -> Path | None:
    if _explicit_config_file is not None:
        return _explicit_config_file
    from_env = os.environ.get(CONFIG_FILE_ENV)
    if from_env:
        return Path(from_env)
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None


def load_config(config_file: Path | None = None, **overrides: Any) -> EngineConfig:
    """Build the configuration; ``overrides`` are flag values (None means "not given")."""
    global _explicit_config_file
    if config_file is not None and not config_file.is_file():
        raise ConfigError(f"{config_file}: config file not found")
    chosen = config_file or _config_file_path()
    if chosen is not None and not chosen.is_file():
        raise ConfigError(f"{chosen}: config file not found (set by {CONFIG_FILE_ENV})")
    _explicit_config_file = config_file
    try:
        given = {key: value for key, value in overrides.items() if value is not None}
        return EngineConfig(**given)
    except ValidationError as exc:
        where = f" (config file {chosen})" if chosen else ""
        problems = "; ".join(
            f"{'.'.join(str(part) for part in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"Invalid configuration{where}: {problems}") from exc
    finally:
        _explicit_config_file = None
