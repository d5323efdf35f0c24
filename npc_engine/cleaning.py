"""Streaming clean-up of model output: what the player sees must sound like the character.

Removes chat-template role tokens that leak into text, a leading "Name:" the model sometimes
writes before its own line, and whole sentences of assistant boilerplate ("As an AI…").
It works on a stream: text is held back only while it could still turn into something that
must be removed (a few characters), so deltas keep flowing. The concatenation of everything
``feed``/``finish`` return is the final reply.
"""

from __future__ import annotations

import re

_SPECIAL = re.compile(
    r"<\|[^|<>]{0,40}\|>|</?s>|\[/?INST\]|<start_of_turn>|<end_of_turn>|<\|?im_(start|end)\|?>"
    r"|<(/)?(system|user|assistant)>",
    re.I,
)
_SPECIAL_STARTS = (
    "<|",
    "</s>",
    "<s>",
    "[inst]",
    "[/inst]",
    "<start_of_turn>",
    "<end_of_turn>",
    "<im_",
    "<system>",
    "<user>",
    "<assistant>",
    "</system>",
    "</user>",
    "</assistant>",
)
_MAX_SPECIAL = 48
_BOILERPLATE = (
    "as an ai",
    "as an artificial intelligence",
    "as a language model",
    "as an ai language model",
    "i am an ai",
    "i'm an ai",
    "i am a language model",
    "i'm a language model",
    "i am just an ai",
    "i'm just an ai",
    # what a small chat model says when it forgets the character (seen in tools/eval.py)
    "how can i assist you",
    "how may i assist you",
    "i'm sorry, but i can't assist",
    "i'm sorry, but i cannot assist",
    "i can't assist with that",
    "i cannot assist with that",
    "is there anything else i can assist",
)
_SENTENCE_END = ".!?"


def _could_become_special(text: str) -> bool:
    low = text.lower()
    if len(low) > _MAX_SPECIAL:
        return False
    if low.startswith("<|"):
        return "|>" not in low and ">" not in low[2:]
    return any(start.startswith(low) for start in _SPECIAL_STARTS)


def strip_special_tokens(text: str) -> str:
    return _SPECIAL.sub("", text)


class StreamCleaner:
    def __init__(self, npc_name: str) -> None:
        first = npc_name.split()[0] if npc_name.split() else npc_name
        self._name_prefixes = sorted(
            {f"{npc_name.lower()}:", f"{first.lower()}:", "npc:", "assistant:"}, key=len
        )
        self._pending = ""
        self._started = False
        self._prefix_stripped = False  # one "Name:" at most, however the text is chunked
        self._sentence_start = True
        self._dropping = False
        self._need_space = False
        self.text = ""

    def feed(self, piece: str) -> str:
        self._pending += piece
        return self._drain(final=False)

    def finish(self) -> str:
        return self._drain(final=True)

    def _emit(self, run: str, out: list[str]) -> None:
        if self._need_space and self.text and not self.text[-1].isspace() and run[:1].strip():
            run = " " + run
        self._need_space = False
        out.append(run)
        self.text += run

    def _drain(self, final: bool) -> str:
        out: list[str] = []
        while self._pending:
            if not self._started:
                self._pending = self._pending.lstrip()
                low = self._pending.lower()
                if not low:
                    break
                prefixes = [] if self._prefix_stripped else self._name_prefixes
                if not final and any(p.startswith(low) and len(low) < len(p) for p in prefixes):
                    break
                for prefix in prefixes:
                    if low.startswith(prefix):
                        self._pending = self._pending[len(prefix) :].lstrip()
                        self._prefix_stripped = True
                        break
                # After "Mara:" alone, the reply proper (and its leading space) is still to come.
                self._started = bool(self._pending)
                continue
            if self._dropping:
                match = re.search(r"[.!?]+(\s|$)", self._pending)
                if match and (match.group(1) or final):
                    self._pending = self._pending[match.end() :]
                    self._dropping = False
                    self._sentence_start = True
                    self._need_space = True
                    continue
                if final:
                    self._pending = ""
                    break
                tail = re.search(r"[.!?]+$", self._pending)
                self._pending = tail.group(0) if tail else ""
                break
            head = self._pending[0]
            if head in "<[":
                special = _SPECIAL.match(self._pending)
                if special:
                    self._pending = self._pending[special.end() :]
                    continue
                if not final and _could_become_special(self._pending):
                    break
            if self._sentence_start:
                stripped = self._pending.lstrip()
                if not stripped:
                    if final:
                        self._pending = ""
                    break
                low = stripped.lower()
                if any(
                    low.startswith(b) and not low[len(b) : len(b) + 1].isalpha()
                    for b in _BOILERPLATE
                ):
                    if not final and any(b.startswith(low) and b != low for b in _BOILERPLATE):
                        break  # "as an ai" could still become "as an aide…"
                    self._dropping = True
                    self._pending = stripped
                    continue
                if not final and any(b.startswith(low) for b in _BOILERPLATE):
                    break
                self._sentence_start = False
            run_end = len(self._pending)
            for index, char in enumerate(self._pending):
                if index > 0 and char in "<[":
                    run_end = index
                    break
                if char in _SENTENCE_END:
                    run_end = index + 1
                    while run_end < len(self._pending) and self._pending[run_end] in _SENTENCE_END:
                        run_end += 1
                    self._sentence_start = True
                    break
            run = self._pending[:run_end]
            if run_end == len(self._pending):
                kept = run.rstrip()
                if not kept:
                    if final:
                        self._pending = ""
                    break
                if not final:
                    run = kept
                    run_end = len(kept)
                else:
                    run = kept
                    run_end = len(self._pending)
            self._pending = self._pending[run_end:]
            self._emit(run, out)
        return "".join(out)
