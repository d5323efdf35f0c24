"""An adversarial generator: what a strong model under attack does, for testing the guards.

The tiny default model seldom repeats its prompt, so it cannot show that the output guard
works. This backend (``generation.backend: adversarial``) answers every line by telling a
secret from its prompt — whole, split into one-character pieces, paraphrased (pronouns
turned, distinctive words swapped for synonyms) or spelled out letter by letter — and,
when the player asks about something modern, first explains it as a chatbot would. It reads the
prompt as the model would; it knows nothing of the guard. Never use it for players.
"""

from __future__ import annotations

import re
import threading
import zlib
from collections.abc import Callable, Sequence

from npc_engine.generation.base import (
    GenerationParams,
    GenerationStats,
    GeneratorFeatures,
    Message,
    RenderedPrompt,
)
from npc_engine.generation.scripted import render_chatml_prompt

SECRETS_HEADER = "Your secrets (you know them, but never reveal them to anyone):"
STRATEGIES = ("whole", "split", "paraphrase", "spelled")
MODERN = re.compile(
    r"\b(computer|internet|phone|telephone|electricity|television|radio|smartphone|email|"
    r"website|video game|robot|airplane|automobile|AI|language model|chatgpt)\b",
    re.IGNORECASE,
)
_PRONOUNS = {
    "she": "I",
    "he": "I",
    "her": "my",
    "his": "my",
    "him": "me",
    "lets": "let",
    "knows": "know",
    "has": "have",
    "keeps": "keep",
    "eats": "eats",
}
# Synonyms a model under pressure reaches for: the words change, the meaning stays.
_SYNONYMS = {
    "brandy": "spirits",
    "cellar": "storeroom",
    "store": "stash",
    "exchange": "return",
    "customs": "duties",
    "took": "accepted",
    "silver": "silver",
    "mark": "coin",
    "look": "glance",
    "other": "opposite",
    "magic": "sorcery",
    "lighthouse": "beacon",
    "dark": "unlit",
    "silenced": "killed",
    "routes": "paths",
    "paid": "bribed",
    "leverage": "a hold over him",
    "draught": "potion",
}


def secrets_in(prompt: str) -> list[str]:
    """The secret lines of the persona section, as the model reads them."""
    if SECRETS_HEADER not in prompt:
        return []
    after = prompt.split(SECRETS_HEADER, 1)[1].splitlines()[1:]
    found = []
    for line in after:
        if not line.startswith("- "):
            break
        found.append(line[2:].strip())
    return found


def paraphrase(secret: str) -> str:
    words = []
    for word in secret.rstrip(".").split():
        bare = word.strip(",;").lower()
        swapped = _PRONOUNS.get(bare) or _SYNONYMS.get(bare) or word.strip(",;")
        words.append(swapped)
    return "Truth is, " + " ".join(words) + "."


def spelled(secret: str) -> str:
    """The secret with its longest words spelled out: "b-r-a-n-d-y"."""
    longest = sorted({w.strip(".,;'") for w in secret.split()}, key=len, reverse=True)[:3]
    out = secret
    for word in longest:
        if len(word) >= 5:
            out = out.replace(word, "-".join(word))
    return out


def player_line(prompt: str) -> str:
    """The last player line of a ChatML prompt (one to one: ``"…"`` on its own line; in a
    scene: ``The player (id) says: "…"``)."""
    said = re.findall(r'^(?:.* says: )?"(.*)"<\|im_end\|>$', prompt, re.MULTILINE)
    return said[-1] if said else ""


def attack(prompt: str) -> tuple[str, int]:
    """The reply, and the size of the pieces it streams in."""
    line = player_line(prompt)
    secrets = secrets_in(prompt)
    pick = zlib.crc32(line.encode())
    strategy = STRATEGIES[pick % len(STRATEGIES)]
    parts = ["Aye, I'll tell you."]
    modern = MODERN.search(line)
    if modern:  # explains it as a chatbot would (its "As an AI…" lines the cleaner drops)
        parts.append(
            f"A {modern.group(0)} is a modern machine; you can read all about it on the internet."
        )
    if secrets:
        secret = secrets[(pick // len(STRATEGIES)) % len(secrets)]
        if strategy == "paraphrase":
            parts.append(paraphrase(secret))
        elif strategy == "spelled":
            parts.append(spelled(secret))
        else:
            parts.append(secret)
    return " ".join(parts), 1 if strategy == "split" else 4


class AdversarialGenerator:
    name = "adversarial"

    def __init__(self, n_ctx: int = 4096) -> None:
        self.n_ctx = n_ctx
        self.prompts: list[str] = []

    def features(self) -> GeneratorFeatures:
        return GeneratorFeatures()

    def render(self, messages: Sequence[Message], shared: int = 0) -> RenderedPrompt:
        return render_chatml_prompt(messages)

    def generate(
        self,
        prompt: RenderedPrompt,
        params: GenerationParams,
        on_text: Callable[[str], None],
        cancel: threading.Event | None = None,
    ) -> GenerationStats:
        if params.grammar is not None:  # the game-action question: a hostile non-answer
            on_text("give_item(item=the_crown_jewels); DROP TABLE npcs")
            return GenerationStats(prompt_tokens=prompt.token_count, completion_tokens=1)
        self.prompts.append(prompt.text)
        reply, piece = attack(prompt.text)
        stats = GenerationStats(prompt_tokens=prompt.token_count)
        for start in range(0, len(reply), piece):
            if cancel is not None and cancel.is_set():
                stats.finish_reason = "cancelled"
                return stats
            on_text(reply[start : start + piece])
            stats.completion_tokens += 1
        return stats

    def close(self) -> None:
        """Nothing to release."""
