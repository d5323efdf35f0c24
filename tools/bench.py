"""npc-engine speed benchmarks: every figure is a ratio of two measurements taken side by side.

    .venv/bin/python tools/bench.py [--quick] [--json bench-results.json] [--only NAME ...]

The machine is shared and noisy, so each target compares the engine with a baseline run
moments apart, on the same model and threads, and reports the ratio. Bare llama-cpp-python
runs in a process of its own (see ``BareLlama``), so neither side slows the other.
Exits 0 whatever the figures; writes JSON for tracking. ``--quick`` shrinks every count
(the test suite uses it to check that the benchmark runs, not its timings).

Targets (issue 5):
  warm        first-token time flat over 10 turns; vs bare llama-cpp-python on the same
              uncached suffix; vs naive full re-evaluation
  switch      8 NPCs in turn: first token vs single-NPC warm; with vs without snapshots
  batch       8 concurrent conversations: aggregate tokens/s vs one stream
  overhead    a full turn over WebSocket vs bare llama-cpp-python, same prompt and tokens
  memory      retrieval p50 with 10,000 memories on the NPC (100 NPCs in the store);
              batched writes per second
  decode      single-stream decode vs a bare llama-cpp-python loop; bandwidth ceiling
  expression  emotion/action from the finished reply vs grammar-constrained generation
  restart     an NPC's first line in a new process: head restored from disk vs read cold
  guard       the output guard's time per token vs the model's; first text shown vs first token
  npc_warm    (issue 12) the first say to an NPC after npc.warm vs a warm turn; the same in a
              new engine reading the head from disk; the cold first say beside them
  saves       (issue 12) save.create / save.load with 10,000 memories vs copying the store
  actions     (issue 12) the labelled game-action set through the model: accuracy,
              false actions, added time per turn
  scene       (issue 15) a 4-NPC, 8-line scene: each line's first token vs a warm one-to-one
              turn; the share of each line's prompt served from cache
  tick        (issue 15) world.tick over 100 NPCs with 1,000 memories each: time per tick;
              a say sent during a tick vs the same say with no tick (first text, client side)
  lore        (issue 14) a 2,000-entry lorebook: recall of the answering entry on the probe
              set; warm first token vs the same NPC in the small sample world; load and
              restart time (entries embedded)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))  # bench_remote and servers, beside this file

from npc_engine.config import EngineConfig, load_config  # noqa: E402
from npc_engine.model_files import resolve_chat_model  # noqa: E402
from npc_engine.runtime import EngineRuntime, open_engine  # noqa: E402

EXTRA_LORE = [
    "Every spring the fleet is blessed on the quay; the chapel bell rings once per boat.",
    "The old customs house burned in the winter of the great storm and was never rebuilt.",
    "Children are told that the fog carries the voices of drowned sailors.",
    "Brandy from the south is cheaper in Saltwhistle than anywhere on the coast.",
    "The Duke's last magistrate left after a single winter and refused to come back.",
    "Salt is dried in flat pans on the shingle beach east of the harbour.",
    "A ferry crosses to the island of Gull Point twice a week when the sea allows.",
    "The well on the market square is said never to have frozen, even in the hard winter.",
    "The town's only doctor drank himself to death; people now go to Old Wren instead.",
    "Herring, cod and eel are the town's fish; oysters are for the Duke's table only.",
    "Travellers pay a copper bit at the gate, which the guard is supposed to record.",
    "Nobody fishes on the day of the drowned, the first new moon after midwinter.",
    "The tide table is nailed to the door of the Rusty Anchor and updated in chalk.",
    "Wreckers once lured ships onto the rocks with false lights; the town denies it.",
]


@dataclass
class Row:
    target: str
    compared: str
    engine: str
    engine_value: float
    baseline: str
    baseline_value: float
    ratio: float
    goal: str
    met: bool | None
    note: str = ""


@dataclass
class Report:
    machine: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


# -- setup -------------------------------------------------------------------------------


def bench_personas(folder: Path, *, extra_lore: bool = True) -> list[str]:
    """The sample world with extra lore, and 8 NPCs: the 4 samples and a relative of each.
    (``--quick`` leaves the extra lore out: every cold prompt is then ~40% shorter.)"""
    folder.mkdir(parents=True, exist_ok=True)
    world = yaml.safe_load((REPO / "personas/world.yaml").read_text())
    world["lore"] = list(world.get("lore", [])) + (EXTRA_LORE if extra_lore else [])
    (folder / "world.yaml").write_text(yaml.safe_dump(world, sort_keys=False))
    ids = []
    for path in sorted((REPO / "personas").glob("*.yaml")):
        if path.name == "world.yaml":
            continue
        persona = yaml.safe_load(path.read_text())
        persona.setdefault("id", path.stem)
        ids.append(persona["id"])
        (folder / path.name).write_text(yaml.safe_dump(persona, sort_keys=False))
        relative = dict(persona)
        relative["id"] = f"{persona['id']}_kin"
        relative["name"] = f"{persona['name']}'s cousin"
        relative["description"] = (
            f"A cousin of {persona['name']} who came to Saltwhistle last spring. "
            + persona["description"]
        )
        ids.append(relative["id"])
        (folder / f"{relative['id']}.yaml").write_text(yaml.safe_dump(relative, sort_keys=False))
    return ids


BENCH_OVERRIDES: dict[str, Any] = {}  # --model / --n-gpu-layers / --threads


def bench_config(root: Path, name: str, **overrides: Any) -> EngineConfig:
    settings: dict[str, Any] = {
        **BENCH_OVERRIDES,
        "personas_dir": root / "personas",
        "data_dir": root / f"data-{name}",
        "head_cache_dir": root / "kv-heads",  # starts empty: the first line of an NPC is cold
        "seed": 1234,
        "temperature": 0.0,
        "n_ctx": 4096,
        # Game actions are measured on their own (target "actions"); elsewhere their choice
        # after a reply would only add to the turn times those targets compare.
        "actions": {"enabled": False},
    }
    settings.update(overrides)
    return load_config(**settings)


class ChildProcess:
    """A helper process answering named calls over a pipe (see ``BareLlama``, ``GameClient``)."""

    def __init__(self, target: Callable[..., None], *args: Any) -> None:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self._connection, child = context.Pipe()
        self._process = context.Process(target=target, args=(child, *args), daemon=True)
        self._process.start()
        child.close()

    def _call(self, name: str, *args: Any) -> Any:
        self._connection.send((name, args))
        status, value = self._connection.recv()
        if status != "ok":
            raise RuntimeError(f"{type(self).__name__} failed in {name}: {value}")
        return value

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._connection.send(None)
        self._process.join(30)
        if self._process.is_alive():
            self._process.kill()


def serve_calls(connection: Any, calls: dict[str, Callable[..., Any]]) -> None:
    """The child's side of ``ChildProcess``: answer calls until told to stop."""
    while (request := connection.recv()) is not None:
        name, args = request
        try:
            connection.send(("ok", calls[name](*args)))
        except Exception as exc:  # reported to the parent, which raises it
            connection.send(("error", repr(exc)))


class BareLlama(ChildProcess):
    """A plain ``Llama`` on the same model and threads as the engine, in its own process.

    Not in the engine's process: llama.cpp's OpenMP thread team belongs to the thread that
    calls it, and two teams on 2 cores (the engine's decode thread and this one) slowed
    both sides ~1.7× (single stream 148 -> 86 tokens/s; most likely libgomp spinning less
    at graph barriers once it manages more threads than cores) and skewed every ratio.
    Timings are taken in the child, so the pipe between the processes is not counted.
    """

    def __init__(self, config: EngineConfig) -> None:
        path, _format = resolve_chat_model(config, lambda _message: None)
        threads = config.n_threads or os.cpu_count() or 1
        super().__init__(_bare_worker, str(path), config.n_ctx, threads, config.n_gpu_layers)

    def first_token(self, tokens: list[int], cached: int) -> float:
        """Seconds to the first token with ``tokens[:cached]`` already in the context."""
        return float(self._call("first_token", tokens, cached))

    def generate(self, tokens: list[int], cached: int, count: int) -> tuple[float, float]:
        """(seconds to first token, seconds in all) producing ``count`` tokens greedily."""
        first, total = self._call("generate", tokens, cached, count)
        return float(first), float(total)

    def grammar_rate(self, tokens: list[int], count: int, schema: dict[str, Any]) -> float:
        """Decode tokens/s under a JSON-schema grammar."""
        return float(self._call("grammar_rate", tokens, count, schema))

    def tokenize(self, text: str) -> list[int]:
        return list(self._call("tokenize", text))


class GameClient(ChildProcess):
    """A WebSocket client in its own process, as a game is: its frames are parsed there, not
    under the engine's interpreter lock. Each turn is timed in the child, from the say to
    its ``reply.end``."""

    def __init__(self, url: str) -> None:
        super().__init__(_game_client_worker, url)

    def turn(self, npc_id: str, line: str, player_id: str, max_tokens: int) -> Any:
        """(seconds, the reply.end frame) of one say with ``inspect``."""
        return self._call("turn", npc_id, line, player_id, max_tokens)


def _game_client_worker(connection: Any, url: str) -> None:
    from npc_engine.client import NpcClient

    async def turn(
        client: NpcClient, npc_id: str, line: str, player_id: str, max_tokens: int
    ) -> tuple[float, dict[str, Any]]:
        started = time.perf_counter()
        stream = await client.say(
            npc_id, line, player_id=player_id, max_tokens=max_tokens, inspect=True
        )
        end = await stream.result()
        return time.perf_counter() - started, end

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with await NpcClient.connect(url) as client:
            # The pipe is read on a thread, so the loop keeps the connection serviced.
            while (request := await loop.run_in_executor(None, connection.recv)) is not None:
                _name, args = request
                try:
                    connection.send(("ok", await turn(client, *args)))
                except Exception as exc:  # reported to the parent, which raises it
                    connection.send(("error", repr(exc)))

    asyncio.run(main())


def _bare_worker(
    connection: Any, model_path: str, n_ctx: int, threads: int, n_gpu_layers: int
) -> None:
    from llama_cpp import Llama

    llama = Llama(
        model_path=model_path,
        n_ctx=n_ctx,
        n_batch=256,
        n_threads=threads,
        n_threads_batch=threads,
        n_gpu_layers=n_gpu_layers,
        verbose=False,
        seed=1234,
    )
    calls: dict[str, Callable[..., Any]] = {
        "first_token": lambda tokens, cached: bare_first_token(llama, tokens, cached),
        "generate": lambda tokens, cached, count: bare_generate(llama, tokens, cached, count),
        "grammar_rate": lambda tokens, count, schema: bare_grammar_rate(
            llama, tokens, count, schema
        ),
        "tokenize": lambda text: llama.tokenize(text.encode(), add_bos=True),
    }
    serve_calls(connection, calls)
    llama.close()


def hold_prefix(llama: Any, tokens: list[int], cached: int) -> None:
    """Put exactly ``tokens[:cached]`` in the context, evaluating only what is missing."""
    held = 0
    for held_token, wanted in zip(llama._input_ids.tolist(), tokens[:cached], strict=False):
        if held_token != wanted:
            break
        held += 1
    llama.n_tokens = held
    if held < cached:
        llama.eval(tokens[held:cached])


def bare_first_token(llama: Any, tokens: list[int], cached: int) -> float:
    """Seconds to the first token with ``tokens[:cached]`` already in the context."""
    if cached:
        hold_prefix(llama, tokens, cached)
    else:
        llama.reset()
    started = time.perf_counter()
    for _chunk in llama.create_completion(tokens, max_tokens=1, temperature=0.0, stream=True):
        break
    return time.perf_counter() - started


def bare_generate(llama: Any, tokens: list[int], cached: int, count: int) -> tuple[float, float]:
    """(seconds to first token, seconds in all) producing ``count`` tokens greedily."""
    if cached:
        hold_prefix(llama, tokens, cached)
    else:
        llama.reset()
    started = time.perf_counter()
    first = None
    for _chunk in llama.create_completion(
        tokens, max_tokens=count, temperature=0.0, stream=True, stop=[]
    ):
        if first is None:
            first = time.perf_counter() - started
    return first or 0.0, time.perf_counter() - started


def bare_grammar_rate(llama: Any, tokens: list[int], count: int, schema: dict[str, Any]) -> float:
    from llama_cpp import LlamaGrammar

    grammar = LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
    llama.reset()
    stamps = []
    for _chunk in llama.create_completion(
        tokens, max_tokens=count, temperature=0.0, stream=True, grammar=grammar
    ):
        stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


PLAYER_LINES = [
    "Good evening. I just came in on the ferry.",
    "What news is there in town these days?",
    "Who should I talk to about work on the boats?",
    "Is it true that the lighthouse went dark?",
    "What do people say about the Fog Runners?",
    "Where can I find something warm to eat?",
    "Have you seen any strangers around lately?",
    "What happened to the herring?",
    "Do you know Old Wren from the marsh?",
    "Thank you. One last thing: is the road north safe?",
]


# -- targets -----------------------------------------------------------------------------


def target_warm(
    runtime: EngineRuntime, bare: BareLlama, report: Report, turns: int, *, naive_too: bool = True
) -> float:
    engine = runtime.engine
    ttfts, prompts, cached, bare_ttfts = [], [], [], []
    prompt_tokens: list[int] = []
    for index in range(turns):
        result = engine.say(
            "mara", PLAYER_LINES[index % len(PLAYER_LINES)], player_id="warm", max_tokens=24
        )
        engine.writer.flush(60)  # the player reads the reply before answering
        ttfts.append((result.timings.ttft_ms or 0) / 1000)
        prompts.append(result.prompt_tokens)
        cached.append(result.cached_tokens)
        prompt_tokens = engine.generator.tokenize(result.prompt)
        if index:  # the same prompt, the same cached prefix, on the bare Llama
            bare_ttfts.append(bare.first_token(prompt_tokens, result.cached_tokens))
    naive = (
        median([bare.first_token(prompt_tokens, 0) for _ in range(2 if turns > 3 else 1)])
        if naive_too
        else float("nan")
    )
    last, second = ttfts[-1], ttfts[1] if len(ttfts) > 1 else ttfts[0]
    warm_engine, warm_bare = median(ttfts[1:]), median(bare_ttfts)
    report.details["warm"] = {
        "ttft_s": ttfts,
        "bare_ttft_s": bare_ttfts,
        "prompt_tokens": prompts,
        "cached": cached,
    }
    uncached = [p - c for p, c in zip(prompts[1:], cached[1:], strict=True)]
    report.rows += [
        Row(
            "1 warm multi-turn",
            f"first token, turn {turns} vs turn 2 (prompt {prompts[-1]} tokens)",
            f"turn {turns}",
            last,
            "turn 2",
            second,
            last / second,
            "≤ 1.5×",
            last / second <= 1.5,
        ),
        Row(
            "1 warm multi-turn",
            f"median first token, turns 2-{turns}: engine vs a bare call on the same prompt "
            f"evaluating only the same uncached tokens (median {median(uncached):.0f})",
            "engine",
            warm_engine,
            "bare llama-cpp-python",
            warm_bare,
            warm_engine / warm_bare,
            "≤ 1.2×",
            warm_engine / warm_bare <= 1.2,
        ),
        Row(
            "1 warm multi-turn",
            f"naive full re-evaluation of the turn-{turns} prompt vs the engine",
            "naive",
            naive,
            "engine",
            last,
            naive / last,
            "≥ 10× (expected)",
            naive / last >= 10 if naive_too else None,
            "" if naive_too else "not measured with --quick (a full cold evaluation, ~10 s)",
        ),
    ]
    return warm_engine


def run_switching(runtime: EngineRuntime, npcs: list[str], rounds: int) -> list[float]:
    """First-token times of every turn after the first round of an 8-NPC rotation."""
    ttfts = []
    for round_index in range(rounds):
        for npc_index, npc_id in enumerate(npcs):
            line = PLAYER_LINES[(round_index * len(npcs) + npc_index) % len(PLAYER_LINES)]
            result = runtime.engine.say(npc_id, line, player_id="switch", max_tokens=12)
            runtime.engine.writer.flush(60)
            if round_index:
                ttfts.append((result.timings.ttft_ms or 0) / 1000)
    return ttfts


def target_switch(
    root: Path, npcs: list[str], warm_single: float, report: Report, rounds: int
) -> None:
    runtime = open_engine(bench_config(root, "switch"))
    try:
        with_snapshots = run_switching(runtime, npcs, rounds)
        hits = runtime.engine.generator.snapshots.hits
    finally:
        runtime.close()
    runtime = open_engine(bench_config(root, "switch-nosnap", snapshot_ram_mb=0))
    try:
        without = run_switching(runtime, npcs, 2)
    finally:
        runtime.close()
    switched = median(with_snapshots)
    report.details["switch"] = {
        "with_snapshots_ttft_s": with_snapshots,
        "without_snapshots_ttft_s": without,
        "snapshot_hits": hits,
    }
    report.rows += [
        Row(
            "2 NPC switching",
            f"{len(npcs)} NPCs in turn: first token vs single-NPC warm",
            "8-NPC rotation",
            switched,
            "single NPC warm",
            warm_single,
            switched / warm_single,
            "≤ 2×",
            switched / warm_single <= 2,
        ),
        Row(
            "2 NPC switching",
            "the same rotation without conversation snapshots (each NPC's head still "
            "restored from disk, its turns re-read) vs with",
            "no snapshots",
            median(without),
            "snapshots",
            switched,
            median(without) / switched,
            "(context)",
            None,
        ),
    ]


def target_restart(root: Path, report: Report) -> None:
    """Mara's first line in a new engine (a new data folder: no memories, the same prompt)
    whose head cache the main engine filled, vs the main engine's first line, read cold."""
    cold = report.details["warm"]["ttft_s"][0]
    runtime = open_engine(bench_config(root, "restart"))
    try:
        result = runtime.engine.say("mara", PLAYER_LINES[0], player_id="warm", max_tokens=24)
        restored = (result.timings.ttft_ms or 0) / 1000
        cached = result.cached_tokens
    finally:
        runtime.close()
    report.details["restart"] = {"cold_ttft_s": cold, "restored_ttft_s": restored}
    report.rows.append(
        Row(
            "9 restart",
            f"an NPC's first line in a new process: head restored from disk ({cached} of "
            f"{result.prompt_tokens} tokens) vs read cold",
            "cold",
            cold,
            "head from disk",
            restored,
            cold / restored,
            "≥ 5×",
            cold / restored >= 5,
        )
    )


def target_scene(runtime: EngineRuntime, report: Report, lines: int) -> None:
    """Mara's warm one-to-one turns, then a scene of four sample NPCs (each NPC's head is
    already cached, as in a game where they talked before): first tokens side by side."""
    engine = runtime.engine
    warm = []
    for index in range(4):
        result = engine.say("mara", PLAYER_LINES[index], player_id="scene-bench", max_tokens=24)
        engine.writer.flush(60)
        warm.append((result.timings.ttft_ms or 0) / 1000)
    for npc in ("guard_tom", "wren", "ysolde"):  # their heads, as a game's earlier talk would
        engine.say(npc, "Good evening.", player_id="scene-bench", max_tokens=8)
    scene = engine.scenes.start(
        "bench", ["mara", "guard_tom", "wren", "ysolde"], topic="the burned pier", max_turns=lines
    )
    firsts, shares, speakers = [], [], []
    while scene.over() is None:
        speaker = engine.scenes.next_speaker(scene)
        # As the server does: the likely next speakers read what they heard so far in
        # spare batch slots while this line is generated, from its first token on.
        preparing = [
            threading.Thread(target=engine.scenes.prepare_line, args=(scene, npc))
            for npc in engine.scenes.likely_next(scene, speaker, 2)
        ]

        def start_preparing(_piece: str, threads: list[threading.Thread] = preparing) -> None:
            for thread in threads:
                if not thread.is_alive() and thread.ident is None:
                    thread.start()

        result = engine.scenes.line(scene, speaker, max_tokens=24, on_delta=start_preparing)
        for thread in preparing:
            if thread.ident is not None:
                thread.join()
        firsts.append((result.timings.ttft_ms or 0) / 1000)
        shares.append(result.cached_tokens / max(result.prompt_tokens, 1))
        speakers.append(speaker)
    engine.writer.flush(60)
    warm_turn, line = median(warm[1:]), median(firsts)
    report.details["scene"] = {
        "warm_ttft_s": warm,
        "line_ttft_s": firsts,
        "cached_share": shares,
        "speakers": speakers,
    }
    report.rows += [
        Row(
            "15 scenes",
            f"median first token of a scene line ({len(firsts)} lines, 4 NPCs: "
            f"{', '.join(speakers)}) vs a warm one-to-one turn of Mara",
            "scene line",
            line,
            "warm 1:1 turn",
            warm_turn,
            line / warm_turn,
            "≤ 1.5×",
            line / warm_turn <= 1.5,
        ),
        Row(
            "15 scenes",
            "share of each line's prompt served from cache (mean; per line in the JSON): "
            "its NPC's head and its earlier part of the scene",
            "mean share",
            statistics.mean(shares),
            "lowest",
            min(shares),
            statistics.mean(shares),
            "report",
            None,
        ),
    ]


def tick_world(folder: Path, npcs: int) -> list[str]:
    """The sample personas plus ``npcs`` generated ones, each talking to the next three."""
    import shutil

    shutil.copytree(REPO / "personas", folder)
    ids = [f"villager{index:03d}" for index in range(npcs)]
    for index, npc_id in enumerate(ids):
        friends = {ids[(index + step) % npcs]: "neighbour" for step in (1, 2, 3) if npcs > step}
        persona = {
            "name": f"Villager {index}",
            "role": "Fisher of Saltwhistle",
            "description": "Mends nets on the quay and hears everything.",
            "relationships": friends,
        }
        (folder / f"{npc_id}.yaml").write_text(yaml.safe_dump(persona))
    return ids


def target_tick(root: Path, report: Report, npcs: int, per_npc: int) -> None:
    from npc_engine.memory.chroma_store import ChromaMemoryStore
    from npc_engine.memory.minilm import OfflineMiniLM
    from npc_engine.memory.types import Memory
    from npc_engine.model_registry import ModelCache
    from npc_engine.server import NpcServer

    folder = root / "tick-personas"
    ids = tick_world(folder, npcs)
    config = bench_config(root, "tick", personas_dir=folder)
    # Filling 100 × 1,000 memories through the embedder would take long here: random unit
    # vectors, what the tick reads is metadata (importance, time, kind) and texts.
    store = ChromaMemoryStore(
        config.data_dir / "chroma", OfflineMiniLM(ModelCache(config.cache_dir))
    )
    rng = np.random.default_rng(11)
    now = datetime.now(UTC)
    for npc_id in ids:
        texts = [
            f"I saw boat {i} come in with {rng.integers(2, 90)} crates." for i in range(per_npc)
        ]
        vectors = rng.normal(size=(per_npc, 384)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        # A world with history: memories made over the last 30 days (the first tick passes
        # on the last day's news).
        memories = [
            Memory(
                npc_id=npc_id,
                text=f'The player p{i % 7} told me: "{text}"',
                content=text,
                player_id=f"p{i % 7}",
                importance=int(rng.integers(1, 11)),
                created_at=now - timedelta(minutes=float(rng.uniform(1, 30 * 1440))),
            )
            for i, text in enumerate(texts)
        ]
        store.add_with_embeddings(memories, vectors.tolist())
    store.close()
    print(f"bench: tick world filled: {npcs} NPCs x {per_npc} memories", file=sys.stderr)
    runtime = open_engine(config)
    engine = runtime.engine
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = NpcServer(engine, port=0)
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(30)

    async def first_text(client: Any, line: str, npc_id: str = "mara") -> float:
        started = time.perf_counter()
        stream = await client.say(npc_id, line, player_id="tick-bench", max_tokens=16)
        async for _piece in stream:
            break
        seconds = time.perf_counter() - started
        await stream.result()
        return seconds

    async def measure() -> dict[str, Any]:
        from npc_engine.client import NpcClient

        async with await NpcClient.connect(server.url) as ticker:
            # A villager the ticks tell rumours to, its head warm before them.
            await first_text(ticker, "Good day to you.", ids[1])
            ticks, spread = [], []
            for round_index in range(2):  # the first tick, then the next, nothing else running
                started = time.perf_counter()
                spread.append(await ticker.world_tick(game_time=60.0 * (round_index + 1)))
                ticks.append(time.perf_counter() - started)
                print(f"bench: tick {round_index + 1}: {ticks[-1]:.1f} s", file=sys.stderr)
            # The player connects now: a connection idle through slow ticks would time out.
            async with await NpcClient.connect(server.url) as player:
                # The rumours held for it move into Chroma at its next recall.
                after = await first_text(player, "Any news from the quay?", ids[1])
                settled = await first_text(player, "Any news from the gate?", ids[1])
                out = await says_during_a_tick(ticker, player, ticks, spread)
                return {**out, "listener_after_ticks": after, "listener_next": settled}

    async def says_during_a_tick(
        ticker: Any, player: Any, ticks: list[float], spread: list[int]
    ) -> dict[str, Any]:
        await first_text(player, "Good evening.")  # Mara's conversation starts
        # Fresh news for every villager, so the third tick has work to do while a player
        # talks to Mara: a say every 1.5 s, at most 6, against the same says alone.
        for start in range(0, len(ids), 64):  # an event names 64 NPCs at most
            chunk = ids[start : start + 64]
            await ticker.event(chunk, "A whale was seen in the bay at dawn!", importance=8)
        alone = [await first_text(player, PLAYER_LINES[1 + index]) for index in range(3)]
        during = []
        tick = asyncio.ensure_future(ticker.world_tick(game_time=180.0))
        while not tick.done() and len(during) < 6:
            # The first say at once: a tick with held rumours can be over in a fraction
            # of a second (before: 0.2 s first, when ticks took many seconds).
            await asyncio.sleep(1.5 if during else 0.0)
            if not tick.done():
                during.append(await first_text(player, PLAYER_LINES[4 + len(during) % 5]))
        spread.append(await tick)
        return {"alone": alone, "during": during, "ticks": ticks, "spread": spread}

    try:
        out = asyncio.run_coroutine_threadsafe(measure(), loop).result(1800)
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(120)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        runtime.close()
    report.details["tick"] = out
    alone = median(out["alone"])
    during = median(out["during"]) if out["during"] else float("nan")
    report.rows += [
        Row(
            "15 world tick",
            f"world.tick over {npcs} NPCs with {per_npc} memories each (3 friends each): "
            f"first tick (the last day's news; {out['spread'][0]} rumours) vs the next "
            f"({out['spread'][1]} rumours)",
            "first tick",
            out["ticks"][0],
            "next tick",
            out["ticks"][1],
            out["ticks"][0] / out["ticks"][1],
            "≤ 2×",
            out["ticks"][0] / out["ticks"][1] <= 2,
        ),
        Row(
            "15 world tick",
            f"the slower of those two ticks vs the 5 s a town ticking every in-game hour may "
            f"spend ({npcs} NPCs)",
            "slower tick",
            max(out["ticks"][:2]),
            "budget",
            5.0,
            max(out["ticks"][:2]) / 5.0,
            "≤ 1×",
            max(out["ticks"][:2]) <= 5.0,
        ),
        Row(
            "15 world tick",
            f"a say's first text (client side) while a tick runs ({len(out['during'])} says) "
            "vs the same NPC with no tick running",
            "during a tick",
            during,
            "no tick",
            alone,
            during / alone,
            "≤ 1.2×",
            during / alone <= 1.2 if out["during"] else None,
            "" if out["during"] else "the ticks ended before a say could be sent",
        ),
        Row(
            "15 world tick",
            "a villager's first say after the ticks (the rumours held for it move into "
            "Chroma before its recall) vs its next say",
            "after ticks",
            out["listener_after_ticks"],
            "next say",
            out["listener_next"],
            out["listener_after_ticks"] / out["listener_next"],
            "report",
            None,
        ),
    ]


def target_lore(root: Path, report: Report, turns: int, entries: int) -> None:
    """The same NPC and player lines in the sample world (its 29-entry lorebook) and in the
    sample world plus ``entries`` generated ones; turns interleaved so noise hits both."""
    sys.path.insert(0, str(REPO / "tools"))
    import lore_probe
    import make_world

    spec = lore_probe.load_probes()
    small_dir, big_dir = root / "lore-small", root / "lore-big"
    make_world.write_world(small_dir, 0)
    make_world.write_world(big_dir, entries, spec["seed"])
    small_config = bench_config(root, "lore-small", personas_dir=small_dir)
    big_config = bench_config(root, "lore-big", personas_dir=big_dir)
    small, small_open = lore_probe.open_world(small_config)
    try:
        big, big_open = lore_probe.open_world(big_config)
        try:
            probes = spec["probes"] if entries == spec["entries"] else []
            found = lore_probe.ask(big.engine, probes, lore_probe.settings_of(big_config))
            times: dict[str, list[float]] = {"small": [], "big": []}
            chosen: dict[str, list[int]] = {"small": [], "big": []}
            for index in range(turns):
                line = PLAYER_LINES[index % len(PLAYER_LINES)]
                for name, runtime in (("small", small), ("big", big)):
                    result = runtime.engine.say("mara", line, player_id="lore", max_tokens=24)
                    runtime.engine.writer.flush(60)
                    times[name].append((result.timings.ttft_ms or 0) / 1000)
                    chosen[name].append(len(result.lore))
        finally:
            big.close()
    finally:
        small.close()
    again, again_open = lore_probe.open_world(big_config)
    again.close()
    warm_small, warm_big = median(times["small"][1:]), median(times["big"][1:])
    report.details["lore"] = {
        "ttft_small_s": times["small"],
        "ttft_big_s": times["big"],
        "entries_chosen_small": chosen["small"],
        "entries_chosen_big": chosen["big"],
        "misses": found.misses,
    }
    report.rows += [
        Row(
            "14 lorebook",
            f"probe recall: the answering entry among those chosen for the question "
            f"({found.total} questions, {big_open.entries} entries, default budget)",
            "hits",
            float(found.hits),
            "questions",
            float(found.total),
            found.recall,
            "≥ 0.9",
            found.recall >= 0.9 if found.total else None,
            "" if found.total else "the probe set needs the 2,000-entry world",
        ),
        Row(
            "14 lorebook",
            f"median warm first token, turns 2-{turns}, Mara: {big_open.entries}-entry "
            f"lorebook vs the sample world's {small_open.entries} (entries noted per line: "
            f"{statistics.mean(chosen['big']):.1f} vs {statistics.mean(chosen['small']):.1f})",
            "big world",
            warm_big,
            "sample world",
            warm_small,
            warm_big / warm_small,
            "≤ 1.1×",
            warm_big / warm_small <= 1.1,
        ),
        Row(
            "14 lorebook",
            f"engine open with the big world: first ({big_open.embedded} entries embedded) vs "
            f"restart ({again_open.embedded} embedded)",
            "first open",
            big_open.seconds,
            "restart",
            again_open.seconds,
            big_open.seconds / again_open.seconds,
            "restart embeds 0",
            again_open.embedded == 0,
        ),
        Row(
            "14 lorebook",
            "engine open, restart: big world vs the sample world (model load included)",
            "big world",
            again_open.seconds,
            "sample world",
            small_open.seconds,
            again_open.seconds / small_open.seconds,
            "report",
            None,
        ),
    ]


def target_npc_warm(root: Path, report: Report, turns: int, *, cold_too: bool = True) -> None:
    """npc.warm, measured in engines of their own with an empty head folder: an NPC's first
    say cold, then (another NPC) its first say after warm(), then warm turns with it; and a
    new engine (a restart) that warms from the heads on disk. (``cold_too`` False, for
    --quick: the heads the other targets stored are used, and no cold say is timed.)"""
    heads = root / "kv-heads-npc-warm" if cold_too else root / "kv-heads"
    lines = PLAYER_LINES

    def first_say(engine: Any, npc: str, player: str) -> float:
        result = engine.say(npc, lines[0], player_id=player, max_tokens=24)
        engine.writer.flush(60)
        return (result.timings.ttft_ms or 0) / 1000

    runtime = open_engine(bench_config(root, "npc-warm", head_cache_dir=heads))
    try:
        engine = runtime.engine
        cold = first_say(engine, "wren", "cold") if cold_too else float("nan")
        started = time.perf_counter()
        engine.warm("guard_tom")
        warm_call = time.perf_counter() - started
        warmed_first = first_say(engine, "guard_tom", "p1")
        ongoing = []
        for index in range(1, turns + 1):
            result = engine.say("guard_tom", lines[index], player_id="p1", max_tokens=24)
            engine.writer.flush(60)
            ongoing.append((result.timings.ttft_ms or 0) / 1000)
    finally:
        runtime.close()
    runtime = open_engine(bench_config(root, "npc-warm-restart", head_cache_dir=heads))
    try:
        started = time.perf_counter()
        runtime.engine.warm("guard_tom")
        restart_warm_call = time.perf_counter() - started
        restarted_first = first_say(runtime.engine, "guard_tom", "p2")
    finally:
        runtime.close()
    warm_turn = median(ongoing)
    report.details["npc_warm"] = {
        "cold_first_s": cold,
        "warm_call_s": warm_call,
        "warmed_first_s": warmed_first,
        "warm_turns_s": ongoing,
        "restart_warm_call_s": restart_warm_call,
        "restarted_first_s": restarted_first,
    }
    for label, first in (("after npc.warm", warmed_first), ("after a restart", restarted_first)):
        ratio = first / warm_turn
        report.rows.append(
            Row(
                "11 npc.warm",
                f"an NPC's first say {label} vs a warm turn of an ongoing conversation "
                f"(a cold first say took {cold:.2f} s; warm() took {warm_call:.2f} s, "
                f"{restart_warm_call:.2f} s after the restart)",
                "first say",
                first,
                "warm turn",
                warm_turn,
                ratio,
                "≤ 1.5×",
                ratio <= 1.5,
                "" if cold_too else "heads of earlier targets reused: no cold figure with --quick",
            )
        )


def target_saves(root: Path, report: Report, memories: int) -> None:
    """save.create / save.load on a world of ``memories`` memories (10 NPCs, their own
    and 100 players'), against copying the store's folder (what a save by copying costs)."""
    import shutil

    from npc_engine.dialogue import DialogueEngine
    from npc_engine.generation.scripted import ScriptedGenerator
    from npc_engine.memory.chroma_store import ChromaMemoryStore
    from npc_engine.memory.types import Memory
    from npc_engine.persona.loader import load_personas

    config = bench_config(root, "saves")
    rng = np.random.default_rng(7)
    store = ChromaMemoryStore(
        config.data_dir / "chroma", lambda texts: [[0.0] * 384 for _ in texts]
    )
    npcs = [f"npc{n}" for n in range(10)]
    world = [
        Memory(
            npc_id=npcs[i % 10],
            player_id=None if i % 4 == 0 else f"p{i % 100}",
            text=f"Memory {i}: the player mentioned the {i % 37}th barrel of herring.",
        )
        for i in range(memories)
    ]
    vectors = rng.standard_normal((memories, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    for start in range(0, memories, 2000):
        store.add_with_embeddings(world[start : start + 2000], list(vectors[start : start + 2000]))
    engine = DialogueEngine(load_personas(config.personas_dir), ScriptedGenerator(), store, config)
    try:
        creates, loads, copies, restores = [], [], [], []
        for round_number in range(3):
            slot = f"slot{round_number}"
            started = time.perf_counter()
            engine.create_save(slot)
            creates.append(time.perf_counter() - started)
            # The game goes on: 100 new memories, 50 forgotten.
            extra = [
                Memory(npc_id="npc1", player_id="p1", text=f"new {round_number}-{k}")
                for k in range(100)
            ]
            store.add_with_embeddings(extra, list(vectors[:100]))
            store.forget("npc2", memory_ids=[m.id for m in world[2 + 10 * round_number :: 10][:50]])
            started = time.perf_counter()
            engine.load_save(slot)
            loads.append(time.perf_counter() - started)
        chroma = config.data_dir / "chroma"
        for round_number in range(3):
            target = root / f"copy-{round_number}"
            started = time.perf_counter()
            shutil.copytree(chroma, target)
            copies.append(time.perf_counter() - started)
            started = time.perf_counter()
            shutil.rmtree(target)
            shutil.copytree(chroma, target)
            restores.append(time.perf_counter() - started)
            shutil.rmtree(target)
    finally:
        engine.close()
    create, load, copy, restore = median(creates), median(loads), median(copies), median(restores)
    first_cold = first_save_in_new_process(config.data_dir / "chroma", opened_ahead=False)
    first_warm = first_save_in_new_process(config.data_dir / "chroma", opened_ahead=True)
    report.details["saves"] = {
        "create_s": creates,
        "load_s": loads,
        "copy_s": copies,
        "first_create_new_process_s": first_cold,
        "first_create_new_process_opened_ahead_s": first_warm,
    }
    report.rows += [
        Row(
            "12 saves",
            f"save.create with {memories} memories (manifest of ids) vs copying the store",
            "save.create",
            create,
            "copy the store",
            copy,
            create / copy,
            "≤ 200 ms",
            create <= 0.2,
        ),
        Row(
            "12 saves",
            f"save.load after 100 new and 50 forgotten memories ({memories} in all) vs "
            "putting a copied store back",
            "save.load",
            load,
            "restore a copy",
            restore,
            load / restore,
            "≤ 1 s",
            load <= 1.0,
        ),
        Row(
            "12 saves",
            "the first save.create in a new process: collections opened on a background "
            "thread at start (as `serve` does) vs opened by the save itself",
            "opened ahead",
            first_warm,
            "opened by the save",
            first_cold,
            first_warm / first_cold,
            "≤ 200 ms",
            first_warm <= 0.2,
        ),
    ]


FIRST_SAVE_SCRIPT = """
import sys, time
from pathlib import Path
from npc_engine.memory.chroma_store import ChromaMemoryStore
store = ChromaMemoryStore(Path(sys.argv[1]), lambda texts: [[0.0] * 384 for _ in texts])
if sys.argv[2] == "ahead":
    store.open_collections_in_background().join()
started = time.perf_counter()
store.saves.create_save("first-after-start")
print(time.perf_counter() - started)
"""


def first_save_in_new_process(chroma: Path, *, opened_ahead: bool) -> float:
    """Chroma loads a collection on first use: what the first save after a start costs."""
    import subprocess

    done = subprocess.run(
        [sys.executable, "-c", FIRST_SAVE_SCRIPT, str(chroma), "ahead" if opened_ahead else "no"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        check=True,
    )
    return float(done.stdout.strip().splitlines()[-1])


def load_action_probes() -> list[dict[str, Any]]:
    probes = yaml.safe_load((REPO / "tests/probes/game_actions.yaml").read_text())
    return list(probes["lines"])


def action_label(action: Any) -> str:
    if action is None:
        return "none"
    args = ", ".join(f"{k}={v}" for k, v in action.args.items())
    return f"{action.name}({args})"


def target_actions(runtime: EngineRuntime, report: Report, limit: int | None) -> None:
    """The labelled game-action lines through the model: how often the chosen action is the
    expected one, how often an action comes where none was expected, and the time the choice
    adds to a turn (after the spoken line: the first token is not delayed)."""
    engine = runtime.engine
    probes = load_action_probes()[:limit]
    outcomes = []
    engine.config.actions.enabled = True
    for index, probe in enumerate(probes):
        player = f"actions{index}"
        state = probe.get("state") or {}
        if state:
            engine.set_state(player, npc_id=probe["npc"], **state)
        result = engine.say(probe["npc"], probe["player"], player_id=player, max_tokens=32)
        engine.writer.flush(60)
        outcomes.append(
            {
                "npc": probe["npc"],
                "player": probe["player"],
                "reply": result.text,
                "expected": probe["expect"],
                "chosen": action_label(result.game_action),
                "action_ms": result.timings.action_ms,
                "generation_ms": result.timings.generation_ms,
            }
        )
    engine.config.actions.enabled = False
    right = sum(o["chosen"] == o["expected"] for o in outcomes)
    quiet = [o for o in outcomes if o["expected"] == "none"]
    acting = [o for o in outcomes if o["expected"] != "none"]
    false_actions = sum(o["chosen"] != "none" for o in quiet)
    named = sum(o["chosen"].split("(")[0] == o["expected"].split("(")[0] for o in acting)
    added = statistics.mean(o["action_ms"] for o in outcomes) / 1000
    reply = statistics.mean(o["generation_ms"] for o in outcomes) / 1000
    report.details["actions"] = {"outcomes": outcomes}
    report.rows.append(
        Row(
            "13 game actions",
            f"{len(outcomes)} labelled lines: {right} right ({right / len(outcomes):.0%}); "
            f"actions when none was expected {false_actions}/{len(quiet)}; right action name "
            f"{named}/{len(acting)}. Time added per turn (after the spoken line) vs the "
            "reply's own generation",
            "action choice",
            added,
            "reply generation",
            reply,
            added / reply if reply else float("nan"),
            "valid always (checked in tests)",
            None,
        )
    )


def target_overhead(runtime: EngineRuntime, bare: BareLlama, report: Report, turns: int) -> None:
    from npc_engine.server import NpcServer

    engine = runtime.engine
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = NpcServer(engine, port=0, allow_inspect=True)  # the client reads the prompt
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(30)
    ratios, engine_times, bare_times = [], [], []
    client = GameClient(server.url)
    try:
        # A new player's first turn with Mara (her head from the cache), not measured.
        client.turn("mara", PLAYER_LINES[0], "ws", 24)
        for index in range(1, turns + 1):
            time.sleep(0.3)  # the previous turn's memory write settles
            seconds, end = client.turn("mara", PLAYER_LINES[index], "ws", 24)
            usage = end["usage"]
            last = engine.generator.tokenize(end["inspect"]["prompt"])
            count = max(usage["completion_tokens"], 1)
            _first, bare_total = bare.generate(last, usage["cached_tokens"], count)
            engine_times.append(seconds)
            bare_times.append(bare_total)
            ratios.append(seconds / bare_total)
    finally:
        client.close()
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(120)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
    report.details["overhead"] = {"engine_s": engine_times, "bare_s": bare_times}
    ratio = median(ratios)
    report.rows.append(
        Row(
            "4 engine overhead",
            "full turn over WebSocket, client in its own process (retrieval, prompt, framing, "
            "memory write) vs bare llama-cpp-python, same prompt, cache state and tokens",
            "engine over WebSocket",
            median(engine_times),
            "bare llama-cpp-python",
            median(bare_times),
            ratio,
            "≤ 1.10×",
            ratio <= 1.10,
        )
    )


def target_memory(root: Path, report: Report, npcs: int, per_npc: int, others: int) -> None:
    from npc_engine.config import RetrievalConfig
    from npc_engine.memory.chroma_store import ChromaMemoryStore
    from npc_engine.memory.minilm import OfflineMiniLM
    from npc_engine.memory.scoring import score_candidates
    from npc_engine.memory.types import Memory, utc_now
    from npc_engine.memory.writer import MemoryWriter
    from npc_engine.model_registry import ModelCache

    config = load_config()
    embed = OfflineMiniLM(ModelCache(config.cache_dir))
    store = ChromaMemoryStore(root / "memory-bench", embed)
    rng = np.random.default_rng(7)
    words = [
        "salt",
        "fog",
        "lantern",
        "herring",
        "boat",
        "bell",
        "chapel",
        "marsh",
        "guard",
        "brandy",
        "storm",
        "key",
    ]

    def sentences(count: int) -> list[str]:
        return [" ".join(rng.choice(words, size=8)) + f" (note {index})" for index in range(count)]

    # Filling 100 × 10,000 memories through the embedder would take an hour here, so the
    # fill uses random unit vectors; every query below is embedded for real.
    filled = time.perf_counter()
    for npc_index in range(npcs):
        npc_id = f"npc{npc_index:03d}"
        count = per_npc if npc_index == 0 else others
        for start in range(0, count, 2000):
            texts = sentences(min(2000, count - start))
            vectors = rng.normal(size=(len(texts), 384)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            # A fifth of what an NPC knows is its own; the rest is about the player.
            memories = [
                Memory(npc_id=npc_id, text=t, player_id=None if i % 5 == 0 else "p")
                for i, t in enumerate(texts)
            ]
            store.add_with_embeddings(memories, vectors.tolist())
    fill_seconds = time.perf_counter() - filled

    # Hybrid (dense + BM25 keywords, fused) against dense only, alternating query by query
    # so both see the same machine load.
    hybrid = RetrievalConfig()
    dense = RetrievalConfig(hybrid=False)
    timings, dense_timings = [], []
    for index in range(120):
        config = hybrid if index % 2 == 0 else dense
        query = " ".join(rng.choice(words, size=6)) + f" {index}?"
        started = time.perf_counter()
        candidates = store.search("npc000", "p", query, config.candidates, keywords=config.hybrid)
        score_candidates(candidates, utc_now(), config)[: config.top_k]
        (timings if config.hybrid else dense_timings).append(time.perf_counter() - started)
    timings, dense_timings = timings[5:], dense_timings[5:]  # first calls warm ONNX

    writer = MemoryWriter(store)
    writes = 1000 if per_npc >= 1000 else 200  # --quick: enough to check that it runs
    batch = [Memory(npc_id="npc001", text=t, player_id="p") for t in sentences(writes)]
    started = time.perf_counter()
    writer.submit(batch).result(600)
    write_seconds = time.perf_counter() - started
    writer.close()
    store.close()
    p50 = median(timings)
    rate = len(batch) / write_seconds
    report.details["memory"] = {
        "retrieval_s": timings,
        "retrieval_dense_s": dense_timings,
        "fill_s": fill_seconds,
        "npcs": npcs,
        "memories_on_npc": per_npc,
        "memories_on_others": others,
    }
    report.rows += [
        Row(
            "5 memory",
            f"retrieval p50, hybrid (embed query + dense + BM25 keywords + fuse + score), "
            f"{per_npc:,} memories on the NPC, {npcs} NPCs in the store",
            "p50",
            p50,
            "goal",
            0.010,
            p50 / 0.010,
            "≤ 10 ms",
            p50 <= 0.010,
            note=f"p95 {percentile(timings, 0.95) * 1000:.1f} ms",
        ),
        Row(
            "5 memory",
            "retrieval p50, hybrid vs dense only (same queries, alternating)",
            "p50",
            p50,
            "dense only",
            median(dense_timings),
            p50 / median(dense_timings),
            "the cost of keywords",
            None,
        ),
        Row(
            "5 memory",
            f"batched writes with real embeddings ({len(batch)} memories)",
            "memories/s",
            rate,
            "goal",
            500.0,
            rate / 500.0,
            "≥ 500/s",
            rate >= 500,
        ),
    ]


def target_decode(runtime: EngineRuntime, bare: BareLlama, report: Report, tokens: int) -> None:
    from npc_engine.generation.base import GenerationParams

    generator = runtime.engine.generator
    prompt = generator.render(
        [{"role": "user", "content": "Tell me a long story about the sea, the fog and a bell."}]
    )
    assert prompt.tokens is not None
    params = GenerationParams(max_tokens=tokens, temperature=0.0, stop=[])
    engine_rates, bare_rates = [], []
    for _ in range(3):
        stamps: list[float] = []

        def stamp(_text: str, stamps: list[float] = stamps) -> None:
            stamps.append(time.perf_counter())

        stats = generator.generate(prompt, params, stamp)
        if len(stamps) > 1 and stats.completion_tokens > 1:
            engine_rates.append((stats.completion_tokens - 1) / (stamps[-1] - stamps[0]))
        first, total = bare.generate(prompt.tokens, 0, tokens)
        bare_rates.append((tokens - 1) / (total - first))
    model_bytes = Path(generator.model_path).stat().st_size
    bandwidth = memory_bandwidth()
    ceiling = bandwidth / model_bytes
    ratio = median(engine_rates) / median(bare_rates)
    report.rows.append(
        Row(
            "6 single-stream decode",
            "engine decode tokens/s vs a bare llama-cpp-python loop, same prompt and threads",
            "engine tokens/s",
            median(engine_rates),
            "bare tokens/s",
            median(bare_rates),
            ratio,
            "≥ 0.90×",
            ratio >= 0.9,
            note=f"bandwidth ceiling {ceiling:.0f} tokens/s = {bandwidth / 1e9:.1f} GB/s ÷ "
            f"{model_bytes / 1e6:.0f} MB per token",
        )
    )


def memory_bandwidth() -> float:
    """Bytes per second for a large copy (read + write), best of three."""
    source = np.ones(64 << 20, dtype=np.float32)  # 256 MiB
    target = np.empty_like(source)
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - started)
    return 2 * source.nbytes / best


def target_guard(runtime: EngineRuntime, report: Report, turns: int) -> None:
    """The output guard's cost: its own time per reply token against the model's time per
    token (the same replies), and the first text a player sees with sentences held back."""
    engine = runtime.engine
    guard_ms, decode_ms, tokens, model_first, shown_first = 0.0, 0.0, 0, [], []
    for index in range(turns):
        result = engine.say(
            "mara", PLAYER_LINES[index % len(PLAYER_LINES)], player_id="guard", max_tokens=48
        )
        engine.writer.flush(60)
        timings = result.timings
        guard_ms += timings.guard_ms
        # The model's time per token: from its first token to the end, less the guard's.
        after_first = timings.total_ms - (timings.model_ttft_ms or 0.0)
        decode_ms += max(after_first - timings.guard_ms, 0.0)
        tokens += max(result.completion_tokens - 1, 1)
        model_first.append(timings.model_ttft_ms or 0.0)
        shown_first.append(timings.ttft_ms or 0.0)
    per_token_guard, per_token_model = guard_ms / tokens, decode_ms / tokens
    report.details["guard"] = {
        "guard_ms": guard_ms,
        "decode_ms": decode_ms,
        "tokens": tokens,
        "model_first_ms": model_first,
        "shown_first_ms": shown_first,
    }
    report.rows += [
        Row(
            "10 output guard",
            f"guard time per reply token (key terms in all their forms, out-of-world terms, "
            f"meaning of sentences, clauses and pairs with guard.meaning="
            f"{engine.config.guard.meaning}) vs the model's decode time per token, "
            f"{turns} replies of Mara's",
            "guard",
            per_token_guard / 1000,
            "model",
            per_token_model / 1000,
            per_token_guard / per_token_model,
            "≤ 0.10×",
            per_token_guard / per_token_model <= 0.10,
        ),
        Row(
            "10 output guard",
            "median first text the player sees vs the model's first token, same replies",
            "first text shown",
            median(shown_first) / 1000,
            "model first token",
            median(model_first) / 1000,
            median(shown_first) / median(model_first),
            "≤ 1.15×",
            median(shown_first) / median(model_first) <= 1.15,
        ),
    ]


def target_expression(runtime: EngineRuntime, bare: BareLlama, report: Report, tokens: int) -> None:
    from npc_engine.expression import infer_action, infer_emotion

    prompt = bare.tokenize("The innkeeper answers the traveller: ")
    first, plain_total = bare.generate(prompt, 0, tokens)
    plain_rate = (tokens - 1) / (plain_total - first)
    schema = {
        "type": "object",
        "properties": {
            "text": {"type": "string"},
            "emotion": {"type": "string", "enum": ["neutral", "happy", "angry", "sad"]},
        },
        "required": ["text", "emotion"],
    }
    grammar_rate = bare.grammar_rate(prompt, tokens, schema)
    reply = "Welcome, love! *slides a brass key across the counter* Room three, upstairs."
    started = time.perf_counter()
    for _ in range(1000):
        infer_emotion(reply, "busy but friendly")
        infer_action(reply)
    per_reply = (time.perf_counter() - started) / 1000
    report.rows += [
        Row(
            "structured output",
            "decode tokens/s: plain (emotion/action read off the finished reply) vs "
            "JSON-schema grammar",
            "plain tokens/s",
            plain_rate,
            "grammar tokens/s",
            grammar_rate,
            plain_rate / grammar_rate if grammar_rate else float("inf"),
            "(context)",
            None,
            note=f"emotion+action classifier: {per_reply * 1e6:.0f} µs per reply",
        )
    ]


def streams_throughput(generator: Any, prompts: list[Any], tokens: int) -> float:
    """Aggregate tokens/s of ``len(prompts)`` concurrent generations (prompts pre-cached)."""
    from npc_engine.generation.base import GenerationParams

    def one(index: int, counts: list[int]) -> None:
        params = GenerationParams(
            max_tokens=tokens, temperature=0.8, stop=[], seed=index, cache_key=f"bench-{index}"
        )
        counts[index] = generator.generate(
            prompts[index], params, lambda _text: None
        ).completion_tokens

    counts = [0] * len(prompts)
    for index in range(len(prompts)):  # warm: each conversation's prompt is in the cache
        warm = [0] * len(prompts)
        one(index, warm)
    threads = [threading.Thread(target=one, args=(i, counts)) for i in range(len(prompts))]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.perf_counter() - started)


def llama_server_throughput(config: EngineConfig, texts: list[str], tokens: int) -> float | None:
    """The same streams through llama-cpp-python's own OpenAI-compatible server."""
    import urllib.request

    from servers import llama_cpp_server

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        return None
    path, _format = resolve_chat_model(config, lambda _message: None)
    threads = config.n_threads or os.cpu_count() or 1
    with llama_cpp_server(path, config.n_ctx, threads) as url:

        def complete(text: str, seed: int) -> int:
            body = json.dumps(
                {"prompt": text, "max_tokens": tokens, "temperature": 0.8, "seed": seed, "stop": []}
            ).encode()
            request = urllib.request.Request(
                f"{url}/completions", data=body, headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=600) as answer:
                return int(json.loads(answer.read())["usage"]["completion_tokens"])

        complete(texts[0], 0)  # warm
        counts = [0] * len(texts)

        def one(index: int) -> None:
            counts[index] = complete(texts[index], index)

        workers = [threading.Thread(target=one, args=(i,)) for i in range(len(texts))]
        started = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        return sum(counts) / (time.perf_counter() - started)


def target_batch(runtime: EngineRuntime, config: EngineConfig, report: Report, tokens: int) -> None:
    generator = runtime.engine.generator
    prompts = [
        generator.render(
            [{"role": "user", "content": f"{line} Tell me a long story about it, traveller {i}."}]
        )
        for i, line in enumerate(PLAYER_LINES[:8])
    ]
    single = streams_throughput(generator, prompts[:1], tokens)
    many = streams_throughput(generator, prompts, tokens)
    slots = generator.features().parallel
    report.details["batch"] = {"single_tps": single, "eight_tps": many, "slots": slots}
    report.rows.append(
        Row(
            "3 many NPCs at once",
            f"8 concurrent conversations ({slots} batch slots), aggregate tokens/s vs one "
            "stream, same threads",
            "8 streams tokens/s",
            many,
            "1 stream tokens/s",
            single,
            many / single,
            "≥ 2.5×",
            many / single >= 2.5,
        )
    )
    server = llama_server_throughput(config, [p.text for p in prompts], tokens)
    if server is None:
        report.rows.append(
            Row(
                "3 many NPCs at once",
                "vs llama_cpp.server: not measured (pip install -e '.[bench]')",
                "8 streams tokens/s",
                many,
                "llama_cpp.server",
                float("nan"),
                float("nan"),
                "≥ 2.5×",
                None,
            )
        )
        return
    report.rows.append(
        Row(
            "3 many NPCs at once",
            "the same 8 streams: engine vs llama-cpp-python's OpenAI-compatible server",
            "engine tokens/s",
            many,
            "llama_cpp.server tokens/s",
            server,
            many / server,
            "≥ 2.5×",
            many / server >= 2.5,
        )
    )


# -- driver ------------------------------------------------------------------------------


def machine_info(config: EngineConfig) -> dict[str, Any]:
    import llama_cpp

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):  # no /proc: keep what platform says
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    path, _format = resolve_chat_model(config, lambda _message: None)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": config.n_threads or os.cpu_count(),
        "model": f"{path.name} ({path.stat().st_size / 1e6:.0f} MB)",
        "llama_cpp_python": llama_cpp.__version__,
        "gpu_layers": config.n_gpu_layers,
        "gpu_offload_supported": bool(llama_cpp.llama_supports_gpu_offload()),
        "build": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        "python": platform.python_version(),
    }


def print_table(report: Report) -> None:
    print("\nnpc-engine benchmark")
    for key, value in report.machine.items():
        print(f"  {key}: {value}")
    print()
    header = f"{'target':<22} {'engine':>12} {'baseline':>12} {'ratio':>8} {'goal':>16}  met"
    print(header)
    print("-" * len(header))
    for row in report.rows:
        met = "–" if row.met is None else ("yes" if row.met else "NO")
        print(
            f"{row.target:<22} {fmt(row.engine_value):>12} {fmt(row.baseline_value):>12} "
            f"{row.ratio:>7.2f}× {row.goal:>16}  {met}"
        )
        print(
            f"    {row.compared}: {row.engine} vs {row.baseline}"
            + (f"; {row.note}" if row.note else "")
        )


def fmt(value: float) -> str:
    if value != value:  # NaN
        return "–"
    if value < 10:
        return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"
    return f"{value:,.0f}"


@contextlib.contextmanager
def timed(name: str) -> Any:
    """Says on stderr how long a target took (where a slow benchmark spends its time)."""
    started = time.perf_counter()
    yield
    print(f"bench: {name} took {time.perf_counter() - started:.1f} s", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny counts: checks it runs")
    parser.add_argument("--json", type=Path, default=Path("bench-results.json"))
    parser.add_argument(
        "--only",
        nargs="*",
        choices=[
            "warm",
            "switch",
            "batch",
            "overhead",
            "memory",
            "decode",
            "expression",
            "restart",
            "guard",
            "npc_warm",
            "saves",
            "actions",
            "lore",
            "scene",
            "tick",
            "remote",
        ],
    )
    parser.add_argument("--model", help="known model id or GGUF path (default: the default)")
    parser.add_argument("--n-gpu-layers", type=int, help="offload layers (-1 = all; GPU build)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    args = parser.parse_args(argv)
    for key, value in (
        ("model", args.model),
        ("n_gpu_layers", args.n_gpu_layers),
        ("n_threads", args.threads),
    ):
        if value is not None:
            BENCH_OVERRIDES[key] = value
    wanted: Callable[[str], bool] = lambda name: not args.only or name in args.only  # noqa: E731
    quick = args.quick
    root = Path(tempfile.mkdtemp(prefix="npc-bench-"))
    npcs = bench_personas(root / "personas", extra_lore=not quick)
    config = bench_config(root, "main")
    report = Report(machine_info(config))
    with timed("setup"):
        runtime = open_engine(config)
        bare = BareLlama(config)
    try:
        warm_single = 1.0
        if wanted("warm") or wanted("switch") or wanted("restart"):
            with timed("warm"):
                warm_single = target_warm(
                    runtime, bare, report, 3 if quick else 10, naive_too=not quick
                )
        if wanted("overhead"):
            with timed("overhead"):
                target_overhead(runtime, bare, report, 1 if quick else 9)
        if wanted("decode"):
            with timed("decode"):
                target_decode(runtime, bare, report, 16 if quick else 64)
        if wanted("guard"):
            with timed("guard"):
                target_guard(runtime, report, 2 if quick else 10)
        if wanted("expression"):
            with timed("expression"):
                target_expression(runtime, bare, report, 8 if quick else 40)
        if wanted("batch"):
            with timed("batch"):
                target_batch(runtime, config, report, 8 if quick else 64)
        if wanted("actions"):
            with timed("actions"):
                target_actions(runtime, report, 3 if quick else None)
        if wanted("scene"):
            with timed("scene"):
                target_scene(runtime, report, 4 if quick else 8)
    finally:
        runtime.close()
        bare.close()
    if wanted("restart"):
        with timed("restart"):
            target_restart(root, report)
    if wanted("switch"):
        with timed("switch"):
            # quick: Mara (her head cached by "warm") and one more
            pair = ["mara", "guard_tom"]
            target_switch(root, pair if quick else npcs, warm_single, report, 2 if quick else 3)
    if wanted("npc_warm"):
        with timed("npc_warm"):
            target_npc_warm(root, report, 2 if quick else 5, cold_too=not quick)
    if wanted("saves"):
        with timed("saves"):
            target_saves(root, report, 1_000 if quick else 10_000)
    if wanted("tick"):
        with timed("tick"):
            target_tick(root, report, 10 if quick else 100, 100 if quick else 1000)
    if wanted("lore"):
        with timed("lore"):
            target_lore(root, report, 3 if quick else 20, 200 if quick else 2000)
    if wanted("remote"):
        with timed("remote"):
            from bench_remote import target_remote

            target_remote(root, report, Row, config, quick)
    if wanted("memory"):
        with timed("memory"):
            if quick:
                target_memory(root, report, npcs=3, per_npc=200, others=20)
            else:
                target_memory(root, report, npcs=100, per_npc=10_000, others=1_000)
    print_table(report)
    args.json.write_text(
        json.dumps(
            {"machine": report.machine, "rows": [asdict(r) for r in report.rows], **report.details},
            indent=2,
            default=float,
        )
    )
    print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
