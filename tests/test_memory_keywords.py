"""The keyword half of hybrid retrieval (issue 16, item 2): SQLite FTS5 BM25 beside Chroma.
Real Chroma on disk; an embedder that makes everything alike but the barrel, so what the
keywords add shows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from npc_engine.memory.chroma_records import KEYWORD_INDEX
from npc_engine.memory.chroma_store import ChromaMemoryStore
from npc_engine.memory.keywords import KeywordIndex, query_terms
from npc_engine.memory.types import Memory

pytestmark = pytest.mark.timeout(120)


def same_vector(texts: list[str]) -> list[list[float]]:
    """Every text the same vector, except those about the barrel: orthogonal to all."""
    return [[0.0, 1.0] + [0.0] * 6 if "barrel" in t else [1.0] + [0.0] * 7 for t in texts]


def filler(count: int, player: str = "p1") -> list[Memory]:
    return [
        Memory("mara", f"The player {player} told me: chatter {i}", player_id=player)
        for i in range(count)
    ]


@pytest.fixture
def store(tmp_path: Path) -> ChromaMemoryStore:
    return ChromaMemoryStore(tmp_path / "chroma", same_vector)


def test_a_keyword_match_joins_the_candidates_the_meaning_half_missed(
    store: ChromaMemoryStore,
) -> None:
    key = Memory(
        "mara", 'The player p1 told me: "The cellar key is under the barrel."', player_id="p1"
    )
    store.add([*filler(40), key, *filler(40)])
    dense = store.search("mara", "p1", "Where is the cellar key?", 3, keywords=False)
    hybrid = store.search("mara", "p1", "Where is the cellar key?", 3)
    assert key.id not in [c.memory.id for c in dense]  # by meaning: the farthest of all
    joined = {c.memory.id: c for c in hybrid}
    assert joined[key.id].keyword_rank == 0 and joined[key.id].relevance == pytest.approx(0.0)
    store.close()


def test_keyword_search_keeps_players_and_npcs_apart(store: ChromaMemoryStore) -> None:
    store.add(
        [
            Memory("mara", "Aria hid the silver under the mill.", player_id="aria"),
            Memory("tomas", "Bo hid the silver under the mill.", player_id="bo"),
            Memory("mara", "Bo hid the silver in the chapel.", player_id="bo"),
            Memory("mara", "The mill burned down last winter."),  # Mara's own: any player
        ]
    )
    found = {c.memory.text for c in store.search("mara", "bo", "silver mill", 10)}
    assert found == {"Bo hid the silver in the chapel.", "The mill burned down last winter."}
    store.close()


def test_query_words_are_data_never_fts_syntax(store: ChromaMemoryStore) -> None:
    store.add([Memory("mara", "A note about NEAR and OR.", player_id="p1")])
    for hostile in ['" OR * NEAR(', "scope : p1", "words:*", "a" * 5000, "' -- ;"]:
        store.search("mara", "p1", hostile, 5)  # no error, nothing outside the scope
    assert query_terms("what is my name") == ['"name"']  # common words say nothing
    assert len(query_terms(" ".join(f"w{i}x" for i in range(500)))) == 16
    store.close()


def test_forget_supersede_and_a_lost_index_stay_in_step_with_chroma(tmp_path: Path) -> None:
    store = ChromaMemoryStore(tmp_path / "chroma", same_vector)
    key = Memory("mara", "The cellar key is under the barrel.", player_id="p1")
    old = Memory("mara", "The cellar key is in the well.", player_id="p1")
    lantern = Memory("mara", "The lantern is in the attic.", player_id="p1")
    store.add([*filler(10), key, old, lantern])
    store.mark_superseded("mara", "p1", [old.id], key.id)
    found = [c.memory.id for c in store.search("mara", "p1", "cellar key", 5)]
    assert key.id in found and old.id not in found  # superseded: history only
    kept = {m.id: m for m in store.of_player("mara", "p1")}  # the rest of its record stays
    assert kept[old.id].superseded_by == key.id and kept[old.id].text == old.text
    store.forget("mara", memory_ids=[key.id])
    assert key.id not in KeywordIndex(tmp_path / "chroma" / KEYWORD_INDEX).ids()
    store.close()
    (tmp_path / "chroma" / KEYWORD_INDEX).unlink()  # lost (or written by an older version)
    store = ChromaMemoryStore(tmp_path / "chroma", same_vector)
    store.open_collections_in_background().join(30)
    index = KeywordIndex(tmp_path / "chroma" / KEYWORD_INDEX)
    assert index.count() == store.count("mara") == 12
    found = {c.memory.id: c.keyword_rank for c in store.search("mara", "p1", "attic lantern", 5)}
    assert found[lantern.id] == 0
    assert store.search("mara", "p1", "barrel", 5, keywords=True)[0].keyword_rank is None
    store.close()


def test_a_players_vectors_kept_in_ram_follow_adds_and_forgets(store: ChromaMemoryStore) -> None:
    """The exact search over one player's memories reads their vectors from RAM after the
    first search: a memory written later is found, a forgotten one is not."""
    store.add(filler(30))
    first = store.search("mara", "p1", "the barrel", 5, keywords=False)
    assert first and max(c.relevance for c in first) == pytest.approx(0.0)
    barrel = Memory("mara", "The key is under the barrel.", player_id="p1")
    store.add([barrel])
    found = store.search("mara", "p1", "the barrel", 5, keywords=False)
    assert found[0].memory.id == barrel.id and found[0].relevance == pytest.approx(1.0)
    store.forget("mara", memory_ids=[barrel.id])
    after = store.search("mara", "p1", "the barrel", 5, keywords=False)
    assert barrel.id not in {c.memory.id for c in after}
    store.close()


def tick_world() -> list[Memory]:
    """Mara's memories over three days: her own, two players', rumours she heard."""
    day = datetime(2026, 12, 1, tzinfo=UTC)
    memories = []
    for index in range(30):
        memories.append(
            Memory(
                "mara",
                f"News {index} from the harbour.",
                player_id=(None, "p1", "p2")[index % 3],
                importance=1 + index % 10,
                created_at=day + timedelta(hours=2 * index),
                game_time=float(60 * index) if index % 2 else None,
            )
        )
    for index in range(6):
        memories.append(
            Memory(
                "mara",
                f"Tom said the bell rang {index} times.",
                kind="rumour",
                importance=4,
                created_at=day + timedelta(hours=5 * index),
                game_time=float(100 * index),
                source="guard_tom",
                origin=f"wren/origin-{index}",
                hops=1,
            )
        )
    memories.append(Memory("tom", "Not Mara's.", origin="wren/origin-9", kind="rumour"))
    return memories


def test_a_tick_reads_the_index_as_it_would_read_chroma(tmp_path: Path) -> None:
    """The local index answers what a world tick asks (news in a window, most important
    first; rumours to fade; origins known) exactly as scanning Chroma does, after a schema
    change too (the index is remade from Chroma before it answers)."""
    import sqlite3

    import chromadb
    from chromadb.config import Settings

    store = ChromaMemoryStore(tmp_path / "chroma", same_vector)
    world = tick_world()
    # Into Chroma itself (as an import writes), rumours too: a scan must see them all (a
    # tick's own rumours wait outside Chroma, tests/test_held_rumours.py).
    store.add_with_embeddings(world, same_vector([m.searchable for m in world]))
    store.close()
    with sqlite3.connect(tmp_path / "chroma" / KEYWORD_INDEX) as db:  # an older layout
        db.execute("PRAGMA user_version=2")
    local = ChromaMemoryStore(tmp_path / "chroma", same_vector)  # no background fill
    scanning = ChromaMemoryStore(
        None,
        same_vector,
        client=chromadb.PersistentClient(
            path=str(tmp_path / "chroma"), settings=Settings(anonymized_telemetry=False)
        ),
    )
    assert scanning.shared and not local.shared
    since, until = world[3].created_at, world[25].created_at

    def news(store: ChromaMemoryStore) -> list[tuple[str, int]]:
        return [(m.id, m.importance) for m in store.rumours.made_between("mara", since, until, 4)]

    expected = sorted(
        (m for m in world[:36] if since <= m.created_at < until and m.importance >= 4),
        key=lambda m: (-m.importance, m.created_at),
    )
    assert news(local) == news(scanning) == [(m.id, m.importance) for m in expected]
    read_back = next(iter(local.rumours.made_between("mara", since, until, 4)))
    assert read_back.text == expected[0].text and read_back.player_id == expected[0].player_id
    now = world[29].created_at
    for game_now, fade in ((None, 40 * 60.0), (1000.0, 600.0)):  # real time, game time
        fading = local.rumours.faded_rumours("mara", now, game_now, fade)
        assert sorted(fading) == sorted(scanning.rumours.faded_rumours("mara", now, game_now, fade))
        assert len(fading) == 4  # some faded, some not: the rule is exercised both ways
    asked = ["wren/origin-1", "wren/origin-5", "wren/origin-9", "nobody/else"]
    assert local.rumours.origins_known("mara", asked) == scanning.rumours.origins_known(
        "mara", asked
    )
    assert local.rumours.origins_known("mara", asked) == {"wren/origin-1", "wren/origin-5"}
    local.forget("mara", memory_ids=[world[30].id])
    assert "wren/origin-0" not in local.rumours.origins_known("mara", ["wren/origin-0"])
    local.close()
    scanning.close()


def test_the_index_is_trusted_after_a_clean_close_and_compared_after_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restart after a clean close answers ticks from the index at once (comparing it
    with Chroma read every collection: minutes in a big town); after a crash between the
    two writes, the index is compared first and the memory Chroma kept is found."""
    world = tick_world()[:30]
    store = ChromaMemoryStore(tmp_path / "chroma", same_vector)
    store.add(world)
    store.close()
    reopened = ChromaMemoryStore(tmp_path / "chroma", same_vector)
    assert reopened.index_synced.is_set()  # clean close: no comparison needed
    late = Memory(
        "mara", "The bell rang at midnight.", importance=9, created_at=world[-1].created_at
    )
    # The process dies after Chroma stored the memory, before the index did.
    monkeypatch.setattr(reopened._keywords, "add", lambda memories: None)
    reopened.add([late])
    reopened._keywords._db.close()  # the process dies: no clean close
    again = ChromaMemoryStore(tmp_path / "chroma", same_vector)
    assert not again.index_synced.is_set()
    since = world[0].created_at
    news = list(
        again.rumours.made_between("mara", since, late.created_at + timedelta(seconds=1), 9)
    )
    assert late.id in [m.id for m in news]
    again.close()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:legacy embedding function config:DeprecationWarning")
def test_chromas_write_log_stays_short_as_a_collection_is_written(tmp_path: Path) -> None:
    """Chroma keeps each write in its log until the collection's vectors are saved, at its
    sync threshold (1,000 by default): an NPC's collections rarely reach it, so the log
    held every memory and each write got slower (145 ms at 100 NPCs x 1,000 memories).
    Memory collections save every 64 writes; one made by an older version is lowered."""
    import sqlite3

    import chromadb
    from chromadb.config import Settings

    from npc_engine.memory.chroma_records import MEMORY_COLLECTION_CONFIG, own_name

    def log_rows() -> int:
        with sqlite3.connect(tmp_path / "chroma" / "chroma.sqlite3") as db:
            return int(db.execute("SELECT count(*) FROM embeddings_queue").fetchone()[0])

    store = ChromaMemoryStore(tmp_path / "chroma", same_vector)
    for index in range(200):  # one write per turn, as a game writes
        store.add([Memory("mara", f"Line {index} of the evening.")])
    assert store.count("mara") == 200
    assert log_rows() < 100  # saved at 64, 128, 192: the older writes left the log
    store.close()
    # A collection made the old way (Chroma's default threshold) is lowered when opened.
    client = chromadb.PersistentClient(
        path=str(tmp_path / "chroma"), settings=Settings(anonymized_telemetry=False)
    )
    old = client.get_or_create_collection(
        own_name("tom"), embedding_function=None, configuration={"hnsw": {"space": "cosine"}}
    )
    assert old.configuration["hnsw"]["sync_threshold"] == 1000
    store = ChromaMemoryStore(tmp_path / "chroma", same_vector)
    store.add([Memory("tom", "The gate closed early.")])
    wanted = MEMORY_COLLECTION_CONFIG["hnsw"]["sync_threshold"]
    assert client.get_collection(own_name("tom")).configuration["hnsw"]["sync_threshold"] == wanted
    store.close()


def test_a_players_memories_are_counted_per_npc_through_writes_and_deletes(
    tmp_path: Path,
) -> None:
    """count_of picks exact search or the vector index for a player's recall."""
    index = KeywordIndex(tmp_path / KEYWORD_INDEX)
    mine = filler(5, "p1")
    index.add([*mine, *filler(3, "p2"), Memory("mara", "The mill burned.")])
    index.add([Memory("tomas", "Aria paid.", player_id="p1")])
    assert [index.count_of("mara", p) for p in ("p1", "p2", "p3")] == [5, 3, 0]
    assert index.count_of("tomas", "p1") == 1 and index.count_of("nobody", "p1") == 0
    index.delete([m.id for m in mine[:2]])
    index.add(mine[2:3])  # written again: replaced, not counted twice
    assert index.count_of("mara", "p1") == 3
