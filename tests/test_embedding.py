"""Our MiniLM embedder gives Chroma's vectors, without padding every text to 256 tokens."""

from __future__ import annotations

import numpy as np
import pytest

from npc_engine.config import load_config
from npc_engine.memory.chroma_store import OfflineMiniLM
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
