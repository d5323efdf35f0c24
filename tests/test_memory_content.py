"""Issue 16, item 1: memories are found by what was said, not by the third-person wrapper
the prompt shows; ``npc-engine memory reindex`` converts a store of an older version."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from npc_engine.config import load_config
from npc_engine.memory.chroma_records import CONTENT_VECTORS
from npc_engine.memory.chroma_store import ChromaMemoryStore
from npc_engine.memory.minilm import OfflineMiniLM
from npc_engine.memory.types import Memory, utc_now
from npc_engine.model_registry import ModelCache
from npc_engine.turns import player_line_memory, reply_memory

from .conftest import REPO, run_cli


@pytest.fixture(scope="module")
def minilm() -> OfflineMiniLM:
    return OfflineMiniLM(ModelCache(load_config().cache_dir))


def test_vectors_come_from_what_was_said(tmp_path: Path, minilm: OfflineMiniLM) -> None:
    store = ChromaMemoryStore(tmp_path / "chroma", minilm)
    line = player_line_memory("mara", "p1", "I used to be a blacksmith.", utc_now())
    assert line.text == 'The player p1 told me: "I used to be a blacksmith."'
    assert line.content == "I used to be a blacksmith."
    store.add([line])
    collection = store.memory_collections()
    [stored] = [
        c.get(ids=[line.id], include=["embeddings", "metadatas", "documents"])
        for c in collection.values()
        if c.get(ids=[line.id])["ids"]
    ]
    assert stored["documents"][0] == line.text  # the prompt still shows the wrapper
    assert stored["metadatas"][0]["content"] == line.content
    vector = np.asarray(stored["embeddings"][0])
    assert np.allclose(vector, minilm([line.content])[0], atol=1e-5)
    assert not np.allclose(vector, minilm([line.text])[0], atol=1e-3)
    assert store.format.current() == CONTENT_VECTORS


def test_reindex_converts_a_store_of_the_older_version(
    tmp_path: Path, minilm: OfflineMiniLM
) -> None:
    """A store written the old way (wrapper embedded whole, no content metadata, no format
    mark) is re-embedded from the words inside the wrapper."""
    path = tmp_path / "chroma"
    old = ChromaMemoryStore(path, minilm)
    said = ["My name is Aria.", "I used to be a blacksmith.", "I fear the sea."]
    memories = [player_line_memory("mara", "p1", line, utc_now()) for line in said]
    memories.append(reply_memory("mara", "p1", "Aye, love.", utc_now()))
    memories.append(Memory("mara", "A storm sank the herring fleet.", kind="event"))
    written_the_old_way = [Memory(**{**m.__dict__, "content": None}) for m in memories]
    old.add_with_embeddings(written_the_old_way, minilm([m.text for m in memories]))
    old.saves.saves_collection().delete(ids=["\x1fformat"])
    reopened = ChromaMemoryStore(path, minilm)
    assert reopened.format.current() is None  # older store: the engine says to reindex

    seen: list[tuple[int, int]] = []
    assert reopened.format.reindex(lambda done, total: seen.append((done, total))) == 5
    assert seen[-1] == (5, 5)
    assert reopened.format.current() == CONTENT_VECTORS
    for memory in reopened.recent("mara", "p1", 10):
        expected = memory.text.split(': "', 1)[1][:-1] if ': "' in memory.text else None
        assert memory.content == expected
    for collection in reopened.memory_collections().values():
        page = collection.get(include=["embeddings", "metadatas", "documents"])
        for vector, meta, document in zip(
            page["embeddings"], page["metadatas"], page["documents"], strict=True
        ):
            words = meta.get("content") or document
            assert np.allclose(vector, minilm([words])[0], atol=1e-5)
    after = reopened.search("mara", "p1", "What was my old trade?", 5)
    assert after[0].memory.text == 'The player p1 told me: "I used to be a blacksmith."'


@pytest.mark.slow
def test_memory_reindex_command(tmp_path: Path) -> None:
    data = tmp_path / "data"
    done = run_cli("memory", "reindex", "--data-dir", str(data), timeout=120)
    assert done.returncode == 0, done.stderr
    assert "reindexed 0 memories" in done.stderr


@pytest.mark.timeout(300)
def test_recall_probe_facts_told_once_are_found_after_ten_turns(tmp_path: Path) -> None:
    """The first 20 facts of the committed probe, each followed by 10 unrelated turns, with
    the engine's recall on Chroma and MiniLM (the full probe: tools/recall_probe.py)."""
    import sys

    sys.path.insert(0, str(REPO / "tools"))
    from recall_probe import run

    outcome = run(tmp_path, 10, content_vectors=True, facts=20)
    assert outcome.recall >= 0.95, outcome.misses
