"""Output guards: a reply is checked as it streams and cut before it tells a guarded secret
or speaks of things that do not exist in the world. Sans-I/O: text in, safe text out.

What is checked, sentence by sentence:
- **Key terms,** in every form a model can give them (``leak_forms.py``: look-alike
  letters, zero-width characters, markdown, leetspeak, letters spelled out over any
  separators, reversed, base64/hex/ROT13, NATO words, near misspellings, inflections of
  every word). A secret's ``keys``, or without them its distinctive words: rare in English
  and absent from everything the world says elsewhere (lore, every persona); a distinctive
  word that is still fairly common counts only beside a second word of the secret. The
  world's ``out_of_world`` terms and chat-model boilerplate too. Never inside a longer word.
- **Across sentences:** a term spelled one letter per sentence or line, or by the first
  letters of consecutive sentences (an acrostic).
- **Meaning.** Each finished sentence, and it with the sentence before (a secret told in
  two short sentences), is embedded and compared with each guarded secret and its first-
  and second-person rewrites ("She lets…" is told as "I let…"); at or above ``threshold``
  it tells the secret. Likewise with descriptions of modern things, for the world.

The same decision for any chunking: text is taken a whole word at a time (a word ends at
white space), and every decision reads only whole words, so where the tokens broke the
text never changes what is cut or what is delivered. A sentence is held to its end from
its first word of a secret's vocabulary; otherwise only the last words that could still
grow into a term are held. A cut ends the reply there: nothing of the offending sentence
is released, and an in-voice deflection closes the reply.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from npc_engine.guard_rules import (
    _LETTERS,
    _WORD,
    BOILERPLATE,
    DEFAULT_DEFLECTIONS,
    MIN_MEANING_WORDS,
    MODERN_THINGS,
    PUZZLED_LINES,
    RARE_ZIPF,
    Embed,
    GuardCut,
    GuardedSecret,
    GuardRules,
    _meaning_cut,
    _normalized,
    _secret_stems,
    _stem,
    _term_cut,
    distinctive_words,
    person_rewrites,
    tells_secret,
)
from npc_engine.leak_forms import find_term, fold, spelled_run

# What the other checks import from here (``guard_rules`` defines them).
__all__ = [
    "BOILERPLATE",
    "DEFAULT_DEFLECTIONS",
    "MIN_MEANING_WORDS",
    "MODERN_THINGS",
    "PUZZLED_LINES",
    "RARE_ZIPF",
    "_LETTERS",
    "_SENTENCE_END",
    "_UNIT",
    "_WORD",
    "Embed",
    "GuardCut",
    "GuardRules",
    "GuardedSecret",
    "ReplyGuard",
    "_meaning_cut",
    "_normalized",
    "_stem",
    "_telling_words",
    "_term_cut",
    "_vocabulary",
    "distinctive_words",
    "find_term",
    "person_rewrites",
    "tells_secret",
]


# A unit of the reply: a whole word with the white space after it (leading space kept).
_UNIT = re.compile(r"\s*\S+\s+")
# A sentence ends at . ! ? … (and closing quotes) followed by white space, or at a line end
# -- unless what ends is a single letter ("B. R. A. N. D. Y.": one sentence, read whole).
_SENTENCE_END = re.compile(r"(?:[.!?…]+[\"')\]]*\s+|\n\s*)$")


@lru_cache(maxsize=1024)
def _telling_words(text: str) -> tuple[str, ...]:
    """A secret's words of five letters or more that are not everyday ones ("cellar",
    "lighthouse", not "would"): spelled out or encoded, they give it away."""
    from wordfreq import zipf_frequency

    words = {w.lower().strip("'-") for w in _WORD.findall(text)}
    return tuple(sorted(w for w in words if len(w) >= 5 and zipf_frequency(w, "en") < 5.0))


def _vocabulary(secrets: Sequence[GuardedSecret]) -> frozenset[str]:
    return frozenset().union(*(_secret_stems(s.text, s.keys) for s in secrets))


class ReplyGuard:
    """One reply's guard: ``feed`` the streamed text, send what it returns; ``finish``
    returns the held tail, or the deflection after a cut. ``cut`` says why it cut.

    The text is taken a whole word at a time (the module's docstring says why). A word is
    released at once while the sentence so far is innocent; from the first word of a
    guarded secret's vocabulary the sentence is held to its end; the last words are held
    while they could still grow into a term. Every finished sentence is then checked
    whole, by meaning too: one that tells a secret in words it does not share with it was
    streamed up to its end, and is cut there (the rest of the reply never comes).
    Embedding at every few words would hold such a sentence earlier, at ~10 ms per probe:
    more than the per-token budget here."""

    def __init__(self, rules: GuardRules, deflection: str, puzzled: str = PUZZLED_LINES[0]) -> None:
        self.rules = rules
        self.deflection = deflection  # after a secret
        self.puzzled = puzzled  # after an out-of-world sentence
        self.cut: GuardCut | None = None
        self._pending = ""  # received, not yet a whole word
        self._sentence = ""  # whole words of the current sentence
        self._sent = 0  # how much of ``_sentence`` was released
        self._sentences: list[str] = []  # the finished sentences, in order
        self._released = ""
        self._suspect = False  # the current sentence is held to its end
        self._early = 0  # characters of ``_pending`` already released
        self._world_terms = (*rules.out_of_world, *BOILERPLATE)
        self._terms = [
            fold(t) for t in [*self._world_terms, *(k for s in rules.secrets for k in s.keys)]
        ]
        self._vocabulary = _vocabulary(rules.secrets) if rules.secrets else frozenset()

    def feed(self, text: str) -> str:
        if self.cut is not None or not text:
            return ""
        self._pending += text
        out: list[str] = []
        position = 0
        for unit in _UNIT.finditer(self._pending):
            if unit.start() != position:
                break
            position = unit.end()
            if not self._take(unit.group(), out):
                break
        self._pending = self._pending[position:] if self.cut is None else ""
        growing = self.cut is None and self._early < len(self._pending)
        if growing and self._may_go_early(self._pending):
            out.append(self._pending[self._early :])
            self._early = len(self._pending)
        return self._release("".join(out))

    def _may_go_early(self, partial: str) -> bool:
        """Whether the reply's first word may go while it is still being written (shown at
        the first token, not the second): only a plain word that cannot grow into a term,
        a secret's word, or a disguise of one (reversed, ROT13, base64), so that what is
        delivered is still what whole words would deliver. Later words wait for their end
        (a word inside a sentence can end a reversed or spelled-out term)."""
        word = partial.strip()
        if self._released or self._sentence or self._sentences or len(word) < 2:
            return False
        if not word.isascii() or not word.isalpha() or not (word.islower() or word.istitle()):
            return False
        lower = word.lower()
        if self._could_start_term(partial):
            return False
        forms = (lower, lower[::-1], codecs.encode(lower, "rot13"))
        stem = lower[:5]
        return not any(
            term.replace(" ", "").startswith(form) or term[::-1].startswith(form)
            for term in self._terms
            for form in forms
        ) and not any(v.startswith(stem) or stem.startswith(v) for v in self._vocabulary)

    def finish(self) -> str:
        """The rest of the reply: the held tail if it passes, else the deflection."""
        out: list[str] = []
        if self.cut is None and self._pending:
            tail, self._pending = self._pending, ""
            self._take(tail, out, last=True)
        elif self.cut is None and self._sentence:
            self._end_sentence(out)
        if self.cut is None:
            return self._release("".join(out))
        line = self.deflection if self.cut.kind == "secret" else self.puzzled
        started = self._sentence[: self._sent].strip()
        if started and not started.endswith((".", "!", "?", "…")):  # broken off mid-sentence
            return self._release("".join(out)) + "— " + line
        released = self._released + "".join(out)
        space = "" if not released or released[-1].isspace() else " "
        return self._release("".join(out)) + space + line

    @property
    def held(self) -> str:
        return self._sentence[self._sent :] + self._pending

    def _release(self, text: str) -> str:
        self._released += text
        return text

    def _take(self, unit: str, out: list[str], last: bool = False) -> bool:
        """One whole word (and its white space) of the reply. False: the reply was cut."""
        self._sentence += unit
        if self._early:  # its start went early (``_may_go_early``)
            self._sent = len(self._sentence) - len(unit) + self._early
            self._early = 0
        ends = last or (bool(_SENTENCE_END.search(unit)) and not self._single_letter(unit))
        if ends:
            return self._end_sentence(out)
        cut = self._term_check(self._sentence)
        if cut is not None:
            self.cut = cut
            return False
        if not self._suspect and self._vocabulary:
            stem = _stem(unit)
            if stem and any(stem.startswith(v) for v in self._vocabulary):
                self._suspect = True
        if not self._suspect:
            keep = self._held_tail(self._sentence)
            if keep > self._sent:
                out.append(self._sentence[self._sent : keep])
                self._sent = keep
        return True

    def _end_sentence(self, out: list[str]) -> bool:
        sentence = self._sentence
        cut = self._term_check(sentence) or self._across_check(sentence)
        if cut is None:
            cut = self._meaning_check(sentence)
        if cut is not None:
            self.cut = cut
            return False
        out.append(sentence[self._sent :])
        self._sentences.append(sentence)
        self._sentence, self._sent, self._suspect = "", 0, False
        return True

    @staticmethod
    def _single_letter(unit: str) -> bool:
        """A lone letter ("B. ", "b\n"): part of a word being spelled, not a sentence."""
        return len("".join(_LETTERS.findall(fold(unit)))) == 1

    def _held_tail(self, sentence: str) -> int:
        """How much of the sentence may go: not the last words that may begin a term, nor
        single letters (a word being spelled out is only seen once it is whole)."""
        words = list(re.finditer(r"\S+\s*", sentence))
        while words and (
            self._could_start_term(sentence[words[-1].start() :])
            or len("".join(_LETTERS.findall(fold(words[-1].group())))) <= 1
        ):
            words.pop()
        return words[-1].end() if words else 0

    def _could_start_term(self, tail: str) -> bool:
        said = " ".join(fold(tail).split())
        return any(term.startswith(said) and len(term) > len(said) for term in self._terms)

    def _term_check(self, sentence: str) -> GuardCut | None:
        found = _term_cut(self.rules.secrets, sentence)
        if found is not None:
            return found
        term = find_term(sentence, self._world_terms)
        if term is not None:
            return GuardCut("out_of_world", term, f"term {term!r}", sentence)
        return None

    def _across_check(self, sentence: str) -> GuardCut | None:
        """A key, or a telling word of a secret, spelled one letter per sentence or line,
        or by first letters (nobody spells a word by accident)."""
        pieces = [*self._sentences[-24:], sentence]
        for secret in self.rules.secrets:
            word = spelled_run(pieces, [*secret.keys, *_telling_words(secret.text)])
            if word is not None:
                reason = f"{word!r} spelled across lines"
                return GuardCut("secret", secret.entry, reason, sentence)
        return None

    def _meaning_check(self, sentence: str) -> GuardCut | None:
        found = _meaning_cut(
            self.rules, [*self._sentences[-1:], sentence], len(self._sentences[-1:])
        )
        if found is not None:
            return found
        world = self.rules.world_vectors()
        if world is None or self.rules.embed is None:
            return None
        if len(_WORD.findall(sentence)) < MIN_MEANING_WORDS:
            return None
        said = _normalized(np.asarray(self.rules.embed([sentence]), dtype=np.float32))
        scores = world @ said[0]
        best = int(np.argmax(scores))
        if scores[best] < self.rules.world_threshold:
            return None
        thing = [*MODERN_THINGS, *self.rules.out_of_world][best]
        reason = f"speaks of {thing!r} ({scores[best]:.2f})"
        return GuardCut("out_of_world", thing, reason, sentence)
