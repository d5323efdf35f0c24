"""Memory probes (issue 16): recall, updates and abstention, measured as a player would.

    .venv/bin/python tools/recall_probe.py [--turns 10 50] [--facts N]   # store, side by side
    .venv/bin/python tools/recall_probe.py --server                      # the real server
    .venv/bin/python tools/recall_probe.py --calibrate       # choose retrieval.min_relevance

``--server`` runs every probe through a real server on loopback (real Chroma, MiniLM, the
scripted reply backend so only memory is measured): each fact of recall_facts.yaml told
once by a fresh player, then K unrelated turns, then ``memory.list`` with the question
(recall@3), asked as the player asks it and as a designer does (third person); the 30
never-told questions of never_told.yaml (memories recalled above the
bar: should be none); the 20 update pairs of fact_updates.yaml (what the NPC knows about
the player, ``state.facts``, holds the newer value; neither it nor the question's recall
holds the older). tests/test_memory_probes_real.py runs it in the default test run on the
first 30 facts (each paired with a never-told question, as in the whole run; every update):
all 60 facts' 3,200 turns took ~170 s of a 2-core run. ``--server`` alone runs all 60.

Each fact of ``tests/probes/recall_facts.yaml`` is told to Mara by a fresh player, Mara
answers, then the same player chats about other things for K turns (player line and reply,
each stored as the engine stores turns). Then the player asks a question about the fact;
a hit is the fact's memory among the 3 the engine recalls for that question (the engine's
own scoring, on Chroma on disk with the real MiniLM embedder). Run for memories embedded the
way this version embeds them (what was said) and the way older versions did (the whole
third-person line), side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from npc_engine.config import ServerLimits, load_config  # noqa: E402
from npc_engine.dialogue import DialogueEngine  # noqa: E402
from npc_engine.generation.scripted import ScriptedGenerator  # noqa: E402
from npc_engine.memory.chroma_store import ChromaMemoryStore  # noqa: E402
from npc_engine.memory.minilm import OfflineMiniLM  # noqa: E402
from npc_engine.memory.types import Memory, utc_now  # noqa: E402
from npc_engine.model_registry import ModelCache  # noqa: E402
from npc_engine.persona.loader import load_personas  # noqa: E402
from npc_engine.turns import player_line_memory, reply_memory  # noqa: E402

PROBES = REPO / "tests/probes/recall_facts.yaml"
NEVER_TOLD = REPO / "tests/probes/never_told.yaml"
UPDATES = REPO / "tests/probes/fact_updates.yaml"
ACKNOWLEDGED = "Is that so? I'll keep it in mind, love."


@dataclass
class Outcome:
    hits: int
    total: int
    misses: list[tuple[str, list[str]]]  # question, the 3 recalled
    firsts: int = 0  # the fact recalled first (recall@1)

    @property
    def recall(self) -> float:
        return self.hits / self.total if self.total else 0.0


PROBE_LIMITS = ServerLimits(rate_per_second=1000, rate_burst=1000)


def load_probes() -> dict[str, Any]:
    return dict(yaml.safe_load(PROBES.read_text()))


def model_replies(folder: Path, facts: list[dict[str, str]]) -> list[str]:
    """Mara's own replies to the facts, from the configured model (temperature 0)."""
    from npc_engine.runtime import open_engine

    config = load_config(
        personas_dir=REPO / "personas",
        data_dir=folder / "replies",
        temperature=0.0,
        seed=1234,
        actions={"enabled": False},
    )
    runtime = open_engine(config)
    try:
        return [
            runtime.engine.say("mara", fact["told"], player_id=f"r{i}", max_tokens=40).text
            for i, fact in enumerate(facts)
        ]
    finally:
        runtime.close()


def run(
    folder: Path,
    turns: int,
    *,
    content_vectors: bool,
    hybrid: bool = True,
    gated: bool = True,
    facts: int | None = None,
    replies: list[str] | None = None,
) -> Outcome:
    """``replies``: Mara's answer to each fact (default: one stock line for all).
    ``gated``: the relevance bars as configured (else none, as before issue 16)."""
    probes = load_probes()
    chatter = probes["chatter"]
    retrieval: dict[str, Any] = {"hybrid": hybrid}
    if not gated:
        retrieval |= {"min_relevance": -1.0, "min_relevance_small_talk": -1.0}
    config = load_config(personas_dir=REPO / "personas", data_dir=folder, retrieval=retrieval)
    embed = OfflineMiniLM(ModelCache(config.cache_dir))
    store = ChromaMemoryStore(folder / "chroma", embed)
    engine = DialogueEngine(
        load_personas(config.personas_dir), ScriptedGenerator(), store, config, embed=embed
    )
    clock = utc_now() - timedelta(hours=2)
    told: list[tuple[str, str, str]] = []  # player, fact memory id, question
    memories: list[Memory] = []
    for index, fact in enumerate(probes["facts"][:facts]):
        player = f"probe-{index}"
        line = player_line_memory("mara", player, fact["told"], clock)
        told.append((player, line.id, fact["asked"]))
        answer = replies[index] if replies is not None else ACKNOWLEDGED
        memories += [line, reply_memory("mara", player, answer, clock)]
        for turn in range(turns):
            clock += timedelta(seconds=20)
            said, answer = chatter[(index + turn) % len(chatter)]
            memories += [
                player_line_memory("mara", player, said, clock),
                reply_memory("mara", player, answer, clock),
            ]
    if not content_vectors:  # as older versions stored them: the wrapper is what is embedded
        memories = [replace(m, content=None) for m in memories]
    for start in range(0, len(memories), 512):
        store.add(memories[start : start + 512])
    hits, firsts, misses = 0, 0, []
    for player, fact_id, question in told:
        recalled = [m.memory.id for m in engine.recall("mara", player, question, 3)]
        if fact_id in recalled:
            hits += 1
            firsts += recalled[0] == fact_id
        else:
            misses.append((question, [m.memory.text for m in recalled]))
    engine.close()
    return Outcome(hits, len(told), misses, firsts)


@dataclass
class ServerOutcome:
    recall: dict[int, Outcome]  # by K
    injected: dict[int, list[tuple[str, list[str]]]]  # by K: never-told question, recalled
    updates: Outcome  # hits: the newer value won
    designer: dict[int, Outcome]  # by K: the same facts asked in the third person

    @property
    def injected_total(self) -> dict[int, int]:
        return {k: sum(len(texts) for _, texts in found) for k, found in self.injected.items()}


async def probe_server(
    url: str, turns: Sequence[int] = (10, 50), *, facts: int | None = None, workers: int = 4
) -> ServerOutcome:
    """All three probes against the server at ``url`` (players ``probe-*``, ``update-*``)."""
    from npc_engine.client import NpcClient
    from npc_engine.turns import sanitize_for_memory

    probes = load_probes()
    chatter = [said for said, _answer in probes["chatter"]]
    told = probes["facts"][:facts]
    never = list(yaml.safe_load(NEVER_TOLD.read_text())["questions"])
    pairs = list(yaml.safe_load(UPDATES.read_text())["pairs"])
    hits = {k: 0 for k in turns}
    firsts = {k: 0 for k in turns}
    misses: dict[int, list[tuple[str, list[str]]]] = {k: [] for k in turns}
    # The same questions as a designer asks them in a tool (third person).
    designer_hits = {k: 0 for k in turns}
    designer_firsts = {k: 0 for k in turns}
    designer_misses: dict[int, list[tuple[str, list[str]]]] = {k: [] for k in turns}
    injected: dict[int, list[tuple[str, list[str]]]] = {k: [] for k in turns}
    won, lost = 0, []

    async def say(client: NpcClient, player: str, text: str) -> None:
        await (await client.say("mara", text, player_id=player)).result()

    async def recalled(client: NpcClient, player: str, question: str) -> list[dict[str, Any]]:
        return await client.memory_list("mara", player_id=player, query=question, limit=3)

    async def recall_one(client: NpcClient, index: int) -> None:
        player, fact = f"probe-{index}", told[index]
        wording = sanitize_for_memory(fact["told"])
        await say(client, player, fact["told"])
        done = 0
        for k in sorted(turns):
            for turn in range(done, k):
                await say(client, player, chatter[(index + turn) % len(chatter)])
            done = k
            for question, found_in, first_in, missed_in in (
                (fact["asked"], hits, firsts, misses),
                (fact["designer"], designer_hits, designer_firsts, designer_misses),
            ):
                items = await recalled(client, player, question)
                # The fact in the player's words (its line, or a summary quoting it), or
                # the fact memory made from that line (the chatter states no facts).
                found = [wording in i["text"] or i["kind"] == "fact" for i in items]
                if any(found):
                    found_in[k] += 1
                    first_in[k] += found[0]
                else:
                    missed_in[k].append((question, [i["text"] for i in items]))
            if index < len(never):
                items = await recalled(client, player, never[index])
                injected[k].append((never[index], [i["text"] for i in items]))

    async def update_one(client: NpcClient, index: int) -> None:
        nonlocal won
        player, pair = f"update-{index}", pairs[index]
        await say(client, player, pair["before"])
        for turn in range(3):
            await say(client, player, chatter[(index + turn) % len(chatter)])
        await say(client, player, pair["after"])
        for turn in range(2):
            await say(client, player, chatter[(index + turn + 5) % len(chatter)])
        # What the NPC knows about the player (state.facts) holds the newer value and not
        # the older; the question recalls nothing with the older value as current.
        state = await client.get_state(player, npc_id="mara")
        known = [fact["text"] for fact in state.get("facts") or []]
        texts = [i["text"] for i in await recalled(client, player, pair["asked"])]
        newer = any(pair["new"] in fact for fact in known)
        if newer and not any(pair["old"] in t for t in known + texts):
            won += 1
        else:
            lost.append((pair["asked"], known + texts))

    jobs: asyncio.Queue[Any] = asyncio.Queue()
    for index in range(len(told)):
        jobs.put_nowait((recall_one, index))
    for index in range(len(pairs)):
        jobs.put_nowait((update_one, index))

    async def worker() -> None:
        async with await NpcClient.connect(url) as client:
            while not jobs.empty():
                job, index = jobs.get_nowait()
                await job(client, index)

    await asyncio.gather(*(worker() for _ in range(workers)))
    return ServerOutcome(
        {k: Outcome(hits[k], len(told), misses[k], firsts[k]) for k in turns},
        injected,
        Outcome(won, len(pairs), lost),
        {
            k: Outcome(designer_hits[k], len(told), designer_misses[k], designer_firsts[k])
            for k in turns
        },
    )


def serve_and_probe(
    folder: Path,
    turns: Sequence[int],
    facts: int | None = None,
    settings: dict[str, Any] | None = None,
) -> ServerOutcome:
    """Start the real server (scripted replies, Chroma in ``folder``, ``settings`` on top
    of the defaults) and probe it."""
    from npc_engine.runtime import open_engine
    from npc_engine.server import NpcServer

    config = load_config(
        personas_dir=REPO / "personas",
        data_dir=folder,
        generation={"backend": "scripted", "scripted_reply": ACKNOWLEDGED},
        **(settings or {}),
    )
    runtime = open_engine(config)

    async def run_all() -> ServerOutcome:
        # Turns back to back, as fast as the engine answers: more than a game sends, so
        # the per-connection rate limit (20/s) is raised for this client.
        server = NpcServer(runtime.engine, port=0, limits=PROBE_LIMITS)
        await server.start()
        try:
            return await probe_server(server.url, turns, facts=facts)
        finally:
            await server.stop()

    try:
        return asyncio.run(run_all())
    finally:
        runtime.close()


def print_server(outcome: ServerOutcome) -> None:
    for k, result in outcome.recall.items():
        for voice, found in (("player's", result), ("designer's", outcome.designer[k])):
            print(
                f"server K={k:3d}  {voice} questions: recall@3 {found.hits}/{found.total}"
                f"  recall@1 {found.firsts}/{found.total}"
            )
            for question, recalled in found.misses:
                print(f"    miss: {question!r} -> {recalled}")
        found = [(q, texts) for q, texts in outcome.injected[k] if texts]
        print(
            f"server K={k:3d}  never told: {outcome.injected_total[k]} memories recalled "
            f"for {len(outcome.injected[k])} questions"
        )
        for question, texts in found:
            print(f"    recalled: {question!r} -> {texts}")
    updates = outcome.updates
    print(f"server updates: newer value won {updates.hits}/{updates.total}")
    for question, recalled in updates.misses:
        print(f"    lost: {question!r} -> {recalled}")


def calibrate(folder: Path, turns: int = 10) -> tuple[list[float], list[float]]:
    """The relevance (cosine) of the best answer to each recall question, and of the best
    memory that states something about the player for each never-told question: what
    ``retrieval.min_relevance`` separates. Told through the engine (facts made, scripted
    replies), on Chroma with the configured embedder."""
    from npc_engine.runtime import open_engine

    probes = load_probes()
    chatter = [said for said, _answer in probes["chatter"]]
    never = list(yaml.safe_load(NEVER_TOLD.read_text())["questions"])
    config = load_config(
        personas_dir=REPO / "personas",
        data_dir=folder,
        generation={"backend": "scripted", "scripted_reply": ACKNOWLEDGED},
    )
    runtime = open_engine(config)
    engine = runtime.engine
    answers, unrelated = [], []
    try:
        for index, fact in enumerate(probes["facts"]):
            player = f"probe-{index}"
            engine.say("mara", fact["told"], player_id=player)
            for turn in range(turns):
                engine.say("mara", chatter[(index + turn) % len(chatter)], player_id=player)
        engine.writer.flush(120)
        for index, fact in enumerate(probes["facts"]):
            player, wording = f"probe-{index}", fact["told"].replace('"', "'")
            found = engine.store.search("mara", player, fact["asked"], 40)
            hits = [
                c.relevance for c in found if wording in c.memory.text or c.memory.kind == "fact"
            ]
            answers.append(max(hits, default=-1.0))
            if index < len(never):
                telling = [
                    c.relevance
                    for c in engine.store.search("mara", player, never[index], 40)
                    if not c.memory.states_little
                ]
                unrelated.append(max(telling, default=-1.0))
    finally:
        runtime.close()
    return answers, unrelated


def print_calibration(answers: list[float], unrelated: list[float]) -> None:
    print(
        f"best answer per recall question ({len(answers)}), lowest: "
        + " ".join(f"{v:.3f}" for v in sorted(answers)[:6])
    )
    print(
        f"best memory per never-told question ({len(unrelated)}), highest: "
        + " ".join(f"{v:.3f}" for v in sorted(unrelated)[-6:])
    )
    print("min_relevance  recalled  never-told questions recalling something")
    for bar in (0.20, 0.22, 0.24, 0.25, 0.26, 0.27, 0.28, 0.29, 0.30, 0.32, 0.35):
        kept = sum(1 for v in answers if v >= bar)
        leaked = sum(1 for v in unrelated if v >= bar)
        print(f"  {bar:.2f}         {kept:3d}/{len(answers)}    {leaked}/{len(unrelated)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--turns", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--facts", type=int, help="only the first N facts")
    parser.add_argument(
        "--model-replies",
        action="store_true",
        help="Mara answers each fact with the model (default: one stock reply)",
    )
    parser.add_argument("--server", action="store_true", help="all probes via the server")
    parser.add_argument(
        "--no-facts", action="store_true", help="with --server: memory.facts off (before/after)"
    )
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="sweep retrieval.min_relevance: recall against never-told questions",
    )
    args = parser.parse_args(argv)
    if args.calibrate:
        with tempfile.TemporaryDirectory() as folder:
            print_calibration(*calibrate(Path(folder)))
        return 0
    if args.server:
        with tempfile.TemporaryDirectory() as folder:
            settings = {"memory": {"facts": False}} if args.no_facts else None
            print_server(serve_and_probe(Path(folder), args.turns, args.facts, settings))
        return 0
    replies = None
    if args.model_replies:
        with tempfile.TemporaryDirectory() as folder:
            replies = model_replies(Path(folder), load_probes()["facts"][: args.facts])
    # Each step of issue 16 added to the one before, so each row shows what one step did.
    steps = (
        ("whole line (before)", False, False, False),
        ("what was said", True, False, False),
        ("+ keywords (hybrid)", True, True, False),
        ("+ relevance bars", True, True, True),
    )
    for turns in args.turns:
        for label, content, hybrid, gated in steps:
            with tempfile.TemporaryDirectory() as folder:
                outcome = run(
                    Path(folder),
                    turns,
                    content_vectors=content,
                    hybrid=hybrid,
                    gated=gated,
                    facts=args.facts,
                    replies=replies,
                )
            print(
                f"K={turns:3d}  {label:26s} recall@3 {outcome.hits}/{outcome.total}"
                f"  recall@1 {outcome.firsts}/{outcome.total}"
            )
            for question, recalled in outcome.misses:
                print(f"    miss: {question!r} -> {recalled}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
