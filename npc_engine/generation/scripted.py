"""A scripted generator for fast tests: replies come from a queue or a function of the prompt."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence

from npc_engine.errors import GenerationError
from npc_engine.generation.base import (
    GenerationParams,
    GenerationStats,
    GeneratorFeatures,
    Message,
    RenderedPrompt,
)


def _render_chatml(messages: Sequence[Message]) -> str:
    parts = [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
    return "".join(parts) + "<|im_start|>assistant\n"


def render_chatml_prompt(messages: Sequence[Message]) -> RenderedPrompt:
    """ChatML for the test backends; a word counts as a token."""
    text = _render_chatml(messages)
    return RenderedPrompt(text=text, stop=["<|im_end|>"], tokens=list(range(len(text.split()))))


class ScriptedGenerator:
    name = "scripted"

    def __init__(
        self,
        replies: Iterable[str] = (),
        *,
        respond: Callable[[str], str] | None = None,
        n_ctx: int = 4096,
        fail: bool = False,
        action: str | Callable[[str], str] = "none",
    ) -> None:
        self.replies = deque(replies)
        self.respond = respond
        self.n_ctx = n_ctx
        self.fail = fail
        self.prompts: list[str] = []
        # What it answers under a grammar (the game-action question), from the prompt.
        self.action = action
        self.action_prompts: list[str] = []

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
        if params.grammar is not None:
            self.action_prompts.append(prompt.text)
            answer = self.action(prompt.text) if callable(self.action) else self.action
            on_text(answer)
            return GenerationStats(prompt_tokens=prompt.token_count, completion_tokens=1)
        self.prompts.append(prompt.text)
        if self.fail:
            raise GenerationError("scripted failure")
        if self.respond is not None:
            reply = self.respond(prompt.text)
        else:
            reply = self.replies.popleft() if self.replies else "..."
        words = reply.split(" ")
        stats = GenerationStats(prompt_tokens=prompt.token_count)
        for index, word in enumerate(words[: params.max_tokens]):
            if cancel is not None and cancel.is_set():
                stats.finish_reason = "cancelled"
                return stats
            on_text(word if index == 0 else " " + word)
            stats.completion_tokens += 1
        if len(words) > params.max_tokens:
            stats.finish_reason = "length"
        return stats

    def close(self) -> None:
        """Nothing to release: the script lives in memory."""
