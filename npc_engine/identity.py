"""The NPC's own name, trade and town, noted beside a line that asks for them.

The persona's first line says who the NPC is, but a small model reading a long prompt often
answers "Who are you?" with another character's name or a place from its knowledge (the
0.5B default knew itself in 16 of 24 evaluated questions; tools/eval.py). A short note
beside the question, like the note of a fact the player told, is what it answers from.

Whether a line asks about the NPC is judged by meaning against a few general questions
(no keyword list: players ask in their own words). The bar was set on the labelled lines
of tests/probes/eval_conversations.yaml: at 0.45, 21 of 24 questions about the NPC pass,
and the lines above it that are not are harmless (a note the NPC did not need) except
questions about the player's own name or home, which recall what the player told and so
get no note (``DialogueEngine``)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from npc_engine.persona.model import Persona, World

SELF_QUESTIONS = (
    "Who are you?",
    "What's your name?",
    "What do people call you?",
    "Tell me about yourself.",
    "What do you do for work?",
    "What is your trade?",
    "What's your job?",
    "Where do you live?",
    "Where is your home?",
    "What is this place called?",
    "Which town is this?",
)
ASKS_ABOUT_SELF = 0.45  # cosine with the nearest of SELF_QUESTIONS (MiniLM)

Embed = Callable[[Sequence[str]], Sequence[Sequence[float]]]


def identity_note(persona: Persona, world: World | None) -> str:
    place = f", in {world.name}" if world is not None else ""
    return f"(You are {persona.name}, {persona.role}{place}.)"


class SelfQuestions:
    """Tells whether a player's line asks the NPC who, what or where it is."""

    def __init__(self, embed: Embed) -> None:
        self._embed = embed
        self._vectors: Any = None
        self._lock = threading.Lock()

    def asked(self, line: str) -> bool:
        import numpy as np

        with self._lock:
            if self._vectors is None:
                self._vectors = _unit(np.asarray(self._embed(list(SELF_QUESTIONS))))
        vector = _unit(np.asarray(self._embed([line]))[0:1])[0]
        return float(np.max(self._vectors @ vector)) >= ASKS_ABOUT_SELF


def _unit(rows: Any) -> Any:
    import numpy as np

    rows = rows.astype(np.float32)
    return rows / np.clip(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12, None)
