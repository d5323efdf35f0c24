"""NPC heads on disk: the store on its own, then a new engine starting an NPC warm."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from npc_engine.config import EngineConfig
from npc_engine.generation.prefix_store import (
    MIN_HEAD_TOKENS,
    PrefixStore,
    model_digest,
    model_fingerprint,
)
from npc_engine.runtime import open_engine

pytestmark = pytest.mark.timeout(300)


def head(start: int, length: int = MIN_HEAD_TOKENS) -> np.ndarray:
    return np.arange(start, start + length, dtype=np.int32)


def test_the_longest_stored_head_of_a_prompt_is_found(tmp_path: Path) -> None:
    store = PrefixStore(tmp_path, "model-a", 1 << 20)
    short, longer = head(0), head(0, MIN_HEAD_TOKENS + 10)
    store.put(short, bytearray(b"S" * 100))
    store.put(longer, bytearray(b"L" * 100))
    prompt = np.concatenate([head(0, MIN_HEAD_TOKENS + 40), head(9000, 5)])
    found = store.best(prompt)
    assert found is not None and found[1] == len(longer)
    assert store.load(found[0]) == b"L" * 100
    # A head that is only partly the prompt's start, or the whole prompt, is no use.
    diverging = np.concatenate([head(0, 20), head(5000, MIN_HEAD_TOKENS)])
    assert store.best(diverging) is None
    assert store.best(short) is None  # the last prompt token must still be read
    # Too short to be worth a file.
    store.put(head(0, MIN_HEAD_TOKENS - 1), bytearray(b"x"))
    assert len(store) == 2


def test_heads_are_shared_between_processes_of_the_same_model_only(tmp_path: Path) -> None:
    writer = PrefixStore(tmp_path, "model-a", 1 << 20)
    reader = PrefixStore(tmp_path, "model-a", 1 << 20)  # another process, started earlier
    other_model = PrefixStore(tmp_path, "model-b", 1 << 20)
    prompt = head(0, MIN_HEAD_TOKENS + 1)
    assert reader.best(prompt) is None
    writer.put(head(0), bytearray(b"K" * 64))
    found = reader.best(prompt)
    assert found is not None and reader.load(found[0]) == b"K" * 64
    assert other_model.best(prompt) is None
    assert not list(tmp_path.rglob("*.part"))  # written under a temporary name, renamed


def test_model_fingerprint_changes_with_the_file_and_the_build(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + b"\0" * 100)
    first = model_fingerprint(model, "0.3.16", 0)
    assert first == model_fingerprint(model, "0.3.16", 0)
    assert first != model_fingerprint(model, "0.3.17", 0)
    assert first != model_fingerprint(model, "0.3.16", -1)
    model.write_bytes(b"GGUF" + b"\0" * 101)
    assert first != model_fingerprint(model, "0.3.16", 0)


def test_the_fingerprint_is_the_files_content_and_its_hash_is_cached(tmp_path: Path) -> None:
    cache = tmp_path / "digests.json"
    original, copy = tmp_path / "a.gguf", tmp_path / "elsewhere" / "b.gguf"
    copy.parent.mkdir()
    original.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    copy.write_bytes(original.read_bytes())
    # The same bytes under another name share heads; a byte changed does not.
    assert model_fingerprint(original, "v", digest_cache=cache) == model_fingerprint(
        copy, "v", digest_cache=cache
    )
    assert len(json.loads(cache.read_text())) == 2
    changed = bytearray(copy.read_bytes())
    changed[100] ^= 1
    copy.write_bytes(bytes(changed))
    assert model_fingerprint(original, "v", digest_cache=cache) != model_fingerprint(
        copy, "v", digest_cache=cache
    )
    # Unchanged files are not hashed again: a cached digest is trusted while path, size
    # and modification time hold (a planted value shows it was read, not recomputed).
    key = next(k for k in json.loads(cache.read_text()) if k.startswith(str(original.resolve())))
    cache.write_text(json.dumps({key: "planted"}))
    assert model_digest(original, cache) == "planted"


def test_damaged_and_foreign_files_are_never_restored(tmp_path: Path) -> None:
    store = PrefixStore(tmp_path, "model-a", 1 << 20)
    prompt = head(0, MIN_HEAD_TOKENS + 1)
    store.put(head(0), bytearray(b"K" * 64))
    (path,) = store.directory.glob("*.kv")
    good = path.read_bytes()
    (store.directory / "junk.kv").write_bytes(b"not a head")
    path.write_bytes(good[:-10])  # cut short (a full disk, a copy that stopped)
    assert PrefixStore(tmp_path, "model-a", 1 << 20).best(prompt) is None
    path.write_bytes(good[:-1] + b"X")  # one byte of the cells changed
    fresh = PrefixStore(tmp_path, "model-a", 1 << 20)
    found = fresh.best(prompt)
    assert found is not None  # the header is intact, so it is listed…
    assert fresh.load(found[0]) is None and not path.exists()  # …but never restored


def test_the_least_recently_used_heads_go_beyond_the_budget(tmp_path: Path) -> None:
    store = PrefixStore(tmp_path, "model-a", 1200)  # a file here: ~370 bytes; three fit

    def stored_path(index: int) -> Path:
        found = store.best(head(1000 * index, MIN_HEAD_TOKENS + 1))
        assert found is not None and found[0].path is not None
        return found[0].path

    files = []
    for index in range(3):
        store.put(head(1000 * index), bytearray(b"K" * 100))
        files.append(stored_path(index))
        os.utime(files[-1], ns=(index * 10**9, index * 10**9))  # used in this order
    assert store.load(store.best(head(0, MIN_HEAD_TOKENS + 1))[0])  # type: ignore[index]
    store.put(head(5000), bytearray(b"K" * 100))  # over budget: the least recently used goes
    assert files[0].exists() and not files[1].exists() and files[2].exists()
    assert store.best(head(1000, MIN_HEAD_TOKENS + 1)) is None


@pytest.mark.slow
def test_a_new_engine_starts_each_npc_from_its_stored_head(
    real_config: EngineConfig, tmp_path: Path
) -> None:
    """Each first engine reads Tom's head and stores it; each second one (a restart, a
    fresh data folder) restores it, and replies exactly as the first did: the cells are the
    same bytes, and both evaluate the rest of the prompt alike. The batched context (8
    slots) and the single one keep separate heads: llama.cpp's state records the slot
    layout, so neither could read the other's."""
    config = real_config.model_copy(update={"head_cache_dir": tmp_path / "heads"})
    line = "Who goes there?"
    replies, cached, heads = [], [], []
    for index, parallel in enumerate([8, 8, 1, 1]):
        runtime = open_engine(
            config.model_copy(update={"parallel": parallel, "data_dir": tmp_path / f"d{index}"})
        )
        try:
            result = runtime.engine.say("guard_tom", line, player_id="p", max_tokens=12)
            replies.append(result.text)
            cached.append(result.cached_tokens)
            store = runtime.engine.generator.heads  # type: ignore[attr-defined]
            heads.append(sorted(len(s.tokens) for s in store._entries.values()))
        finally:
            runtime.close()
    assert heads[0] == heads[1] == heads[2] == heads[3] and len(heads[0]) == 1
    head = heads[0][0]
    assert head > 300  # world, persona, examples
    assert cached == [0, head, 0, head]  # cold, from the head, cold (other layout), head
    assert replies[1] == replies[0] and replies[3] == replies[2]
