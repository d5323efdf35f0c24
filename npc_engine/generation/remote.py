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

What the server is and says stays here: an error a game client sees says only that the
model server is unavailable or refused the request (with the HTTP status class); the
details, with the URL's credentials taken out, go to the engine's log. The server's error
body can hold the whole prompt (a validation error quoting the input), secrets included.

``timeout`` bounds a whole request (connecting, the first byte, every token), not each
read: a server that trickles a byte now and then cannot hold a slot past it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from npc_engine.errors import (
    ConfigError,
    GenerationError,
    GenerationUnavailableError,
    is_unavailable,
)
from npc_engine.generation.base import (
    FinishReason,
    GenerationParams,
    GenerationStats,
    GeneratorFeatures,
    Message,
    RenderedPrompt,
)
from npc_engine.generation.http_deadline import deadline_client, http_library, request_deadline

log = logging.getLogger(__name__)
CANCEL_POLL_SECONDS = 0.02  # how soon a cancel closes the stream while no token arrives
UNAVAILABLE = "the model server is unavailable"
REFUSED = "the model server refused the request"
LOGGED_DETAIL_CHARS = 400  # of a server's error, in the log (its body may quote the prompt)


def redact_url(url: str) -> str:
    """``url`` without its secrets: the userinfo and every query value become ``***``."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = ("***@" if parts.username or parts.password else "") + host
        if parts.port is not None:
            netloc += f":{parts.port}"
        query = urlencode([(k, "***") for k, _ in parse_qsl(parts.query, keep_blank_values=True)])
        return urlunsplit((parts.scheme, netloc, parts.path, query, ""))
    except ValueError:
        return "<the configured URL>"


def _status_class(exc: BaseException) -> str | None:
    status = getattr(exc, "status_code", None)
    return f"HTTP {status // 100}xx" if isinstance(status, int) else None


def _public_error(exc: BaseException) -> GenerationError:
    """What a game client may read about ``exc``: that the server is unavailable (code
    ``unavailable``) or refused the request, and the HTTP status class at most."""
    import httpx
    import openai

    http = http_library()
    status = _status_class(exc)
    if isinstance(exc, openai.APITimeoutError | http.TimeoutException | httpx.TimeoutException):
        return GenerationUnavailableError(f"{UNAVAILABLE} (timed out)")
    if isinstance(exc, openai.APIConnectionError | openai.InternalServerError):
        return GenerationUnavailableError(UNAVAILABLE + (f" ({status})" if status else ""))
    if isinstance(exc, openai.APIStatusError) and exc.status_code in (408, 429):
        return GenerationUnavailableError(f"{UNAVAILABLE} ({status})")
    if isinstance(exc, http.TransportError | OSError) or is_unavailable(exc):
        return GenerationUnavailableError(UNAVAILABLE)  # refused, reset, timed out
    if not isinstance(exc, openai.OpenAIError):
        return GenerationError("the model server's reply could not be read")
    return GenerationError(REFUSED + (f" ({status})" if status else ""))


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
            http_client=deadline_client(),
        )
        self.url = url
        self.shown_url = redact_url(url)  # for logs: never the URL's credentials
        self.timeout = timeout
        self.model = chat_model  # ChatModel: template + vocabulary, no weights
        self.api = api
        self.send_tokens = send == "tokens"
        self.n_ctx = n_ctx
        self.slot_count = slots
        # Requests sent at once: the server batches them (llama-server's -np, vLLM).
        self.slots = list(range(parallel))
        self._model_name = model
        self._model_lock = threading.Lock()
        self.name = f"{model or 'server model'} @ {self.shown_url}"
        # Whether the server takes token-id prompts is unknown until asked (check_server).
        self._checked = not (api == "completions" and self.send_tokens)
        self._refuses_tokens = False
        self._check_lock = threading.Lock()

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

    def features(self) -> GeneratorFeatures:
        return GeneratorFeatures(len(self.slots), None, self.tokenize)

    def _served_model(self) -> str:
        """``generation.model``, or the first model the server lists (asked once)."""
        import openai

        with self._model_lock:
            if self._model_name is None:
                try:
                    with request_deadline(self.timeout):
                        models = self._client.models.list().data
                except openai.OpenAIError as exc:
                    raise self._failed("listing its models", exc) from None
                if not models:
                    log.warning("model server %s lists no model", self.shown_url)
                    raise GenerationError(f"{REFUSED} (it lists no model)")
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
            if params.grammar is not None:
                # The game-action question: llama.cpp's servers (llama-server, llama-cpp-
                # python's) take a GBNF grammar on chat completions too. A hosted API that
                # refuses the field fails the request, and the engine takes no action:
                # never one chosen without the grammar.
                request["extra_body"] = {"grammar": params.grammar}
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

    def _failed(self, during: str, exc: BaseException) -> GenerationError:
        """Log what went wrong in full (the URL's secrets out, a long body cut), and return
        the error a game client may see (``_public_error``)."""
        public = _public_error(exc)
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())
        if len(detail) > LOGGED_DETAIL_CHARS:
            detail = detail[:LOGGED_DETAIL_CHARS] + f"… ({len(detail)} characters)"
        log.warning("model server %s, %s: %s", self.shown_url, during, detail)
        return public

    def check_server(self) -> None:
        """At start, with ``send: tokens``: does the server take a token-id prompt? A
        one-token completion from a token prompt, then (if refused) from a text prompt:
        refused as tokens but taken as text is a server that takes text only (llama-cpp-
        python's): a ConfigError naming the setting. A server that does not answer now is
        asked again before the first reply."""
        if self._checked:
            return
        import openai

        client = self._client.with_options(max_retries=0)

        def probe(prompt: str | list[int]) -> None:
            with request_deadline(self.timeout):
                stream = client.completions.create(
                    model=self._served_model(),
                    prompt=prompt,
                    max_tokens=1,
                    temperature=0.0,
                    stream=True,
                )
                try:
                    for _chunk in stream:
                        pass
                finally:
                    stream.close()

        try:
            probe(self.tokenize("Hello"))
        except GenerationError:  # _served_model: no answer (logged); asked again later
            return
        except openai.APIStatusError as refused:
            try:
                probe("Hello")
            except Exception as exc:  # refused either way: not a token mismatch (yet)
                self._failed("a one-token check from token ids", refused)
                self._failed("a one-token check from text", exc)
                return
            self._checked = self._refuses_tokens = True
            raise ConfigError(
                f"generation.send: the server at {self.shown_url} refuses prompts sent as "
                "token ids and takes text (llama-cpp-python's llama_cpp.server does): set "
                "generation.send: text"
            ) from None
        except openai.OpenAIError as exc:
            self._failed("a one-token check", exc)
            return
        self._checked = True

    def generate(
        self,
        prompt: RenderedPrompt,
        params: GenerationParams,
        on_text: Callable[[str], None],
        cancel: threading.Event | None = None,
    ) -> GenerationStats:
        if not self._checked:
            with self._check_lock, contextlib.suppress(ConfigError):
                self.check_server()  # once, whichever reply comes first
        if self._refuses_tokens:
            log.error(
                "model server %s takes no token-id prompts: set generation.send: text",
                self.shown_url,
            )
            raise GenerationError(f"{REFUSED} (a configuration error: see the engine log)")
        with request_deadline(self.timeout):
            return self._generate(prompt, params, on_text, cancel)

    def _generate(
        self,
        prompt: RenderedPrompt,
        params: GenerationParams,
        on_text: Callable[[str], None],
        cancel: threading.Event | None,
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
        except openai.OpenAIError as exc:
            raise self._failed("a reply", exc) from None
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
            failed = self._failed("the reply stream", exc)
            message = f"{failed} (the reply stream broke)"
            raise type(failed)(message) from None
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
