"""llama-cpp-python backend: any GGUF, rendered with the chat template stored in the GGUF."""

from __future__ import annotations

import ctypes
import logging
import os
import re
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from npc_engine.errors import GenerationError, ModelUnavailableError
from npc_engine.generation.base import (
    FinishReason,
    GenerationParams,
    GenerationStats,
    GeneratorFeatures,
    Message,
    RenderedPrompt,
)
from npc_engine.generation.prefix_store import MIN_HEAD_TOKENS, PrefixStore
from npc_engine.generation.snapshots import Snapshot, SnapshotCache, common_prefix_length
from npc_engine.generation.tokens import PromptTokenizer, placeholder, split_rendered

log = logging.getLogger(__name__)
# Restore a snapshot only when it saves at least this many prompt tokens over what the
# context already holds: a restore copies ~23 KB per held token of the default model (a
# few ms for a whole conversation), while re-reading 16 tokens takes ~40 ms on 2 cores.
RESTORE_MIN_GAIN = 16
PROMPT_BATCH = 256  # prompt tokens per llama_decode: a cancel is noticed within one batch


def read_sequence_state(low: Any, ctx: Any, seq_id: int) -> bytearray | None:
    """The KV cells of one sequence (``llama_state_seq_get_data``), or None if empty."""
    size = low.llama_state_seq_get_size(ctx, seq_id)
    data = bytearray(size)
    written = low.llama_state_seq_get_data(
        ctx, (ctypes.c_uint8 * size).from_buffer(data), size, seq_id
    )
    if not written:
        return None
    del data[written:]
    return data


def write_sequence_state(low: Any, ctx: Any, seq_id: int, data: bytearray) -> bool:
    """Replace one sequence's KV cells with a saved state (no copy of ``data``)."""
    buffer = (ctypes.c_uint8 * len(data)).from_buffer(data)
    return bool(low.llama_state_seq_set_data(ctx, buffer, len(data), seq_id))


def restore_best_snapshot(
    snapshots: SnapshotCache | None,
    low: Any,
    ctx: Any,
    seq_id: int,
    wanted: np.ndarray,
    kept: int,
    heads: PrefixStore | None = None,
) -> tuple[np.ndarray | None, int]:
    """The one snapshot-restore path of both generators.

    The best of the conversation snapshots (``snapshots``) and the stored NPC heads
    (``heads``, on disk) is the one sharing most tokens with ``wanted``. When it shares at
    least ``RESTORE_MIN_GAIN`` more than the ``kept`` tokens the sequence already holds, its
    cells replace the sequence's: returns (the tokens the sequence now holds, how many of
    them ``wanted`` shares). Otherwise (None, kept): nothing changed. A restore llama.cpp
    refuses leaves the sequence empty: (no tokens, 0), and the caller evaluates the whole
    prompt.
    """
    choices: list[tuple[int, Snapshot, Callable[[Snapshot], bytearray | None]]] = []
    if snapshots is not None and (found := snapshots.best(wanted)) is not None:
        choices.append((found[1], found[0], snapshots.load))
    if heads is not None and (found := heads.best(wanted)) is not None:
        choices.append((found[1], found[0], heads.load))
    if not choices:
        return None, kept
    shared, snapshot, load = max(choices, key=lambda choice: choice[0])
    if shared < kept + RESTORE_MIN_GAIN:
        return None, kept
    data = load(snapshot)
    if data is None:  # a head file another process removed meanwhile
        return None, kept
    if write_sequence_state(low, ctx, seq_id, data):
        return snapshot.tokens, shared
    log.warning("could not restore a KV snapshot; evaluating the prompt instead")
    low.llama_memory_seq_rm(low.llama_get_memory(ctx), seq_id, -1, -1)
    return np.empty(0, dtype=np.int32), 0


def should_store_head(
    heads: PrefixStore | None, tokens: Sequence[int], head: int, kept: int
) -> bool:
    """Whether this prompt's evaluation should stop at its head to store the head's cells:
    it is long enough to be worth it, not already held, and not stored yet."""
    return (
        heads is not None
        and kept < head < len(tokens) - 1
        and head >= MIN_HEAD_TOKENS
        and not heads.has(np.asarray(tokens[:head], dtype=np.int32))
    )


def load_llama(
    model_path: Path, *, n_ctx: int, n_threads: int, n_gpu_layers: int, seed: int
) -> Any:
    """A ``Llama`` (weights, vocabulary and one context of ``n_ctx`` tokens)."""
    from llama_cpp import Llama

    if not model_path.is_file():
        raise ModelUnavailableError(f"{model_path}: GGUF file not found")
    try:
        return Llama(
            model_path=str(model_path),
            n_ctx=n_ctx,
            n_batch=PROMPT_BATCH,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            n_gpu_layers=n_gpu_layers,
            seed=seed if seed >= 0 else 0xFFFFFFFF,
            verbose=False,
        )
    except (ValueError, RuntimeError) as exc:
        raise ModelUnavailableError(f"{model_path}: cannot load this GGUF ({exc})") from exc


def load_vocabulary(model_path: Path) -> Any:
    """A GGUF's vocabulary and chat template without its weights (``vocab_only``): for
    rendering and counting prompts that a remote server generates from."""
    from llama_cpp import Llama

    if not model_path.is_file():
        raise ModelUnavailableError(f"{model_path}: GGUF file not found")
    try:
        return Llama(model_path=str(model_path), vocab_only=True, verbose=False)
    except (ValueError, RuntimeError) as exc:
        raise ModelUnavailableError(f"{model_path}: cannot read this GGUF ({exc})") from exc


class ChatModel:
    """What both generators share: the GGUF's chat template and tokenizer. Renders chat
    messages into prompt tokens, with special tokens only where the template put them."""

    def __init__(self, llama: Any, model_path: Path, chat_format: str | None) -> None:
        self._llama = llama
        self.model_path = model_path
        self._formatter = self._make_formatter(chat_format)
        self._prompt_tokenizer = PromptTokenizer(self._tokenize_part)
        self._control_texts: re.Pattern[str] | None = None

    def _make_formatter(self, chat_format: str | None) -> Callable[..., Any]:
        from llama_cpp import llama_chat_format

        if chat_format:
            function_name = "format_" + chat_format.replace("-", "_").replace(".", "_")
            formatter = getattr(llama_chat_format, function_name, None)
            if formatter is None:
                raise ModelUnavailableError(
                    f"Unknown chat_format {chat_format!r} (llama-cpp-python has no {function_name})"
                )
            return formatter
        template = self._llama.metadata.get("tokenizer.chat_template")
        if not template:
            raise ModelUnavailableError(
                f"{self.model_path.name} carries no chat template (tokenizer.chat_template). "
                "Set chat_format explicitly (e.g. chatml, llama-3, gemma, mistral-instruct); "
                "npc-engine never guesses a prompt format."
            )
        eos_id, bos_id = self._llama.token_eos(), self._llama.token_bos()
        model = self._llama._model
        return llama_chat_format.Jinja2ChatFormatter(
            template=template,
            eos_token=model.token_get_text(eos_id) if eos_id != -1 else "",
            bos_token=model.token_get_text(bos_id) if bos_id != -1 else "",
            stop_token_ids=[eos_id],
        )

    def tokenize(self, text: str, *, add_bos: bool = False) -> list[int]:
        return list(self._llama.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))

    def _tokenize_part(self, text: str, add_bos: bool, special: bool) -> list[int]:
        return list(self._llama.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special))

    def render(self, messages: Sequence[Message], shared: int = 0) -> RenderedPrompt:
        """The prompt in the GGUF's template; special tokens only where the template put
        them (see ``generation.tokens``). The head is everything before the content of
        message ``shared``: the template's text up to there depends only on the shared
        messages and that next message's role (always the player's)."""
        contents = [message.get("content", "") for message in messages]
        scaffold = self._formatter(
            messages=[{**m, "content": placeholder(i)} for i, m in enumerate(messages)]
        )
        stop = [
            s
            for s in ([scaffold.stop] if isinstance(scaffold.stop, str) else scaffold.stop or [])
            if s
        ]
        add_bos = not scaffold.added_special
        parts = split_rendered(scaffold.prompt, len(messages))
        if parts is None:
            # This template rewrites contents (trims, capitalises…), so it cannot be split:
            # render the real text with every control token's text taken out of contents.
            defused = [
                {**m, "content": self.defuse(c)} for m, c in zip(messages, contents, strict=True)
            ]
            result = self._formatter(messages=defused)
            tokens = self.tokenize(result.prompt, add_bos=add_bos)
            return RenderedPrompt(text=result.prompt, stop=stop, tokens=tokens)
        pieces = [
            (text, True) if index is None else (contents[index], False) for text, index in parts
        ]
        # parts alternate template text and content slots: content k is parts[2k + 1]
        head = (
            len(self._prompt_tokenizer(pieces[: 2 * shared + 1], add_bos))
            if 0 < shared < len(messages)
            else 0
        )
        return RenderedPrompt(
            text="".join(text for text, _ in pieces),
            stop=stop,
            tokens=self._prompt_tokenizer(pieces, add_bos),
            head_tokens=head,
        )

    def defuse(self, content: str) -> str:
        """``content`` without the text of any control token (``<|im_start|>``…)."""
        if self._control_texts is None:
            import llama_cpp

            vocab = llama_cpp.llama_model_get_vocab(self._llama._model.model)
            control = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL
            texts = {
                self._llama._model.token_get_text(token)
                for token in range(self._llama.n_vocab())
                if llama_cpp.llama_vocab_get_attr(vocab, token) & control
            }
            ordered = sorted((t for t in texts if t), key=len, reverse=True)
            self._control_texts = re.compile("|".join(map(re.escape, ordered or ["\ue000"])))
        return self._control_texts.sub("", content)


class LlamaGenerator:
    """One ``Llama`` object; it serves one generation at a time (guarded by a lock, since
    llama.cpp contexts are not thread-safe)."""

    def __init__(
        self,
        model_path: Path,
        *,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        chat_format: str | None = None,
        seed: int = -1,
        snapshots: SnapshotCache | None = None,
        heads: PrefixStore | None = None,
    ) -> None:
        self.threads = n_threads or os.cpu_count() or 1
        self._llama = load_llama(
            model_path,
            n_ctx=n_ctx,
            n_threads=self.threads,
            n_gpu_layers=n_gpu_layers,
            seed=seed,
        )
        self.model = ChatModel(self._llama, model_path, chat_format)
        self.name = model_path.name
        self.model_path = model_path
        self.n_ctx = n_ctx
        self._lock = threading.Lock()
        self.snapshots = snapshots
        self.heads = heads
        self._context_key: str | None = None  # whose conversation the context holds now
        self._said_no_dry = False

    def render(self, messages: Sequence[Message], shared: int = 0) -> RenderedPrompt:
        return self.model.render(messages, shared)

    def features(self) -> GeneratorFeatures:
        return GeneratorFeatures(1, self.warm_keys, self.tokenize)

    def warm_keys(self) -> set[str]:
        """The conversation the context holds (see ``GenerationScheduler``)."""
        return {self._context_key} if self._context_key else set()

    def tokenize(self, text: str, *, add_bos: bool = False) -> list[int]:
        return self.model.tokenize(text, add_bos=add_bos)

    def generate(
        self,
        prompt: RenderedPrompt,
        params: GenerationParams,
        on_text: Callable[[str], None],
        cancel: threading.Event | None = None,
    ) -> GenerationStats:
        tokens = prompt.tokens if prompt.tokens is not None else self.tokenize(prompt.text)
        with self._lock:
            if self._context_key is not None and self._context_key != params.cache_key:
                # Leaving a conversation: keep its state for when the player comes back.
                # Saved here, not after each reply, so staying with one NPC costs nothing.
                self._save_snapshot(self._context_key)
            self._context_key = params.cache_key
            stats = GenerationStats(prompt_tokens=len(tokens))
            kept, stats.restored_snapshot = self._reuse_cache(np.asarray(tokens, dtype=np.int32))
            # llama-cpp-python re-evaluates at least the last prompt token.
            stats.cached_tokens = min(kept, len(tokens) - 1)
            try:
                if not self._prefill(tokens, stats.cached_tokens, prompt.head_tokens, cancel):
                    stats.finish_reason = "cancelled"
                    return stats
                stop = list(dict.fromkeys([*prompt.stop, *params.stop]))
                finish = self._stream(tokens, params, stop, on_text, cancel)
            except Exception as exc:
                raise GenerationError(f"generation failed: {exc}") from exc
            stats.completion_tokens = max(self._llama.n_tokens - len(tokens), 0)
            stats.finish_reason = finish
            return stats

    def _reuse_cache(self, tokens: np.ndarray) -> tuple[int, bool]:
        """Tokens already in the context, after restoring a better snapshot if there is one."""
        from llama_cpp import llama_cpp as low_level

        llama = self._llama
        kept = common_prefix_length(llama.input_ids[: llama.n_tokens].astype(np.int32), tokens)
        held, kept = restore_best_snapshot(
            self.snapshots, low_level, llama._ctx.ctx, 0, tokens, kept, self.heads
        )
        if held is None:
            return kept, False
        llama.input_ids[: len(held)] = held
        llama.n_tokens = len(held)
        llama._requires_eval = True
        return kept, len(held) > 0

    def _save_snapshot(self, key: str) -> None:
        from llama_cpp import llama_cpp as low_level

        if self.snapshots is None or self._llama.n_tokens == 0:
            return
        data = read_sequence_state(low_level, self._llama._ctx.ctx, 0)
        if data is not None:
            tokens = self._llama.input_ids[: self._llama.n_tokens].astype(np.int32)
            self.snapshots.put(key, tokens, data)

    def _prefill(
        self, tokens: Sequence[int], cached: int, head: int, cancel: threading.Event | None
    ) -> bool:
        """Evaluate the uncached prompt one batch at a time, leaving the last batch (at most
        ``PROMPT_BATCH`` tokens) to ``create_completion``; False if cancelled meanwhile.
        A head not stored yet is evaluated on its own first and stored.

        ``create_completion`` evaluates its whole prompt before yielding anything, so a
        cancel could wait for the full prompt; this way it waits for one batch at most,
        and a short suffix (the usual warm turn) still takes a single decode call.
        """
        from llama_cpp import llama_cpp as low_level

        llama = self._llama
        llama.n_tokens = cached
        if should_store_head(self.heads, tokens, head, cached):
            assert self.heads is not None
            if not self._evaluate(tokens, cached, head, cancel):
                return False
            data = read_sequence_state(low_level, llama._ctx.ctx, 0)
            if data is not None:
                self.heads.put(np.asarray(tokens[:head], dtype=np.int32), data)
            cached = head
        return self._evaluate(tokens, cached, max(cached, len(tokens) - PROMPT_BATCH), cancel)

    def _evaluate(
        self, tokens: Sequence[int], start: int, end: int, cancel: threading.Event | None
    ) -> bool:
        for chunk in range(start, end, PROMPT_BATCH):
            if cancel is not None and cancel.is_set():
                return False
            self._llama.eval(tokens[chunk : min(chunk + PROMPT_BATCH, end)])
        return not (cancel is not None and cancel.is_set())

    def _stream(
        self,
        tokens: Sequence[int],
        params: GenerationParams,
        stop: list[str],
        on_text: Callable[[str], None],
        cancel: threading.Event | None,
    ) -> FinishReason:
        if params.dry_multiplier > 0 and not self._said_no_dry:
            # llama-cpp-python's own sampling chain has no DRY stage: only the batched
            # generator (parallel > 1) builds its chain itself.
            log.warning("dry_multiplier is set but not applied with parallel: 1")
            self._said_no_dry = True
        grammar = None
        if params.grammar is not None:
            from llama_cpp import LlamaGrammar

            grammar = LlamaGrammar.from_string(params.grammar, verbose=False)
        stream: Any = self._llama.create_completion(
            prompt=list(tokens),
            grammar=grammar,
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_k=params.top_k,
            top_p=params.top_p,
            min_p=params.min_p,
            repeat_penalty=params.repeat_penalty,
            stop=stop,
            seed=params.seed if params.seed >= 0 else None,
            stream=True,
        )
        finish: str | None = None
        for chunk in stream:
            choice = chunk["choices"][0]
            if choice["text"]:
                on_text(choice["text"])
            finish = choice.get("finish_reason") or finish
            if cancel is not None and cancel.is_set():
                stream.close()
                return "cancelled"
        return "length" if finish == "length" else "stop"

    def close(self) -> None:
        with self._lock:
            self._llama.close()
