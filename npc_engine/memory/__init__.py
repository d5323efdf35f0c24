"""Per-NPC long-term memory: records, scoring, stores and the batched writer."""

from npc_engine.memory.types import Memory, MemoryKind, MemoryStore, ScoredMemory

__all__ = ["Memory", "MemoryKind", "MemoryStore", "ScoredMemory"]
