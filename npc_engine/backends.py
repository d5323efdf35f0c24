"""Generators and memory stores by name: one small registry the config chooses from.

``open_engine`` asks this registry for ``generation.backend`` and ``memory.backend``; the
real adapters (llama.cpp, Chroma) and the fakes (scripted replies, an in-memory store) are
registered the same way, so a wiring test picks the fakes from config and loads no model.
A new backend is one ``@generator_backend("name")`` function (the plugin shape of
simonw/llm, without the entry points, which nothing here needs yet).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from npc_engine.errors import ConfigError

if TYPE_CHECKING:
    from npc_engine.config import EngineConfig
    from npc_engine.generation.base import Generator
    from npc_engine.memory.types import MemoryStore

Progress = Callable[[str], None]
GeneratorFactory = Callable[["EngineConfig", Progress], "Generator"]
StoreFactory = Callable[["EngineConfig", Progress], "MemoryStore"]

GENERATORS: dict[str, GeneratorFactory] = {}
STORES: dict[str, StoreFactory] = {}


def generator_backend(name: str) -> Callable[[GeneratorFactory], GeneratorFactory]:
    def register(factory: GeneratorFactory) -> GeneratorFactory:
        GENERATORS[name] = factory
        return factory

    return register


def store_backend(name: str) -> Callable[[StoreFactory], StoreFactory]:
    def register(factory: StoreFactory) -> StoreFactory:
        STORES[name] = factory
        return factory

    return register


def _chosen(registry: dict[str, Any], name: str, setting: str) -> Any:
    if name not in registry:
        known = ", ".join(sorted(registry))
        raise ConfigError(f"{setting}: unknown backend {name!r} (known: {known})")
    return registry[name]


def make_generator(config: EngineConfig, progress: Progress) -> Generator:
    factory: GeneratorFactory = _chosen(GENERATORS, config.generation.backend, "generation.backend")
    return factory(config, progress)


def make_store(config: EngineConfig, progress: Progress) -> MemoryStore:
    factory: StoreFactory = _chosen(STORES, config.memory.backend, "memory.backend")
    return factory(config, progress)


@generator_backend("llama")
def _llama(config: EngineConfig, progress: Progress) -> Generator:
    """The GGUF in-process: batched over ``parallel`` slots, or one context."""
    import llama_cpp

    from npc_engine.generation.batched import BatchedLlamaGenerator
    from npc_engine.generation.llama import LlamaGenerator
    from npc_engine.generation.prefix_store import PrefixStore, model_fingerprint
    from npc_engine.generation.snapshots import SnapshotCache
    from npc_engine.model_files import resolve_chat_model

    model_path, chat_format = resolve_chat_model(config, progress)
    snapshots = (
        SnapshotCache(
            config.snapshot_ram_mb << 20,
            spill_dir=config.data_dir / "kv-snapshots",
            disk_budget_bytes=config.snapshot_disk_mb << 20,
        )
        if config.snapshot_ram_mb
        else None
    )
    heads = (
        PrefixStore(
            config.head_cache_dir,
            # llama.cpp's sequence state holds the context's stream count (one per batch
            # slot): a head stored by an 8-slot context cannot be read by a 1-slot one.
            model_fingerprint(
                model_path,
                llama_cpp.__version__,
                config.n_gpu_layers,
                config.parallel,
                digest_cache=config.head_cache_dir / "model-digests.json",
            ),
            config.head_cache_mb << 20,
        )
        if config.head_cache_mb
        else None
    )
    options: dict[str, Any] = {
        "n_ctx": config.n_ctx,
        "n_threads": config.n_threads,
        "n_gpu_layers": config.n_gpu_layers,
        "chat_format": chat_format,
        "seed": config.seed,
        "snapshots": snapshots,
        "heads": heads,
    }
    if config.parallel > 1:
        return BatchedLlamaGenerator(model_path, slots=config.parallel, **options)
    return LlamaGenerator(model_path, **options)


@generator_backend("openai")
def _openai(config: EngineConfig, progress: Progress) -> Generator:
    """An OpenAI-compatible server (``generation.url``); prompts are rendered and counted
    here with the GGUF's template and vocabulary (``generation.tokenizer``), no weights."""
    import os

    from npc_engine.generation.llama import ChatModel, load_vocabulary
    from npc_engine.generation.remote import OpenAIGenerator
    from npc_engine.model_files import resolve_chat_model

    settings = config.generation
    if not settings.url:
        raise ConfigError("generation.url: the openai backend needs the server's base URL")
    api_key = None
    if settings.api_key_env:
        api_key = os.environ.get(settings.api_key_env)
        if not api_key:
            raise ConfigError(
                f"generation.api_key_env: the variable {settings.api_key_env} is not set"
            )
    tokenizer = config.model_copy(update={"model": settings.tokenizer or config.model})
    model_path, chat_format = resolve_chat_model(tokenizer, progress)
    vocabulary = load_vocabulary(model_path)
    generator = OpenAIGenerator(
        url=settings.url,
        api_key=api_key,
        model=settings.model,
        chat_model=ChatModel(vocabulary, model_path, chat_format),
        n_ctx=config.n_ctx,
        api=settings.api,
        send=settings.send,
        timeout=settings.timeout,
        connect_timeout=settings.connect_timeout,
        retries=settings.retries,
        slots=settings.slots,
        parallel=config.parallel,
    )
    try:
        # send: tokens to a server that takes text only is a configuration error: said
        # now, naming the setting, not as an outage on every turn.
        generator.check_server()
    except BaseException:
        generator.close()
        raise
    return generator


@generator_backend("scripted")
def _scripted(config: EngineConfig, progress: Progress) -> Generator:
    """Replies with ``generation.scripted_reply``, word by word: for wiring tests."""
    from npc_engine.generation.scripted import ScriptedGenerator

    reply = config.generation.scripted_reply
    return ScriptedGenerator(respond=lambda _prompt: reply, n_ctx=config.n_ctx)


@generator_backend("adversarial")
def _adversarial(config: EngineConfig, progress: Progress) -> Generator:
    """Tells the prompt's secrets every way it can: for testing the output guards only."""
    from npc_engine.generation.adversarial import AdversarialGenerator

    return AdversarialGenerator(n_ctx=config.n_ctx)


@store_backend("chroma")
def _chroma(config: EngineConfig, progress: Progress) -> MemoryStore:
    """Chroma on disk in ``data_dir/chroma``, embedded with the offline MiniLM."""
    from npc_engine.memory.chroma_store import ChromaMemoryStore
    from npc_engine.memory.minilm import OfflineMiniLM
    from npc_engine.model_files import ensure_installed
    from npc_engine.model_registry import EMBEDDING_MODEL, MODELS, ModelCache

    cache = ModelCache(config.cache_dir)
    ensure_installed(cache, MODELS[EMBEDDING_MODEL], progress)
    embed = OfflineMiniLM(cache, threads=config.memory.embed_threads)
    if config.memory.url:
        return _chroma_server(config, embed, progress)
    store = ChromaMemoryStore(
        config.data_dir / "chroma", embed, lore_cache=config.lore_vector_cache
    )
    if store.format.current() is None:
        progress(
            "note: this data directory's memories were embedded by an older npc-engine; "
            "recall is better after a one-off `npc-engine memory reindex` (server stopped)"
        )
    store.open_collections_in_background()
    return store


def _chroma_server(config: EngineConfig, embed: Any, progress: Progress) -> MemoryStore:
    """Chroma on a server (``memory.url``), shared by every engine replica; the engine
    still embeds (the same MiniLM), so both stores hold the same vectors."""
    import os

    from npc_engine.errors import is_unavailable
    from npc_engine.memory.chroma_records import connect_server
    from npc_engine.memory.chroma_store import ChromaMemoryStore

    settings = config.memory
    assert settings.url is not None
    token = None
    if settings.token_env:
        token = os.environ.get(settings.token_env)
        if not token:
            raise ConfigError(f"memory.token_env: the variable {settings.token_env} is not set")
    try:
        client = connect_server(
            settings.url,
            token=token,
            tenant=settings.tenant,
            database=settings.database,
            timeout=settings.timeout,
        )
        store = ChromaMemoryStore(None, embed, client=client)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    except Exception as exc:
        if is_unavailable(exc):
            raise ConfigError(f"memory.url: no Chroma server answers at {settings.url}") from exc
        raise ConfigError(f"memory.url: the Chroma server at {settings.url}: {exc}") from exc
    progress(f"memories on the Chroma server at {settings.url}")
    return store


@store_backend("memory")
def _in_memory(config: EngineConfig, progress: Progress) -> MemoryStore:
    """Memories in RAM with bag-of-words similarity, gone at exit: for tests."""
    from npc_engine.memory.in_memory import InMemoryStore

    return InMemoryStore()
