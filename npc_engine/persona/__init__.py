"""Persona files: the schema writers author against, and the loader that reports every problem."""

from npc_engine.persona.loader import PersonaProblem, PersonaRegistry, load_personas
from npc_engine.persona.model import Persona, World

__all__ = ["Persona", "PersonaProblem", "PersonaRegistry", "World", "load_personas"]
