"""Scale-out on real servers, on loopback (issue 13): a Chroma server (``chroma run``), an
OpenAI-compatible generation server on the tiny test model (llama-cpp-python's own
``llama_cpp.server``), and engine replicas as separate ``npc-engine serve`` processes, all
configured through the environment as a deployment would be. Every process a test starts,
it stops."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import servers
from servers import ChromaServer, EngineProcess

from npc_engine.client import NpcClient, ProtocolError
from npc_engine.config import load_config
from npc_engine.model_registry import MODELS, TINY_CHAT_MODEL, ModelCache
from tests.conftest import SAMPLE_PERSONAS, TEST_MODEL_ENV

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chroma_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChromaServer]:
    with servers.chroma_server(tmp_path_factory.mktemp("chroma-server")) as server:
        yield server


def tiny_model_path() -> Path:
    return ModelCache(load_config().cache_dir).path_of(MODELS[TINY_CHAT_MODEL])


@pytest.fixture(scope="module")
def generation_server() -> Iterator[str]:
    """llama-cpp-python's OpenAI-compatible server on the tiny test model."""
    with servers.llama_cpp_server(tiny_model_path(), 4096) as url:
        yield url


@pytest.fixture(scope="module")
def llama_server(llama_server_build_log: str) -> Iterator[str]:
    """llama.cpp's own llama-server, built once per machine by tools/build_llama_server.sh
    (``tools/dev.sh test`` builds it in the background; these tests run last)."""
    binary = servers.llama_server_binary()
    if binary is None:
        pytest.fail(
            f"llama-server is not built: run tools/build_llama_server.sh\n{llama_server_build_log}"
        )
    with servers.llama_server(binary, tiny_model_path(), 2, 2048) as url:
        yield url


def start_engine(data_dir: Path, settings: dict[str, str]) -> EngineProcess:
    """``npc-engine serve`` configured by environment variables, as a deployment is."""
    return servers.start_engine(
        SAMPLE_PERSONAS,
        data_dir,
        settings={
            "NPC_ENGINE_HEAD_CACHE_DIR": os.environ["NPC_ENGINE_HEAD_CACHE_DIR"],
            "NPC_ENGINE_LORE_VECTOR_CACHE": os.environ["NPC_ENGINE_LORE_VECTOR_CACHE"],
            # The servers' model: the prompt is rendered and counted with its vocabulary.
            TEST_MODEL_ENV: os.environ[TEST_MODEL_ENV],
            "NPC_ENGINE_SEED": "1234",
            "NPC_ENGINE_TEMPERATURE": "0",
            "NPC_ENGINE_N_CTX": "2048",
            "NPC_ENGINE_MAX_TOKENS": "24",
            "NPC_ENGINE_ALLOW_INSPECT": "true",
            "NPC_ENGINE_PARALLEL": "2",
            **settings,
        },
        inherit_settings=False,
        log=data_dir.parent / f"{data_dir.name}.log",
    )


def kill(engine: EngineProcess) -> None:
    engine.process.send_signal(signal.SIGKILL)
    engine.process.wait(10)


@pytest.fixture
def engines() -> Iterator[list[EngineProcess]]:
    started: list[EngineProcess] = []
    try:
        yield started
    finally:
        for engine in started:
            servers.stop(engine.process)


def remote_settings(
    generation: str | None = None, chroma: ChromaServer | None = None
) -> dict[str, str]:
    settings = {}
    if generation is not None:
        settings.update(
            {
                "NPC_ENGINE_GENERATION__BACKEND": "openai",
                "NPC_ENGINE_GENERATION__URL": generation,
                # llama_cpp.server takes text prompts only.
                "NPC_ENGINE_GENERATION__SEND": "text",
            }
        )
    if chroma is not None:
        settings["NPC_ENGINE_MEMORY__URL"] = chroma.url
    return settings


def player() -> str:
    return "p" + uuid.uuid4().hex[:12]


async def protocol_walk(url: str, who: str) -> dict[str, object]:
    """hello, event, say, memory.list, forget: what every deployment shape must pass."""
    async with await NpcClient.connect(url) as client:
        assert client.welcome["type"] == "welcome"
        stored = await client.event(
            ["mara"], "A storm flooded the Zephyrine cellar last night.", player_id=who
        )
        assert len(stored) == 1
        stream = await client.say(
            "mara", "What happened to the Zephyrine cellar?", player_id=who, inspect=True
        )
        end = await stream.result()
        assert end["text"].strip(), end
        assert "error" not in end or end["error"] is None, end
        items = await client.memory_list("mara", player_id=who, limit=50)
        texts = " | ".join(item["text"] for item in items)
        assert "Zephyrine cellar last night" in texts  # the event
        assert "What happened to the Zephyrine cellar?" in texts  # the player's line
        assert stored[0] in {item["id"] for item in items}
        forgotten = await client.memory_forget("mara", player_id=who)
        assert forgotten >= 2
        assert await client.memory_list("mara", player_id=who, limit=50) == []
        return end


SHAPES = ["embedded", "openai", "chroma-server", "openai+chroma-server"]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("shape", SHAPES)
def test_the_protocol_walk_passes_on_every_deployment_shape(
    shape: str,
    tmp_path: Path,
    engines: list[EngineProcess],
    chroma_server: ChromaServer,
    generation_server: str,
) -> None:
    generation = generation_server if "openai" in shape else None
    chroma = chroma_server if "chroma" in shape else None
    engines.append(start_engine(tmp_path / "data", remote_settings(generation, chroma)))
    end = asyncio.run(protocol_walk(engines[0].url, player()))
    inspect = end["inspect"]
    assert isinstance(inspect, dict)
    # The event was recalled into the prompt, whichever store held it.
    assert "Zephyrine cellar last night" in inspect["prompt"]
    if chroma is not None:
        # Nothing of the walk is in the replica's own data dir: it all went to the server.
        assert not (tmp_path / "data" / "chroma").exists()


async def reply_of(client: NpcClient, who: str, text: str) -> dict[str, object]:
    stream = await client.say("mara", text, player_id=who, inspect=True)
    return await stream.result()


@pytest.mark.timeout(240)
def test_the_protocol_walk_passes_on_llama_server_with_token_prompts_and_slots(
    tmp_path: Path, engines: list[EngineProcess], llama_server: str
) -> None:
    engines.append(
        start_engine(
            tmp_path / "data",
            {
                "NPC_ENGINE_GENERATION__BACKEND": "openai",
                "NPC_ENGINE_GENERATION__URL": llama_server,
                "NPC_ENGINE_GENERATION__SLOTS": "2",
            },
        )
    )
    first = asyncio.run(protocol_walk(engines[0].url, player()))
    assert first["usage"]["prompt_tokens"] > 0  # type: ignore[index]

    async def warm_turns() -> list[dict[str, object]]:
        who = player()
        async with await NpcClient.connect(engines[0].url) as client:
            return [await reply_of(client, who, line) for line in ("Hello.", "A room?", "Ale?")]

    ends = asyncio.run(warm_turns())
    assert all(end.get("error") is None for end in ends), ends
    usage: list[dict[str, int]] = [end["usage"] for end in ends]  # type: ignore[misc]
    # llama-server's own count: the conversation's earlier turns were read from its slot.
    assert all(u["cached_tokens"] > 0.5 * u["prompt_tokens"] for u in usage[1:]), usage


@pytest.mark.timeout(300)
def test_two_replicas_share_one_conversation_and_survive_a_kill(
    tmp_path: Path,
    engines: list[EngineProcess],
    chroma_server: ChromaServer,
    generation_server: str,
) -> None:
    settings = remote_settings(generation_server, chroma_server)
    first = start_engine(tmp_path / "a", settings)
    second = start_engine(tmp_path / "b", settings)
    engines += [first, second]
    who = player()

    async def scenario() -> None:
        async with await NpcClient.connect(first.url) as a:
            await a.set_state(who, npc_id="mara", trust=55, flags={"paid_rent": True})
            await a.event(["mara"], "The player returned Mara's lost brass locket.", player_id=who)
            await reply_of(a, who, "My name is Quillon and I mend sails.")
        async with await NpcClient.connect(second.url) as b:
            # B continues A's conversation: its prompt holds A's turn, A's memory, A's state.
            end = await reply_of(b, who, "Do you remember the locket I gave back to you?")
            prompt = end["inspect"]["prompt"]  # type: ignore[index]
            assert "My name is Quillon and I mend sails." in prompt  # A's turn, in history
            assert "brass locket" in prompt  # A's event, recalled through B (not in the line)
            state = await b.get_state(who, npc_id="mara")
            assert state["trust"] == 55 and state["flags"] == {"paid_rent": True}
        async with await NpcClient.connect(first.url) as a:
            # Back on A: B's turn is there too (A's RAM copy was not trusted).
            end = await reply_of(a, who, "And my name?")
            assert "Do you remember the locket I gave back to you?" in end["inspect"]["prompt"]  # type: ignore[index]
            acknowledged = await a.event(["mara"], "The player paid for a week.", player_id=who)
            stream = await a.say(
                "mara", "Tell me a very long story about the sea.", player_id=who, max_tokens=400
            )
            async for _piece in stream:
                kill(first)  # kill -9 mid-reply, at its first token
                break
        assert first.process.returncode == -signal.SIGKILL
        async with await NpcClient.connect(second.url) as b:
            items = await b.memory_list("mara", player_id=who, limit=100)
            ids = {item["id"] for item in items}
            assert set(acknowledged) <= ids  # nothing acknowledged was lost
            end = await reply_of(b, who, "Where were we?")
            assert end["text"]
            assert "And my name?" in end["inspect"]["prompt"]  # type: ignore[index]

    asyncio.run(scenario())


@pytest.mark.timeout(240)
def test_the_engine_rides_out_a_chroma_server_restart_under_load(
    tmp_path: Path, engines: list[EngineProcess]
) -> None:
    chroma = ChromaServer(tmp_path / "chroma")
    chroma.start()
    try:
        # Scripted replies: this is about the store; the walks above use real generation.
        engine = start_engine(
            tmp_path / "data",
            {"NPC_ENGINE_GENERATION__BACKEND": "scripted", **remote_settings(chroma=chroma)},
        )
        engines.append(engine)
        asyncio.run(_restart_under_load(engine, chroma))
    finally:
        chroma.stop()


async def _restart_under_load(engine: EngineProcess, chroma: ChromaServer) -> None:
    acknowledged: list[str] = []
    outcomes: dict[str, int] = {"ok": 0, "unavailable": 0}
    stop_load = asyncio.Event()

    async def load(who: str) -> None:
        async with await NpcClient.connect(engine.url) as client:
            for index in range(90):  # bounded (memory.list reads 100 at most)
                if stop_load.is_set():
                    return
                try:
                    acknowledged.extend(
                        await client.event(["wren"], f"Crate {index} arrived.", player_id=who)
                    )
                    outcomes["ok"] += 1
                except ProtocolError as exc:
                    assert exc.message["code"] == "unavailable", exc.message
                    outcomes["unavailable"] += 1
                await asyncio.sleep(0.05)

    players = [player(), player()]
    workers = [asyncio.create_task(load(who)) for who in players]
    async with await NpcClient.connect(engine.url) as watcher:
        await asyncio.sleep(1.0)
        chroma.stop()
        started = time.monotonic()
        with pytest.raises(ProtocolError) as failure:
            await watcher.memory_list("wren", player_id=players[0])
        assert failure.value.message["code"] == "unavailable"
        assert time.monotonic() - started < 5.0  # fails fast, not at a long timeout
        end = await (await watcher.say("wren", "Anything new?", player_id=players[0])).result()
        assert end["error"]["code"] == "unavailable", end  # the fallback line, flagged
        assert (await watcher.ping())["type"] == "pong"  # the engine itself is fine
        chroma.start()
        # Recovers without a restart: the next calls succeed.
        deadline = time.monotonic() + 30
        while True:
            try:
                await watcher.memory_list("wren", player_id=players[0])
                break
            except ProtocolError:
                assert time.monotonic() < deadline, "the engine did not recover"
                await asyncio.sleep(0.2)
        before = outcomes["ok"]
        await asyncio.sleep(1.0)
        stop_load.set()
        await asyncio.gather(*workers)
        assert outcomes["ok"] > before  # the load goes on after the restart
        assert outcomes["unavailable"] >= 1
        end = await (await watcher.say("wren", "Anything new?", player_id=players[0])).result()
        assert end.get("error") is None, end
        stored: set[str] = set()
        for who in players:
            stored |= {
                item["id"] for item in await watcher.memory_list("wren", player_id=who, limit=100)
            }
        assert set(acknowledged) <= stored  # every acknowledged memory survived the restart
