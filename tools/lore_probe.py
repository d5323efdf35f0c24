"""Lorebook probe (issue 14): does the entry that answers a question reach the prompt?

    .venv/bin/python tools/lore_probe.py [--entries 2000]     # recall, load, restart
    .venv/bin/python tools/lore_probe.py --calibrate          # recall per lore.min_similarity

Generates the big world of tools/make_world.py (the sample world plus N entries), opens
the engine on it as the server does (real Chroma on disk, the real MiniLM, the default
model's tokenizer counting each entry against ``lore.budget_tokens``), then asks every
question of tests/probes/lore_questions.yaml as Mara's player: a hit is the answering entry
among those chosen for that line under the default budget. Then the engine is opened again
on the same data directory: an unchanged lorebook must embed nothing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

import make_world  # noqa: E402

from npc_engine.conditions import GameFacts  # noqa: E402
from npc_engine.config import EngineConfig, load_config  # noqa: E402
from npc_engine.lore import LoreSettings  # noqa: E402
from npc_engine.runtime import open_engine  # noqa: E402

PROBES = REPO / "tests" / "probes" / "lore_questions.yaml"
NPC = "mara"


@dataclass
class Opened:
    seconds: float
    entries: int
    embedded: int


@dataclass
class ProbeResult:
    hits: int
    total: int
    misses: list[str]
    chosen_per_line: float

    @property
    def recall(self) -> float:
        return self.hits / self.total if self.total else 0.0


def load_probes() -> dict[str, Any]:
    return dict(yaml.safe_load(PROBES.read_text()))


def world_config(world: Path, data: Path, **extra: Any) -> EngineConfig:
    return load_config(personas_dir=world, data_dir=data, **extra)


def open_world(config: EngineConfig) -> tuple[Any, Opened]:
    """The engine on ``config`` and how long its lorebook took to be ready."""
    started = time.perf_counter()
    runtime = open_engine(config)
    seconds = time.perf_counter() - started
    books = [runtime.engine.lore.lorebook(w) for w in runtime.registry.worlds.values()]
    embedded = sum(b.vectors.embedded for b in books if b.vectors is not None)
    return runtime, Opened(seconds, sum(len(b) for b in books), embedded)


def ask(engine: Any, probes: list[dict[str, Any]], settings: LoreSettings) -> ProbeResult:
    loaded = engine.persona(NPC)
    assert loaded.world is not None
    book = engine.lore.lorebook(loaded.world)
    hits, misses, chosen_total = 0, [], 0
    for probe in probes:
        chosen = book.choose(
            loaded.persona,
            GameFacts(trust=0, flags={}),
            query=probe["question"],
            recent="",
            shown=set(),
            settings=settings,
        )
        chosen_total += len(chosen)
        if any(c.entry_id == probe["entry"] for c in chosen):
            hits += 1
        else:
            misses.append(f"{probe['question']} -> {probe['entry']}")
    return ProbeResult(hits, len(probes), misses, chosen_total / max(len(probes), 1))


def settings_of(config: EngineConfig, **changes: Any) -> LoreSettings:
    lore = config.lore
    values = {
        "budget_tokens": lore.budget_tokens,
        "max_entries": lore.max_entries,
        "min_similarity": lore.min_similarity,
        "scan_turns": lore.scan_turns,
    }
    values.update(changes)
    return LoreSettings(**values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calibrate", action="store_true")
    args = parser.parse_args(argv)
    spec = load_probes()
    with tempfile.TemporaryDirectory(prefix="npc-lore-probe-") as tmp:
        world = Path(tmp) / "world"
        make_world.write_world(world, spec["entries"], spec["seed"])
        config = world_config(world, Path(tmp) / "data")
        runtime, first = open_world(config)
        try:
            if args.calibrate:
                for bar in (0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55):
                    found = ask(
                        runtime.engine, spec["probes"], settings_of(config, min_similarity=bar)
                    )
                    print(
                        f"min_similarity {bar:.2f}: recall {found.hits}/{found.total}, "
                        f"{found.chosen_per_line:.1f} entries per line"
                    )
                return 0
            result = ask(runtime.engine, spec["probes"], settings_of(config))
        finally:
            runtime.close()
        runtime, again = open_world(config)
        runtime.close()
    print(
        f"lorebook probe, {first.entries} entries looked up per turn (the sample world's "
        f"{first.entries - spec['entries']} + {spec['entries']} generated):"
    )
    print(
        f"  recall of the answering entry: {result.hits}/{result.total} = {result.recall:.2f} "
        f"({result.chosen_per_line:.1f} entries chosen per line, budget "
        f"{config.lore.budget_tokens} tokens)"
    )
    for miss in result.misses:
        print(f"  miss: {miss}")
    print(f"  first open: {first.seconds:.1f} s, {first.embedded} entries embedded")
    print(f"  restart:    {again.seconds:.1f} s, {again.embedded} entries embedded")
    return 0


if __name__ == "__main__":
    sys.exit(main())
