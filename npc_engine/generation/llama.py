"""llama-cpp-python backend: any GGUF, rendered with the chat template stored in the GGUF."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from npc_engine.errors import GenerationError, ModelUnavailableError
from npc_engine.generation.base import (
    GenerationParams,
    GenerationStats,
    Message,
    RenderedPrompt,
)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    count = 0
    for left, right in zip(a, b, strict=False):
        if left != right:
            break
        count += 1
    return count


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
    ) -> None:
        from llama_cpp import Llama

        if not model_path.is_file():
            raise ModelUnavailableError(f"{model_path}: GGUF file not found")
        threads = n_threads or os.cpu_count() or 1
        try:
            self._llama = Llama(
                model_path=str(model_path),
                n_ctx=n_ctx,
                n_batch=256,  # smaller prompt chunks: a cancel is noticed sooner
                n_threads=threads,
                n_threads_batch=threads,
                n_gpu_layers=n_gpu_layers,
                seed=seed if seed >= 0 else 0xFFFFFFFF,
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            raise ModelUnavailableError(f"{model_path}: cannot load this GGUF ({exc})") from exc
        self.name = model_path.name
        self.model_path = model_path
        self.n_ctx = n_ctx
        self._lock = threading.Lock()
        self._formatter = self._make_formatter(chat_format)

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

    def render(self, messages: Sequence[Message]) -> RenderedPrompt:
        result = self._formatter(messages=list(messages))
        stop = [
            s for s in ([result.stop] if isinstance(result.stop, str) else result.stop or []) if s
        ]
        tokens = self.tokenize(result.prompt, add_bos=not result.added_special)
        return RenderedPrompt(text=result.prompt, stop=stop, tokens=tokens)

    def generate(
        self,
        prompt: RenderedPrompt,
        params: GenerationParams,
        on_text: Callable[[str], None],
        cancel: threading.Event | None = None,
    ) -> GenerationStats:
        tokens = prompt.tokens if prompt.tokens is not None else self.tokenize(prompt.text)
        with self._lock:
            llama = self._llama
            kept = _common_prefix(llama._input_ids[: llama.n_tokens].tolist(), tokens)
            # llama-cpp-python re-evaluates at least the last prompt token.
            stats = GenerationStats(
                prompt_tokens=len(tokens), cached_tokens=min(kept, len(tokens) - 1)
            )
            try:
                stream: Any = llama.create_completion(
                    prompt=tokens,
                    max_tokens=params.max_tokens,
                    temperature=params.temperature,
                    top_p=params.top_p,
                    repeat_penalty=params.repeat_penalty,
                    stop=list(dict.fromkeys([*prompt.stop, *params.stop])),
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
                        finish = "cancelled"
                        break
            except Exception as exc:
                raise GenerationError(f"generation failed: {exc}") from exc
            stats.completion_tokens = max(llama.n_tokens - len(tokens), 0)
            stats.finish_reason = (
                "length"
                if finish == "length"
                else ("cancelled" if finish == "cancelled" else "stop")
            )
            return stats

    def close(self) -> None:
        with self._lock:
            self._llama.close()
