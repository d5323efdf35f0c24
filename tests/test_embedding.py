"""Our MiniLM embedder gives Chroma's vectors, without padding every text to 256 tokens."""

from __future__ import annotations

import numpy as np
import pytest

from npc_engine.config import load_config
from npc_engine.memory.minilm import OfflineMiniLM
from npc_engine.model_registry import EMBEDDING_MODEL, MODELS, ModelCache

pytestmark = pytest.mark.slow


def test_vectors_match_chromas_reference_implementation() -> None:
    from chromadb.utils.embedding_functions import ONNXMiniLM_L6_V2

    cache = ModelCache(load_config().cache_dir)
    model_dir = cache.require(MODELS[EMBEDDING_MODEL])

    class Reference(ONNXMiniLM_L6_V2):
        DOWNLOAD_PATH = model_dir.parent

    texts = [
        'The player aria told me: "My name is Aria"',
        "A storm tore the sails of the ferry this morning.",
        "hi",
        "salt " * 40,
    ]
    ours = np.array(OfflineMiniLM(cache)(texts))
    reference = np.array(Reference(preferred_providers=["CPUExecutionProvider"])(texts))
    assert ours.shape == reference.shape == (4, 384)
    assert np.allclose((ours * reference).sum(axis=1), 1.0, atol=1e-4)
    assert OfflineMiniLM(cache)([]) == []


@pytest.mark.timeout(60)
def test_a_turns_texts_are_embedded_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The player's line is embedded for recall, then written with the reply: the write
    runs the model for the reply alone, and gets the same vectors as a fresh embedder."""
    cache = ModelCache(load_config().cache_dir)
    embed = OfflineMiniLM(cache)
    ran: list[list[str]] = []
    model = embed._embed
    monkeypatch.setattr(embed, "_embed", lambda texts: ran.append(texts) or model(texts))
    line, reply = "Is it going to rain?", "Gulls came inland at noon, love. A gale by night."
    [query] = embed([line])
    written = embed([line, reply])
    assert ran == [[line], [reply]]
    assert written[0] == query
    assert np.allclose(np.array(written), np.array(OfflineMiniLM(cache)([line, reply])), atol=1e-6)
    bulk = [f"Entry {n} of the lorebook." for n in range(OfflineMiniLM.RECENT_BATCH + 1)]
    embed(bulk)
    embed(bulk[:1])  # a bulk load is not remembered: it would push out the turn's lines
    assert ran[-1] == bulk[:1]
