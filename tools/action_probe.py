"""Game actions by meaning (issue 30): how often the engine picks the right action.

    .venv/bin/python tools/action_probe.py                 # both labelled sets, as configured
    .venv/bin/python tools/action_probe.py --calibrate     # choose actions.gate/accept/margin
    .venv/bin/python tools/action_probe.py --model qwen2.5-coder-0.5b-instruct   # close calls
                                                           # go to that model (default: none)

Each labelled line (tests/probes/game_actions.yaml, and game_actions_heldout.yaml, written
apart from the actions' examples) is said to its NPC through the real engine (real MiniLM,
real Chroma on disk). Without ``--model`` the replies are scripted and a close call that
would go to the model counts as no action: what is measured is the embedder alone. With
``--model`` the close calls go to that model under the grammar, as in a game. Prints, per
set: right share, actions where none was expected, the share decided without the model, and
the time the choice added per turn. ``--calibrate`` searches the three thresholds on the
first set only (embedding scores, no engine) for the most right lines with at most 5 %
false actions, and reports the held-out set at the choice.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from npc_engine.actions import (  # noqa: E402
    ChosenAction,
    choose_by_meaning,
    labelled_lines,
    offered_actions,
)
from npc_engine.config import load_config  # noqa: E402

SETS = {
    "labelled": REPO / "tests/probes/game_actions.yaml",
    "held-out": REPO / "tests/probes/game_actions_heldout.yaml",
}


def label(action: ChosenAction | None) -> str:
    if action is None:
        return "none"
    return f"{action.name}({', '.join(f'{k}={v}' for k, v in action.args.items())})"


def load_lines(path: Path) -> list[dict[str, Any]]:
    return list(yaml.safe_load(path.read_text(encoding="utf-8"))["lines"])


@dataclass
class SetOutcome:
    name: str
    total: int
    right: int
    false_actions: int  # an action where none was expected
    quiet: int  # lines where none was expected
    decided: int  # by the embedder alone
    added_ms: float  # mean time the choice added to a turn
    wrong: list[tuple[str, str, str]]  # line, expected, chosen

    def row(self) -> str:
        return (
            f"| {self.name} | {self.total} | {self.right}/{self.total} "
            f"({100 * self.right / self.total:.0f} %) | {self.false_actions}/{self.quiet} "
            f"({100 * self.false_actions / max(self.quiet, 1):.0f} %) "
            f"| {100 * self.decided / self.total:.0f} % | {self.added_ms:.0f} ms |"
        )


HEADER = (
    "| set | lines | right | false actions | decided without the model | added per turn |\n"
    "|---|---|---|---|---|---|"
)


def probe_engine(model: str | None, data_dir: Path, **settings: Any) -> list[SetOutcome]:
    """Every line of both sets through one real engine."""
    from npc_engine.runtime import open_engine

    generation = {} if model else {"backend": "scripted", "scripted_reply": "Aye."}
    config = load_config(
        personas_dir=REPO / "personas",
        data_dir=data_dir,
        seed=1234,
        temperature=0.0,
        **({"model": model} if model else {}),
        generation=generation,
        **settings,
    )
    runtime = open_engine(config)
    engine = runtime.engine
    outcomes = []
    try:
        for name, path in SETS.items():
            lines = load_lines(path)
            right = false_actions = decided = 0
            added: list[float] = []
            wrong = []
            for index, line in enumerate(lines):
                player = f"{name}-{index}"
                if line.get("state"):
                    engine.set_state(player, npc_id=line["npc"], **line["state"])
                result = engine.say(line["npc"], line["player"], player_id=player, max_tokens=24)
                engine.writer.flush(60)
                chosen = label(result.game_action)
                right += chosen == line["expect"]
                false_actions += line["expect"] == "none" and chosen != "none"
                decided += result.action_by == "meaning"
                added.append(result.timings.action_ms)
                if chosen != line["expect"]:
                    wrong.append((line["player"], line["expect"], chosen))
            quiet = sum(1 for line in lines if line["expect"] == "none")
            outcomes.append(
                SetOutcome(
                    name,
                    len(lines),
                    right,
                    false_actions,
                    quiet,
                    decided,
                    statistics.mean(added),
                    wrong,
                )
            )
    finally:
        runtime.close()
    return outcomes


def calibrate(data_dir: Path) -> None:
    """Grid search of (gate, accept, margin) on the labelled set's embedding scores."""
    from npc_engine.game_state import Standing
    from npc_engine.memory.minilm import OfflineMiniLM
    from npc_engine.model_registry import ModelCache
    from npc_engine.persona.loader import load_personas

    config = load_config(personas_dir=REPO / "personas", data_dir=data_dir)
    embed = OfflineMiniLM(ModelCache(config.cache_dir))
    registry = load_personas(REPO / "personas")
    prepared: dict[str, list[tuple[Any, ...]]] = {}
    for name, path in SETS.items():
        rows = []
        for line in load_lines(path):
            loaded = registry.get(line["npc"])
            assert loaded is not None, line["npc"]
            standing = Standing(int((line.get("state") or {}).get("trust", loaded.persona.trust)))
            offered = offered_actions(loaded.persona, loaded.world, standing.facts())
            labelled = labelled_lines(offered)
            vectors = embed([x.text for x in labelled])
            rows.append((line, embed([line["player"]])[0], labelled, vectors))
        prepared[name] = rows

    def measure(rows: list[tuple[Any, ...]], gate: float, accept: float, margin: float) -> tuple:
        right = false_actions = 0
        for line, vector, labelled, vectors in rows:
            choice = choose_by_meaning(
                line["player"], vector, labelled, vectors, near=gate, accept=accept, margin=margin
            )
            chosen = label(choice.action) if choice.decided else "none"
            right += chosen == line["expect"]
            false_actions += line["expect"] == "none" and chosen != "none"
        quiet = sum(1 for row in rows if row[0]["expect"] == "none")
        return right / len(rows), false_actions / max(quiet, 1)

    best: tuple[float, float, float, float, float] | None = None
    for gate in (0.15, 0.2, 0.25, 0.3, 0.35, 0.4):
        for accept in [round(0.4 + 0.025 * i, 3) for i in range(17)]:
            for margin in (0.0, 0.02, 0.04, 0.06, 0.08, 0.1):
                right, false = measure(prepared["labelled"], gate, accept, margin)
                if false <= 0.05 and (best is None or right > best[0]):
                    best = (right, false, gate, accept, margin)
    assert best is not None
    right, false, gate, accept, margin = best
    held_right, held_false = measure(prepared["held-out"], gate, accept, margin)
    print(
        f"chosen on the labelled set: gate {gate}, accept {accept}, margin {margin}: "
        f"right {right:.0%}, false {false:.0%} (embedder alone)"
    )
    print(f"held-out set at that choice: right {held_right:.0%}, false {held_false:.0%}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="send close calls to this model (id or GGUF)")
    parser.add_argument("--calibrate", action="store_true", help="choose the thresholds")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="npc-actions-") as tmp:
        if args.calibrate:
            calibrate(Path(tmp) / "data")
            return 0
        started = time.perf_counter()
        outcomes = probe_engine(args.model, Path(tmp) / "data")
    print(f"model for close calls: {args.model or 'none (embedder alone)'}")
    print(HEADER)
    for outcome in outcomes:
        print(outcome.row())
    for outcome in outcomes:
        for said, expected, chosen in outcome.wrong:
            print(f"  {outcome.name}: {said!r}: expected {expected}, chose {chosen}")
    print(f"({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
