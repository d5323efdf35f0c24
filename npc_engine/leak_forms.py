"""The forms a key term can take in a reply, and how the guard reads through them.

Sans-I/O: text in, the term it speaks of (or None) out. A 3–8B model can spell, encode,
disguise and translate, so a term is looked for in the reply as the matcher *reads* it:

- **Folded:** Unicode NFKC; format characters (zero-width, soft hyphen, bidi) removed;
  look-alike letters of other scripts mapped to the Latin letter they imitate (Unicode's
  confusables data, through ``confusable_homoglyphs``); markdown emphasis and underscores
  removed; camelCase split.
- **Loose words:** each letter of a term also matches its leetspeak digits and signs, and
  up to a few separators may stand between letters ("b-r-a-n-d-y", "bran dy", "B. R. A.
  N. D. Y." over sentence ends and lines). Never inside a longer word, but digits may be
  glued to it ("brandy2"). Every word of a multi-word term may be inflected, and two short
  words may stand between them ("half of the customs").
- **Rewritten:** reversed; NATO words read as letters; base64 and hex tokens decoded;
  ROT13; near misspellings of long one-word terms (edit distance, rare words only).
- **Across sentences:** letters spelled one per sentence or line, and the first letters of
  consecutive sentences or lines (acrostics), are read by ``ReplyGuard`` with
  ``spelled_run``.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache

MAX_SEPARATOR = 4  # characters that may stand between two letters of a term
MIN_FUZZY_LENGTH = 6  # one-word terms at least this long also match near misspellings
COMMON_ZIPF = 3.0  # a word this common is a word, not a misspelling
_LEET: dict[str, str] = {
    "a": "4@",
    "b": "8",
    "e": "3",
    "g": "96",
    "i": "1!|",
    "l": "1|",
    "o": "0",
    "s": "5$",
    "t": "7+",
    "z": "2",
}
NATO = {
    "alfa": "a",
    "alpha": "a",
    "bravo": "b",
    "charlie": "c",
    "delta": "d",
    "echo": "e",
    "foxtrot": "f",
    "golf": "g",
    "hotel": "h",
    "india": "i",
    "juliet": "j",
    "juliett": "j",
    "kilo": "k",
    "lima": "l",
    "mike": "m",
    "november": "n",
    "oscar": "o",
    "papa": "p",
    "quebec": "q",
    "romeo": "r",
    "sierra": "s",
    "tango": "t",
    "uniform": "u",
    "victor": "v",
    "whiskey": "w",
    "whisky": "w",
    "xray": "x",
    "x-ray": "x",
    "yankee": "y",
    "zulu": "z",
}
_NATO_RUN = re.compile(
    r"\b(?:(?:" + "|".join(map(re.escape, NATO)) + r")\b[\W_]*){3,}", re.IGNORECASE
)
_BASE64 = re.compile(r"(?<![A-Za-z0-9+/])[A-Za-z0-9+/]{8,}={0,2}(?![A-Za-z0-9+/=])")
_HEX = re.compile(r"(?<![0-9a-fA-F])(?:[0-9a-fA-F]{2}[ :]?){4,}(?![0-9a-fA-F])")
_LETTERS = re.compile(r"[a-z]+")


@cache
def _homoglyphs() -> dict[int, str]:
    """Non-Latin characters that look like a Latin letter or digit -> that character
    (Unicode's confusables.txt, as the confusable_homoglyphs package ships it)."""
    from confusable_homoglyphs.confusables import confusables_data

    table: dict[int, str] = {}
    for char, glyphs in confusables_data.items():
        if len(char) != 1 or char.isascii():
            continue
        latin = [g["c"] for g in glyphs if len(g["c"]) == 1 and g["c"].isascii()]
        letters = [c for c in latin if c.isalnum()]
        if letters:
            table[ord(char)] = letters[0]
    return table


_MARKDOWN = re.compile(r"[*_~`]+")
_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])")


def _folded_letters(text: str) -> str:
    if not text.isascii():  # NFKC, format characters and look-alikes: none in ASCII
        text = unicodedata.normalize("NFKC", text)
        text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf")
        text = text.translate(_homoglyphs())
    return _MARKDOWN.sub("", text)


def fold(text: str) -> str:
    """The text as the matcher reads it (lowercase; see the module's docstring)."""
    return _CAMEL.sub(" ", _folded_letters(text)).lower()


@lru_cache(maxsize=4096)
def _folded_term(term: str) -> str:
    """A key term folded: terms repeat at every word the guard checks."""
    return fold(term)


def _letter(char: str) -> str:
    return "[" + re.escape(char + _LEET.get(char, "")) + "]"


def _inflected_tail(word: str) -> str:
    """The end of a word's pattern: its inflections (brandy, brandies; smuggle, smuggled)."""
    if len(word) < 4:
        return ""
    if word.endswith("y"):
        return "(?:y|ies|ied)"
    if word.endswith("e"):
        return "(?:e|es|ed|ing|er|ers)"
    return "(?:s|es|ed|ing|er|ers)?"


def _word_pattern(word: str) -> str:
    letters = [c for c in word if c.isalnum()]
    tail = _inflected_tail(word) if word.isalpha() else ""
    separator = f"[^a-z0-9]{{0,{MAX_SEPARATOR}}}"
    if tail and word.endswith(("y", "e")):  # the last letter is in the tail: brand(y|ies)
        return separator.join(_letter(c) for c in letters[:-1]) + separator + tail
    return separator.join(_letter(c) for c in letters) + tail


@cache
def term_pattern(term: str) -> re.Pattern[str]:
    """A folded term in its loose forms: never inside a longer word."""
    words = [w for w in fold(term).split() if any(c.isalnum() for c in w)]
    between = r"[^a-z0-9]+(?:[a-z]{1,4}[^a-z0-9]+){0,2}"  # "half (of) the customs"
    body = between.join(_word_pattern(w) for w in words)
    return re.compile(rf"(?<![a-z]){body}(?![a-z])")


@lru_cache(maxsize=256)
def _any_term_pattern(terms: tuple[str, ...]) -> re.Pattern[str]:
    """All the terms in one pattern: one search per reading finds that none is there (the
    usual case), instead of one per term."""
    return re.compile("|".join(f"(?:{term_pattern(term).pattern})" for term in terms))


def _packed(text: str) -> str:
    return "".join(_LETTERS.findall(text))


def _decoded(text: str) -> list[str]:
    """What base64, hex and ROT13 forms in ``text`` say (only printable results)."""
    found = [codecs.encode(text, "rot13")]
    for match in _BASE64.finditer(text):
        token = match.group()
        try:
            raw = base64.b64decode(token + "=" * (-len(token) % 4), validate=True)
        except (binascii.Error, ValueError):
            continue
        if raw.isascii() and raw.decode("ascii").isprintable():
            found.append(raw.decode("ascii"))
    for match in _HEX.finditer(text):
        digits = re.sub(r"[ :]", "", match.group())
        if len(digits) % 2:
            continue
        raw = bytes.fromhex(digits)
        if raw.isascii() and raw.decode("ascii").isprintable():
            found.append(raw.decode("ascii"))
    return found


def _nato_letters(text: str) -> list[str]:
    return [
        "".join(
            NATO[w.lower()] for w in re.findall(r"[A-Za-z-]+", run.group()) if w.lower() in NATO
        )
        for run in _NATO_RUN.finditer(text)
    ]


def _near_misspelling(folded: str, terms: Sequence[str]) -> str | None:
    """A long one-word term written with one or two letters wrong (a rare word only:
    "brands" is a word, "brandey" is a misspelling of "brandy")."""
    long_terms = [t for t in terms if " " not in t and len(t) >= MIN_FUZZY_LENGTH and t.isalpha()]
    if not long_terms:
        return None
    from rapidfuzz.distance import Levenshtein
    from wordfreq import zipf_frequency

    for word in set(_LETTERS.findall(folded)):
        for term in long_terms:
            allowed = 1 if len(term) < 10 else 2
            if abs(len(word) - len(term)) > allowed or word == term:
                continue
            near = Levenshtein.distance(word, term, score_cutoff=allowed) <= allowed
            if near and zipf_frequency(word, "en") < COMMON_ZIPF:
                return term
    return None


@dataclass(frozen=True)
class _Reading:
    """The forms of one text that terms are looked for in."""

    folded: str
    readings: tuple[str, ...]  # folded, reversed, decoded
    spelled: tuple[str, ...]  # runs of NATO words, as letters


@lru_cache(maxsize=64)
def _reading(text: str) -> _Reading:
    """Read once per text: the guard checks the same sentence for every secret's keys and
    for the world's terms, and the sentence grows a word at a time."""
    folded = fold(text)
    readings = (folded, folded[::-1], *(fold(d) for d in _decoded(text)))
    return _Reading(folded, readings, tuple(_nato_letters(text)))


def find_term(text: str, terms: Iterable[str]) -> str | None:
    """The first of ``terms`` that ``text`` speaks of in any of its forms, or None."""
    wanted = [t for t in terms if t.strip()]
    if not wanted:
        return None
    reading = _reading(text)
    if any(_any_term_pattern(tuple(wanted)).search(form) for form in reading.readings):
        for term in wanted:  # which one, in the order given
            pattern = term_pattern(term)
            if any(pattern.search(form) for form in reading.readings):
                return term
    for term in wanted:
        packed = _packed(_folded_term(term))
        if len(packed) >= 4 and any(packed in run for run in reading.spelled):
            return term
    return _near_misspelling(reading.folded, [_folded_term(t) for t in wanted])


def spelled_run(pieces: Sequence[str], terms: Iterable[str]) -> str | None:
    """A term spelled across pieces (sentences or lines): one letter each, or as their
    first letters (an acrostic). ``pieces``: the reply's sentences so far, in order."""
    packed_pieces = [_packed(fold(p)) for p in pieces]
    letters_each = "".join(p[:1] for p in packed_pieces)
    singles = "".join(p if len(p) == 1 else "|" for p in packed_pieces)
    for term in terms:
        packed = _packed(_folded_term(term))
        if len(packed) >= 4 and (packed in letters_each or packed in singles):
            return term
    return None


_SPELLED_LETTERS = re.compile(r"(?<![a-z])(?:[a-z](?:[^a-z0-9\n]{1,3}|\n)){3,}[a-z](?![a-z])")
_INNER_HYPHEN = re.compile(r"(?<=[a-z])[-\u2010\u2011](?=[a-z])")
_TOKEN = re.compile(r"[a-z0-9@$!|+]+")
_UNLEET = str.maketrans("4@31!|05$7+", "aaeiiiosstt")


def _unleet(token: str) -> str:
    """A word written with digits for letters ("l1ghth0use"), or with digits glued on
    ("42brandy", "brandy2"): the word it stands for. Numbers stay numbers."""
    letters = sum(c.isalpha() for c in token)
    if letters < 2 or letters == len(token):
        return token
    bare = token.strip("0123456789")
    if bare.isalpha():
        return bare
    return token.translate(_UNLEET)


@cache
def _english(word: str) -> bool:
    from wordfreq import zipf_frequency

    return zipf_frequency(word, "en") >= 3.0


def english(text: str) -> bool:
    """Whether most of a text's words are English ones (a sentence to read in English)."""
    return _englishness(fold(text)) >= 0.5


def _englishness(text: str) -> float:
    words = _LETTERS.findall(text)
    return sum(_english(w) for w in words) / max(len(words), 1)


_WORD_RUN = re.compile(r"[a-z]+(?:[^a-z\n]{1,3}[a-z]+)*")


def _turned_back(text: str) -> str:
    """Runs of words that are not English, reversed or ROT13'd back when that reads as
    English ("krad esuohthgil" -> "lighthouse dark")."""

    def back(match: re.Match[str]) -> str:
        run = match.group()
        words = _LETTERS.findall(run)
        if len(run) < 4 or _englishness(run) >= 0.5:
            return run
        for other in (run[::-1], codecs.encode(run, "rot13")):
            if _englishness(other) >= 0.6 and len(words) >= 1:
                return other
        return run

    pieces = re.split(r"(\b(?:[a-z]+)\b)", text)
    out: list[str] = []
    run: list[str] = []

    def flush() -> None:
        if run:
            joined = "".join(run)
            out.append(_WORD_RUN.sub(back, joined) if not _english_all(joined) else joined)
            run.clear()

    for piece in pieces:
        if (piece.isalpha() and not _english(piece)) or (run and piece.strip() == "" and piece):
            run.append(piece)
        else:
            flush()
            out.append(piece)
    flush()
    return "".join(out)


def _english_all(text: str) -> bool:
    return all(_english(w) for w in _LETTERS.findall(text))


def plain_reading(text: str) -> str:
    """What a disguised sentence says in plain words, for the meaning check: base64 and
    hex decoded, folded, letters spelled out joined, NATO words read, leetspeak and glued
    digits undone, and runs of reversed or ROT13 words turned back."""
    for token in (*_BASE64.findall(text), *_HEX.findall(text)):
        decoded = _decoded(token)[1:]
        if decoded:
            text = text.replace(token, decoded[0], 1)
    letters = _folded_letters(text)
    lower = letters.lower()
    if _englishness(lower[::-1]) > _englishness(lower) + 0.25:  # the whole line backwards
        lower = lower[::-1]
    turned = _turned_back(lower)
    # camelCase glued words ("TomHale") are split unless words were turned back (their
    # case is reversed too)
    folded = turned if turned != letters.lower() else _CAMEL.sub(" ", letters).lower()
    folded = _SPELLED_LETTERS.sub(lambda m: _packed(m.group()), folded)
    for run in _NATO_RUN.finditer(folded):
        folded = folded.replace(run.group(), _nato_letters(run.group())[0] + " ", 1)
    folded = _INNER_HYPHEN.sub("", folded)
    folded = _TOKEN.sub(lambda m: _unleet(m.group()), folded)
    return " ".join(folded.split())
