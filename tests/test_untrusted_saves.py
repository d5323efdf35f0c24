"""An imported save file (``.npcsave``, received from someone else) is untrusted: bounded
after decompression, validated in full, imported all-or-nothing, and it never reaches
another save, another player, or the engine's ability to start."""

from __future__ import annotations

import contextlib
import copy
import gzip
import json
import logging
import time
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from npc_engine.ids import check_save_name, save_name_problem
from npc_engine.memory import chroma_records, chroma_saves, saves
from npc_engine.memory.chroma_records import own_name, player_shard
from npc_engine.memory.chroma_saves import ONE_VECTOR, PENDING_LOAD
from npc_engine.memory.chroma_store import ChromaMemoryStore
from npc_engine.memory.in_memory import InMemoryStore
from npc_engine.memory.save_imports import read_import
from npc_engine.memory.saves import SaveError, check_save_id, decode_export, pack
from npc_engine.memory.types import Memory, utc_now
from npc_engine.protocol import REQUEST_ADAPTER

from .test_game_loop import hashed_embed

DIM = 1024  # hashed_embed's


def store_at(path: Path) -> ChromaMemoryStore:
    return ChromaMemoryStore(path, hashed_embed)


def snapshot(store: ChromaMemoryStore) -> dict[str, list[Any]]:
    """Every record of every non-empty collection, vectors included."""
    found: dict[str, list[Any]] = {}
    for collection in store._client.list_collections():
        got = store._client.get_collection(collection.name).get(
            include=["documents", "metadatas", "embeddings"]
        )
        if got["ids"]:
            found[collection.name] = sorted(
                (i, d, json.dumps(m, sort_keys=True), [round(float(x), 6) for x in e])
                for i, d, m, e in zip(
                    got["ids"], got["documents"], got["metadatas"], got["embeddings"], strict=True
                )
            )
    return found


def as_document(data: bytes) -> dict[str, Any]:
    return dict(json.loads(gzip.decompress(data)))


def as_file(document: dict[str, Any]) -> bytes:
    return gzip.compress(json.dumps(document).encode("utf-8"))


def record(memory: Memory, vector: list[float] | None = None) -> dict[str, Any]:
    return {
        "document": memory.text,
        "metadata": chroma_records.metadata_of(memory),
        "vector": vector if vector is not None else hashed_embed([memory.text])[0],
    }


def crafted(
    memories: dict[str, list[str]], records: dict[str, Any], state: dict[str, Any] | None = None
) -> bytes:
    return as_file(
        {
            "format": "npc-engine-save",
            "version": 1,
            "save_id": "x",
            "created_at": "2026-01-01T00:00:00Z",
            "manifest": {"memories": memories, "state": state or {}},
            "records": records,
        }
    )


@pytest.fixture
def world(tmp_path: Path) -> tuple[ChromaMemoryStore, Memory, bytes]:
    """A store with a save s1 (mara's memory X and p1's) and a valid file of another world."""
    store = store_at(tmp_path / "chroma")
    x = Memory("mara", "The bell rang twice.", kind="event")
    store.add([x, Memory("mara", "p1 paid in silver.", player_id="p1")])
    store.state.save_state("trust:mara:p1", {"trust": 40})
    store.saves.create_save("s1")
    other = store_at(tmp_path / "other")
    other.add([Memory("mara", "Gulls stole the bread.", player_id="p2")])
    other.state.save_state("trust:mara:p2", {"trust": -10})
    other.saves.create_save("theirs")
    return store, x, other.saves.export_save("theirs")


def live_texts(store: ChromaMemoryStore) -> set[str]:
    return {m.text for p in (None, "p1", "p2") for m in store.recent("mara", p, 100)}


# -- 1. a crafted file cannot brick the data directory ----------------------------------


@pytest.mark.timeout(60)
def test_a_collection_name_with_a_trailing_newline_is_refused_at_import(world: Any) -> None:
    store, _, _ = world
    fake = Memory("mara", "FORGED TEXT")
    name = own_name("mara") + "\n"
    before = snapshot(store)
    with pytest.raises(SaveError) as refused:
        store.saves.import_save("evil", crafted({name: [fake.id]}, {fake.id: record(fake)}))
    assert refused.value.field == "file"
    assert snapshot(store) == before
    store.saves.load_save("s1")
    assert "The bell rang twice." in live_texts(store)


def plant_damaged_save(store: ChromaMemoryStore, manifest: dict[str, Any]) -> None:
    """A save as an engine without these checks imported it: stored, never validated."""
    store.saves.saves_collection().upsert(
        ids=["damaged"],
        metadatas=[{"kind": "save", "created_at": 1.0, "memories": 1, "manifest": pack(manifest)}],
        embeddings=ONE_VECTOR,
    )
    store.saves._referenced_ids = None


DAMAGED = {
    "newline in a collection": lambda x: {
        "memories": {own_name("mara"): [x.id], own_name("guard") + "\n": ["m1"]},
        "state": {},
    },
    "state document not text": lambda x: {
        "memories": {own_name("mara"): [x.id]},
        "state": {"trust:mara:p1": [123, {}]},
    },
}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("damage", sorted(DAMAGED))
def test_a_damaged_save_neither_loads_halfway_nor_bricks_the_next_start(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "chroma"
    store = store_at(path)
    x = Memory("mara", "The bell rang twice.")
    store.add([x, Memory("mara", "Made after every save.")])
    store.saves.create_save("s1")
    plant_damaged_save(store, DAMAGED[damage](x))
    before = snapshot(store)
    with pytest.raises(SaveError) as refused:
        store.saves.load_save("damaged")
    assert refused.value.field == "save_id"
    assert snapshot(store) == before  # refused before anything moved
    # A load of it left pending (an older engine crashed, or failed, partway): the next
    # start gives it up with a logged error instead of raising at every start.
    store.saves.saves_collection().upsert(
        ids=[PENDING_LOAD],
        metadatas=[{"kind": "pending", "save_id": "damaged"}],
        embeddings=ONE_VECTOR,
    )
    store.close()
    with caplog.at_level(logging.ERROR, logger="npc_engine.memory.chroma_saves"):
        reopened = store_at(path)
    assert "could not finish loading save 'damaged'" in caplog.text
    assert not reopened.saves.saves_collection().get(ids=[PENDING_LOAD])["ids"]
    reopened.close()
    again = store_at(path)  # and stays startable
    again.saves.load_save("s1")
    assert {m.text for m in again.recent("mara", None, 10)} == {
        "The bell rang twice.",
        "Made after every save.",
    }


@pytest.mark.timeout(60)
def test_a_pending_load_the_store_can_finish_is_finished(tmp_path: Path) -> None:
    path = tmp_path / "chroma"
    store = store_at(path)
    store.add([Memory("mara", "Before.")])
    store.saves.create_save("s1")
    store.add([Memory("mara", "After.")])
    store.saves.saves_collection().upsert(
        ids=[PENDING_LOAD], metadatas=[{"kind": "pending", "save_id": "s1"}], embeddings=ONE_VECTOR
    )
    store.close()
    reopened = store_at(path)
    assert [m.text for m in reopened.recent("mara", None, 10)] == ["Before."]


# -- 2. an import reaches nothing but its own records -----------------------------------


@pytest.mark.timeout(60)
def test_a_record_the_manifest_does_not_name_is_refused(world: Any) -> None:
    store, x, _ = world
    store.forget("mara", memory_ids=[x.id])  # X now waits in the archive for s1
    forged = Memory("guard", "FORGED TEXT", player_id="p9", id=x.id)
    before = snapshot(store)
    with pytest.raises(SaveError):
        store.saves.import_save("evil", crafted({}, {x.id: record(forged)}))
    assert snapshot(store) == before
    store.saves.load_save("s1")
    assert "The bell rang twice." in live_texts(store)
    assert "FORGED TEXT" not in live_texts(store)


@pytest.mark.timeout(60)
def test_an_imported_id_that_exists_here_cannot_rewrite_another_save(world: Any) -> None:
    store, x, _ = world
    store.forget("mara", memory_ids=[x.id])
    forged = Memory("mara", "FORGED TEXT", kind="event", id=x.id)
    info = store.saves.import_save(
        "evil", crafted({own_name("mara"): [x.id]}, {x.id: record(forged)})
    )
    assert info.memories == 1
    store.saves.load_save("s1")
    assert store.recent("mara", None, 10)[0].text == "The bell rang twice."
    assert store.recent("mara", None, 10)[0].id == x.id
    store.saves.load_save("evil")  # the import's own copy, under an id of its own
    [mine] = store.recent("mara", None, 10)
    assert mine.text == "FORGED TEXT" and mine.id != x.id
    store.saves.load_save("s1")
    assert [m.text for m in store.recent("mara", None, 10)] == ["The bell rang twice."]
    assert store.state.load_state("trust:mara:p1") == {"trust": 40}


OTHER_PLACE = {
    "another npc": lambda m: Memory("guard", m.text, player_id="p1", id=m.id),
    "another player": lambda m: Memory("mara", m.text, player_id="p3", id=m.id),
    "no player": lambda m: Memory("mara", m.text, id=m.id),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", sorted(OTHER_PLACE))
def test_record_metadata_must_agree_with_its_collection(world: Any, where: str) -> None:
    store, _, _ = world
    memory = Memory("mara", "I owe p1 nothing.", player_id="p1")
    moved = OTHER_PLACE[where](memory)
    shard = player_shard("mara", "p1")
    for bad in (
        crafted({shard: [memory.id]}, {memory.id: record(moved)}),
        crafted(
            {shard: [memory.id]},
            {
                memory.id: {
                    **record(memory),
                    "metadata": {**record(memory)["metadata"], "kind": "x"},
                }
            },
        ),
    ):
        before = snapshot(store)
        with pytest.raises(SaveError):
            store.saves.import_save("evil", bad)
        assert snapshot(store) == before


@pytest.mark.timeout(60)
def test_a_refused_import_over_max_saves_writes_nothing(
    world: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _, theirs = world
    monkeypatch.setattr(chroma_saves, "MAX_SAVES", 1)
    before = snapshot(store)
    with pytest.raises(SaveError) as refused:
        store.saves.import_save("second", theirs)
    assert refused.value.field == "save_id"
    assert snapshot(store) == before
    assert store.saves.import_save("s1", theirs).memories == 1  # replacing one is allowed


@pytest.mark.timeout(60)
def test_export_import_renames_consistently(tmp_path: Path) -> None:
    source = store_at(tmp_path / "a")
    old = Memory("mara", "p1 is called Bob.", kind="fact", player_id="p1", subject="name")
    new = Memory("mara", "p1 is called Rob.", kind="fact", player_id="p1", subject="name")
    told = Memory("mara", "Rumour of a storm.", kind="rumour", origin="wren/abc", source="wren")
    source.add([old, new, told])
    source.mark_superseded("mara", "p1", [old.id], new.id)
    told_back = Memory("wren", "Mara heard it too.", kind="rumour", origin=f"mara/{told.id}")
    source.add([told_back])
    turn = {"player_text": "Hi", "reply_text": "Aye.", "memory_ids": [new.id], "noted": []}
    turn["noted"] = [[new.id, "- p1 is called Rob."]]
    labels = {"kind": "history", "npc_id": "mara", "player_id": "p1"}
    source.state.save_state("history:mara\x1fp1", {"turns": [turn]}, labels)
    source.state.save_state("player:p1", {"flags": {"paid": True}, "game_time": 30.0})
    source.state.save_state("world-tick", {"last": 1000.0})
    source.saves.create_save("slot")
    target = store_at(tmp_path / "b")
    assert target.saves.import_save("copy", source.saves.export_save("slot")).memories == 4
    target.saves.load_save("copy")
    facts = {m.text: m for m in target.of_player("mara", "p1")}
    renamed_new = facts["p1 is called Rob."]
    assert renamed_new.id != new.id
    assert facts["p1 is called Bob."].superseded_by == renamed_new.id
    [rumour] = target.rumours.rumours_of("wren")
    [mine] = target.rumours.rumours_of("mara")
    assert rumour.origin == f"mara/{mine.id}" and mine.origin == "wren/abc"
    history = target.state.load_state("history:mara\x1fp1")
    assert history is not None
    assert history["turns"][0]["memory_ids"] == [renamed_new.id]
    assert history["turns"][0]["noted"] == [[renamed_new.id, "- p1 is called Rob."]]
    assert target.state.load_state("player:p1") == {"flags": {"paid": True}, "game_time": 30.0}
    assert target.state.state_keys({"kind": "history", "npc_id": "mara"}) == ["history:mara\x1fp1"]


# -- 3. decompression bombs ---------------------------------------------------------------


def bomb(gib: float = 1.0) -> bytes:
    """A 1 GiB gzip of spaces (valid JSON whitespace) in about 1 MB: one member repeated."""
    member = gzip.compress(b" " * (1 << 20), 9)
    return member * int(1024 * gib)


@pytest.mark.timeout(60)
def test_a_decompression_bomb_is_refused_quickly_without_inflating_it(tmp_path: Path) -> None:
    data = bomb()
    assert len(data) < 1_200_000
    for importer in (
        decode_export,
        lambda d: InMemoryStore().saves.import_save("s", d),
        lambda d: store_at(tmp_path / "c").saves.import_save("s", d),
    ):
        tracemalloc.start()
        started = time.perf_counter()
        try:
            with pytest.raises(SaveError, match="inflates past"):
                importer(data)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert time.perf_counter() - started < 5
        assert peak < saves.inflate_limit(len(data)) * 1.5 + (32 << 20)
        assert peak < 256 << 20  # a quarter of what it would inflate to


@pytest.mark.timeout(30)
def test_the_inflate_limit_is_the_file_size_scaled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(saves, "FREE_INFLATE_BYTES", 1 << 20)
    with pytest.raises(SaveError, match="inflates past"):
        decode_export(gzip.compress(b" " * (2 << 20)))
    small = gzip.compress(json.dumps({"format": "x"}).encode() + b" " * 1000)
    with pytest.raises(SaveError, match="not an npc-engine save"):
        decode_export(small)
    with pytest.raises(SaveError):
        decode_export(gzip.compress(b"{}")[:-3])  # cut short
    with pytest.raises(SaveError):
        decode_export(gzip.compress(b"{}") + b"junk")
    with pytest.raises(SaveError):
        decode_export(gzip.compress(b"[" * 100_000 + b"]" * 100_000))  # too deep for json


# -- 8, 13. save ids and file names are safe file names on every OS ----------------------

BAD_NAMES = [
    "slot\n",
    "D:x",
    "slot:stream",
    "NUL",
    "nul",
    "con.npcsave",
    "Com1",
    "lpt9.txt",
    "AUX.tar.gz",
    "slot.",
    "",
    "a" * 65,
    "a/b",
    "a\\b",
    "sp ace",
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", BAD_NAMES)
def test_unsafe_save_names_are_refused_everywhere(name: str) -> None:
    assert save_name_problem(name) is not None
    with pytest.raises(ValueError):
        check_save_name(name)
    with pytest.raises(SaveError):
        check_save_id(name)
    with pytest.raises(SaveError):
        InMemoryStore().saves.create_save(name)
    for request in (
        {"type": "save.create", "id": "1", "save_id": name},
        {"type": "save.import", "id": "1", "save_id": "ok", "file": f"{name}.npcsave"},
    ):
        with pytest.raises(ValidationError):
            REQUEST_ADAPTER.validate_python(request)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", ["slot1", "a.b", "CONX", "nul_", "com10", "x@y-z_1", "a" * 64])
def test_safe_save_names_pass(name: str) -> None:
    assert check_save_id(name) == name
    REQUEST_ADAPTER.validate_python({"type": "save.load", "id": "1", "save_id": name})
    REQUEST_ADAPTER.validate_python(
        {"type": "save.import", "id": "1", "save_id": name, "file": f"{name}.npcsave"}
    )


# -- suspected: vectors, shards, game state -----------------------------------------------


@pytest.mark.timeout(60)
def test_vectors_of_another_dimension_are_refused(tmp_path: Path) -> None:
    store = store_at(tmp_path / "chroma")  # empty archive: the first write would fix it
    short = Memory("mara", "Three numbers only.")
    with pytest.raises(SaveError, match="dimensions"):
        store.saves.import_save(
            "evil", crafted({own_name("mara"): [short.id]}, {short.id: record(short, [0.5] * 3)})
        )
    kept = Memory("mara", "The bell rang twice.")
    store.add([kept])
    store.saves.create_save("s1")
    store.forget("mara", memory_ids=[kept.id])  # moved into the archive: its dimension
    store.saves.load_save("s1")
    assert [m.text for m in store.recent("mara", None, 5)] == ["The bell rang twice."]


@pytest.mark.timeout(60)
def test_collections_beyond_the_engines_shards_are_refused(world: Any) -> None:
    store, _, _ = world
    memory = Memory("mara", "In a ninth shard.", player_id="p1")
    for name in (
        own_name("mara").replace("-own", "-players-9"),
        own_name("mara").replace("-own", "-players-08"),
        "npc-engine-game-state",
        "npc-engine-archive",
    ):
        before = snapshot(store)
        with pytest.raises(SaveError):
            store.saves.import_save(
                "evil", crafted({name: [memory.id]}, {memory.id: record(memory)})
            )
        assert snapshot(store) == before


HISTORY = {"kind": "history", "npc_id": "mara", "player_id": "p1"}
BAD_STATE: dict[str, tuple[str, Any, Any]] = {
    "trust not a number": ("trust:mara:p1", {"trust": "abc"}, {}),
    "trust out of range": ("trust:mara:p1", {"trust": 1000}, {}),
    "trust a bool": ("trust:mara:p1", {"trust": True}, {}),
    "65 flags": ("player:p1", {"flags": {f"f{n}": True for n in range(65)}}, {}),
    "flag name with a space": ("player:p1", {"flags": {"bad name": 1}}, {}),
    "flag name with a newline": ("player:p1", {"flags": {"paid\n": 1}}, {}),
    "flag value a list": ("player:p1", {"flags": {"paid": [1]}}, {}),
    "flag text too long": ("player:p1", {"flags": {"paid": "x" * 65}}, {}),
    "game_time not a number": ("player:p1", {"flags": {}, "game_time": "noon"}, {}),
    "turns not a list": ("history:mara\x1fp1", {"turns": "hi"}, HISTORY),
    "turn without reply": ("history:mara\x1fp1", {"turns": [{"player_text": "hi"}]}, HISTORY),
    "noted not pairs": (
        "history:mara\x1fp1",
        {"turns": [{"player_text": "a", "reply_text": "b", "noted": [["x"]]}]},
        HISTORY,
    ),
    "history labels of another npc": (
        "history:mara\x1fp1",
        {"turns": []},
        {**HISTORY, "npc_id": "guard"},
    ),
    "unknown key": ("secrets:all", {"x": 1}, {}),
    "world tick not a number": ("world-tick", {"last": None}, {}),
}


@pytest.mark.slow
@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(BAD_STATE))
def test_game_state_from_a_save_keeps_the_rules_of_state_set(world: Any, case: str) -> None:
    store, _, _ = world
    key, value, labels = BAD_STATE[case]
    before = snapshot(store)
    with pytest.raises(SaveError):
        store.saves.import_save("evil", crafted({}, {}, {key: [json.dumps(value), labels]}))
    assert snapshot(store) == before
    memory_store = InMemoryStore()
    file = saves.encode_export(
        saves.SaveInfo("x", utc_now(), 0),
        {"memories": {"all": []}, "state": {key: value}, "labels": {key: labels}},
        {},
    )
    with pytest.raises(SaveError):
        memory_store.saves.import_save("evil", file)
    assert memory_store.saves.list_saves() == []


@pytest.mark.timeout(60)
def test_the_in_memory_store_refuses_what_the_chroma_store_refuses() -> None:
    source = InMemoryStore()
    memory = Memory("mara", "The bell rang twice.")
    source.add([memory])
    source.state.save_state("trust:mara:p1", {"trust": 5})
    source.saves.create_save("slot")
    good = as_document(source.saves.export_save("slot"))
    target = InMemoryStore()
    assert target.saves.import_save("copy", as_file(good)).memories == 1
    unnamed = copy.deepcopy(good)
    unnamed["manifest"]["memories"]["all"] = []
    bad_kind = copy.deepcopy(good)
    bad_kind["records"][memory.id]["memory"]["kind"] = "secret"
    naive = copy.deepcopy(good)
    naive["records"][memory.id]["memory"]["created_at"] = "2026-01-01T00:00:00"
    for bad in (unnamed, bad_kind, naive):
        with pytest.raises(SaveError):
            target.saves.import_save("evil", as_file(bad))
    assert [info.save_id for info in target.saves.list_saves()] == ["copy"]


# -- fuzz: only SaveError, nothing changed on a refusal, bounded time ---------------------

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(
        [
            own_name("mara") + "\n",
            own_name("mara").replace("-own", "-players-9"),
            own_name("mara"),
            player_shard("mara", "p1"),
            "trust:mara:p1",
            "player:p1",
            "history:mara\x1fp1",
            "NUL",
            "D:x",
        ]
    ),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


def base_document(dimension: int) -> dict[str, Any]:
    """A valid save file's document; fixed, so hypothesis can replay its mutations."""
    when = datetime(2026, 1, 1, tzinfo=UTC)
    own = Memory("mara", "The bell rang twice.", kind="event", id="a" * 32, created_at=when)
    fact = Memory("mara", "p1 is called Bob.", "fact", 5, "p1", "b" * 32, when, subject="name")
    turn = {"player_text": "Hi", "reply_text": "Aye.", "memory_ids": [fact.id], "noted": []}
    return {
        "format": "npc-engine-save",
        "version": 1,
        "save_id": "theirs",
        "created_at": "2026-01-01T00:00:00Z",
        "manifest": {
            "memories": {own_name("mara"): [own.id], player_shard("mara", "p1"): [fact.id]},
            "state": {
                "trust:mara:p1": [json.dumps({"trust": 20}), {"kind": "trust"}],
                "player:p1": [json.dumps({"flags": {"paid": True}, "game_time": 3.0}), {}],
                "history:mara\x1fp1": [json.dumps({"turns": [turn]}), dict(HISTORY)],
            },
        },
        "records": {
            m.id: {
                "document": m.text,
                "metadata": chroma_records.metadata_of(m),
                "vector": [0.5] * dimension,
            }
            for m in (own, fact)
        },
    }


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(value, dict):
        for key, inner in value.items():
            found += paths(inner, (*prefix, key))
    elif isinstance(value, list):
        for index, inner in enumerate(value[:3]):
            found += paths(inner, (*prefix, index))
    return found


@st.composite
def mutated(draw: st.DrawFn, dimension: int) -> bytes:
    document = base_document(dimension)
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(paths(document)[1:]))
        parent = document
        for step in where[:-1]:
            parent = parent[step]
        action = draw(st.sampled_from(["replace", "delete", "add", "rename"]))
        if action == "replace" or isinstance(parent, list):
            parent[where[-1]] = draw(JSON)
        elif action == "delete":
            del parent[where[-1]]
        elif action == "add":
            parent[draw(st.text(max_size=8))] = draw(JSON)
        else:
            parent[str(where[-1]) + draw(st.sampled_from(["\n", "x", ":", " "]))] = parent.pop(
                where[-1]
            )
    if draw(st.booleans()):  # and a state document as JSON text with something inside
        state = document.get("manifest", {})
        if isinstance(state, dict) and isinstance(state.get("state"), dict):
            state["state"]["player:p1"] = [json.dumps(draw(JSON)), {}]
    try:
        raw = json.dumps(document).encode("utf-8")
    except (TypeError, ValueError):
        raw = b"{}"
    return gzip.compress(raw, 1)


def refused_or_clean(read: Any, data: bytes) -> None:
    started = time.perf_counter()
    with contextlib.suppress(SaveError):
        read(data)
    assert time.perf_counter() - started < 2


@pytest.mark.slow
@pytest.mark.timeout(60)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=mutated(4) | st.binary(max_size=300) | st.binary(max_size=300).map(gzip.compress))
def test_fuzz_reading_a_save_file_only_ever_refuses(data: bytes) -> None:
    refused_or_clean(lambda d: read_import(d, 4), data)
    refused_or_clean(lambda d: InMemoryStore().saves.import_save("fuzz", d), data)


@pytest.mark.timeout(60)
@settings(max_examples=300, deadline=None)
@given(document=JSON)
def test_fuzz_any_json_document(document: Any) -> None:
    refused_or_clean(lambda d: read_import(d, 4), gzip.compress(json.dumps(document).encode()))


@pytest.mark.timeout(120)
def test_fuzz_imports_into_a_real_store_change_nothing_when_refused(tmp_path: Path) -> None:
    store = store_at(tmp_path / "chroma")
    x = Memory("mara", "The bell rang twice.")
    store.add([x, Memory("mara", "p1 paid.", player_id="p1")])
    store.state.save_state("trust:mara:p1", {"trust": 40})
    store.saves.create_save("s1")
    store.forget("mara", memory_ids=[x.id])
    accepted = []

    @settings(max_examples=12, deadline=None, database=None)
    @given(data=mutated(DIM))
    def one(data: bytes) -> None:
        before = snapshot(store)
        started = time.perf_counter()
        try:
            store.saves.import_save("fuzz", data)
        except SaveError:
            assert snapshot(store) == before
        else:
            accepted.append(1)
            store.saves.load_save("fuzz")
            store.saves.load_save("s1")
            assert store.saves.delete_save("fuzz")
        assert time.perf_counter() - started < 10

    one()
    store.saves.load_save("s1")
    assert live_texts(store) == {"The bell rang twice.", "p1 paid."}
    assert store.state.load_state("trust:mara:p1") == {"trust": 40}


@pytest.mark.timeout(30)
def test_a_save_file_over_the_limit_is_refused_before_it_is_read(tmp_path: Path) -> None:
    """save.import and ``npc-engine save import`` read the file through read_save_file."""
    huge = tmp_path / "huge.npcsave"
    with huge.open("wb") as sparse:  # no disk used: the size is what is checked
        sparse.truncate(saves.MAX_IMPORT_BYTES + 1)
    tracemalloc.start()
    try:
        with pytest.raises(SaveError) as refused:
            saves.read_save_file(huge)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert refused.value.field == "file" and peak < 1 << 20
    with pytest.raises(SaveError):
        saves.read_save_file(tmp_path / "missing.npcsave")
