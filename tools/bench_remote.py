"""Scale-out lines of tools/bench.py (``--only remote``): the engine over remote servers.

Compared side by side in one run, on loopback:
- prefix-cache hit rate of warm turns through the ``openai`` backend, from llama-server's own
  usage (cached ÷ prompt tokens);
- first token through the engine vs the same prompt sent straight to llama-server (two
  slots of one server, each holding the same earlier turns: greedy replies are the same);
- two engine replicas vs one, 16 conversations on one llama-server: aggregate tokens/s;
- memory retrieval through a Chroma server vs Chroma on disk, at 10,000 memories.

llama-server comes from ``tools/build_llama_server.sh`` (or NPC_ENGINE_LLAMA_SERVER); the
lines that need it say so when it is missing.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from servers import chroma_server, llama_server, llama_server_binary, start_engine, stop

REPO = Path(__file__).resolve().parent.parent
CONVERSATIONS = 16
THINK_SECONDS = 1.0
QUESTIONS = [
    "Any rooms free tonight?",
    "What's the news from the harbour?",
    "Who runs the watchhouse these days?",
    "Is the fog always this thick?",
    "Where can I buy salt?",
    "Tell me about the lighthouse.",
    "What do you think of the customs men?",
    "Have you seen a tall stranger in a grey coat?",
]


def target_remote(root: Path, report: Any, row: Any, config: Any, quick: bool) -> None:
    """Adds the scale-out rows to ``report`` (``row`` builds one)."""
    from npc_engine.model_files import resolve_chat_model

    model, _format = resolve_chat_model(config, lambda _message: None)
    binary = llama_server_binary()
    if binary is None:
        report.rows.append(
            row(
                "16 scale-out",
                "llama-server not built: run tools/build_llama_server.sh (cached once)",
                "",
                float("nan"),
                "",
                float("nan"),
                float("nan"),
                "",
                None,
            )
        )
    else:
        # --quick checks that each part runs: one warm turn; two conversations (one per
        # replica) of one turn each, not 16 of two (~60 s less on 2 cores).
        turns = 2 if quick else 12
        with llama_server(binary, model, 2, config.n_ctx) as url:
            _prefix_and_first_token(root, report, row, config, url, turns)
        rounds = 1 if quick else 6
        conversations = 2 if quick else CONVERSATIONS
        with chroma_server(root / "chroma-fleet") as chroma:
            _replicas(
                root,
                report,
                row,
                binary,
                model,
                chroma.url,
                config,
                rounds,
                conversations,
                turns=1 if quick else 2,
            )
    with chroma_server(root / "chroma-retrieval") as chroma:
        _retrieval(root, report, row, chroma.url, 200 if quick else 10_000)


def _prefix_and_first_token(
    root: Path, report: Any, row: Any, config: Any, url: str, turns: int
) -> None:
    import openai

    from npc_engine.config import load_config
    from npc_engine.runtime import open_engine

    remote = load_config(
        personas_dir=config.personas_dir,
        data_dir=root / "remote-engine",
        seed=1234,
        temperature=0.0,
        n_ctx=config.n_ctx,
        max_tokens=32,
        generation={"backend": "openai", "url": url, "slots": 2},
    )
    runtime = open_engine(remote)
    generator = runtime.engine.generator
    sent: list[dict[str, Any]] = []  # each reply's request, as the engine sent it
    original = generator.generate

    arrivals: list[float] = []  # when the server's first text of each reply came in

    def recording(prompt: Any, params: Any, on_text: Any, cancel: Any = None) -> Any:
        if params.grammar is not None:
            return original(prompt, params, on_text, cancel)
        sent.append(generator._request(prompt, params))

        def arrived(piece: str) -> None:
            if len(arrivals) < len(sent):
                arrivals.append(time.perf_counter())
            on_text(piece)

        return original(prompt, params, arrived, cancel)

    generator.generate = recording  # type: ignore[method-assign]
    client = openai.OpenAI(base_url=url, api_key="no-key")
    engine_ttft: list[float] = []  # the server's first text, arrived in the engine
    delivered_ttft: list[float] = []  # the first text the game gets (after the cleaner)
    direct_ttft: list[float] = []
    prompt_tokens = cached_tokens = 0
    try:
        for turn in range(turns):
            # A player's think time: the last turn's memory writes (embedded on these same
            # 2 cores) are done, as they are in play; back to back they slow the recall.
            time.sleep(THINK_SECONDS)
            delivered: list[float] = []
            begun = time.perf_counter()
            result = runtime.engine.say(
                "mara",
                QUESTIONS[turn % len(QUESTIONS)],
                player_id="bench",
                on_delta=lambda _text, into=delivered: into.append(time.perf_counter()),
            )
            request = sent[-1]
            other_slot = {**request["extra_body"], "id_slot": 1 - request["extra_body"]["id_slot"]}
            if turn > 0:  # warm turns: the conversation's earlier turns sit in its slot
                prompt_tokens += result.prompt_tokens
                cached_tokens += result.cached_tokens
                engine_ttft.append((arrivals[-1] - begun) * 1000)
                delivered_ttft.append((delivered[0] - begun) * 1000)
                # The other slot first made to hold exactly the tokens the engine's slot had
                # cached for this prompt, so both read the same uncached rest.
                priming = {**request, "stream": False, "stream_options": None, "max_tokens": 1}
                priming["prompt"] = request["prompt"][: max(result.cached_tokens, 1)]
                client.completions.create(**{**priming, "extra_body": other_slot})
            # Then the very request the engine sent (sampling, stops and all), straight.
            started = time.perf_counter()
            first: float | None = None
            stream = client.completions.create(**{**request, "extra_body": other_slot})
            for _chunk in stream:
                if first is None:
                    first = (time.perf_counter() - started) * 1000
            if turn > 0 and first is not None:
                direct_ttft.append(first)
    finally:
        runtime.close()
        client.close()
    hit = cached_tokens / max(prompt_tokens, 1)
    report.details["remote_prefix"] = {
        "prompt_tokens": prompt_tokens,
        "cached_tokens": cached_tokens,
        "engine_ttft_ms": engine_ttft,
        "delivered_ttft_ms": delivered_ttft,
        "direct_ttft_ms": direct_ttft,
    }
    report.rows.append(
        row(
            "16 scale-out",
            f"prefix-cache hit rate of {turns - 1} warm turns through the openai backend "
            "(llama-server's own usage: cached ÷ prompt tokens)",
            "cached tokens",
            float(cached_tokens),
            "prompt tokens",
            float(prompt_tokens),
            hit,
            "≥ 0.9",
            hit >= 0.9,
        )
    )
    direct_median = statistics.median(direct_ttft)
    # Paired turn by turn (each turn reads a different number of new tokens).
    for name, times, goal in (
        ("the server's first text arriving in the engine", engine_ttft, 1.15),
        (
            "the first text the game gets (the reply cleaner holds a first word that could "
            "begin 'Mara:' or 'As an AI' until the next)",
            delivered_ttft,
            None,
        ),
    ):
        ratio = statistics.median(e / d for e, d in zip(times, direct_ttft, strict=True))
        report.rows.append(
            row(
                "16 scale-out",
                f"first token, warm turns (1 s think time before each): {name}, through the "
                "engine (recall, prompt, HTTP) vs the same prompt sent straight to "
                "llama-server with the same tokens cached; medians, ratio per turn",
                "engine ms",
                statistics.median(times),
                "direct ms",
                direct_median,
                ratio,
                "≤ 1.15×" if goal else "report",
                ratio <= goal if goal else None,
            )
        )


async def _conversations(urls: list[str], turns: int, tag: str, count: int) -> int:
    """``count`` conversations spread over ``urls``, ``turns`` says each; tokens generated."""
    from npc_engine.client import NpcClient

    npcs = ["mara", "guard_tom", "wren", "ysolde"]

    async def one(index: int) -> int:
        tokens = 0
        async with await NpcClient.connect(urls[index % len(urls)]) as client:
            for turn in range(turns):
                text = QUESTIONS[(index + turn) % len(QUESTIONS)]
                stream = await client.say(
                    npcs[index % len(npcs)], text, player_id=f"{tag}{index}", max_tokens=48
                )
                end = await stream.result()
                tokens += int((end.get("usage") or {}).get("completion_tokens", 0))
        return tokens

    return sum(await asyncio.gather(*(one(i) for i in range(count))))


def _replicas(
    root: Path,
    report: Any,
    row: Any,
    binary: Path,
    model: Path,
    memory_url: str,
    config: Any,
    rounds: int,
    conversations: int = CONVERSATIONS,
    turns: int = 2,
) -> None:
    """Aggregate tokens/s of ``conversations`` conversations of ``turns`` says each, on one
    replica and on two, ``rounds`` times."""
    one_rates: list[float] = []
    two_rates: list[float] = []
    with llama_server(binary, model, conversations, config.n_ctx) as url:
        settings = {
            "NPC_ENGINE_GENERATION__BACKEND": "openai",
            "NPC_ENGINE_GENERATION__URL": url,
            "NPC_ENGINE_MODEL": str(model),  # rendered and counted with the server's vocabulary
            "NPC_ENGINE_MEMORY__URL": memory_url,
            "NPC_ENGINE_PARALLEL": str(conversations),
            "NPC_ENGINE_N_CTX": str(config.n_ctx),
            "NPC_ENGINE_TEMPERATURE": "0.8",
            # Replicas here share 2 cores with llama-server: one embedder thread each (with
            # all cores, two replicas' embedders at once cost the server 7 %: 0.93x).
            "NPC_ENGINE_MEMORY__EMBED_THREADS": "1",
            # 16 sockets from one bench process are one client here, not an attack.
            "NPC_ENGINE_LIMITS__MAX_QUEUED_GENERATIONS": "64",
        }
        first, second = (
            start_engine(
                REPO / "personas",
                root / name,
                settings=settings,
                inherit_settings=False,
                log=root / f"{name}.log",
            )
            for name in ("replica-a", "replica-b")
        )
        try:
            asyncio.run(_conversations([first.url], 1, "warm", conversations))  # heads read
            for round_index in range(rounds):
                # Alternating which goes first, so both see the same machine load.
                order = [("one", [first.url]), ("two", [first.url, second.url])]
                for label, urls in order if round_index % 2 == 0 else order[::-1]:
                    started = time.perf_counter()
                    tag = f"{label}{round_index}-"
                    tokens = asyncio.run(_conversations(urls, turns, tag, conversations))
                    rate = tokens / (time.perf_counter() - started)
                    (one_rates if label == "one" else two_rates).append(rate)
        finally:
            for engine in (first, second):
                stop(engine.process)
    # Paired: each round's two runs ran back to back, so their ratio shares the machine's
    # load of the moment (runs alone varied by ±15 % here).
    ratio = statistics.median(t / o for o, t in zip(one_rates, two_rates, strict=True))
    one, two = statistics.median(one_rates), statistics.median(two_rates)
    report.details["remote_replicas"] = {"one_tps": one_rates, "two_tps": two_rates}
    report.rows.append(
        row(
            "16 scale-out",
            f"{conversations} concurrent conversations on one llama-server (-np "
            f"{conversations}), memories on a Chroma server: two engine replicas vs one, "
            f"aggregate tokens/s (medians; ratio: median of {len(one_rates)} paired runs)",
            "2 replicas tokens/s",
            two,
            "1 replica tokens/s",
            one,
            ratio,
            "≥ 0.95×",
            ratio >= 0.95,
        )
    )


def _retrieval(root: Path, report: Any, row: Any, memory_url: str, count: int) -> None:
    from npc_engine.config import load_config
    from npc_engine.memory.chroma_records import connect_server
    from npc_engine.memory.chroma_store import ChromaMemoryStore
    from npc_engine.memory.minilm import OfflineMiniLM
    from npc_engine.memory.types import Memory
    from npc_engine.model_registry import ModelCache

    embed = OfflineMiniLM(ModelCache(load_config().cache_dir))
    client = connect_server(
        memory_url, token=None, tenant="default_tenant", database="default_database", timeout=10
    )
    stores = {
        "server": ChromaMemoryStore(None, embed, client=client),
        "disk": ChromaMemoryStore(root / "retrieval-disk", embed),
    }
    rng = np.random.default_rng(11)
    words = ["salt", "fog", "lantern", "herring", "boat", "bell", "chapel", "marsh", "brandy"]
    # Random unit vectors for the fill (embedding 10,000 lines would take minutes); every
    # query is embedded for real. A fifth are the NPC's own, the rest one player's.
    for start in range(0, count, 2000):
        size = min(2000, count - start)
        texts = [" ".join(rng.choice(words, size=8)) + f" (note {start + i})" for i in range(size)]
        vectors = rng.normal(size=(size, 384)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        memories = [
            Memory(npc_id="keeper", text=t, player_id=None if i % 5 == 0 else "p")
            for i, t in enumerate(texts)
        ]
        for store in stores.values():
            store.add_with_embeddings(memories, vectors.tolist())
    queries = [f"Tell me about the {w} and the {v}" for w in words for v in words[:4]]
    timings: dict[str, list[float]] = {}
    for query in queries[:3]:  # warm both
        for store in stores.values():
            store.search("keeper", "p", query, 40)
    for query in queries:  # alternating, so both see the same machine load
        for hybrid in (True, False):
            for name, store in stores.items():
                started = time.perf_counter()
                store.search("keeper", "p", query, 40, keywords=hybrid)
                key = f"{name} {'hybrid' if hybrid else 'dense'}"
                timings.setdefault(key, []).append((time.perf_counter() - started) * 1000)
    for store in stores.values():
        store.close()
    report.details["remote_retrieval_ms"] = timings
    for kind, what in (("dense", "by meaning only"), ("hybrid", "meaning + keywords")):
        server = statistics.median(timings[f"server {kind}"])
        disk = statistics.median(timings[f"disk {kind}"])
        report.rows.append(
            row(
                "16 scale-out",
                f"memory retrieval p50 at {count:,} memories, {what}, 40 candidates: through "
                "a Chroma server on loopback vs Chroma on disk in-process (the fill's words "
                "are in most memories: the keyword half's worst case)",
                "server ms",
                server,
                "disk ms",
                disk,
                server / disk,
                "server ≤ 15 ms",
                server <= 15.0,
            )
        )
