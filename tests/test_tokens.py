"""Piecewise prompt tokenization gives exactly the whole-text tokens, and reuses pieces."""

from __future__ import annotations

from pathlib import Path

import pytest

from npc_engine.config import load_config
from npc_engine.generation.llama import LlamaGenerator
from npc_engine.generation.tokens import PieceTokenizer
from npc_engine.runtime import resolve_chat_model


def test_pieces_start_at_markers_and_are_tokenized_once() -> None:
    calls: list[tuple[str, bool]] = []

    def tokenize(text: str, add_bos: bool) -> list[int]:
        calls.append((text, add_bos))
        return [0] * add_bos + [ord(c) for c in text]

    tokenizer = PieceTokenizer(tokenize, ["<s>", "<s>x"])
    text = "head<s>x one<s>two"
    whole = [0] + [ord(c) for c in text]
    assert tokenizer(text, True) == whole
    # Split before each marker (the longer one wins); BOS only on the first piece.
    assert calls == [("head", True), ("<s>x one", False), ("<s>two", False)]
    calls.clear()
    assert tokenizer(text, True) == whole
    assert calls == []  # every piece was cached
    assert tokenizer(text + "<s>three", True) == whole + [ord(c) for c in "<s>three"]
    assert calls == [("<s>three", False)]  # only the new piece
    assert tokenizer("", False) == []
    assert PieceTokenizer(tokenize, [])("abc", False) == [97, 98, 99]


@pytest.mark.slow
def test_real_model_prompts_tokenize_the_same_piece_by_piece() -> None:
    path, chat_format = resolve_chat_model(load_config(), lambda _message: None)
    generator = LlamaGenerator(Path(path), n_ctx=2048, chat_format=chat_format)
    assert generator._prompt_tokenizer is not None  # the default model's template qualifies
    lines = [
        "Any rooms free tonight?",
        "  spaces around  ",
        "Ünïcödé — «quotes» and 🐟 emoji",
        "",
        "line one\nline two\n\n",
        "<|im_start|> typed by a player",
        "trailing newline\n",
    ]
    messages = [{"role": "system", "content": "You are Mara, the innkeeper.\n"}]
    for index, line in enumerate(lines):
        messages.append({"role": "user", "content": line})
        prompt = generator.render(messages)
        assert prompt.tokens == generator.tokenize(prompt.text, add_bos=False), line
        messages.append({"role": "assistant", "content": f"Reply {index}: *nods* {line}"})
    generator.close()
