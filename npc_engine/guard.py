"""Output guards: a reply is checked as it streams and cut before it tells a guarded secret
or speaks of things that do not exist in the world. Sans-I/O: text in, safe text out.

What is checked, sentence by sentence:
- **Key terms.** A secret's ``keys`` (or, without them, its distinctive words: rare in
  English, by wordfreq, and absent from everything else the NPC is told) and the world's
  ``out_of_world`` terms plus chat-model boilerplate ("as an AI", "language model").
  Matched on whole words, case-insensitively, also with spacing and punctuation squeezed
  out ("b-r-a-n-d-y"), so a spelled-out term is caught.
- **Meaning.** Each finished sentence is embedded (the MiniLM the engine already loads)
  and compared with each guarded secret; at or above ``threshold`` it counts as telling
  the secret (the default comes from the labelled set in tests/probes/).

Holding back: while a guarded secret is in play a sentence is held until it ends (the
meaning check needs the whole sentence), then released or cut; without one, only the last
words that could still grow into a term are held. A cut ends the reply there: nothing of
the offending sentence is released, and an in-voice deflection closes the reply.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Literal

import numpy as np

GuardKind = Literal["secret", "out_of_world"]
Embed = Callable[[Sequence[str]], Sequence[Sequence[float]]]

# What chat models say about themselves; never true of a person in a game world.
BOILERPLATE = (
    "as an AI",
    "an AI language model",
    "a language model",
    "large language model",
    "I am an AI",
    "I'm an AI",
    "artificial intelligence",
    "I cannot assist",
    "I can't assist",
    "as an assistant",
    "OpenAI",
    "ChatGPT",
    "chatbot",
)
DEFAULT_DEFLECTIONS = (
    "But that's not something I'll talk about.",
    "Let's leave that be, shall we?",
    "Ask me something else.",
)
# Said when a reply was cut for speaking of something outside the world: in-world puzzlement.
PUZZLED_LINES = (
    "Hm? I don't know what that is.",
    "Never heard of such a thing.",
    "You speak strangely, friend. What do you mean?",
)
DEFAULT_THRESHOLD = 0.58  # tuned on tests/probes/guard_similarity.yaml
RARE_ZIPF = 3.8  # words rarer than this (wordfreq's Zipf scale) are distinctive
# A sentence ends at . ! ? … (and closing quotes) followed by white space: "3.5" and a
# terminator that is the last character so far are not ends yet.
_SENTENCE_END = re.compile(r"[.!?…]+[\"')\]]*\s+|\n+")
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")


@dataclass(frozen=True)
class GuardedSecret:
    entry: str  # "secrets.0"
    text: str
    keys: tuple[str, ...]


@dataclass(frozen=True)
class GuardCut:
    kind: GuardKind
    entry: str  # "secrets.0", or the out-of-world term
    reason: str  # "key 'brandy'", "similar to the secret (0.71)", "term 'computer'"
    withheld: str  # the sentence that was not sent (for the inspector only)


@dataclass
class GuardRules:
    """What one NPC's replies are checked for; built once per persona and player standing."""

    secrets: list[GuardedSecret] = field(default_factory=list)
    out_of_world: tuple[str, ...] = ()
    embed: Embed | None = None
    threshold: float = DEFAULT_THRESHOLD
    _secret_vectors: np.ndarray | None = None

    @property
    def active(self) -> bool:
        return bool(self.secrets or self.out_of_world)

    def preset_vectors(self, vectors: np.ndarray) -> None:
        """The secrets' vectors, computed once per persona by the caller."""
        self._secret_vectors = _normalized(np.asarray(vectors, dtype=np.float32))

    def secret_vectors(self) -> np.ndarray | None:
        if self.embed is None or not self.secrets:
            return None
        if self._secret_vectors is None:
            vectors = np.asarray(self.embed([s.text for s in self.secrets]), dtype=np.float32)
            self._secret_vectors = _normalized(vectors)
        return self._secret_vectors


def _normalized(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-9)


_SPELLED_OUT = re.compile(r"(?:[A-Za-z][^A-Za-z\n]{1,3}){3,}[A-Za-z]\b")


@cache
def _term_pattern(term: str) -> re.Pattern[str]:
    """Whole words, case-insensitive; a lowercase one-word term also matches its plural
    and verb forms (brandy, brandies; smuggle, smuggled)."""
    words = term.split()
    if len(words) == 1 and term.isalpha() and term.islower():
        if term.endswith("y"):
            body = re.escape(term[:-1]) + r"(?:y|ies|ied)"
        elif term.endswith("e"):
            body = re.escape(term[:-1]) + r"(?:e|es|ed|ing|er|ers)"
        else:
            body = re.escape(term) + r"(?:s|es|ed|ing|er|ers)?"
        return re.compile(rf"\b{body}\b", re.IGNORECASE)
    return re.compile(r"\b" + r"\W+".join(map(re.escape, words)) + r"\b", re.IGNORECASE)


def find_term(text: str, terms: Iterable[str]) -> str | None:
    """The first term ``text`` speaks of, or None. Letters spelled out one by one
    ("b-r-a-n-d-y", "b r a n d y") are read as the word they spell."""
    spelled = [re.sub(r"[^a-z]", "", run.group().lower()) for run in _SPELLED_OUT.finditer(text)]
    for term in terms:
        if _term_pattern(term).search(text):
            return term
        packed = re.sub(r"[^a-z]", "", term.lower())
        if len(packed) >= 4 and any(packed in run for run in spelled):
            return term
    return None


def distinctive_words(secret: str, public_text: str) -> tuple[str, ...]:
    """Words of a secret that give it away: rare in English and nowhere else in what the
    NPC is told (a word of its own goals or lore is one it may say innocently)."""
    from wordfreq import zipf_frequency

    public = {word.lower() for word in _WORD.findall(public_text)}
    found = []
    for word in _WORD.findall(secret):
        lower = word.lower().strip("'-")
        if len(lower) < 4 or lower in public or lower in found:
            continue
        if zipf_frequency(lower, "en") < RARE_ZIPF:
            found.append(lower)
    return tuple(found)


class ReplyGuard:
    """One reply's guard: ``feed`` the streamed text, send what it returns; ``finish``
    returns the held tail, or the deflection after a cut. ``cut`` says why it cut."""

    def __init__(self, rules: GuardRules, deflection: str, puzzled: str = PUZZLED_LINES[0]) -> None:
        self.rules = rules
        self.deflection = deflection  # after a secret
        self.puzzled = puzzled  # after an out-of-world sentence
        self.cut: GuardCut | None = None
        self._pending = ""  # received, not yet released
        self._sentence = ""  # the released start of the current sentence
        self._released = ""
        self._hold_sentences = bool(rules.secrets)
        terms = [*rules.out_of_world, *BOILERPLATE]
        self._longest_term_words = max((len(t.split()) for t in terms), default=1)

    def feed(self, text: str) -> str:
        if self.cut is not None or not text:
            return ""
        self._pending += text
        out: list[str] = []
        while True:
            end = _SENTENCE_END.search(self._pending)
            if end is None:
                break
            sentence, self._pending = self._pending[: end.end()], self._pending[end.end() :]
            if not self._check(self._sentence + sentence, finished=True):
                return self._release("".join(out))
            out.append(sentence)
            self._sentence = ""
        if self._pending and not self._hold_sentences:
            if not self._check(self._sentence + self._pending, finished=False):
                return self._release("".join(out))
            safe = self._safe_prefix(self._pending)
            out.append(safe)
            self._sentence += safe
            self._pending = self._pending[len(safe) :]
        return self._release("".join(out))

    def finish(self) -> str:
        """The rest of the reply: the held tail if it passes, else the deflection."""
        if self.cut is None and self._pending:
            tail, self._pending = self._pending, ""
            if self._check(self._sentence + tail, finished=True):
                return self._release(tail)
        if self.cut is None:
            return ""
        space = "" if not self._released or self._released[-1].isspace() else " "
        return space + (self.deflection if self.cut.kind == "secret" else self.puzzled)

    @property
    def held(self) -> str:
        return self._pending

    def _release(self, text: str) -> str:
        self._released += text
        return text

    def _safe_prefix(self, text: str) -> str:
        """Everything but the words a term could still be growing from."""
        keep = self._longest_term_words  # the last word may be partial: one more held
        words = list(re.finditer(r"\S+\s*", text))
        if len(words) <= keep:
            return ""
        return text[: words[-keep].start()]

    def _check(self, sentence: str, *, finished: bool) -> bool:
        """False (and ``cut`` set) if the sentence tells a secret or leaves the world."""
        for secret in self.rules.secrets:
            key = find_term(sentence, secret.keys)
            if key is not None:
                self.cut = GuardCut("secret", secret.entry, f"key {key!r}", sentence)
                return False
        term = find_term(sentence, [*self.rules.out_of_world, *BOILERPLATE])
        if term is not None:
            self.cut = GuardCut("out_of_world", term, f"term {term!r}", sentence)
            return False
        vectors = self.rules.secret_vectors() if finished else None
        if vectors is not None and self.rules.embed is not None and _WORD.search(sentence):
            vector = _normalized(np.asarray(self.rules.embed([sentence]), dtype=np.float32))
            scores = vectors @ vector[0]
            best = int(np.argmax(scores))
            if scores[best] >= self.rules.threshold:
                secret = self.rules.secrets[best]
                reason = f"similar to the secret ({scores[best]:.2f})"
                self.cut = GuardCut("secret", secret.entry, reason, sentence)
                return False
        return True
