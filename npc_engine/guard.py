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
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache, lru_cache
from typing import Literal

import numpy as np

GuardKind = Literal["secret", "out_of_world"]
Embed = Callable[[Sequence[str]], Sequence[Sequence[float]]]

# What chat models say about themselves; never true of a person in a game world.
# What chat models say about themselves; never true of a person in a game world. (Sentences
# that open with "As an AI…" or "I'm a language model…" are already dropped by the stream
# cleaner; these catch the rest without holding back common first words like "I" or "as".)
BOILERPLATE = (
    "an AI",
    "language model",
    "artificial intelligence",
    "AI assistant",
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
MIN_MEANING_WORDS = 5  # shorter sentences are checked for key terms only
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
        packed = _packed(term)
        if spelled and len(packed) >= 4 and any(packed in run for run in spelled):
            return term
    return None


@cache
def _packed(term: str) -> str:
    return re.sub(r"[^a-z]", "", term.lower())


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


def _stem(word: str) -> str:
    """Crude but enough to match inflections: the first five letters ("s-i-l-v-e-r" and
    "silver," alike)."""
    return re.sub(r"[^a-z]", "", word.lower())[:5]


@lru_cache(maxsize=1024)
def _secret_stems(text: str, keys: tuple[str, ...]) -> frozenset[str]:
    """Stems of a secret's telling words: those of its text and keys of four letters or
    more (three for names: "Tom"), leaving out the most common ones (Zipf ≥ 5.5: "other",
    "night"), so everyday talk streams on."""
    from wordfreq import zipf_frequency

    stems = set()
    for word in _WORD.findall(" ".join([text, *keys])):
        bare = word.strip("'-")
        long_enough = len(bare) >= 4 or (len(bare) == 3 and bare[0].isupper())
        if long_enough and zipf_frequency(bare.lower(), "en") < 5.5:
            stems.add(_stem(bare))
    return frozenset(stems)


def _vocabulary(secrets: Sequence[GuardedSecret]) -> frozenset[str]:
    return frozenset().union(*(_secret_stems(s.text, s.keys) for s in secrets))


_preloading = threading.Lock()
_preloaded = False


def preload() -> None:
    """Load wordfreq's tables (~0.4 s) on a background thread, once per process, so no
    first reply waits for them."""
    global _preloaded
    with _preloading:
        if _preloaded:
            return
        _preloaded = True

    def load() -> None:
        from wordfreq import zipf_frequency

        zipf_frequency("harbour", "en")

    threading.Thread(target=load, name="npc-guard-preload", daemon=True).start()


class ReplyGuard:
    """One reply's guard: ``feed`` the streamed text, send what it returns; ``finish``
    returns the held tail, or the deflection after a cut. ``cut`` says why it cut.

    Words are released as they come while the sentence so far is innocent. A sentence
    becomes suspect, and is held to its end, at its first word from a guarded secret's
    vocabulary; otherwise only the last words that could still grow into a term are held.
    Every finished sentence is then checked whole, by meaning too: one that tells a
    secret in words it does not share with it was streamed up to its end, and is cut
    there (the rest of the reply never comes). Embedding at every few words would hold
    such a sentence earlier, at ~10 ms per probe: more than the per-token budget here."""

    def __init__(self, rules: GuardRules, deflection: str, puzzled: str = PUZZLED_LINES[0]) -> None:
        self.rules = rules
        self.deflection = deflection  # after a secret
        self.puzzled = puzzled  # after an out-of-world sentence
        self.cut: GuardCut | None = None
        self._pending = ""  # received, not yet released
        self._sentence = ""  # the released start of the current sentence
        self._released = ""
        self._suspect = False  # the current sentence is held to its end
        self._terms = [
            t.lower()
            for t in [
                *rules.out_of_world,
                *BOILERPLATE,
                *(k for s in rules.secrets for k in s.keys),
            ]
        ]
        self._vocabulary = _vocabulary(rules.secrets) if rules.secrets else frozenset()

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
            self._sentence, self._suspect = "", False
        if self._pending and not self._suspect:
            if not self._check(self._sentence + self._pending, finished=False):
                return self._release("".join(out))
            safe = self._innocent_prefix(self._pending)
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
        line = self.deflection if self.cut.kind == "secret" else self.puzzled
        started = self._sentence.strip()
        if started and not started.endswith((".", "!", "?", "…")):  # broken off mid-sentence
            return "— " + line
        space = "" if not self._released or self._released[-1].isspace() else " "
        return space + line

    @property
    def held(self) -> str:
        return self._pending

    def _release(self, text: str) -> str:
        self._released += text
        return text

    def _innocent_prefix(self, text: str) -> str:
        """The words that may go now: whole words (followed by a space), up to the first
        suspect one, and not the last ones if they could still be the start of a term."""
        words = [m for m in re.finditer(r"\S+\s+", text)]
        for index, match in enumerate(words):
            stem = _stem(match.group())  # "Jory's" is Jory's: a stem may start a longer one
            if stem and any(stem.startswith(v) for v in self._vocabulary):
                self._suspect = True
                words = words[:index]
                break
        # Held at the end: words that may begin a term, and single letters (a word being
        # spelled out letter by letter, "b r a n d y", is only seen once it is whole).
        while words and (
            self._could_start_term(text[words[-1].start() :])
            or len(words[-1].group().strip().strip(".,;:!?\"'()-")) <= 1
        ):
            words.pop()
        released = words[-1].end() if words else 0
        partial = text[released:]
        if (
            not self._suspect
            and len(words) == len(re.findall(r"\S+\s+", text))  # nothing held before it
            and partial
            and not partial[-1].isspace()
            and not self._could_grow(partial)
        ):
            return text  # the word being written cannot become a term or a telling word
        return text[:released]

    def _could_grow(self, partial: str) -> bool:
        """Whether a word still being written may end as a term or a secret's word."""
        bare = partial.strip().strip(".,;:!?\"'()").lower()
        if not bare.isalpha() or len(bare) <= 1:  # "b-r-a…", a lone letter: wait for more
            return True
        stem = bare[:5]
        return self._could_start_term(partial) or any(
            v.startswith(stem) or stem.startswith(v) for v in self._vocabulary
        )

    def _could_start_term(self, tail: str) -> bool:
        said = " ".join(tail.lower().split())
        return any(term.startswith(said) and len(term) > len(said) for term in self._terms)

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
        # A sentence of a few words ("Aye.", "Ask me something else.") cannot tell a secret
        # by meaning alone; not embedding those saves a third of the guard's time.
        telling = len(_WORD.findall(sentence)) >= MIN_MEANING_WORDS
        if vectors is not None and self.rules.embed is not None and telling:
            vector = _normalized(np.asarray(self.rules.embed([sentence]), dtype=np.float32))
            scores = vectors @ vector[0]
            best = int(np.argmax(scores))
            if scores[best] >= self.rules.threshold:
                secret = self.rules.secrets[best]
                reason = f"similar to the secret ({scores[best]:.2f})"
                self.cut = GuardCut("secret", secret.entry, reason, sentence)
                return False
        return True
