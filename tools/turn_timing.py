"""Where the time of one turn goes: engine work (recall, prompt building, memory write)
against the model (prompt evaluation + generation), on the configured model.

Prints each stage as a share of the turn, measured in the same run (absolute times on a
shared machine are noise; the shares are the useful part).

    .venv/bin/python tools/turn_timing.py [--turns 6] [--npc mara]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from npc_engine.config import load_config
from npc_engine.runtime import open_engine

LINES = [
    "Hello! My name is Aria.",
    "Any rooms free tonight?",
    "What's the news from the harbour?",
    "Who is the guard at the gate?",
    "Do you remember my name?",
    "Is the stew any good?",
    "What happened to the lighthouse?",
    "Goodnight, then.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--npc", default="mara")
    parser.add_argument("--max-tokens", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data_dir:
        config = load_config(data_dir=Path(data_dir), seed=7, temperature=0.0)
        runtime = open_engine(config)
        engine = runtime.engine
        rows = []
        try:
            for index in range(args.turns + 1):
                line = LINES[index % len(LINES)]
                result = engine.say(args.npc, line, player_id="bench", max_tokens=args.max_tokens)
                mark = time.perf_counter()
                assert result.memory_write is not None
                result.memory_write.result(60)
                write_ms = (time.perf_counter() - mark) * 1000
                if index == 0:
                    continue  # the cold first turn evaluates the whole persona
                t = result.timings
                rows.append(
                    {
                        "ttft": t.ttft_ms or 0.0,
                        "total": t.total_ms,
                        "retrieval": t.retrieval_ms,
                        "prompt": t.prompt_ms,
                        "generation": t.generation_ms,
                        "write": write_ms,
                        "tokens": result.completion_tokens,
                        "prompt_tokens": result.prompt_tokens,
                        "cached": result.cached_tokens,
                    }
                )
        finally:
            runtime.close()

    def median(key: str) -> float:
        return statistics.median(row[key] for row in rows)

    total = median("total")
    engine_ms = median("retrieval") + median("prompt")
    print(f"model {config.model}, {len(rows)} warm turns, medians:")
    print(f"  first token      {median('ttft'):8.0f} ms")
    print(f"  whole turn       {total:8.0f} ms  ({median('tokens'):.0f} tokens generated)")
    print(f"  prompt tokens    {median('prompt_tokens'):8.0f}  ({median('cached'):.0f} cached)")
    print(f"  recall           {median('retrieval'):8.1f} ms  {median('retrieval') / total:6.1%}")
    print(f"  prompt building  {median('prompt'):8.1f} ms  {median('prompt') / total:6.1%}")
    gen = median("generation")
    print(f"  model            {gen:8.1f} ms  {gen / total:6.1%}")
    print(f"  memory write     {median('write'):8.1f} ms  (after the reply, off the reply path)")
    print(f"  engine share of the turn (recall + prompt): {engine_ms / total:.1%}")


if __name__ == "__main__":
    main()
