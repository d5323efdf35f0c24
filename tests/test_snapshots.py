"""KV snapshots: the LRU on its own, then restoring real llama.cpp state across NPC switches."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from npc_engine.config import EngineConfig
from npc_engine.generation.base import GenerationParams, RenderedPrompt
from npc_engine.generation.batched import BatchedLlamaGenerator, StopMatcher
from npc_engine.generation.llama import LlamaGenerator
from npc_engine.generation.snapshots import SnapshotCache, common_prefix_length
from npc_engine.model_files import resolve_chat_model
from npc_engine.runtime import EngineRuntime, open_engine


def tokens(*values: int) -> np.ndarray:
    return np.asarray(values, dtype=np.int32)


def test_common_prefix_length() -> None:
    assert common_prefix_length(tokens(1, 2, 3), tokens(1, 2, 4)) == 2
    assert common_prefix_length(tokens(1, 2), tokens(1, 2, 3)) == 2
    assert common_prefix_length(tokens(), tokens(1)) == 0
    assert common_prefix_length(tokens(5), tokens(1)) == 0


def test_best_snapshot_shares_the_longest_prefix() -> None:
    cache = SnapshotCache(1000)
    cache.put("mara", tokens(1, 2, 3, 4), bytearray(b"a" * 10))
    cache.put("tom", tokens(1, 2, 9, 9), bytearray(b"b" * 10))
    found = cache.best(tokens(1, 2, 3, 7))
    assert found is not None and found[0].key == "mara" and found[1] == 3
    assert cache.best(tokens(8, 8)) is None
    cache.put("mara", tokens(1, 2, 3, 4, 5), bytearray(b"c" * 10))  # replaces, does not add
    assert len(cache) == 2


def test_lru_keeps_the_ram_budget_and_drops_the_oldest() -> None:
    cache = SnapshotCache(25)
    for index, key in enumerate(["a", "b", "c"]):
        cache.put(key, tokens(index), bytearray(10))
    assert len(cache) == 2 and cache.ram_bytes == 20
    assert cache.best(tokens(0)) is None  # "a" was least recently used
    found = cache.best(tokens(1))
    assert found is not None
    cache.load(found[0])  # "b" is now the most recently used
    cache.put("d", tokens(3), bytearray(10))
    assert cache.best(tokens(2)) is None and cache.best(tokens(1)) is not None


def test_evicted_snapshots_spill_to_disk_and_come_back(tmp_path: Path) -> None:
    cache = SnapshotCache(15, spill_dir=tmp_path, disk_budget_bytes=15)
    cache.put("a", tokens(1, 1), bytearray(b"A" * 10))
    cache.put("b", tokens(2, 2), bytearray(b"B" * 10))
    assert cache.spills == 1 and len(list(tmp_path.glob("*.kv"))) == 1
    found = cache.best(tokens(1, 1))
    assert found is not None and cache.load(found[0]) == b"A" * 10
    cache.put("c", tokens(3, 3), bytearray(b"C" * 10))  # "b" spills; the disk budget drops "a"
    assert cache.best(tokens(1, 1)) is None and len(list(tmp_path.glob("*.kv"))) == 1


@pytest.fixture(params=[1, 8], ids=["single", "batched"])
def runtime(request: pytest.FixtureRequest, real_config: EngineConfig) -> Iterator[EngineRuntime]:
    """The real engine with one sequence (LlamaGenerator) and with 8 (batched)."""
    opened = open_engine(real_config.model_copy(update={"parallel": request.param}))
    try:
        yield opened
    finally:
        opened.close()


@pytest.mark.slow
def test_switching_npcs_restores_each_conversation(runtime: EngineRuntime) -> None:
    engine = runtime.engine
    first = engine.say("mara", "Any rooms free tonight?", player_id="p", max_tokens=8)
    engine.say("guard_tom", "Who goes there?", player_id="p", max_tokens=8)
    second = engine.say("mara", "How much for the room?", player_id="p", max_tokens=8)
    # Back at Mara: her persona and the first exchange are not evaluated again.
    assert second.cached_tokens >= first.prompt_tokens - 16


AnyLlama = LlamaGenerator | BatchedLlamaGenerator


def scene_prompts(generator: AnyLlama) -> tuple[RenderedPrompt, RenderedPrompt]:
    harbour = "The harbour wakes: gulls, nets, tar and salt. " * 8
    marsh = "Reeds, mud and mist over the marsh pools. " * 8
    return (
        generator.render([{"role": "user", "content": harbour + "Describe it at dawn."}]),
        generator.render([{"role": "user", "content": marsh + "Name three herbs."}]),
    )


def greedy(key: str, max_tokens: int = 16) -> GenerationParams:
    return GenerationParams(max_tokens=max_tokens, temperature=0.0, seed=1, cache_key=key)


def run(generator: AnyLlama, prompt: RenderedPrompt, key: str) -> tuple[str, bool, int]:
    pieces: list[str] = []
    stats = generator.generate(prompt, greedy(key), pieces.append)
    return "".join(pieces), stats.restored_snapshot, stats.cached_tokens


@pytest.mark.slow
def test_restored_state_generates_what_the_kept_state_does(runtime: EngineRuntime) -> None:
    """What a restore guarantees: the sequence's KV cells come back as they were, so the
    reply equals the one from the same cells kept in place (both evaluate the prompt's
    last token alone). A cold context evaluates it inside a 256-token batch, whose CPU
    kernels (AVX2 vs AVX-512) may round differently: equal to a cold reply is not a promise.
    """
    generator = runtime.engine.generator
    assert isinstance(generator, (LlamaGenerator, BatchedLlamaGenerator))
    prompt, other = scene_prompts(generator)
    run(generator, prompt, "a")  # cold: fills the cells
    kept_text, restored, cached = run(generator, prompt, "a")  # same cells, kept in place
    assert not restored and cached == len(prompt.tokens or []) - 1
    if isinstance(generator, BatchedLlamaGenerator):
        # "a" leaves its slot (as when the slot goes to another conversation): its state is
        # snapshotted and the slot emptied, so "a" must come back from the snapshot.
        slot = next(slot for slot in generator.slots if slot.key == "a")
        generator._save_slot(slot)
        generator._low.llama_memory_seq_rm(generator._memory, slot.seq_id, -1, -1)
        slot.tokens, slot.key = [], None
    else:
        generator.generate(other, greedy("b", 4), print)
    warm_text, restored, cached = run(generator, prompt, "a")
    assert restored and cached == len(prompt.tokens or []) - 1
    assert warm_text == kept_text


@pytest.mark.slow
def test_a_conversation_that_loses_its_slot_comes_back_restored(
    real_config: EngineConfig,
) -> None:
    """One batch slot, three turns: "a", then "b" takes the slot (save-on-leave), then "a"
    returns and is restored from its snapshot, replying as with its cells kept."""
    path, chat_format = resolve_chat_model(real_config, lambda _m: None)
    generator = BatchedLlamaGenerator(
        Path(path),
        n_ctx=2048,
        chat_format=chat_format,
        snapshots=SnapshotCache(256 << 20),
        slots=1,
    )
    try:
        prompt, other = scene_prompts(generator)
        run(generator, prompt, "a")
        kept_text, _, _ = run(generator, prompt, "a")
        assert len(generator.snapshots or []) == 0
        generator.generate(other, greedy("b", 4), print)  # the only slot changes hands
        assert generator.snapshots is not None and len(generator.snapshots) == 1
        back_text, restored, cached = run(generator, prompt, "a")
        assert restored and cached == len(prompt.tokens or []) - 1
        assert back_text == kept_text
    finally:
        generator.close()


@pytest.mark.slow
def test_cancel_during_the_prompt_stops_after_one_batch(
    runtime: EngineRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    generator = runtime.engine.generator
    long_prompt = generator.render([{"role": "user", "content": "harbour " * 900}])
    cancel = threading.Event()
    batches: list[int] = []

    if isinstance(generator, BatchedLlamaGenerator):
        low = generator._low

        class CancelAfterFirstDecode:
            def __getattr__(self, name: str) -> object:
                return getattr(low, name)

            def llama_decode(self, ctx: object, batch: object) -> int:
                batches.append(batch.n_tokens)  # type: ignore[attr-defined]
                status = int(low.llama_decode(ctx, batch))
                cancel.set()  # the player walked away during the first batch
                return status

        monkeypatch.setattr(generator, "_low", CancelAfterFirstDecode())
    else:
        real_eval = generator._llama.eval

        def eval_then_cancel(batch: list[int]) -> None:
            batches.append(len(batch))
            real_eval(batch)
            cancel.set()

        monkeypatch.setattr(generator._llama, "eval", eval_then_cancel)

    stats = generator.generate(long_prompt, GenerationParams(max_tokens=8), print, cancel)
    assert stats.finish_reason == "cancelled" and stats.completion_tokens == 0
    assert len(batches) == 1 and len(long_prompt.tokens) > 3 * batches[0]


def test_stop_matcher_cuts_at_stops_and_holds_back_their_starts() -> None:
    matcher = StopMatcher(["<|im_end|>", "\nPlayer:"])
    assert matcher.feed("Aye, one room") == "Aye, one room"
    assert matcher.feed(" left.<|im") == " left."  # "<|im" could start a stop string
    assert matcher.feed("_end|>more") == "" and matcher.stopped
    other = StopMatcher(["\nPlayer:"])
    assert other.feed("Hello\nPl") == "Hello" and other.feed("ease sit.") == "\nPlease sit."
    assert other.finish() == ""


@pytest.mark.slow
def test_a_failing_decode_ends_only_its_own_reply(
    real_config: EngineConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """llama_decode refuses every batch holding conversation "bad": "bad" ends with an
    error and its slot is reset, "good" (decoding in the same batches) goes on."""
    path, chat_format = resolve_chat_model(real_config, lambda _m: None)
    generator = BatchedLlamaGenerator(Path(path), n_ctx=2048, chat_format=chat_format, slots=2)
    try:
        prompt, other = scene_prompts(generator)
        low = generator._low
        refused: list[int] = []

        class RefuseBad:
            def __getattr__(self, name: str) -> object:
                return getattr(low, name)

            def llama_decode(self, ctx: object, batch: Any) -> int:
                seqs = {batch.seq_id[i][0] for i in range(batch.n_tokens)}
                bad = {s.seq_id for s in generator.slots if s.key == "bad" and s.request}
                if seqs & bad:
                    refused.append(batch.n_tokens)
                    return 1  # llama.cpp's "could not find a KV slot"
                return int(low.llama_decode(ctx, batch))

        monkeypatch.setattr(generator, "_low", RefuseBad())
        results: dict[str, object] = {}

        def talk(key: str, rendered: RenderedPrompt) -> None:
            pieces: list[str] = []
            try:
                stats = generator.generate(rendered, greedy(key, 24), pieces.append)
                results[key] = (stats.finish_reason, "".join(pieces))
            except Exception as exc:
                results[key] = exc

        threads = [
            threading.Thread(target=talk, args=("good", prompt)),
            threading.Thread(target=talk, args=("bad", other)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert refused  # the fault really happened
        assert isinstance(results["bad"], Exception) and "llama_decode" in str(results["bad"])
        reason, text = results["good"]  # type: ignore[misc]
        assert reason in ("stop", "length") and text
        bad_slot = next(s for s in generator.slots if s.key != "good")
        assert bad_slot.tokens == [] and bad_slot.key is None  # no cells claimed
        monkeypatch.setattr(generator, "_low", low)
        again, _restored, _cached = run(generator, other, "bad")  # the slot works again
        assert again
    finally:
        generator.close()


def longest_copied_run(reply: str, source: str) -> int:
    """The most consecutive words of ``reply`` found in a row in ``source``."""
    words = reply.lower().split()
    text = " " + " ".join(source.lower().split()) + " "
    best = 0
    for start in range(len(words)):
        end = start + best + 1
        while end <= len(words) and " " + " ".join(words[start:end]) + " " in text:
            best, end = end - start, end + 1
    return best


@pytest.mark.slow
def test_dry_stops_the_reply_copying_a_long_run_of_its_prompt(real_config: EngineConfig) -> None:
    """The tiny model that said a sentence twice says it a third time word for word; with
    DRY it cannot continue a run of the prompt past a few tokens (the batched generator's
    own sampler chain; docs/models.md, "Repetition")."""
    path, chat_format = resolve_chat_model(real_config, lambda _m: None)
    generator = BatchedLlamaGenerator(Path(path), n_ctx=1024, chat_format=chat_format, slots=1)
    said = "The old lighthouse keeper counted seven grey ships sailing past the broken pier."
    # Its own earlier turns, not a request to repeat: asked to repeat, the 135M copied on
    # one CPU and rambled on another (AVX-512); after two identical turns it copies on both.
    prompt = generator.render(
        [
            {"role": "user", "content": "Say the line."},
            {"role": "assistant", "content": said},
            {"role": "user", "content": "Again."},
            {"role": "assistant", "content": said},
            {"role": "user", "content": "Again."},
        ]
    )
    try:
        replies = {}
        for multiplier in (0.0, 3.0):
            params = greedy(f"dry-{multiplier}", 64)
            params.dry_multiplier = multiplier
            pieces: list[str] = []
            generator.generate(prompt, params, pieces.append)
            replies[multiplier] = "".join(pieces)
    finally:
        generator.close()
    assert longest_copied_run(replies[0.0], said) >= 6, replies  # copies without DRY
    assert longest_copied_run(replies[3.0], said) <= 4, replies
