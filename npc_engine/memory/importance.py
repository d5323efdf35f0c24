"""Cheap, rule-based importance (1–10) for new memories: no model call on the reply path.

The scale follows the Generative Agents prompt: 1 is mundane, 10 is life-changing. Rules
look for the things an NPC should remember about a player: who they are, promises, debts,
threats, loss, love and quests.
"""

from __future__ import annotations

import re

_RULES: tuple[tuple[int, re.Pattern[str]], ...] = (
    (
        9,
        re.compile(
            r"\b(killed|murder(ed)?|died|dead|drowned|betray(ed)?|marry|married|love you|"
            r"swear|vow|sworn)\b",
            re.I,
        ),
    ),
    (
        8,
        re.compile(
            r"\b(my name is|i am called|i'm called|call me|my name.s)",
            re.I,
        ),
    ),
    (
        7,
        re.compile(
            r"\b(promise[ds]?|owe[sd]?|debt|threat(en(ed)?)?|secret|quest|reward|steal|stole|"
            r"attack(ed)?|help me|my (sister|brother|mother|father|son|daughter|wife|husband))\b",
            re.I,
        ),
    ),
    (
        5,
        re.compile(
            r"\b(gold|coins?|paid|pay|buy|bought|sell|sold|gift|gave|looking for|find|lost)\b",
            re.I,
        ),
    ),
)


def rate_importance(text: str, base: int = 3) -> int:
    """The highest rule that matches, else ``base``; short small talk scores lower."""
    best = base
    for score, pattern in _RULES:
        if score > best and pattern.search(text):
            best = score
    if best == base and len(text.split()) <= 3:
        best = max(1, base - 1)
    return max(1, min(10, best))


SELF_STATEMENT_IMPORTANCE = 5  # above what consolidation folds by default (4)
_SELF = re.compile(r"\b(i|i'm|i've|i'd|i was|my|me|mine|myself)\b", re.I)


def rate_player_line(text: str) -> int:
    """A player's line: what the player says about themself ("I grew up on a farm") is
    never small talk, whatever words it uses; questions are not statements."""
    rated = rate_importance(text)
    if _SELF.search(text) and not text.rstrip().endswith("?"):
        return max(rated, SELF_STATEMENT_IMPORTANCE)
    return rated
