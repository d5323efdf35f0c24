"""The reply guard on the labelled leak set (tests/probes/guard_leaks.yaml), per class.

Each reply is streamed through the guard built as the engine builds it (the sample
personas, the real MiniLM), in several chunkings: random 1–4 characters, tokenizer-like
pieces and whole words. A leak is *cut* when the guard cut it, *late* when it cut but the
text it had already delivered still tells the secret's key, *passed* when it was not cut.
A harmless or in-world line that is cut is a false cut. The decision and the delivered
text must be the same for every chunking (``chunking_differs`` counts where they are not).

    python tools/guard_probe.py            # the table
    python tools/guard_probe.py --json     # the numbers, for tests
    python tools/guard_probe.py --calibrate  # thresholds against the labelled lines
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
LEAKS = ROOT / "tests" / "probes" / "guard_leaks.yaml"
sys.path.insert(0, str(ROOT))


def chunkings(text: str, seed: int = 0) -> Iterator[list[str]]:
    """The reply cut as a stream would deliver it: random small pieces, tokenizer-like
    pieces (a leading space, words split in 3–4 letters) and whole words."""
    rng = random.Random(f"{seed}|{text}")
    pieces, position = [], 0
    while position < len(text):
        size = rng.randint(1, 4)
        pieces.append(text[position : position + size])
        position += size
    yield pieces
    tokens: list[str] = []
    for word in re.findall(r"\s*\S+", text) + ([text[len(text.rstrip()) :]] if text else []):
        while len(word) > 4:
            cut = rng.randint(3, 4)
            tokens.append(word[:cut])
            word = word[cut:]
        if word:
            tokens.append(word)
    yield tokens
    yield re.findall(r"\S+\s*|\s+", text)


@dataclass
class Streamed:
    cut: bool
    delivered: str  # what the client saw before the deflection
    kind: str | None


def stream(rules: Any, text: str, pieces: list[str]) -> Streamed:
    from npc_engine.guard import ReplyGuard

    guard = ReplyGuard(rules, "<deflected>", "<puzzled>")
    delivered = "".join(guard.feed(piece) for piece in pieces)
    end = guard.finish()
    for marker in ("— <deflected>", "<deflected>", "— <puzzled>", "<puzzled>"):
        if end.endswith(marker):
            end = end[: -len(marker)]
            break
    kind = guard.cut.kind if guard.cut is not None else None
    return Streamed(guard.cut is not None, delivered + end, kind)


@dataclass
class Tally:
    tried: int = 0
    cut: int = 0
    late: int = 0
    differs: int = 0
    examples: list[str] = field(default_factory=list)


def build_engine() -> Any:
    from npc_engine.config import load_config
    from npc_engine.dialogue import DialogueEngine
    from npc_engine.generation.scripted import ScriptedGenerator
    from npc_engine.memory.in_memory import InMemoryStore
    from npc_engine.memory.minilm import OfflineMiniLM
    from npc_engine.model_registry import ModelCache
    from npc_engine.persona.loader import load_personas

    config = load_config()
    embed = OfflineMiniLM(ModelCache(config.cache_dir))
    cached: dict[str, Any] = {}
    personas = load_personas(ROOT / "personas")
    engine = DialogueEngine(personas, ScriptedGenerator([]), InMemoryStore(), config, embed=embed)
    guard_embed = engine.secrets.embed  # the guard's (MiniLM, or MiniLM and USE paired)
    assert guard_embed is not None

    def remembered(texts: Any) -> Any:  # each sentence embedded once over the chunkings
        missing = [t for t in dict.fromkeys(texts) if t not in cached]
        if missing:
            for text, vector in zip(missing, guard_embed(missing), strict=True):
                cached[text] = vector
        return [cached[t] for t in texts]

    engine.secrets.embed = remembered
    return engine


def measure(engine: Any, data: dict[str, Any], only: set[str] | None = None) -> dict[str, Any]:
    from npc_engine.game_state import Standing
    from npc_engine.guard import find_term

    def rules_of(npc: str) -> Any:
        return engine.secrets.guard_rules(engine.persona(npc), Standing(0))

    def run(text: str, rules: Any) -> tuple[Streamed, bool]:
        runs = [stream(rules, text, pieces) for pieces in chunkings(text)]
        same = all((r.cut, r.delivered) == (runs[0].cut, runs[0].delivered) for r in runs)
        return runs[0], not same

    classes: dict[str, Tally] = defaultdict(Tally)
    for item in data.get("leaks", []):
        if only and item["class"] not in only:
            continue
        rules = rules_of(item["npc"])
        entry = f"secrets.{item['secret']}"
        secret = next((s for s in rules.secrets if s.entry == entry), None)
        if secret is None:
            raise SystemExit(f"{item['npc']} {entry} is not guarded: fix {LEAKS}")
        result, differs = run(item["text"], rules)
        tally = classes[item["class"]]
        tally.tried += 1
        tally.differs += differs
        if result.cut:
            tally.cut += 1
            tally.late += find_term(result.delivered, secret.keys) is not None
        else:
            tally.examples.append(item["text"])
    lines: dict[str, Tally] = defaultdict(Tally)
    sections = (
        ("harmless", False),
        ("contested", False),
        ("in_world", False),
        ("out_of_world", True),
    )
    for section, should_cut in sections:
        for item in data.get(section, []):
            result, differs = run(item["text"], rules_of(item["npc"]))
            tally = lines[section]
            tally.tried += 1
            tally.differs += differs
            tally.cut += result.cut
            if result.cut != should_cut:
                tally.examples.append(item["text"])
    leaks_tried = sum(t.tried for t in classes.values())
    leaks_passed = sum(t.tried - t.cut for t in classes.values())
    return {
        "classes": {k: vars(v) for k, v in sorted(classes.items())},
        "lines": {k: vars(v) for k, v in lines.items()},
        "leaks_tried": leaks_tried,
        "leaks_passed": leaks_passed,
        "passed_rate": leaks_passed / max(leaks_tried, 1),
        "late": sum(t.late for t in classes.values()),
        "false_cut_rate": lines["harmless"].cut / max(lines["harmless"].tried, 1),
        "in_world_cut_rate": lines["in_world"].cut / max(lines["in_world"].tried, 1),
        "out_of_world_caught": lines["out_of_world"].cut / max(lines["out_of_world"].tried, 1),
        "chunking_differs": sum(t.differs for t in [*classes.values(), *lines.values()]),
    }


def table(report: dict[str, Any]) -> str:
    rows = ["| class | tried | cut | passed | cut late |", "|---|---:|---:|---:|---:|"]
    for name, t in report["classes"].items():
        rows.append(
            f"| {name} | {t['tried']} | {t['cut']} | {t['tried'] - t['cut']} | {t['late']} |"
        )
    caught = report["leaks_tried"] - report["leaks_passed"]
    rows.append(
        f"| **all leaks** | {report['leaks_tried']} | {caught}"
        f" | {report['leaks_passed']} ({report['passed_rate']:.0%}) | {report['late']} |"
    )
    for name, t in report["lines"].items():
        rows.append(f"| {name} lines (cut) | {t['tried']} | {t['cut']} | | |")
    rows.append(
        f"\nfalse cuts (harmless): {report['false_cut_rate']:.1%}; in-world lines cut: "
        f"{report['in_world_cut_rate']:.1%}; out-of-world caught: "
        f"{report['out_of_world_caught']:.0%}; chunkings that changed the outcome: "
        f"{report['chunking_differs']}"
    )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--only", nargs="*", help="leak classes to run")
    parser.add_argument(
        "--examples", action="store_true", help="print what passed or was cut wrongly"
    )
    args = parser.parse_args()
    data = yaml.safe_load(LEAKS.read_text(encoding="utf-8"))
    started = time.perf_counter()
    report = measure(build_engine(), data, set(args.only) if args.only else None)
    report["seconds"] = round(time.perf_counter() - started, 1)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(table(report))
    if args.examples:
        for name, t in [*report["classes"].items(), *report["lines"].items()]:
            for text in t["examples"]:
                print(f"[{name}] {text}")
    print(f"({report['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
