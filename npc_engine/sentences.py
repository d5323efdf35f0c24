"""Ending a reply cut by ``max_tokens`` at its last complete sentence.

Text that has streamed cannot be taken back, so near the token limit the unfinished
sentence is held: from ``window`` tokens before the limit, text after the last sentence end
waits until its sentence ends. If the limit comes first, the held words are dropped and the
reply ends with the sentence before them. A sentence already partly sent when the window
opened (longer than the window) ends at its last whole word with an ellipsis instead: never
mid-word.
"""

from __future__ import annotations

import re

# A sentence ends at . ! ? or … (and closing quotes or brackets), before a space or the end.
_SENTENCE_END = re.compile(r"[.!?…][\"'”’)\]*]*(?=\s)")
_CLOSED = re.compile(r"[.!?…][\"'”’)\]*]*\s*$")
ELLIPSIS = "…"


def hold_window(max_tokens: int) -> int:
    """How many tokens before the limit holding starts: long enough for a spoken sentence,
    at most half the reply (short replies still stream their first half at once)."""
    return max(1, min(40, max_tokens // 2))


class SentenceTrim:
    def __init__(self, max_tokens: int) -> None:
        self.window_starts_at = max_tokens - hold_window(max_tokens)
        self.sent = ""  # everything released so far
        self.held = ""
        self.trimmed = ""  # what a length cut dropped (for tools)

    def feed(self, text: str, tokens_so_far: int) -> str:
        """Text to send now; ``tokens_so_far``: tokens the model has produced."""
        if not text:
            return ""
        if tokens_so_far < self.window_starts_at and not self.held:
            self.sent += text
            return text
        self.held += text
        ends = list(_SENTENCE_END.finditer(self.held))
        if not ends:
            return ""
        cut = ends[-1].end()
        out, self.held = self.held[:cut], self.held[cut:]
        self.sent += out
        return out

    def finish(self, cut_by_length: bool) -> str:
        """The rest to send when the reply ends; a length cut drops the unfinished part."""
        held, self.held = self.held, ""
        if not cut_by_length or _CLOSED.search(held):
            out = held
        elif self.sent.strip() and _CLOSED.search(self.sent):
            self.trimmed, out = held, ""  # ends with the last complete sentence
        else:
            # No complete sentence to end on, or one partly sent: end at a whole word.
            space = max(held.rfind(" "), held.rfind("\n"))
            words = held[:space] if space > 0 else held
            self.trimmed = held[len(words) :]
            out = words.rstrip() + ELLIPSIS if (self.sent + words).strip() else ""
        self.sent += out
        return out
