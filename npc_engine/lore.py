"""The lorebook: which world entries an NPC is reminded of on this turn.

A world may hold thousands of entries; only those marked ``always`` sit in the stable head
of every prompt. The others are looked up per turn, two ways, and the best fit a token
budget (``lore.budget_tokens``):

1. by key: an entry whose key (a word or phrase, or ``/regex/``) occurs in the player's
   line or the last ``lore.scan_turns`` exchanges comes first, higher ``priority`` first;
2. by meaning: the entries whose text is nearest the player's line (cosine of the same
   MiniLM vectors memory uses) at or above ``lore.min_similarity``.

An entry counts only for NPCs that know it (``known_by``: NPC ids or factions) and while
its ``reveal_when`` holds for the player. Chosen entries go in the turn's notes, after the
cached prefix; an entry already shown in the conversation window is not repeated, so the
notes stay short turn after turn and the window stays a cached prefix.

The vectors live in a shared Chroma collection keyed by a hash of each entry's text: an
unchanged entry is never embedded twice, a restart embeds nothing, and a world that moves
or renames entries embeds only new texts (``memory/lore_vectors.py``). Search over them is
exact (one matrix product in RAM: ~1.5 KB per entry, well under a millisecond for 2,000).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import numpy as np

from npc_engine.conditions import GameFacts
from npc_engine.persona.model import Persona, World, WorldLore

LORE_NOTE_PREFIX = "lore:"  # ids of lore entries among a turn's shown ids
MAX_SCAN_CHARS = 4000  # the recent talk scanned for keys (a regex key runs over it)


class LoreVectorIndex(Protocol):
    """The vectors of one world's lorebook entries, in the entries' order."""

    embedded: int  # how many texts had to be embedded to build it (0: all were stored)

    def scores(self, query: str) -> Any:
        """Cosine similarity of ``query`` to every entry (a numpy array)."""
        ...


class LoreVectors(Protocol):
    def index(self, texts: Sequence[str]) -> LoreVectorIndex:
        """Vectors for ``texts``, embedding only those not stored yet."""
        ...

    def prune(self, keep: Sequence[str]) -> int:
        """Drop stored vectors of texts no longer in any lorebook; how many went."""
        ...


MAX_REGEX_KEY_CHARS = 300  # a /regex/ key's pattern; a longer one is refused at load
REGEX_KEY = re.compile(r"/(.+)/[a-z]*", re.DOTALL)  # used with fullmatch only


class RegexSearch(Protocol):
    def search(self, text: str) -> Any: ...


def regex_key(key: str) -> RegexSearch | None:
    """``/pattern/`` (or ``/pattern/i``... flags are ignored: keys match in any case),
    compiled with RE2; None for a plain key. Raises ValueError naming the key for a pattern
    that is too long or not RE2 syntax.

    RE2, not ``re``: lorebooks come from outside (Character Cards), and a backtracking
    engine runs a key such as ``(a+)+$`` for hours on a 30-character line, holding the GIL
    (every connection stalls). RE2 matches in time linear in the text and has no
    backreferences or lookaround; ``\\w``, ``\\b`` and ``\\s`` are ASCII in RE2 (``\\pL``
    is any letter)."""
    match = REGEX_KEY.fullmatch(key)
    if match is None:
        return None
    import re2  # google-re2

    source = match.group(1)
    if len(source) > MAX_REGEX_KEY_CHARS:
        raise ValueError(
            f"key {key[:40]!r}...: a regular expression of {len(source)} characters; "
            f"at most {MAX_REGEX_KEY_CHARS}"
        )
    options = re2.Options()
    options.case_sensitive = False
    options.log_errors = False
    try:
        return cast(RegexSearch, re2.compile(source, options))
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise ValueError(
            f"key {key!r} is not a valid regular expression ({reason}; RE2 syntax: no "
            "backreferences, no lookahead or lookbehind)"
        ) from None


def _plain_key(key: str) -> str:
    return " ".join(key.lower().split())


class KeyMatcher:
    """Every plain key of a lorebook in one compiled alternation (a per-entry search over
    thousands of entries would be thousands of scans), plus the few regex keys. Secondary
    keys are in the same scan; an entry with some matches only when a key matched and its
    ``secondary_logic`` holds over them (SillyTavern's selective entries)."""

    def __init__(self, entries: Sequence[WorldLore]) -> None:
        # key -> (entry position, secondary?) for every entry that has it
        self._plain: dict[str, list[tuple[int, bool]]] = {}
        self._regex: list[tuple[RegexSearch, str, int, bool]] = []
        self._secondary: dict[int, tuple[int, str]] = {}  # position -> (distinct keys, logic)
        for position, entry in enumerate(entries):
            for secondary, keys in ((False, entry.keys), (True, entry.secondary_keys)):
                distinct: set[str] = set()
                for key in keys:
                    pattern = regex_key(key)
                    if pattern is not None:
                        if key not in distinct:
                            self._regex.append((pattern, key, position, secondary))
                        distinct.add(key)
                    else:
                        plain = _plain_key(key)
                        if plain not in distinct:
                            self._plain.setdefault(plain, []).append((position, secondary))
                        distinct.add(plain)
                if secondary and distinct and entry.keys:
                    self._secondary[position] = (len(distinct), entry.secondary_logic)
        words = sorted(self._plain, key=len, reverse=True)  # longest key wins at a spot
        spaced = (r"\s+".join(re.escape(part) for part in word.split()) for word in words)
        self._pattern = (
            re.compile(r"(?<!\w)(?:" + "|".join(spaced) + r")(?!\w)", re.IGNORECASE)
            if words
            else None
        )

    def matches(self, text: str) -> dict[int, str]:
        """Entry position → the key that matched in ``text``."""
        text = text[-MAX_SCAN_CHARS:]
        found: dict[int, str] = {}
        said: dict[int, set[str]] = {}  # position -> its secondary keys said
        if self._pattern is not None:
            for match in self._pattern.finditer(text):
                key = _plain_key(match.group(0))
                for position, secondary in self._plain.get(key, ()):
                    if secondary:
                        said.setdefault(position, set()).add(key)
                    else:
                        found.setdefault(position, key)
        for pattern, key, position, secondary in self._regex:
            if secondary:
                if position in self._secondary and pattern.search(text):
                    said.setdefault(position, set()).add(key)
            elif position not in found and pattern.search(text):
                found[position] = key
        for position in [p for p in found if p in self._secondary]:
            if not _secondary_holds(*self._secondary[position], len(said.get(position, ()))):
                del found[position]
        return found


def _secondary_holds(total: int, logic: str, said: int) -> bool:
    if logic == "and_all":
        return said == total
    if logic == "not_any":
        return said == 0
    if logic == "not_all":
        return said < total
    return said > 0  # and_any


@dataclass(frozen=True)
class ChosenLore:
    entry_id: str
    text: str
    why: str  # "key 'lighthouse'", "similar", or both
    similarity: float
    tokens: int

    @property
    def note_id(self) -> str:
        return LORE_NOTE_PREFIX + self.entry_id


@dataclass(frozen=True)
class LoreSettings:
    budget_tokens: int = 200
    max_entries: int = 4
    min_similarity: float = 0.45
    scan_turns: int = 2


class Lorebook:
    """One world's entries looked up per turn (those not ``always``)."""

    def __init__(
        self,
        world: World,
        vectors: LoreVectorIndex | None,
        count_tokens: Callable[[str], int],
    ) -> None:
        self.entries = [entry for entry in world.lore if not entry.constant]
        self.vectors = vectors
        self._keys = KeyMatcher(self.entries)
        self._count_tokens = count_tokens
        self._tokens: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def _tokens_of(self, position: int) -> int:
        count = self._tokens.get(position)
        if count is None:
            count = self._tokens[position] = self._count_tokens(self.entries[position].text)
        return count

    def choose(
        self,
        persona: Persona,
        facts: GameFacts,
        *,
        query: str,
        recent: str,
        shown: frozenset[str] | set[str],
        settings: LoreSettings,
    ) -> list[ChosenLore]:
        """The entries this NPC is reminded of now, best first, within the budget.
        ``query``: the player's line (by meaning); ``recent``: the talk scanned for keys;
        ``shown``: note ids already in the conversation window (not repeated)."""
        if not self.entries or settings.max_entries == 0:
            return []
        keyed = self._keys.matches(f"{recent}\n{query}")
        scores = (
            np.asarray(self.vectors.scores(query), dtype=np.float32)
            if self.vectors is not None and query.strip()
            else None
        )
        nearest: list[int] = []
        if scores is not None:
            wanted = min(len(scores), settings.max_entries * 4)
            top = np.argpartition(-scores, wanted - 1)[:wanted]
            nearest = [int(p) for p in top if scores[p] >= settings.min_similarity]

        def similarity(position: int) -> float:
            return float(scores[position]) if scores is not None else 0.0

        candidates = set(keyed) | set(nearest)
        ranked = sorted(
            candidates,
            key=lambda p: (
                p in keyed,
                self.entries[p].priority if p in keyed else 0,
                similarity(p),
            ),
            reverse=True,
        )
        npc_id = persona.id or ""
        chosen: list[ChosenLore] = []
        spent = 0
        for position in ranked:
            entry = self.entries[position]
            if LORE_NOTE_PREFIX + (entry.id or "") in shown:
                continue
            if not entry.known_by_npc(npc_id, persona.factions) or not entry.known(facts):
                continue
            tokens = self._tokens_of(position)
            if spent + tokens > settings.budget_tokens:
                continue  # a shorter entry further down may still fit
            spent += tokens
            reasons = []
            if position in keyed:
                reasons.append(f"key {keyed[position]!r}")
            if position in nearest:
                reasons.append("similar")
            chosen.append(
                ChosenLore(
                    entry.id or "", entry.text, ", ".join(reasons), similarity(position), tokens
                )
            )
            if len(chosen) >= settings.max_entries:
                break
        return chosen


def recent_talk(turns: Sequence[Any], count: int) -> str:
    """The last ``count`` exchanges' words (player and NPC), scanned for lore keys."""
    if count <= 0:
        return ""
    return "\n".join(f"{t.player_text}\n{t.reply_text}" for t in turns[-count:])


def lore_summary(chosen: Sequence[ChosenLore]) -> list[Mapping[str, Any]]:
    """For the inspector: which entries and why."""
    return [
        {"id": c.entry_id, "why": c.why, "similarity": round(c.similarity, 3), "tokens": c.tokens}
        for c in chosen
    ]
