"""Errors that reach the user as one clear message (the CLI prints them without a traceback)."""

from __future__ import annotations


class NpcEngineError(Exception):
    """Base class: the message is written for the person running the engine."""


class FieldError(NpcEngineError):
    """A request the engine refuses because of one field (named, for ``details.field``)."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name


class ConfigError(NpcEngineError):
    """The configuration (flags, environment, config file) is invalid."""


class ModelUnavailableError(NpcEngineError):
    """A model file is missing, corrupt, or cannot be fetched."""


class DataDirInUseError(NpcEngineError):
    """Another engine process owns the data directory."""


class UnknownNpcError(NpcEngineError):
    """No persona with the requested id is loaded."""

    def __init__(self, npc_id: str, known: list[str]) -> None:
        self.npc_id = npc_id
        self.known = known
        listing = ", ".join(known) if known else "none loaded"
        super().__init__(f"No NPC with id {npc_id!r}. Known: {listing}.")


class GenerationError(NpcEngineError):
    """The generation backend failed while producing a reply."""
