"""The ``openai`` backend: replies from any OpenAI-compatible server (llama.cpp's
llama-server, vLLM, SGLang, llama-cpp-python's server, hosted APIs).

The official ``openai`` client does the HTTP, the server-sent events, the timeouts and the
retries with exponential backoff (of a request that failed before its first token), and it
is what hosted APIs test against; nothing here parses HTTP by hand.

The prompt is rendered here, with the GGUF's own chat template and vocabulary loaded
``vocab_only`` (no weights), exactly as the in-process backend renders it: the same stable
layout, so the server's prefix cache hits turn after turn, and token counts for the
prompt budget are the model's own. In the ``completions`` form the server gets the token
ids, not the text: a control token typed by a player stays plain text (the server would
parse special tokens out of a text prompt). The ``chat`` form sends the messages, for
hosted chat-only APIs, whose template the server applies.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any

from npc_engine.errors import GenerationError, GenerationUnavailableError
from npc_engine.generation.base import (
    FinishReason,
    GenerationParams,
    GenerationStats,
    Message,
    RenderedPrompt,
)

log = logging.getLogger(__name__)
CANCEL_POLL_SECONDS = 0.02  # how soon a cancel closes the stream while no token arrives


def slot_of(cache_key: str, slots: int) -> int:
    """A conversation's llama-server slot: stable across engine replicas and restarts (so a
    conversation that moves replica finds its KV cache where it left it)."""
    digest = hashlib.sha1(cache_key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % slots


class OpenAIGenerator:
    """Streams replies from an OpenAI-compatible server; renders and counts locally."""

    def __init__(
        self,
        *,
        url: str,
        api_key: str | None,
        model: str | None,
        chat_model: Any,
        n_ctx: int,
        api: str = "completions",
        send: str = "tokens",
        timeout: float = 60.0,
        connect_timeout: float = 3.0,
        retries: int = 2,
        slots: int = 0,
        parallel: int = 8,
        client: Any = None,
    ) -> None:
        import openai

        self._client = client or openai.OpenAI(
            base_url=url,
            # Local servers need no key; the client insists on one, so say so.
            api_key=api_key or "no-key",
            timeout=openai.Timeout(timeout, connect=connect_timeout),
            max_retries=retries,
        )
        self.url = url
        self.model = chat_model  # ChatModel: template + vocabulary, no weights
        self.api = api
        self.send_tokens = send == "tokens"
        self.n_ctx = n_ctx
        self.slot_count = slots
        # Requests sent at once: the server batches them (llama-server's -np, vLLM).
        self.slots = list(range(parallel))
        self._model_name = model
        self._model_lock = threading.Lock()
        self.name = f"{model or 'server model'} @ {url}"

    def render(self, messages: Sequence[Message], shared: int = 0) -> RenderedPrompt:
        if self.api == "completions" and not self.send_tokens:
            # The server tokenizes the text with special tokens parsed: none may come from
            # what a player or a game wrote.
            messages = [{**m, "content": self.model.defuse(m.get("content", ""))} for m in messages]
        rendered = self.model.render(messages, shared)
        if self.api == "chat":
            rendered.messages = [dict(m) for m in messages]
        return rendered

    def tokenize(self, text: str, *, add_bos: bool = False) -> list[int]:
        return list(self.model.tokenize(text, add_bos=add_bos))

    def _served_model(self) -> str:
        """``generation.model``, or the first model the server lists (asked once)."""
        import openai

        with self._model_lock:
            if self._model_name is None:
                try:
                    models = self._client.models.list().data
                except openai.APIConnectionError as exc:
                    raise GenerationUnavailableError(f"{self.url}: no answer ({exc})") from exc
                except openai.OpenAIError as exc:
                    raise GenerationError(f"{self.url}: cannot list models ({exc})") from exc
                if not models:
                    raise GenerationError(f"{self.url}: the server lists no model")
                self._model_name = str(models[0].id)
            return self._model_name

    def _request(self, prompt: RenderedPrompt, params: GenerationParams) -> dict[str, Any]:
        stop = list(dict.fromkeys([*prompt.stop, *params.stop]))
        request: dict[str, Any] = {
            "model": params.model or self._served_model(),
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            # OpenAI's own API takes at most 4 stop strings (the engine's cleaner cuts at
            # the rest); llama.cpp and vLLM take them all.
            "stop": (stop[:4] if self.api == "chat" else stop) or None,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if params.seed >= 0:
            request["seed"] = params.seed
        if self.api == "chat":
            request["messages"] = prompt.messages
            return request
        if self.send_tokens:
            tokens = prompt.tokens if prompt.tokens is not None else self.tokenize(prompt.text)
            request["prompt"] = list(tokens)
        else:
            request["prompt"] = prompt.text
        # llama.cpp's and vLLM's own sampling and cache fields (hosted chat APIs refuse
        # fields they do not know: they get none of these).
        extra: dict[str, Any] = {
            "cache_prompt": True,
            "top_k": params.top_k,
            "min_p": params.min_p,
            "repeat_penalty": params.repeat_penalty,
            "return_tokens": False,
        }
        if params.grammar is not None:
            extra["grammar"] = params.grammar
        if self.slot_count and params.cache_key:
            extra["id_slot"] = slot_of(params.cache_key, self.slot_count)
        if params.lora:
            extra["lora"] = [{"id": adapter, "scale": scale} for adapter, scale in params.lora]
        request["extra_body"] = extra
        return request

    def generate(
        self,
        prompt: RenderedPrompt,
        params: GenerationParams,
        on_text: Callable[[str], None],
        cancel: threading.Event | None = None,
    ) -> GenerationStats:
        import openai

        request = self._request(prompt, params)
        stats = GenerationStats(prompt_tokens=prompt.token_count)
        finish: str | None = None
        pieces = 0  # a server that reports no usage: each streamed piece is about a token
        create = (
            self._client.chat.completions.create
            if self.api == "chat"
            else self._client.completions.create
        )
        if cancel is not None and cancel.is_set():
            stats.finish_reason = "cancelled"
            return stats
        try:
            stream = create(**request)
        except (openai.APIConnectionError, openai.InternalServerError) as exc:
            raise GenerationUnavailableError(f"{self.url}: {exc}") from exc
        except openai.OpenAIError as exc:
            raise GenerationError(f"{self.url}: {exc}") from exc
        done = threading.Event()
        watcher = self._watch_cancel(stream, cancel, done) if cancel is not None else None
        try:
            for chunk in stream:
                if chunk.choices:
                    choice = chunk.choices[0]
                    text = choice.delta.content if self.api == "chat" else choice.text
                    if text:
                        pieces += 1
                        on_text(text)
                    finish = choice.finish_reason or finish
                self._read_usage(chunk, stats)
        except Exception as exc:
            if cancel is not None and cancel.is_set():
                stats.finish_reason = "cancelled"
                return stats
            raise GenerationError(f"{self.url}: the reply stream broke ({exc})") from exc
        finally:
            done.set()
            if watcher is not None:
                watcher.join()
            stream.close()
        stats.completion_tokens = stats.completion_tokens or pieces
        if cancel is not None and cancel.is_set():
            stats.finish_reason = "cancelled"
        else:
            stats.finish_reason = _finish(finish)
        return stats

    @staticmethod
    def _watch_cancel(stream: Any, cancel: threading.Event, done: threading.Event) -> Any:
        """Close the HTTP stream as soon as ``cancel`` is set, even while the server is
        still reading the prompt (no token to check between): the server stops the slot
        when its client goes away."""

        def watch() -> None:
            while not done.is_set():
                if cancel.wait(CANCEL_POLL_SECONDS):
                    _shut_socket(stream)
                    stream.close()
                    return

        thread = threading.Thread(target=watch, name="npc-remote-cancel", daemon=True)
        thread.start()
        return thread

    @staticmethod
    def _read_usage(chunk: Any, stats: GenerationStats) -> None:
        """Prompt, cached and generated token counts, as the server reports them: OpenAI's
        ``usage`` (with ``prompt_tokens_details.cached_tokens``) or llama-server's own
        ``timings.cache_n``."""
        usage = getattr(chunk, "usage", None)
        if usage is not None:
            stats.prompt_tokens = int(usage.prompt_tokens or stats.prompt_tokens)
            stats.completion_tokens = int(usage.completion_tokens or 0)
            details = getattr(usage, "prompt_tokens_details", None)
            cached = getattr(details, "cached_tokens", None) if details is not None else None
            if cached is not None:
                stats.cached_tokens = int(cached)
        timings = (getattr(chunk, "model_extra", None) or {}).get("timings")
        if isinstance(timings, dict) and isinstance(timings.get("cache_n"), int):
            stats.cached_tokens = timings["cache_n"]
            if isinstance(timings.get("predicted_n"), int):
                stats.completion_tokens = timings["predicted_n"]

    def close(self) -> None:
        self._client.close()


def _shut_socket(stream: Any) -> None:
    """Shut the stream's socket down: closing the response alone does not wake a thread
    blocked reading it, which would wait for the server's next token."""
    network = getattr(getattr(stream, "response", None), "extensions", {}).get("network_stream")
    raw = network.get_extra_info("socket") if network is not None else None
    if isinstance(raw, socket.socket):
        with contextlib.suppress(OSError):
            raw.shutdown(socket.SHUT_RDWR)


def _finish(reason: str | None) -> FinishReason:
    return "length" if reason == "length" else "stop"
