"""Tokenizing a chat prompt part by part: the template's own text may hold special tokens,
message contents never do, and parts seen on earlier turns are reused.

Safety: a player who types ``<|im_start|>system`` must not open a system message. llama.cpp
parses special tokens in whatever text it is given with ``special=True``, so the rendered
prompt cannot be tokenized as one text. The template is rendered with a placeholder for
each message's content; the text between placeholders is the template's (special tokens
parsed), each content is tokenized with ``special=False`` (a typed control token becomes
plain characters).

Speed: a turn's prompt is the previous turn's plus a few new messages, and tokenizing the
whole ~1,500-token text again took ~3 ms of every first token on 2 cores, so each part's
tokens are cached. llama.cpp tokenizes the text between special tokens separately anyway,
so the parts give the tokens a whole-text tokenization would (checked at load).
No library caches llama.cpp tokenization or separates template from content, hence this.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

# (text, add_bos, parse_special) -> token ids
Tokenize = Callable[[str, bool, bool], list[int]]

# Private-use characters: no chat template changes them, no sane content holds them.
_OPEN, _CLOSE = "\ue000", "\ue001"
_PLACEHOLDER = re.compile(f"{_OPEN}(\\d+){_CLOSE}")


def placeholder(index: int) -> str:
    """Stands in for message ``index``'s content while the template is rendered."""
    return f"{_OPEN}{index}{_CLOSE}"


def split_rendered(scaffold: str, count: int) -> list[tuple[str, int | None]] | None:
    """The template's text and the contents' slots, in order: ``(text, None)`` for template
    text, ``("", index)`` for message ``index``'s content. None when the template did not
    keep each placeholder exactly once and in order (then it cannot be split safely)."""
    parts: list[tuple[str, int | None]] = []
    position = 0
    expected = 0
    for match in _PLACEHOLDER.finditer(scaffold):
        index = int(match.group(1))
        if index != expected:
            return None
        parts.append((scaffold[position : match.start()], None))
        parts.append(("", index))
        position = match.end()
        expected += 1
    parts.append((scaffold[position:], None))
    if expected != count or _OPEN in scaffold[position:] or _CLOSE in scaffold[position:]:
        return None
    return parts


class PromptTokenizer:
    """Tokens of template text (special tokens parsed) and of contents (never parsed),
    each part cached (least recently used out beyond ``capacity``)."""

    def __init__(self, tokenize: Tokenize, capacity: int = 4096) -> None:
        self._tokenize = tokenize
        self._capacity = capacity
        self._parts: OrderedDict[tuple[str, bool, bool], list[int]] = OrderedDict()
        self._lock = threading.Lock()  # prompts are built on several threads at once

    def __call__(self, parts: Sequence[tuple[str, bool]], add_bos: bool) -> list[int]:
        """``parts``: (text, is_template) in order; BOS (if wanted) before the first."""
        tokens: list[int] = []
        first = True
        for text, is_template in parts:
            if not text:
                continue
            tokens += self._part(text, add_bos and first, is_template)
            first = False
        if first and add_bos:
            return self._tokenize("", True, True)
        return tokens

    def _part(self, text: str, add_bos: bool, special: bool) -> list[int]:
        key = (text, add_bos, special)
        with self._lock:
            cached = self._parts.get(key)
            if cached is not None:
                self._parts.move_to_end(key)
                return cached
        tokens = self._tokenize(text, add_bos, special)
        with self._lock:
            self._parts[key] = tokens
            if len(self._parts) > self._capacity:
                self._parts.popitem(last=False)
        return tokens
