"""Text generation behind a small interface: llama.cpp for real, a scripted fake for tests."""

from npc_engine.generation.base import (
    GenerationParams,
    GenerationStats,
    Generator,
    RenderedPrompt,
)

__all__ = ["GenerationParams", "GenerationStats", "Generator", "RenderedPrompt"]
