"""Wires the real adapters together: data-dir lock, personas, models, Chroma, llama.cpp."""

from __future__ import annotations

import time
from dataclasses import dataclass

from npc_engine.config import EngineConfig
from npc_engine.datadir import DataDirLock
from npc_engine.dialogue import DialogueEngine
from npc_engine.errors import NpcEngineError
from npc_engine.model_files import Progress
from npc_engine.persona.loader import PersonaRegistry, load_personas


def load_registry(config: EngineConfig) -> PersonaRegistry:
    if not config.personas_dir.is_dir():
        raise NpcEngineError(f"Personas folder {config.personas_dir} does not exist.")
    registry = load_personas(config.personas_dir)
    if not registry.personas:
        details = "\n".join(str(p) for p in registry.problems[:20])
        raise NpcEngineError(
            f"No persona could be loaded from {config.personas_dir}."
            + (f"\n{details}" if details else "")
        )
    return registry


@dataclass
class EngineRuntime:
    engine: DialogueEngine
    lock: DataDirLock
    registry: PersonaRegistry

    def close(self) -> None:
        try:
            self.engine.close()
        finally:
            self.lock.release()


def open_engine(config: EngineConfig, progress: Progress = lambda _m: None) -> EngineRuntime:
    """Personas, the data-dir lock, then the configured generator and memory store."""
    from npc_engine.backends import make_generator, make_store

    registry = load_registry(config)
    for problem in registry.problems:
        progress(f"skipped: {problem}")
    lock = DataDirLock(config.data_dir)
    lock.acquire()
    try:
        store = make_store(config, progress)
        generator = make_generator(config, progress)
        # The store's embedder (if it has one) also judges replies for the secret guard.
        lore_vectors = getattr(store, "lore_vectors", None)
        engine = DialogueEngine(
            registry,
            generator,
            store,
            config,
            embed=getattr(store, "embedder", None),
            lore_vectors=lore_vectors() if lore_vectors is not None else None,
        )
        started = time.perf_counter()
        lore = engine.lore.prepare()
        if lore["entries"]:
            progress(
                f"lorebook: {lore['entries']} entries looked up per turn, {lore['embedded']} "
                f"embedded now ({time.perf_counter() - started:.1f} s)"
            )
    except BaseException:
        lock.release()
        raise
    return EngineRuntime(engine, lock, registry)
