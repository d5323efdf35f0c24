"""The Chroma store on disk with the real embedder: search, touch, forget, and its record cache."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from npc_engine.config import load_config
from npc_engine.memory.chroma_records import RecordCache
from npc_engine.memory.chroma_store import ChromaMemoryStore
from npc_engine.memory.minilm import OfflineMiniLM
from npc_engine.memory.types import Memory, utc_now
from npc_engine.model_registry import ModelCache

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def embed() -> OfflineMiniLM:
    return OfflineMiniLM(ModelCache(load_config().cache_dir))


def lines() -> list[Memory]:
    old = utc_now() - timedelta(days=3)
    return [
        Memory(npc_id="mara", text="The ferry sank in the storm last winter.", importance=8),
        Memory(
            npc_id="mara",
            text="The player Aria likes salted herring.",
            player_id="aria",
            kind="dialogue",
            importance=4,
            created_at=old,
        ),
        Memory(npc_id="mara", text="Bram owes me three silver coins.", player_id="bram"),
    ]


def by_text(store: ChromaMemoryStore, player: str | None, query: str) -> dict[str, Memory]:
    return {c.memory.text: c.memory for c in store.search("mara", player, query, 10)}


def test_cold_and_warm_searches_agree(tmp_path: Path, embed: OfflineMiniLM) -> None:
    written = lines()
    store = ChromaMemoryStore(tmp_path, embed)
    store.add(written)
    warm = by_text(store, "aria", "What happened to the ferry?")
    store.close()

    reopened = ChromaMemoryStore(tmp_path, embed)  # empty cache: everything from SQLite
    cold = by_text(reopened, "aria", "What happened to the ferry?")
    assert set(cold) == set(warm) == {written[0].text, written[1].text}  # not Bram's
    for memory in written[:2]:
        for found in (cold[memory.text], warm[memory.text]):
            assert (found.id, found.player_id, found.kind, found.importance) == (
                memory.id,
                memory.player_id,
                memory.kind,
                memory.importance,
            )
            assert abs((found.created_at - memory.created_at).total_seconds()) < 1e-3
    best = reopened.search("mara", "aria", "What happened to the ferry?", 10)[0]
    assert best.memory.text == written[0].text and best.relevance > 0.3


def test_touch_and_forget_reach_cached_records(tmp_path: Path, embed: OfflineMiniLM) -> None:
    written = lines()
    store = ChromaMemoryStore(tmp_path, embed)
    store.add(written)
    by_text(store, "aria", "herring")  # both records now cached
    later = utc_now() + timedelta(hours=5)
    store.touch("mara", [written[1].id, written[1].id], later)  # cached: no read first
    touched = by_text(store, "aria", "herring")[written[1].text]
    assert touched.last_accessed_at is not None
    assert abs((touched.last_accessed_at - later).total_seconds()) < 1e-3

    assert store.forget("mara", memory_ids=[written[0].id]) == 1
    assert set(by_text(store, "aria", "ferry")) == {written[1].text}
    store.close()
    reopened = ChromaMemoryStore(tmp_path, embed)
    again = by_text(reopened, "aria", "herring")
    assert set(again) == {written[1].text}
    stored = again[written[1].text].last_accessed_at
    assert stored is not None and abs((stored - later).total_seconds()) < 1e-3


def test_record_cache_drops_the_least_recently_used() -> None:
    cache = RecordCache(capacity=2)
    first, second, third = (Memory(npc_id="n", text=t) for t in ("a", "b", "c"))
    cache.put([first, second])
    assert cache.get(first.id) is first  # first is now the most recent
    cache.put([third])
    assert len(cache) == 2
    assert cache.get(second.id) is None
    assert cache.get(first.id) is first and cache.get(third.id) is third


def test_recent_finds_the_newest_even_when_stored_out_of_order(
    tmp_path: Path, embed: OfflineMiniLM
) -> None:
    """Back-dated memories stored last must not hide newer ones stored before them."""
    now = utc_now()
    store = ChromaMemoryStore(tmp_path, embed)
    newest = [
        Memory(npc_id="mara", text=f"Fresh news {i}.", created_at=now - timedelta(hours=i + 1))
        for i in range(3)
    ]
    store.add(newest)
    store.add(  # an import of old memories, after the new ones
        [
            Memory(npc_id="mara", text=f"Old tale {i}.", created_at=now - timedelta(days=400 + i))
            for i in range(30)
        ]
    )
    latest = Memory(npc_id="mara", text="The bell rang just now.", created_at=now)
    store.add([latest])  # the last three stored: two old tales and this one
    store.add([Memory(npc_id="mara", text="Aria paid for her room.", player_id="aria")])
    expected = [latest.text, newest[0].text, newest[1].text]
    assert [m.text for m in store.recent("mara", None, 3)] == expected
    with_player = [m.text for m in store.recent("mara", "aria", 2)]
    assert with_player == ["Aria paid for her room.", latest.text]
    assert len(store.recent("mara", None, 100)) == 34
    assert store.recent("mara", None, 0) == []


def test_a_player_vector_fill_kept_before_the_writes_extend_holds_no_duplicate() -> None:
    """Found by a parallel test run: a search read the player's shard just after a write
    reached Chroma and kept what it read before the write appended the same ids to the
    cache; the next search asked Chroma for one id twice (DuplicateIDError)."""
    import numpy as np

    from npc_engine.memory.chroma_records import PlayerVectors, unit_rows

    cache = PlayerVectors(1 << 20)
    key = ("mara", "hero")
    rows = unit_rows(np.eye(3, dtype=np.float32))
    entry, epoch = cache.get(key)  # a search starts filling: nothing cached yet
    assert entry is None
    cache.put(key, ["m1", "m2"], rows[:2], epoch)  # it read m2, already in Chroma
    cache.extend(key, ["m2", "m3"], rows[1:])  # the write of m2 (and m3) appends
    (ids, matrix), _ = cache.get(key)
    assert ids == ["m1", "m2", "m3"]
    assert matrix.shape == (3, 3)
    assert np.allclose(matrix, rows)
