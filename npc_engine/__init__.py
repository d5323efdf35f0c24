"""npc-engine: a local-first dialogue engine for game NPCs."""

__version__ = "0.1.0"
