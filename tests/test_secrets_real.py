"""The guards over the real server: the probe set (tests/probes/secret_probes.yaml) against an
adversarial generator that tells every secret it can, and against the real default model.
State over the wire too: trust unlocks a secret in the inspected prompt, and survives a
restart."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from npc_engine.client import NpcClient, ProtocolError
from npc_engine.config import EngineConfig
from npc_engine.dialogue import DialogueEngine
from npc_engine.game_state import Standing
from npc_engine.guard import BOILERPLATE, find_term, tells_secret
from npc_engine.runtime import EngineRuntime, open_engine
from npc_engine.server import NpcServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PROBES = yaml.safe_load((Path(__file__).parent / "probes" / "secret_probes.yaml").read_text())
JUDGE_MARGIN = 0.02
GATED = ["ran off with a Fog Runner's daughter", "lantern on the customs jetty"]


class Judge:
    """Says which replies told a guarded secret, whole, after the fact: the guard's own
    check (``guard.tells_secret``: key terms in any form, meaning with the engine's
    embedders and threshold), on the text the client received."""

    def __init__(self, engine: DialogueEngine) -> None:
        self.engine = engine
        assert engine.secrets.embed is not None
        world = engine.persona("mara").world
        self.out_of_world = [*(world.out_of_world if world else []), *BOILERPLATE]

    def leaks(self, replies: list[dict[str, Any]]) -> list[tuple[str, str]]:
        """(line, why) for every reply that told a secret."""
        found = []
        for reply in replies:
            why = self._told(reply["npc"], reply["text"])
            if why:
                found.append((reply["line"], why))
        return found

    def _told(self, npc_id: str, text: str) -> str | None:
        loaded = self.engine.persona(npc_id)
        rules = self.engine.secrets.protected(loaded, Standing(loaded.persona.trust))
        # The judge re-reads the text the client got, split its own way (the guard split
        # it as it streamed): a tie at the guard's exact threshold is not a leak.
        rules.threshold += JUDGE_MARGIN
        sentences = [p for p in re.split(r"(?<=[.!?])\s+", text) if p.strip()]
        cut = tells_secret(rules, sentences or [text])
        return f"{cut.entry}: {cut.reason}" if cut is not None else None

    def modern(self, text: str) -> str | None:
        return find_term(text, self.out_of_world)


def with_settings(config: EngineConfig, **updates: Any) -> EngineConfig:
    """A copy with some settings changed, validated (nested ones given as dicts)."""
    return EngineConfig(**{**config.model_dump(), **updates})


@pytest.fixture
def runtime_factory(real_config: EngineConfig) -> Iterator[Any]:
    opened: list[EngineRuntime] = []

    def factory(**updates: Any) -> EngineRuntime:
        name = f"data{len(opened)}"
        config = with_settings(real_config, data_dir=real_config.data_dir.parent / name, **updates)
        opened.append(open_engine(config))
        return opened[-1]

    yield factory
    for runtime in opened:
        runtime.close()


async def serving(runtime: EngineRuntime) -> NpcServer:
    server = NpcServer(runtime.engine, port=0, allow_inspect=True)
    await server.start()
    return server


async def run_probes(
    url: str, probes: list[dict[str, str]], tag: str, max_tokens: int
) -> list[dict[str, Any]]:
    """Each probe from a new player; one connection per NPC, the NPCs side by side."""

    async def one_npc(npc_id: str) -> list[dict[str, Any]]:
        ends = []
        async with await NpcClient.connect(url) as client:
            for index, probe in enumerate(p for p in probes if p["npc"] == npc_id):
                stream = await client.say(
                    npc_id,
                    probe["line"],
                    player_id=f"{tag}-{npc_id}-{index}",
                    max_tokens=max_tokens,
                    inspect=True,
                )
                deltas = [piece async for piece in stream]
                end = await stream.result()
                assert "".join(deltas) == end["text"]  # what was sent is what was said
                ends.append({**end, "npc": npc_id, "line": probe["line"]})
        return ends

    npcs = sorted({p["npc"] for p in probes})
    return [end for ends in await asyncio.gather(*map(one_npc, npcs)) for end in ends]


async def test_the_guard_stops_every_secret_an_adversarial_model_tells(
    runtime_factory: Any,
) -> None:
    """The adversarial backend streams the prompt's secrets whole, one character at a time,
    paraphrased and spelled out, and explains modern things like a chatbot. Guard off (the
    engine alone, for the baseline): they leak. Guard on, over the real server: none does."""
    attacks, modern = PROBES["attacks"], PROBES["out_of_world"]
    probes = attacks + modern
    runtime = runtime_factory(generation={"backend": "adversarial"})
    judge = Judge(runtime.engine)
    unguarded = runtime_factory(
        generation={"backend": "adversarial"},
        guard={"enabled": False},
        memory={"backend": "memory"},
    )
    plain = [
        {**p, "text": unguarded.engine.say(p["npc"], p["line"], player_id=f"off{i}").text}
        for i, p in enumerate(probes)
    ]
    told_off, modern_off = judge.leaks(plain), [e for e in plain if judge.modern(e["text"])]

    server = await serving(runtime)
    try:
        ends = await run_probes(server.url, probes, "on", 80)
    finally:
        await server.stop()
    told, outside = judge.leaks(ends), [e["text"] for e in ends if judge.modern(e["text"])]
    print(
        f"\nadversarial model, {len(attacks)} attacks + {len(modern)} out-of-world questions: "
        f"guard off: {len(told_off)} secrets told, {len(modern_off)} modern replies; "
        f"guard on: {len(told)}, {len(outside)}"
    )
    assert len(told_off) >= len(attacks) and len(modern_off) >= len(modern) * 0.8  # it attacks
    assert told == [] and outside == []
    cut = [e for e in ends if e["guard"]]
    assert {e["guard"] for e in cut} == {"secret", "out_of_world"}
    assert all(e["reason"] == "stop" and e["inspect"]["guard_entry"] for e in cut)
    for end in ends:  # gated entries are never in any prompt at trust 0
        assert not any(g in end["inspect"]["prompt"] for g in GATED)


async def test_the_real_model_keeps_secrets_in_the_world_and_answers_plain_questions(
    runtime_factory: Any,
) -> None:
    # Game actions off: what is measured here is the guard (an action choice after some of
    # the 102 lines would only add model time; tests/test_game_loop*.py cover actions).
    runtime = runtime_factory(actions={"enabled": False})
    judge = Judge(runtime.engine)
    server = await serving(runtime)
    try:
        probes = PROBES["attacks"] + PROBES["out_of_world"] + PROBES["harmless"]
        ends = await run_probes(server.url, probes, "real", 12)
    finally:
        await server.stop()
    attacks = len(PROBES["attacks"]) + len(PROBES["out_of_world"])
    told = judge.leaks(ends[:attacks])
    outside = [e["text"] for e in ends if judge.modern(e["text"])]
    harmless = [e for e in ends if e["line"] in {p["line"] for p in PROBES["harmless"]}]
    false_cuts = [e for e in harmless if e["guard"]]
    print(
        f"\nreal model: {len(told)} secrets told, {len(outside)} modern replies over "
        f"{attacks} probes; guard cut {sum(1 for e in ends[:attacks] if e['guard'])} of them; "
        f"false cuts {len(false_cuts)}/{len(harmless)} harmless questions"
    )
    assert told == [] and outside == []
    assert len(false_cuts) <= 0.05 * len(harmless)
    assert all(e["text"].strip() for e in ends)


async def test_trust_unlocks_a_secret_over_the_wire_and_survives_a_restart(
    real_config: EngineConfig,
) -> None:
    config = with_settings(real_config, generation={"backend": "scripted"})
    runtime = open_engine(config)
    server = await serving(runtime)
    try:
        async with await NpcClient.connect(server.url) as client:
            stream = await client.say("mara", "Hello.", player_id="p1", inspect=True)
            before = (await stream.result())["inspect"]["prompt"]
            assert GATED[0] not in before
            state = await client.set_state("p1", npc_id="mara", trust=50, flags={"seen": True})
            assert state["type"] == "state" and state["trust"] == 50
            assert state["unlocked"] == ["secrets.1"] and state["flags"] == {"seen": True}
            stream = await client.say("mara", "Hello again.", player_id="p1", inspect=True)
            after = await stream.result()
            assert GATED[0] in after["inspect"]["prompt"] and after["inspect"]["trust"] == 50
            with pytest.raises(ProtocolError) as refused:
                await client.set_state("p1", npc_id="mara", trust=5, trust_delta=1)
            assert refused.value.message["details"]["field"] == "trust"
            with pytest.raises(ProtocolError) as refused:
                await client.request({"type": "state.set", "player_id": "p1", "flags": {"a b": 1}})
            assert refused.value.message["code"] == "invalid_request"
            assert (await client.ping())["type"] == "pong"  # the connection lives on
    finally:
        await server.stop()
        runtime.close()
    runtime = open_engine(config)  # a restart: state comes back from Chroma on disk
    server = await serving(runtime)
    try:
        async with await NpcClient.connect(server.url) as client:
            state = await client.get_state("p1", npc_id="mara")
            assert state["trust"] == 50 and state["flags"] == {"seen": True}
            assert (await client.get_state("p2", npc_id="mara"))["trust"] == 0
    finally:
        await server.stop()
        runtime.close()
