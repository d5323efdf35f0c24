"""The generation port. A backend renders chat messages with the model's own template, counts
tokens, and streams a reply. Implementations: ``LlamaGenerator`` (llama-cpp-python, any GGUF)
and ``ScriptedGenerator`` (tests). A remote OpenAI-compatible backend fits the same shape."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

FinishReason = Literal["stop", "length", "cancelled"]
Message = dict[str, str]


@dataclass
class GenerationParams:
    max_tokens: int = 80
    temperature: float = 0.7
    # top_k and min_p as llama-cpp-python's defaults; top_k also keeps sampling cheap: the
    # later samplers then sort 40 candidates, not the whole vocabulary.
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    # DRY ("don't repeat yourself"): a token that would continue a sequence already in the
    # prompt or the reply, longer than ``dry_allowed_length`` tokens, is penalised by
    # multiplier x base^(extra length). Long copies (the NPC's last reply, an example line,
    # the player's own words) are stopped; a name said again is not. 0: off.
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    stop: list[str] = field(default_factory=list)
    seed: int = -1
    # Names the conversation, so a backend can keep (and later restore) its KV cache.
    cache_key: str | None = None
    # GBNF the output must match (a game action's choice); None: free text.
    grammar: str | None = None
    # A remote server's model for this NPC (a persona's `model:`; vLLM serves LoRA
    # adapters under their own names) and llama-server's per-request adapters (id, scale).
    model: str | None = None
    lora: list[tuple[int, float]] | None = None


@dataclass
class RenderedPrompt:
    """The exact text the model reads, and its tokens where the backend has them."""

    text: str
    stop: list[str] = field(default_factory=list)
    tokens: list[int] | None = None
    # How many leading tokens every conversation with this NPC shares (world, persona,
    # examples): a backend may keep their KV state across processes. 0: unknown.
    head_tokens: int = 0
    # The messages themselves, for a backend that sends them (a hosted chat API).
    messages: list[Message] | None = None

    @property
    def token_count(self) -> int:
        return len(self.tokens) if self.tokens is not None else len(self.text.split())


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: FinishReason = "stop"
    restored_snapshot: bool = False


@dataclass(frozen=True)
class GeneratorFeatures:
    """What a generator offers beyond ``render`` and ``generate``, declared by it: the
    engine and the server read this, never guess from attributes."""

    parallel: int = 1  # conversations decoded at once (batch slots, a server's -np)
    # The conversations whose KV state it holds ready (the scheduler runs those first).
    warm_keys: Callable[[], set[str]] | None = None
    # Its tokenizer, for token budgets (None: words are counted instead).
    tokenize: Callable[[str], list[int]] | None = None


class Generator(Protocol):
    name: str
    n_ctx: int

    def render(self, messages: Sequence[Message], shared: int = 0) -> RenderedPrompt:
        """``shared``: how many leading messages are the same in every conversation with
        this NPC (they become ``head_tokens``)."""
        ...

    def generate(
        self,
        prompt: RenderedPrompt,
        params: GenerationParams,
        on_text: Callable[[str], None],
        cancel: threading.Event | None = None,
    ) -> GenerationStats: ...

    def features(self) -> GeneratorFeatures: ...

    def close(self) -> None: ...
