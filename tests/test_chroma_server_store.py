"""The memory store on a real Chroma server (``chroma run`` on loopback), as two engine
replicas see it: two store objects on one server, each with its own RAM."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from servers import ChromaServer, free_port

from npc_engine.config import load_config
from npc_engine.errors import is_unavailable
from npc_engine.memory.chroma_records import connect_server
from npc_engine.memory.chroma_store import ChromaMemoryStore
from npc_engine.memory.minilm import OfflineMiniLM
from npc_engine.memory.types import Memory
from npc_engine.model_registry import ModelCache

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def embed() -> OfflineMiniLM:
    return OfflineMiniLM(ModelCache(load_config().cache_dir))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChromaServer]:
    chroma = ChromaServer(tmp_path_factory.mktemp("chroma"))
    chroma.start()
    try:
        yield chroma
    finally:
        chroma.stop()


def replica(server: ChromaServer, embed: OfflineMiniLM) -> ChromaMemoryStore:
    client = connect_server(
        server.url, token=None, tenant="default_tenant", database="default_database", timeout=5
    )
    return ChromaMemoryStore(None, embed, client=client)


def test_what_one_replica_writes_another_finds_and_forgets(
    server: ChromaServer, embed: OfflineMiniLM
) -> None:
    first, second = replica(server, embed), replica(server, embed)
    assert first.shared and second.shared
    # B looks first: the NPC has no collections yet (a local store would remember that).
    assert second.search("harbourmaster", "p1", "Where is my boat?", 5) == []
    lines = [
        Memory(npc_id="harbourmaster", player_id="p1", text="My boat is the Grey Heron."),
        Memory(npc_id="harbourmaster", player_id="p1", text="I owe Brask eleven silver marks."),
        Memory(npc_id="harbourmaster", player_id="p2", text="My boat sank last spring."),
        Memory(npc_id="harbourmaster", text="The harbour chain was mended today."),
    ]
    first.add(lines)
    found = second.search("harbourmaster", "p1", "Where is my boat?", 5)
    texts = [c.memory.text for c in found]
    assert texts[0] == "My boat is the Grey Heron."
    assert "My boat sank last spring." not in texts  # another player's
    # B caches none of it: a forget through A is seen by B's next search.
    assert first.forget("harbourmaster", memory_ids=[lines[0].id]) == 1
    after = [c.memory.text for c in second.search("harbourmaster", "p1", "Where is my boat?", 5)]
    assert "My boat is the Grey Heron." not in after
    # Superseded through A: B leaves it out at once.
    first.mark_superseded("harbourmaster", "p1", [lines[1].id], "newer")
    debts = second.search("harbourmaster", "p1", "Who do I owe money?", 5)
    assert lines[1].id not in {c.memory.id for c in debts}
    first.close()
    second.close()


def test_the_keyword_half_comes_from_the_servers_full_text_search(
    server: ChromaServer, embed: OfflineMiniLM
) -> None:
    store = replica(server, embed)
    store.add(
        [
            Memory(npc_id="fence", player_id="p9", text="Ask for Vashtorin at the east gate."),
            *[
                Memory(npc_id="fence", player_id="p9", text=f"The weather was grey on day {n}.")
                for n in range(30)
            ],
        ]
    )
    found = store.search("fence", "p9", "vashtorin", 5)
    match = next(c for c in found if "Vashtorin" in c.memory.text)
    assert match.keyword_rank == 0  # a keyword match, found despite the lower case
    dense_only = store.search("fence", "p9", "vashtorin", 5, keywords=False)
    assert all(c.keyword_rank is None for c in dense_only)
    store.close()


def test_a_server_that_is_not_there_is_unavailable(embed: OfflineMiniLM) -> None:
    with pytest.raises(Exception) as failure:
        client = connect_server(
            f"http://127.0.0.1:{free_port()}",
            token=None,
            tenant="default_tenant",
            database="default_database",
            timeout=2,
        )
        ChromaMemoryStore(None, embed, client=client)
    assert is_unavailable(failure.value)


def test_a_bad_url_is_refused() -> None:
    with pytest.raises(ValueError, match=r"memory\.url"):
        connect_server("chroma:8000", token=None, tenant="t", database="d", timeout=1)
