"""The sentence embedder of memories: all-MiniLM-L6-v2 (ONNX) on verified offline files."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from npc_engine.model_registry import EMBEDDING_MODEL, MODELS, ModelCache


class OfflineMiniLM:
    """all-MiniLM-L6-v2 (ONNX) on our verified offline files, mean-pooled and normalised.

    Written here rather than using Chroma's ``ONNXMiniLM_L6_V2`` because that class pads
    every text to 256 tokens: NPC memories are 10-40 tokens, so it spent ~10× the work
    (31 ms per query, 36 memories/s written, measured by tools/bench.py). Padding to the
    longest text in a batch gives the same vectors (padding is masked out) much faster.
    """

    MAX_TOKENS = 256  # what sentence-transformers uses for this model
    BATCH = 64

    def __init__(self, cache: ModelCache, *, threads: int | None = None) -> None:
        import onnxruntime
        from tokenizers import Tokenizer

        spec = MODELS[EMBEDDING_MODEL]
        model_dir = cache.require(spec)  # raises with "what is missing, how to provide it"
        self._tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self._tokenizer.enable_truncation(max_length=self.MAX_TOKENS)
        self._tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle ONNX threads spin-wait by default, taking CPU from the llama.cpp threads that
        # start decoding right after a recall (first token ~35% slower on 2 cores).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
        self._session = onnxruntime.InferenceSession(
            str(model_dir / "model.onnx"), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._lock = threading.Lock()
        # A turn embeds the player's line three times (memory recall, the lorebook, then
        # the memory written): the later ones, and repeated lines, are answered from here.
        self._recent: OrderedDict[str, list[float]] = OrderedDict()

    RECENT = 64  # texts remembered
    RECENT_BATCH = 8  # batches up to this size are remembered (a turn's); bulk loads not

    def __call__(self, texts: Sequence[str]) -> list[list[float]]:
        if not texts:
            return []
        with self._lock:
            known = {text: self._recent[text] for text in texts if text in self._recent}
        missing = [text for text in dict.fromkeys(texts) if text not in known]
        if missing:
            fresh = dict(zip(missing, self._vectors(missing), strict=True))
            if len(missing) <= self.RECENT_BATCH:
                with self._lock:
                    self._recent.update(fresh)
                    while len(self._recent) > self.RECENT:
                        self._recent.popitem(last=False)
            known |= fresh
        return [known[text] for text in texts]

    def _vectors(self, texts: Sequence[str]) -> list[list[float]]:
        # Each distinct text once (a world tick writes one rumour to three listeners), and
        # similar lengths share a batch, so little is padded; results go back in order.
        distinct = list(dict.fromkeys(texts))
        order = sorted(range(len(distinct)), key=lambda i: len(distinct[i]))
        vectors: list[Any] = [None] * len(distinct)
        with self._lock:  # one ONNX session; keep its use serial
            for start in range(0, len(order), self.BATCH):
                chunk = order[start : start + self.BATCH]
                for index, vector in zip(
                    chunk, self._embed([distinct[i] for i in chunk]), strict=True
                ):
                    vectors[index] = vector.tolist()
        by_text = dict(zip(distinct, vectors, strict=True))
        return [by_text[text] for text in texts]

    def _embed(self, texts: list[str]) -> Any:
        import numpy as np

        encoded = self._tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encoded], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encoded], dtype=np.int64)
        hidden = self._session.run(
            None,
            {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)},
        )[0]
        weights = mask[..., None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.clip(norms, 1e-12, None)).astype(np.float32)
