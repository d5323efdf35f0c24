"""What the output guard checks against: a speaker's ``GuardRules`` (its guarded secrets
with their key terms, the world's out-of-world terms, the meaning thresholds) and
``tells_secret``, the one check of whether sentences tell a secret (key terms in any form,
then meaning). Shared by the streaming ``guard.ReplyGuard``, ``must_not_leak``, rumours
and the tests' judges; ``guard.py``'s docstring says what is checked and why."""

from __future__ import annotations

import itertools
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

import numpy as np

from npc_engine.leak_forms import find_term, fold, plain_reading

GuardKind = Literal["secret", "out_of_world"]
Embed = Callable[[Sequence[str]], Any]  # texts in, one vector each out

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
# Things of our world described without their names, for the meaning check of worlds that
# list out-of-world terms (their terms are added to these).
MODERN_THINGS = (
    "a telephone or mobile phone that lets people talk across great distances",
    "a cellphone with a glowing screen in your pocket to call, text and take pictures",
    "send a text message or an email, search the web on google",
    "a computer or laptop, an electronic machine that calculates and shows pictures",
    "the internet, websites, email and messages sent over wires and networks",
    "a car or truck, a vehicle with an engine that drives without horses on asphalt roads",
    "an aeroplane, a metal flying machine that carries passengers through the sky",
    "a ship or boat driven by a diesel engine burning oil instead of sails",
    "electricity, electric lights with a switch on the wall, power from a plug",
    "television, radio broadcasts, video and photographs taken by a camera",
    "robots and machines that think, artificial intelligence",
    "a computer program, a language model or chatbot that writes text",
    "I am a program, my lines are generated, I am not a real person",
    "guns, pistols, rifles, machine guns and bombs",
    "this is a video game: save your game, respawn, press a button, the player's quest",
    "I am an NPC, a non-player character in a game written by developers and a script",
    "this world is a simulation running on a machine",
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
MIN_MEANING_WORDS = 5  # shorter sentences are checked by meaning with the one before only
DEFAULT_THRESHOLD = 0.52  # tuned on tests/probes/guard_leaks.yaml and guard_similarity.yaml
DEFAULT_FOREIGN_THRESHOLD = 0.44  # USE alone, another language (guard_leaks.yaml)
UNREAD_BELOW = 0.25  # MiniLM's cosine under which it did not understand the sentence
DEFAULT_WORLD_THRESHOLD = 0.46  # tuned on tests/probes/guard_leaks.yaml (out_of_world)
RARE_ZIPF = 3.8  # words rarer than this (wordfreq's Zipf scale) are distinctive
LONE_ZIPF = 2.5  # a derived key at least this common needs a second word of its secret
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")
_LETTERS = re.compile(r"[^\W\d_]+")


@dataclass(frozen=True)
class GuardedSecret:
    entry: str  # "secrets.0"
    text: str
    keys: tuple[str, ...]
    derived: bool = False  # keys are its distinctive words, not the writer's
    rewrites: tuple[str, ...] = ()  # the secret as the NPC or the player would say it


@dataclass(frozen=True)
class GuardCut:
    kind: GuardKind
    entry: str  # "secrets.0", or the out-of-world term
    reason: str  # "key 'brandy'", "similar to the secret (0.71)", "term 'computer'"
    withheld: str  # the sentence that was not sent (for the inspector only)


def person_rewrites(text: str, name: str = "") -> tuple[str, ...]:
    """A third-person secret ("She lets the Fog Runners store brandy in her cellar") as
    the NPC tells it ("I let … in my cellar") and as the player says it ("You let … in
    your cellar"): an NPC speaks in the first person, and the rewording alone costs the
    meaning check 0.1–0.26 of cosine. Rules, not a model: pronouns and the verb after the
    subject."""
    subjects = ["she", "he", *(n.lower() for n in name.split()[:1] if n)]
    subject = re.compile(rf"\b({'|'.join(map(re.escape, subjects))})\s+(\w+)", re.IGNORECASE)

    def rewrite(person: str) -> str:
        me, my, am = ("I", "my", "am") if person == "first" else ("you", "your", "are")
        own = "myself" if person == "first" else "yourself"

        def verb(match: re.Match[str]) -> str:
            word = match.group(2)
            lower = word.lower()
            if lower in ("is", "was"):
                word = am if lower == "is" else ("was" if person == "first" else "were")
            elif lower == "has":
                word = "have"
            elif lower == "does":
                word = "do"
            elif lower.endswith("ies") and len(lower) > 4:
                word = word[:-3] + "y"
            elif lower.endswith(("ches", "shes", "sses", "xes")):
                word = word[:-2]
            elif lower.endswith("s") and not lower.endswith("ss") and len(lower) > 3:
                word = word[:-1]
            return f"{me} {word}"

        said = subject.sub(verb, text)
        said = re.sub(r"\b(her|his)(?=\s+\w)", my, said, flags=re.IGNORECASE)
        said = re.sub(r"\b(him|her)\b", "me" if person == "first" else "you", said, flags=re.I)
        said = re.sub(r"\b(himself|herself)\b", own, said, flags=re.IGNORECASE)
        return said[:1].upper() + said[1:]

    return tuple(dict.fromkeys(r for r in (rewrite("first"), rewrite("second")) if r != text))


@dataclass
class GuardRules:
    """What one NPC's replies are checked for; built once per persona and player standing."""

    secrets: list[GuardedSecret] = field(default_factory=list)
    out_of_world: tuple[str, ...] = ()
    embed: Embed | None = None
    threshold: float = DEFAULT_THRESHOLD
    world_threshold: float = DEFAULT_WORLD_THRESHOLD
    # With a paired embedder (npc_engine/multilingual.py): where its multilingual half
    # starts, and the threshold that half alone uses for sentences not in English.
    multilingual_from: int | None = None
    foreign_threshold: float = DEFAULT_FOREIGN_THRESHOLD
    _secret_vectors: np.ndarray | None = None
    _owners: np.ndarray | None = None  # the secret each row of _secret_vectors belongs to
    _world_vectors: np.ndarray | None = None

    @property
    def active(self) -> bool:
        return bool(self.secrets or self.out_of_world)

    def texts(self) -> tuple[list[str], list[int]]:
        """What the meaning check compares with: each secret and its rewrites, and whose."""
        texts, owners = [], []
        for index, secret in enumerate(self.secrets):
            for text in (secret.text, *secret.rewrites):
                texts.append(text)
                owners.append(index)
        return texts, owners

    def preset_vectors(self, vectors: np.ndarray) -> None:
        """The vectors of ``texts()``, computed once per persona by the caller."""
        self._secret_vectors = _normalized(np.asarray(vectors, dtype=np.float32))
        self._owners = np.asarray(self.texts()[1], dtype=np.int64)

    def secret_vectors(self) -> tuple[np.ndarray, np.ndarray] | None:
        if self.embed is None or not self.secrets:
            return None
        if self._secret_vectors is None or self._owners is None:
            texts, owners = self.texts()
            self._secret_vectors = _normalized(np.asarray(self.embed(texts), dtype=np.float32))
            self._owners = np.asarray(owners, dtype=np.int64)
        return self._secret_vectors, self._owners

    def world_texts(self) -> list[str]:
        return [*MODERN_THINGS, *self.out_of_world]

    def preset_world_vectors(self, vectors: np.ndarray) -> None:
        """The vectors of ``world_texts()``, computed once per world by the caller."""
        self._world_vectors = _normalized(np.asarray(vectors, dtype=np.float32))

    def world_vectors(self) -> np.ndarray | None:
        """Descriptions of modern things and the world's own out-of-world terms."""
        if self.embed is None or not self.out_of_world:
            return None
        if self._world_vectors is None:
            vectors = np.asarray(self.embed(self.world_texts()), dtype=np.float32)
            self._world_vectors = _normalized(vectors)
        return self._world_vectors


def _normalized(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-9)


def tells_secret(rules: GuardRules, sentences: Sequence[str]) -> GuardCut | None:
    """Whether any of ``sentences`` tells one of the rules' secrets: by a key term in any
    form, or by meaning (each sentence, and each with the one before). The one check the
    reply guard, scripted ``must_not_leak`` checks and rumours share."""
    for sentence in sentences:
        found = _term_cut(rules.secrets, sentence)
        if found is not None:
            return found
    return _meaning_cut(rules, list(sentences), 0)


def _term_cut(secrets: Sequence[GuardedSecret], sentence: str) -> GuardCut | None:
    for secret in secrets:
        key = find_term(sentence, secret.keys)
        if key is None:
            continue
        if (
            secret.derived
            and _common(key)
            and _said_plainly(sentence, key)  # spelled, encoded, reversed: never by chance
            and not _beside_another_word(sentence, secret, key)
        ):
            continue
        return GuardCut("secret", secret.entry, f"key {key!r}", sentence)
    return None


@lru_cache(maxsize=4096)
def _common(word: str) -> bool:
    from wordfreq import zipf_frequency

    return " " not in word and zipf_frequency(word, "en") >= LONE_ZIPF


def _said_plainly(sentence: str, key: str) -> bool:
    return re.search(rf"(?<![a-z]){re.escape(fold(key))}", fold(sentence)) is not None


def _beside_another_word(sentence: str, secret: GuardedSecret, key: str) -> bool:
    """A fairly common derived key ("lighthouse") tells the secret only beside another
    of its words ("the lighthouse keeper's ledger")."""
    stems = _secret_stems(secret.text, secret.keys) - {_stem(key)}
    said = {_stem(word) for word in _LETTERS.findall(fold(sentence))}
    return bool(stems & said)


_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]")


def _word_count(text: str) -> int:
    """Words, counting two characters of Chinese, Japanese or Korean as one."""
    return len(_WORD.findall(text)) + len(_CJK.findall(text)) // 2


_CLAUSE_BREAK = re.compile(r"\s*[,;:—–()]\s*|\s+(?:and|but|while|so|because|though)\s+")
LONG_SENTENCE_WORDS = 14  # a longer sentence is also read clause by clause


def _clauses(sentence: str) -> list[str]:
    """A long sentence's clauses, each alone and with the next: a secret told in one
    clause of a long, innocent sentence is diluted in the sentence's vector."""
    if len(_WORD.findall(sentence)) < LONG_SENTENCE_WORDS:
        return []
    parts = [p for p in _CLAUSE_BREAK.split(sentence) if len(_WORD.findall(p)) >= 3]
    if len(parts) < 2:
        return []
    return [*parts, *(f"{a} {b}" for a, b in itertools.pairwise(parts))]


def meaning_probes(sentences: Sequence[str], first: int = 0) -> list[tuple[str, str]]:
    """What the meaning check embeds for sentences from ``first`` on: each alone (when
    long enough to tell anything), its clauses, and each with the one before it, all with
    disguises undone. Pairs of (text embedded, the sentence it would cut)."""
    probes: list[tuple[str, str]] = []
    plain = [plain_reading(sentence) for sentence in sentences]
    for index in range(first, len(sentences)):
        sentence = sentences[index]
        if _word_count(plain[index]) >= MIN_MEANING_WORDS:
            probes.append((plain[index], sentence))
        probes += [(clause, sentence) for clause in _clauses(plain[index])]
        if index > 0:
            probes.append((f"{plain[index - 1]} {plain[index]}", sentence))
    return probes


def read_ahead(rules: GuardRules, texts: Iterable[Sequence[str]]) -> None:
    """Embed what ``tells_secret`` will embed for each of these texts (sentence lists) in
    one batch: the embedder remembers recent texts, so the checks that follow one by one
    find their vectors (a world tick checks hundreds of memories; one batch of a few
    hundred runs several times faster than as many single calls)."""
    if rules.embed is None or rules.secret_vectors() is None:
        return
    probes = [text for sentences in texts for text, _ in meaning_probes(sentences)]
    if probes:
        rules.embed(list(dict.fromkeys(probes)))


def _meaning_cut(rules: GuardRules, sentences: list[str], first: int) -> GuardCut | None:
    """Sentences from ``first`` on (``meaning_probes``) against the secrets' vectors."""
    found = rules.secret_vectors()
    if found is None or rules.embed is None:
        return None
    vectors, owners = found
    probes = meaning_probes(sentences, first)
    if not probes:
        return None
    said = _normalized(np.asarray(rules.embed([p[0] for p in probes]), dtype=np.float32))
    scores = said @ vectors.T
    if rules.multilingual_from is not None:
        # A sentence the English embedder cannot read (another language: its cosine stays
        # near 0 where the multilingual one is high) is judged by the multilingual half
        # alone, at its own threshold.
        start = rules.multilingual_from
        english_alone = 2.0 * (said[:, :start] @ vectors[:, :start].T)
        multilingual_alone = 2.0 * (said[:, start:] @ vectors[:, start:].T)
        unread = english_alone < UNREAD_BELOW
        scale = rules.threshold / rules.foreign_threshold
        scores = np.where(unread, np.maximum(scores, multilingual_alone * scale), scores)
    row, column = np.unravel_index(int(np.argmax(scores)), scores.shape)
    best = float(scores[row, column])
    if best < rules.threshold:
        return None
    secret = rules.secrets[int(owners[column])]
    reason = f"similar to the secret ({best:.2f})"
    return GuardCut("secret", secret.entry, reason, probes[int(row)][1])


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
