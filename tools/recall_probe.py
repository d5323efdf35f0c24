"""Recall probe (issue 16): facts told once, then unrelated turns, then a natural question.

    .venv/bin/python tools/recall_probe.py [--turns 10 50] [--facts N]

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
import sys
import tempfile
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from npc_engine.config import load_config  # noqa: E402
from npc_engine.dialogue import DialogueEngine, player_line_memory, reply_memory  # noqa: E402
from npc_engine.generation.scripted import ScriptedGenerator  # noqa: E402
from npc_engine.memory.chroma_store import ChromaMemoryStore, OfflineMiniLM  # noqa: E402
from npc_engine.memory.types import Memory, utc_now  # noqa: E402
from npc_engine.model_registry import ModelCache  # noqa: E402
from npc_engine.persona.loader import load_personas  # noqa: E402

PROBES = REPO / "tests/probes/recall_facts.yaml"
ACKNOWLEDGED = "Is that so? I'll keep it in mind, love."


@dataclass
class Outcome:
    hits: int
    total: int
    misses: list[tuple[str, list[str]]]  # question, the 3 recalled

    @property
    def recall(self) -> float:
        return self.hits / self.total if self.total else 0.0


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
    facts: int | None = None,
    replies: list[str] | None = None,
) -> Outcome:
    """``replies``: Mara's answer to each fact (default: one stock line for all)."""
    probes = load_probes()
    chatter = probes["chatter"]
    config = load_config(
        personas_dir=REPO / "personas", data_dir=folder, retrieval={"hybrid": hybrid}
    )
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
    hits, misses = 0, []
    for player, fact_id, question in told:
        recalled = engine.recall("mara", player, question, 3)
        if fact_id in [m.memory.id for m in recalled]:
            hits += 1
        else:
            misses.append((question, [m.memory.text for m in recalled]))
    engine.close()
    return Outcome(hits, len(told), misses)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--turns", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--facts", type=int, help="only the first N facts")
    parser.add_argument(
        "--model-replies",
        action="store_true",
        help="Mara answers each fact with the model (default: one stock reply)",
    )
    args = parser.parse_args(argv)
    replies = None
    if args.model_replies:
        with tempfile.TemporaryDirectory() as folder:
            replies = model_replies(Path(folder), load_probes()["facts"][: args.facts])
    for turns in args.turns:
        for content, hybrid in ((False, False), (True, False), (True, True)):
            with tempfile.TemporaryDirectory() as folder:
                outcome = run(
                    Path(folder),
                    turns,
                    content_vectors=content,
                    hybrid=hybrid,
                    facts=args.facts,
                    replies=replies,
                )
            label = ("what was said" if content else "whole line") + (
                " + keywords" if hybrid else ""
            )
            print(f"K={turns:3d}  {label:26s} recall@3 {outcome.hits}/{outcome.total}")
            for question, recalled in outcome.misses:
                print(f"    miss: {question!r} -> {recalled}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
