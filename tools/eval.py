"""Character fidelity per model: plays the evaluation set through the real engine.

    .venv/bin/python tools/eval.py                                  # the default model
    .venv/bin/python tools/eval.py --model smollm2-135m-instruct --model qwen2.5-coder-0.5b-instruct
    .venv/bin/python tools/eval.py --filler 2 --only mara-identity-1 mara-fact-name

Each conversation of ``tests/probes/eval_conversations.yaml`` is played by a fresh player
against the sample NPCs (real model, real Chroma on disk, the engine's own sampling with a
fixed seed); ``npc_engine.evaluation`` judges every reply with deterministic checks. Prints
one table row per model (the shares, loops, parroting, warm first token and decode speed
measured in the same run) and writes the verdicts as JSON. ``--filler K`` keeps at most K
filler turns between a told fact and its question (the test run's bounded version).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from npc_engine.config import load_config  # noqa: E402
from npc_engine.evaluation import (  # noqa: E402
    Conversation,
    Scores,
    TurnVerdict,
    judge,
    load_eval_set,
    score,
)
from npc_engine.model_registry import DEFAULT_CHAT_MODEL  # noqa: E402

EVAL_SET = REPO / "tests/probes/eval_conversations.yaml"
SEED = 1234


@dataclass
class ModelRun:
    model: str
    scores: Scores
    verdicts: list[TurnVerdict]
    warm_first_token_ms: float  # median over the run's turns whose head was cached
    decode_tokens_per_s: float  # tokens after the first / time after the first, over the run
    seconds: float


def play(
    model: str,
    conversations: list[Conversation],
    data_dir: Path,
    *,
    personas: Path = REPO / "personas",
    progress: bool = True,
    **settings: Any,
) -> ModelRun:
    from npc_engine.runtime import open_engine

    config = load_config(
        model=model,
        personas_dir=personas,
        data_dir=data_dir,
        seed=SEED,
        **settings,
    )
    runtime = open_engine(config)
    engine = runtime.engine
    verdicts: list[TurnVerdict] = []
    warm_ttft: list[float] = []
    decoded = 0
    decode_s = 0.0
    started = time.perf_counter()
    try:
        world = engine.persona(conversations[0].npc).world
        out_of_world = list(world.out_of_world) if world is not None else []
        for number, conversation in enumerate(conversations, start=1):
            persona = engine.persona(conversation.npc).persona
            examples = [line.npc for line in persona.example_dialogue]
            # A fresh player per conversation. The prompt shows the id ("The player
            # (traveller3) says"): a neutral in-world word, not the conversation's name.
            player = f"traveller{number}"
            replies: list[str] = []
            for index, turn in enumerate(conversation.turns):
                result = engine.say(conversation.npc, turn.say, player_id=player)
                if result.memory_write is not None:
                    result.memory_write.result(60)  # a player takes longer than a write
                verdict = judge(
                    conversation,
                    index,
                    result.text,
                    result.reason,
                    earlier_replies=replies,
                    examples=examples,
                    out_of_world=out_of_world,
                )
                verdicts.append(verdict)
                replies.append(result.text)
                timings = result.timings
                if timings.ttft_ms is not None and result.cached_tokens > 0:
                    warm_ttft.append(timings.ttft_ms)
                if timings.ttft_ms is not None and result.completion_tokens > 1:
                    decoded += result.completion_tokens - 1
                    decode_s += (timings.total_ms - timings.ttft_ms) / 1000
                if progress:
                    mark = "ok " if verdict.passed else "BAD"
                    print(f"  {mark} {conversation.id}[{index}] {turn.say!r} -> {result.text!r}")
    finally:
        runtime.close()
    return ModelRun(
        model=model,
        scores=score(verdicts),
        verdicts=verdicts,
        warm_first_token_ms=statistics.median(warm_ttft) if warm_ttft else float("nan"),
        decode_tokens_per_s=decoded / decode_s if decode_s else float("nan"),
        seconds=time.perf_counter() - started,
    )


def table(runs: list[ModelRun]) -> str:
    header = (
        "| model | turns | in character | knows itself | uses what it was told "
        "| knows its world | ends by itself | loops | parroted | echoed | warm first token "
        "| decode |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for run in runs:
        s = run.scores

        def kind(name: str, scores: Scores = s) -> str:
            named, asked = scores.by_kind[name]
            return f"{named}/{asked} ({100 * named / asked:.0f} %)" if asked else "–"

        rows.append(
            f"| {run.model} | {s.turns} | {100 * s.in_character:.0f} % "
            f"| {kind('knows_self')} | {kind('uses_told')} | {kind('knows_world')} "
            f"| {100 * s.ends_by_itself:.0f} % | {s.loops} | {s.parroted} | {s.echoed} "
            f"| {run.warm_first_token_ms:.0f} ms | {run.decode_tokens_per_s:.0f} tok/s |"
        )
    return header + "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", help="model id or GGUF (repeatable)")
    parser.add_argument("--set", type=Path, default=EVAL_SET, help="evaluation set YAML")
    parser.add_argument("--only", nargs="*", help="conversation ids")
    parser.add_argument("--filler", type=int, help="at most K filler turns before a question")
    parser.add_argument("--json", type=Path, default=Path("eval-results.json"))
    parser.add_argument("--quiet", action="store_true", help="no line per turn")
    args = parser.parse_args(argv)
    conversations = [
        c.with_filler(args.filler)
        for c in load_eval_set(args.set).conversations
        if not args.only or c.id in args.only
    ]
    turns = sum(len(c.turns) for c in conversations)
    runs = []
    for model in args.model or [DEFAULT_CHAT_MODEL]:
        print(f"{model}: {len(conversations)} conversations, {turns} turns", flush=True)
        with tempfile.TemporaryDirectory(prefix="npc-eval-") as tmp:
            runs.append(play(model, conversations, Path(tmp) / "data", progress=not args.quiet))
        print(f"{model}: {runs[-1].seconds:.0f} s", flush=True)
    print()
    print(table(runs))
    failures = [v for run in runs for v in run.verdicts if not v.passed]
    args.json.write_text(
        json.dumps(
            {
                "runs": [
                    {**asdict(run), "verdicts": [asdict(v) for v in run.verdicts]} for run in runs
                ],
            },
            indent=2,
            default=float,
        )
    )
    print(f"\n{len(failures)} replies failed a check; verdicts in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
