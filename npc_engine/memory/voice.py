"""A designer's question about "the player", asked in the player's own voice.

Memories are embedded from what was said ("My name is Zephyrine", "I come from Lantern
Bay"): that is how players ask about them later ("What is my name?"), and how they are
found. Designers, quest tools and the inspector ask in the third person ("What is the
player's name?"), which falls under the relevance bar against first-person text. So a
query that speaks of the player is also asked as the player would ask it, and the better
of the two rankings is kept (``DialogueEngine.find``).

Hand-written rules: no library turns English third person into first person, and the
phrases are few ("the player" with its verbs); the labelled designer questions of
``tests/probes/recall_facts.yaml`` measure them (tools/recall_probe.py --designer).
"""

from __future__ import annotations

import re

_PLAYER = r"the (?:player|pc|traveller|traveler|stranger)"
# (pattern, replacement), applied in order; whole words, any case.
_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), replacement)
    for pattern, replacement in (
        (rf"\b{_PLAYER}'s\b", "my"),
        (rf"\b{_PLAYER}s'\b", "my"),
        (rf"\b(is|was|does|did|has|can|could|will|would|should) {_PLAYER}\b", r"\1 I"),
        (rf"\b{_PLAYER} is\b", "I am"),
        (rf"\b{_PLAYER} was\b", "I was"),
        (rf"\b{_PLAYER} has\b", "I have"),
        (rf"\b{_PLAYER} does\b", "I do"),
        (rf"\b{_PLAYER} (\w+?)(?:ies)\b", r"I \1y"),  # carries -> carry
        (rf"\b{_PLAYER} (\w+?(?:ch|sh|ss|x|o))es\b", r"I \1"),  # goes -> go
        (rf"\b{_PLAYER} (\w+?[^s])s\b", r"I \1"),  # owes -> owe
        (
            rf"\b(to|with|for|about|of|from|at|by|tell|told|gave|give|asked|ask) {_PLAYER}\b",
            r"\1 me",
        ),
        (rf"\b{_PLAYER}(?=\s*[?.!,;]|\s*$)", "me"),  # at a clause's end: an object
        (rf"\b{_PLAYER}\b", "I"),
        (r"\bis I\b", "am I"),
        (r"\bwas I\b", "was I"),
        (r"\bdoes I\b", "do I"),
        (r"\bhas I\b", "have I"),
    )
)


def player_voice(query: str) -> str:
    """``query`` with "the player" turned into the player's own first person ("What is
    the player's name?" -> "What is my name?"); unchanged when it does not speak of the
    player."""
    voiced = query
    for pattern, replacement in _RULES:
        voiced = pattern.sub(replacement, voiced)
    if voiced == query:
        return query
    return voiced[:1].upper() + voiced[1:]
