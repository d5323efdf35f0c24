"""The real memory store: one Chroma collection per NPC, in a PersistentClient on disk or
on a Chroma server (``HttpClient``) that several engine replicas share.

Collections per NPC and per (NPC, player) keep queries fast without metadata filters and
make forgetting an NPC or a player cheap. Embeddings are computed
here with the offline all-MiniLM-L6-v2 ONNX model and passed to Chroma explicitly, so Chroma
never tries to fetch its own copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from npc_engine.errors import is_unavailable
from npc_engine.memory.keywords import KeywordIndex, query_terms
from npc_engine.memory.saves import (
    MAX_MEMORY_TEXT,
    MAX_SAVES,
    SaveError,
    SaveInfo,
    check_memory,
    check_memory_id,
    check_number,
    check_save_id,
    check_state_record,
    check_vector,
    decode_export,
    encode_export,
    pack,
    refuse,
    unknown_save,
    unpack,
)
from npc_engine.memory.types import (
    MEMORY_KINDS,
    Candidate,
    Memory,
    MemoryKind,
    faded_at,
    new_memory_id,
    utc_now,
)
from npc_engine.model_registry import EMBEDDING_MODEL, MODELS, ModelCache

log = logging.getLogger(__name__)

NO_PLAYER = ""  # Chroma metadata cannot hold None
STATE_COLLECTION = "npc-engine-game-state"
SAVES_COLLECTION = "npc-engine-saves"
# Memories some save names that are no longer alive (forgotten, or undone by a load).
ARCHIVE_COLLECTION = "npc-engine-archive"
PENDING_LOAD = "\x1fpending-load"  # the saves record of a load not finished yet
STORE_FORMAT = "\x1fformat"  # the saves record naming how memories are embedded
CONTENT_VECTORS = "content-v1"  # vectors of what was said, not of the third-person text
# The third-person wrappers older versions embedded whole; reindex takes the words back out.
_WRAPPED = re.compile(
    r'^(?:The player \S+ told me|I (?:answered|greeted) the player \S+): "(.*)"$', re.S
)
_MEMORY_COLLECTION = re.compile(r"npc-[0-9a-f]{24}-(own|players-[0-9]+)")  # fullmatch
KEYWORD_INDEX = "npc-engine-keywords.sqlite3"  # beside Chroma's own files
TICK_READ_BATCH = 8  # a tick's candidate memories read from Chroma at a time
# Chroma keeps every write in its write-ahead log (a SQLite table, read without an index
# on each write) until the collection's vector index is saved to disk, at ``sync_threshold``
# writes (default 1,000). A collection of one NPC and a few players rarely reaches that:
# at 100 NPCs x 1,000 memories the log held all 100,000 and each write took ~145 ms
# (chroma-core/chroma#7659). Saved every 64 writes, the log stays short.
MEMORY_COLLECTION_CONFIG: dict[str, Any] = {
    "hnsw": {"space": "cosine", "sync_threshold": 64, "batch_size": 64}
}
# A player with at most this many memories on an NPC is searched exactly (~3 ms), past it
# by Chroma's HNSW index (consolidation keeps players far below it unless turned off).
EXACT_SEARCH_LIMIT = 2000
PLAYER_VECTORS_BYTES = 64 << 20  # ~100 players' memories at the per-player cap
SERVER_KEYWORD_TERMS = 4  # rarest words of a line looked up by the server's full-text filter
COMMON_TERM_SECONDS = 600.0  # a word found too common is not searched by for this long
ONE_VECTOR = [[1.0]]  # Chroma needs a vector per record; state and save records have none


class OfflineMiniLM:
    """all-MiniLM-L6-v2 (ONNX) on our verified offline files, mean-pooled and normalised.

    Written here rather than using Chroma's ``ONNXMiniLM_L6_V2`` because that class pads
    every text to 256 tokens: NPC memories are 10-40 tokens, so it spent ~10× the work
    (31 ms per query, 36 memories/s written, measured by tools/bench.py). Padding to the
    longest text in a batch gives the same vectors (padding is masked out) much faster.
    """

    MAX_TOKENS = 256  # what sentence-transformers uses for this model
    BATCH = 64

    def __init__(self, cache: ModelCache, *, threads: int | None = None) -> None:
        import onnxruntime
        from tokenizers import Tokenizer

        spec = MODELS[EMBEDDING_MODEL]
        model_dir = cache.require(spec)  # raises with "what is missing, how to provide it"
        self._tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self._tokenizer.enable_truncation(max_length=self.MAX_TOKENS)
        self._tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle ONNX threads spin-wait by default, taking CPU from the llama.cpp threads that
        # start decoding right after a recall (first token ~35% slower on 2 cores).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
        self._session = onnxruntime.InferenceSession(
            str(model_dir / "model.onnx"), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._lock = threading.Lock()
        # A turn embeds the player's line three times (memory recall, the lorebook, then
        # the memory written): the later ones, and repeated lines, are answered from here.
        self._recent: OrderedDict[str, list[float]] = OrderedDict()

    RECENT = 64  # texts remembered
    RECENT_BATCH = 8  # batches up to this size are remembered (a turn's); bulk loads not

    def __call__(self, texts: Sequence[str]) -> list[list[float]]:
        if not texts:
            return []
        with self._lock:
            known = {text: self._recent[text] for text in texts if text in self._recent}
        missing = [text for text in dict.fromkeys(texts) if text not in known]
        if missing:
            fresh = dict(zip(missing, self._vectors(missing), strict=True))
            if len(missing) <= self.RECENT_BATCH:
                with self._lock:
                    self._recent.update(fresh)
                    while len(self._recent) > self.RECENT:
                        self._recent.popitem(last=False)
            known |= fresh
        return [known[text] for text in texts]

    def _vectors(self, texts: Sequence[str]) -> list[list[float]]:
        # Each distinct text once (a world tick writes one rumour to three listeners), and
        # similar lengths share a batch, so little is padded; results go back in order.
        distinct = list(dict.fromkeys(texts))
        order = sorted(range(len(distinct)), key=lambda i: len(distinct[i]))
        vectors: list[Any] = [None] * len(distinct)
        with self._lock:  # one ONNX session; keep its use serial
            for start in range(0, len(order), self.BATCH):
                chunk = order[start : start + self.BATCH]
                for index, vector in zip(
                    chunk, self._embed([distinct[i] for i in chunk]), strict=True
                ):
                    vectors[index] = vector.tolist()
        by_text = dict(zip(distinct, vectors, strict=True))
        return [by_text[text] for text in texts]

    def _embed(self, texts: list[str]) -> Any:
        import numpy as np

        encoded = self._tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encoded], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encoded], dtype=np.int64)
        hidden = self._session.run(
            None,
            {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)},
        )[0]
        weights = mask[..., None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.clip(norms, 1e-12, None)).astype(np.float32)


def _timestamp(moment: datetime) -> float:
    return moment.timestamp()


def _from_timestamp(value: Any) -> datetime:
    return datetime.fromtimestamp(float(value), tz=UTC)


def _metadata(memory: Memory) -> dict[str, str | int | float | bool]:
    metadata: dict[str, str | int | float | bool] = {
        "npc_id": memory.npc_id,
        "player_id": memory.player_id or NO_PLAYER,
        "kind": memory.kind,
        "importance": memory.importance,
        "created_at": _timestamp(memory.created_at),
        "last_accessed_at": _timestamp(memory.last_accessed_at or memory.created_at),
    }
    if memory.game_time is not None:  # Chroma metadata cannot hold None: absent instead
        metadata["game_time"] = memory.game_time
    if memory.accessed_game_time is not None:
        metadata["accessed_game_time"] = memory.accessed_game_time
    if memory.content is not None:
        metadata["content"] = memory.content
    if memory.subject is not None:
        metadata["subject"] = memory.subject
    if memory.superseded_by is not None:
        metadata["superseded_by"] = memory.superseded_by
    if memory.source is not None:
        metadata["source"] = memory.source
    if memory.origin is not None:
        metadata["origin"] = memory.origin
    if memory.hops:
        metadata["hops"] = memory.hops
    return metadata


def _optional_float(value: Any) -> float | None:
    return float(value) if value is not None else None


def _memory(memory_id: str, document: str | None, metadata: Any) -> Memory:
    meta = dict(metadata or {})
    player = str(meta.get("player_id", NO_PLAYER))
    return Memory(
        id=memory_id,
        npc_id=str(meta.get("npc_id", "")),
        text=document or "",
        kind=cast(MemoryKind, meta.get("kind", "dialogue")),
        importance=int(meta.get("importance", 3)),
        player_id=player or None,
        created_at=_from_timestamp(meta.get("created_at", 0)),
        last_accessed_at=_from_timestamp(meta.get("last_accessed_at", meta.get("created_at", 0))),
        game_time=_optional_float(meta.get("game_time")),
        accessed_game_time=_optional_float(meta.get("accessed_game_time")),
        content=str(meta["content"]) if "content" in meta else None,
        subject=str(meta["subject"]) if "subject" in meta else None,
        superseded_by=str(meta["superseded_by"]) if "superseded_by" in meta else None,
        source=str(meta["source"]) if "source" in meta else None,
        origin=str(meta["origin"]) if "origin" in meta else None,
        hops=int(meta.get("hops", 0)),
    )


def _memories(result: Any) -> list[Memory]:
    """The memories in a Chroma ``get`` result that included documents and metadatas."""
    return [
        _memory(memory_id, document, metadata)
        for memory_id, document, metadata in zip(
            result["ids"],
            result.get("documents") or [],
            result.get("metadatas") or [],
            strict=True,
        )
    ]


PLAYER_SHARDS = 8  # collections per NPC holding what it knows about players


def _save_vectors_often(collection: Any) -> None:
    """A collection made before MEMORY_COLLECTION_CONFIG gets its sync threshold lowered;
    Chroma applies it from the next start (measured: its log then shrinks as written)."""
    wanted = MEMORY_COLLECTION_CONFIG["hnsw"]
    try:
        with warnings.catch_warnings():  # "legacy embedding function config": we set none
            warnings.simplefilter("ignore", DeprecationWarning)
            hnsw = (collection.configuration or {}).get("hnsw") or {}
        if int(hnsw.get("sync_threshold", wanted["sync_threshold"])) > wanted["sync_threshold"]:
            collection.modify(
                configuration={
                    "hnsw": {
                        "sync_threshold": wanted["sync_threshold"],
                        "batch_size": wanted["batch_size"],
                    }
                }
            )
    except Exception as exc:  # only speed is at stake: never fail an open over it
        if is_unavailable(exc):
            raise
        log.debug("could not lower the sync threshold of %s: %s", collection.name, exc)


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:24]


def _own_name(npc_id: str) -> str:
    """The collection of an NPC's own memories (tied to no player)."""
    return f"npc-{_digest(npc_id)}-own"


def _shard_name(npc_id: str, shard: int) -> str:
    return f"npc-{_digest(npc_id)}-players-{shard}"


def _player_shard(npc_id: str, player_id: str) -> str:
    """The collection holding what ``npc_id`` knows about ``player_id``.

    Names are hashes, so no id is a prefix of another's (``guard`` vs ``guard-tom``) and any
    id fits Chroma's name alphabet. Players share a fixed number of shards: a collection per
    player cost ~2.5 MB of RAM, 4 file handles and 37 ms to create (1,000 measured), so
    hostile or merely many player ids would exhaust the machine.
    """
    shard = int(hashlib.sha1(player_id.encode("utf-8")).hexdigest()[:8], 16) % PLAYER_SHARDS
    return _shard_name(npc_id, shard)


def _home_name(memory: Memory) -> str:
    """The collection a memory is stored in."""
    if memory.player_id is None:
        return _own_name(memory.npc_id)
    return _player_shard(memory.npc_id, memory.player_id)


# The collections a save may name: those the engine makes (an NPC's own, its 8 shards).
_SAVED_COLLECTION = re.compile(rf"npc-[0-9a-f]{{24}}-(?:own|players-[0-{PLAYER_SHARDS - 1}])")


def _names_of(npc_id: str) -> list[str]:
    return [_own_name(npc_id), *(_shard_name(npc_id, k) for k in range(PLAYER_SHARDS))]


def _state_labels(key: str, labels: dict[str, str] | None) -> dict[str, str]:
    return dict(labels) if labels else {"kind": key.split(":", 1)[0]}


def _where(labels: dict[str, str]) -> dict[str, Any]:
    clauses = [{name: value} for name, value in sorted(labels.items())]
    return clauses[0] if len(clauses) == 1 else {"$and": clauses}


def _said(document: str) -> str:
    """The words inside an older memory's third-person wrapper (the text if none)."""
    match = _WRAPPED.fullmatch(document)
    return match.group(1) if match else document


# -- imported saves ----------------------------------------------------------------------
#
# An imported save file came from someone else: it is untrusted. It is read whole and
# checked whole (``read_import``) before anything is written: every collection is one the
# engine makes, every record is named by the manifest and lies in the collection its own
# npc_id/player_id/kind put it in, every vector has the store's dimension, every game-state
# record keeps the rules of ``state.set``. Then its memories get NEW ids: the archive is
# shared by every save (keyed by memory id), and ids are visible to clients
# (``memory.list``), so a file carrying an id that exists here (live, archived for another
# save, or made later) could otherwise rewrite what another save restores. Renamed, an
# imported save can only ever reach its own records. References inside the save (a fact's
# ``superseded_by``, a rumour's ``origin``, the memory ids of its conversation histories)
# are renamed with it.

_METADATA_TEXTS = (
    *("npc_id", "player_id", "kind", "content", "subject"),
    *("superseded_by", "source", "origin"),
)
_METADATA_NUMBERS = ("created_at", "last_accessed_at", "game_time", "accessed_game_time")
_METADATA_INTS = ("importance", "hops")
_METADATA_REQUIRED = {"npc_id", "player_id", "kind", "importance", "created_at"}


@dataclass
class ImportedSave:
    """A save file read and checked whole, its memories renamed (see above)."""

    manifest: dict[str, Any]  # as create_save writes it: {"memories": …, "state": …}
    ids: list[str] = field(default_factory=list)
    vectors: list[list[float]] = field(default_factory=list)
    documents: list[str] = field(default_factory=list)
    metadatas: list[dict[str, Any]] = field(default_factory=list)


def _imported_memory(
    memory_id: str, record: Any, where: str, dimension: int
) -> tuple[Memory, list[float]]:
    if not isinstance(record, dict) or set(record) != {"document", "metadata", "vector"}:
        refuse(f"{where} is not a memory record (document, metadata, vector)")
    meta = record["metadata"]
    if not isinstance(meta, dict) or not set(meta) >= _METADATA_REQUIRED:
        refuse(f"{where}: the metadata lacks {', '.join(sorted(_METADATA_REQUIRED))}")
    for name, value in meta.items():
        if name in _METADATA_TEXTS:
            if not isinstance(value, str) or len(value) > MAX_MEMORY_TEXT:
                refuse(f"{where}: metadata {name} is not a text")
        elif name in _METADATA_NUMBERS:
            check_number(value, f"{where}: metadata {name}", -1e15, 1e15)
        elif name in _METADATA_INTS:
            if isinstance(value, bool) or not isinstance(value, int) or abs(value) > 10**6:
                refuse(f"{where}: metadata {name} is not an integer")
        else:
            refuse(f"{where}: unknown metadata {str(name)[:40]!r}")
    document = record["document"]
    if not isinstance(document, str):
        refuse(f"{where}: the document is not a text")
    if meta["kind"] not in MEMORY_KINDS:
        refuse(f"{where}: unknown kind")
    if not 1 <= meta["importance"] <= 10:
        refuse(f"{where}: importance is not 1-10")
    for name in ("created_at", "last_accessed_at"):
        if name in meta:
            check_number(meta[name], f"{where}: metadata {name}", 0, 1e11)
    memory = check_memory(_memory(memory_id, document, meta), where)
    return memory, check_vector(record["vector"], where, dimension)


def _renamed(reference: str | None, names: dict[str, str]) -> str | None:
    """A reference to a memory of the save (a bare id or "npc/id"), renamed with it."""
    if reference is None:
        return None
    if reference in names:
        return names[reference]
    head, slash, tail = reference.rpartition("/")
    return f"{head}/{names[tail]}" if slash and tail in names else reference


def _renamed_state(value: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    if "turns" not in value:
        return value
    turns = []
    for turn in value["turns"]:
        turn = dict(turn)
        turn["memory_ids"] = sorted(names.get(i, i) for i in turn.get("memory_ids", []))
        turn["noted"] = [[names.get(i, i), line] for i, line in turn.get("noted", [])]
        turns.append(turn)
    return {"turns": turns}


def read_import(data: bytes, dimension: int) -> ImportedSave:
    """An exported save file, checked whole and renamed (see above); SaveError, naming
    what is wrong, for anything an engine save cannot hold. Writes nothing."""
    document = decode_export(data)
    manifest, records = document["manifest"], document["records"]
    if not set(manifest) <= {"memories", "state"}:
        refuse("the manifest holds more than memories and state")
    listed, state = manifest.get("memories", {}), manifest.get("state", {})
    if not isinstance(listed, dict) or not isinstance(state, dict):
        refuse("the manifest's memories or state is not an object")
    home: dict[str, str] = {}  # memory id -> the collection the manifest puts it in
    for name, ids in listed.items():
        if not _SAVED_COLLECTION.fullmatch(name):
            refuse(f"the manifest names an unknown collection {name[:80]!r}")
        if not isinstance(ids, list):
            refuse(f"the manifest's {name} is not a list of ids")
        for memory_id in ids:
            check_memory_id(memory_id, f"a memory id of {name}")
            if memory_id in home:
                refuse(f"the manifest names memory {memory_id!r} twice")
            home[memory_id] = name
    unnamed = [memory_id for memory_id in records if memory_id not in home]
    if unnamed:
        refuse(f"{len(unnamed)} memory records are not named by the manifest")
    names = {memory_id: new_memory_id() for memory_id in records}  # uuid4: never collides
    imported = ImportedSave({"memories": {}, "state": {}})
    for memory_id, record in records.items():
        where = f"memory {memory_id!r}"
        memory, vector = _imported_memory(memory_id, record, where, dimension)
        if _home_name(memory) != home[memory_id]:
            refuse(f"{where} is not in the collection of its npc_id and player_id")
        memory = replace(
            memory,
            id=names[memory_id],
            superseded_by=_renamed(memory.superseded_by, names),
            origin=_renamed(memory.origin, names),
        )
        imported.ids.append(memory.id)
        imported.vectors.append(vector)
        imported.documents.append(memory.text)
        imported.metadatas.append(_metadata(memory))
    missing = len(home) - len(records)
    if missing:  # an export of a store that had lost them: nothing to bring back
        log.warning("the imported save names %d memories it does not hold", missing)
    kept: dict[str, list[str]] = {}
    for memory_id, name in home.items():
        if memory_id in names:
            kept.setdefault(name, []).append(names[memory_id])
    imported.manifest["memories"] = {name: sorted(ids) for name, ids in sorted(kept.items())}
    for key, entry in state.items():
        if not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[0], str):
            refuse(f"state {str(key)[:80]!r} is not [document, labels]")
        try:
            value = json.loads(entry[0])
        except (ValueError, RecursionError):
            refuse(f"state {str(key)[:80]!r} is not JSON")
        value, labels = check_state_record(key, value, entry[1])
        value = _renamed_state(value, names)
        imported.manifest["state"][key] = [json.dumps(value, sort_keys=True), labels]
    return imported


def _check_stored_manifest(manifest: dict[str, Any]) -> None:
    """What a load needs of a stored save to run to its end (a save imported before
    imports were checked may lack it): raises ValueError before anything changes."""
    memories, state = manifest.get("memories", {}), manifest.get("state", {})
    if not isinstance(memories, dict) or not isinstance(state, dict):
        raise ValueError("memories or state is not an object")
    for name, ids in memories.items():
        if not isinstance(name, str) or not _SAVED_COLLECTION.fullmatch(name):
            raise ValueError(f"unknown collection {str(name)[:80]!r}")
        if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
            raise ValueError(f"the ids of {name} are not a list of ids")
    for key, entry in state.items():
        if not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[0], str):
            raise ValueError(f"state {str(key)[:80]!r} is not [document, labels]")
        if not isinstance(json.loads(entry[0]), dict):
            raise ValueError(f"state {str(key)[:80]!r} is not a JSON object")
        labels = entry[1]
        if labels is not None and not (
            isinstance(labels, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items())
        ):
            raise ValueError(f"state {str(key)[:80]!r} has labels that are not texts")


class RecordCache:
    """Documents and metadata of recently recalled memories, by id, least recently used out.

    Chroma stays the store of record; this only spares the search its document and
    metadata fetch from SQLite, which was half of a query's time (1.8 ms vs 0.8 ms for ids
    and distances alone, 10,000 memories, by a profile of the bench's query).
    """

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._records: OrderedDict[str, Memory] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, memory_id: str) -> Memory | None:
        with self._lock:
            memory = self._records.get(memory_id)
            if memory is not None:
                self._records.move_to_end(memory_id)
            return memory

    def put(self, memories: Sequence[Memory]) -> None:
        with self._lock:
            for memory in memories:
                self._records[memory.id] = memory
                self._records.move_to_end(memory.id)
            while len(self._records) > self._capacity:
                self._records.popitem(last=False)

    def touch(self, memory_ids: Sequence[str], when: datetime, game_time: float | None) -> None:
        with self._lock:
            for memory_id in memory_ids:
                memory = self._records.get(memory_id)
                if memory is not None:
                    game = game_time if game_time is not None else memory.accessed_game_time
                    self._records[memory_id] = replace(
                        memory, last_accessed_at=when, accessed_game_time=game
                    )

    def clear(self) -> None:
        with self._lock:
            self._records.clear()

    def discard(self, memory_ids: Sequence[str]) -> None:
        with self._lock:
            for memory_id in memory_ids:
                self._records.pop(memory_id, None)

    def __len__(self) -> int:
        return len(self._records)


class _Lru(OrderedDict[str, Any]):
    """An ordered dict that forgets its least recently used entries beyond ``capacity``."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity

    def remember(self, key: str, value: Any) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.capacity:
            self.popitem(last=False)


class _PlayerVectors:
    """The unit vectors of recently searched players' memories, in RAM, least recently
    used out past a byte budget. Reading a player's 400 vectors from Chroma on every search
    cost ~9 ms (mostly turning lists into arrays). Kept current by the store: new memories
    are appended, a forget or reload drops what it touched. A fill that raced a write is
    not kept (``epoch``); a deleted id left in a matrix is harmless, since its record is
    gone and search drops it."""

    def __init__(self, budget_bytes: int) -> None:
        self._budget = budget_bytes
        self._pairs: OrderedDict[tuple[str, str], tuple[list[str], Any]] = OrderedDict()
        self._bytes = 0
        self._epoch = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str]) -> tuple[tuple[list[str], Any] | None, int]:
        with self._lock:
            entry = self._pairs.get(key)
            if entry is not None:
                self._pairs.move_to_end(key)
            return entry, self._epoch

    def put(self, key: tuple[str, str], ids: list[str], matrix: Any, epoch: int) -> None:
        with self._lock:
            if epoch != self._epoch or key in self._pairs or matrix.nbytes > self._budget:
                return
            self._pairs[key] = (ids, matrix)
            self._bytes += matrix.nbytes
            while self._bytes > self._budget:
                _, (_, dropped) = self._pairs.popitem(last=False)
                self._bytes -= dropped.nbytes

    def extend(self, key: tuple[str, str], ids: list[str], unit_vectors: Any) -> None:
        import numpy as np

        with self._lock:
            self._epoch += 1
            entry = self._pairs.pop(key, None)
            if entry is None:
                return
            self._bytes -= entry[1].nbytes
            matrix = np.vstack([entry[1], unit_vectors]) if len(entry[0]) else unit_vectors
            if self._bytes + matrix.nbytes <= self._budget:
                self._pairs[key] = (entry[0] + ids, matrix)
                self._bytes += matrix.nbytes

    def drop(self, npc_id: str | None = None) -> None:
        """Forget the cached vectors of one NPC's players, or of all."""
        with self._lock:
            self._epoch += 1
            for key in [k for k in self._pairs if npc_id is None or k[0] == npc_id]:
                self._bytes -= self._pairs.pop(key)[1].nbytes


def _server_terms(query: str) -> list[str]:
    """The rarest telling words of a line, for the server's full-text filter."""
    from wordfreq import zipf_frequency

    terms = [t.strip('"') for t in query_terms(query) if len(t.strip('"')) >= 3]
    return sorted(terms, key=lambda t: zipf_frequency(t, "en"))[:SERVER_KEYWORD_TERMS]


def _unit_rows(vectors: Any) -> Any:
    import numpy as np

    matrix = np.asarray(vectors, dtype=np.float32)
    if matrix.ndim != 2 or not len(matrix):
        return np.zeros((0, 0), dtype=np.float32)
    return matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)


class _NoKeywordIndex:
    """The keyword index of a store on a Chroma server: none kept here (a local index would
    miss what other replicas wrote); keyword matches come from the server's full-text
    search instead (``ChromaMemoryStore._server_keyword_matches``)."""

    def add(self, memories: Sequence[Memory]) -> None:
        """Nothing to index locally."""

    def delete(self, memory_ids: Sequence[str]) -> None:
        """Nothing indexed locally."""

    def rebuild(self, memories: Sequence[Memory]) -> None:
        """Nothing to rebuild."""

    def ids(self) -> set[str]:
        return set()

    def count_of(self, npc_id: str, player_id: str) -> int:
        return 0

    def search(
        self, npc_id: str, player_id: str | None, query: str, limit: int
    ) -> list[tuple[str, float]]:
        return []

    def close(self) -> None:
        """Nothing open."""


def connect_server(
    url: str, *, token: str | None, tenant: str, database: str, timeout: float
) -> Any:
    """A Chroma ``HttpClient`` for ``url`` (http[s]://host:port). Every call gets ``timeout``
    seconds (chromadb's own client waits forever), so a hung server fails a request instead
    of holding a thread."""
    from urllib.parse import urlsplit

    import chromadb
    import httpx
    from chromadb.config import Settings

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"memory.url: {url!r} is not an http(s)://host:port address")
    if parts.username is not None or parts.password is not None:  # never echoed back
        raise ValueError("memory.url: credentials in the URL are not sent (use memory.token_env)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        # HttpClient takes a host and a port: a path (a proxy's prefix) would be dropped.
        raise ValueError(f"memory.url: {url!r} has a path or query the client would drop")
    headers = {"Authorization": f"Bearer {token}"} if token else None
    client = chromadb.HttpClient(
        host=parts.hostname,
        port=parts.port or (443 if parts.scheme == "https" else 80),
        ssl=parts.scheme == "https",
        headers=headers,
        settings=Settings(anonymized_telemetry=False),
        tenant=tenant,
        database=database,
    )
    session = getattr(getattr(client, "_server", None), "_session", None)
    if isinstance(session, httpx.Client):
        session.timeout = httpx.Timeout(timeout, connect=min(timeout, 2.0))
    return client


class ChromaMemoryStore:
    """Per NPC: one collection of its own memories and ``PLAYER_SHARDS`` of what it knows
    about players (each memory carries its player_id).

    A query for one player first reads the shard without a filter and keeps that player's
    hits: whenever at least ``limit`` of them are among the nearest, they are exactly the
    player's nearest (a ``where`` on player_id made a 10,000-memory query 3-5x slower,
    since Chroma filters before the vector search). Only when the shard is shared by many
    players does the query fall back to the filter, on a shard of a few hundred records.
    """

    OVERFETCH = 4  # nearest read per wanted memory before falling back to a filter

    def __init__(
        self,
        path: Path | None,
        embed: Any,
        *,
        client: Any = None,
        cached_records: int = 100_000,
        cached_handles: int = 512,
        lore_cache: Path | None = None,
    ) -> None:
        """``path``: Chroma on disk there, this process's alone; or ``client``, a Chroma
        server's ``HttpClient`` (``connect_server``), shared with other engine replicas.
        ``lore_cache``: a lore vector file shared with other data directories (see
        ``SharedLoreVectors``)."""
        import chromadb
        from chromadb.config import Settings

        if client is None:
            if path is None:
                raise ValueError("a Chroma store needs a path or a client")
            path.mkdir(parents=True, exist_ok=True)
            client = chromadb.PersistentClient(
                path=str(path), settings=Settings(anonymized_telemetry=False)
            )
        self._client = client
        # On a server other replicas write too: nothing they may change is cached here
        # (records, player vectors, missing collections, the keyword index); what stays
        # cached cannot change under us (collection handles: collections are never
        # dropped; lore vectors: keyed by their text).
        self.shared = path is None
        self._embed = embed
        self._lore_cache = lore_cache
        self._shared_lore: Any = None
        # Open handles and known-missing names, both bounded (least recently used out).
        self._collections = _Lru(cached_handles)
        self._absent = _Lru(cached_handles * 8)
        self._lock = threading.Lock()
        self._records = RecordCache(0 if self.shared else cached_records)
        # Words found too common to search a collection by, until when (see
        # _server_keyword_matches); query words are the players': bounded.
        self._common_terms = _Lru(4096)
        # A search's requests to a server, sent at once (httpx's client is thread-safe).
        self._requests = ThreadPoolExecutor(max_workers=4, thread_name_prefix="npc-chroma")
        # Held while a record is read from Chroma into the cache and while touch/forget
        # change one, so a search never caches a copy older than what touch just wrote.
        self._record_writes = threading.Lock()
        self._saves_lock = threading.RLock()
        self._referenced_ids: set[str] | None = None
        self._keywords: KeywordIndex | _NoKeywordIndex = (
            KeywordIndex(path / KEYWORD_INDEX) if path is not None else _NoKeywordIndex()
        )
        self._player_vectors = _PlayerVectors(0 if self.shared else PLAYER_VECTORS_BYTES)
        # Whether the local index holds every live memory (see _synced_index).
        self._index_synced = threading.Event()
        self._sync_lock = threading.RLock()
        self._resume_interrupted_load()
        fresh = self._mark_if_new()
        if isinstance(self._keywords, KeywordIndex) and (
            self._keywords.opened_clean or (fresh and not self._keywords.count())
        ):
            self._index_synced.set()

    def _collection(self, name: str, npc_id: str, *, create: bool = True) -> Any | None:
        with self._lock:
            collection = self._collections.get(name)
            if collection is not None:
                self._collections.move_to_end(name)
                return collection
            if not create and name in self._absent:
                return None
            if create:
                collection = self._client.get_or_create_collection(
                    name=name,
                    embedding_function=None,
                    configuration=MEMORY_COLLECTION_CONFIG,
                    metadata={"npc_id": npc_id},
                )
            else:
                try:
                    collection = self._client.get_collection(name, embedding_function=None)
                except Exception as exc:  # NotFoundError (or ValueError in old Chromas)
                    if is_unavailable(exc):
                        raise
                    if not self.shared:  # another replica may create it any moment
                        self._absent.remember(name, True)
                    return None
            self._absent.pop(name, None)
            _save_vectors_often(collection)
            self._collections.remember(name, collection)
            return collection

    def _all_of(self, npc_id: str) -> list[Any]:
        found = [self._collection(name, npc_id, create=False) for name in _names_of(npc_id)]
        return [c for c in found if c is not None]

    def add(self, memories: Sequence[Memory]) -> None:
        if memories:
            self.add_with_embeddings(memories, self._embed([m.searchable for m in memories]))

    def add_with_embeddings(self, memories: Sequence[Memory], vectors: Sequence[Any]) -> None:
        """Store memories whose vectors are already computed (imports, benchmarks)."""
        try:
            self._add_with_embeddings(memories, vectors)
        except BaseException:
            self._index_synced.clear()  # Chroma may hold some the index lacks
            raise

    def _add_with_embeddings(self, memories: Sequence[Memory], vectors: Sequence[Any]) -> None:
        by_collection: dict[tuple[str, str], list[int]] = {}
        for index, memory in enumerate(memories):
            by_collection.setdefault((_home_name(memory), memory.npc_id), []).append(index)
        for (name, npc_id), indexes in by_collection.items():
            collection = self._collection(name, npc_id)
            assert collection is not None
            collection.add(
                ids=[memories[i].id for i in indexes],
                embeddings=[vectors[i] for i in indexes],
                documents=[memories[i].text for i in indexes],
                metadatas=[_metadata(memories[i]) for i in indexes],
            )
        by_player: dict[tuple[str, str], list[int]] = {}
        for index, memory in enumerate(memories):
            if memory.player_id is not None:
                by_player.setdefault((memory.npc_id, memory.player_id), []).append(index)
        for key, indexes in by_player.items():
            self._player_vectors.extend(
                key, [memories[i].id for i in indexes], _unit_rows([vectors[i] for i in indexes])
            )
        self._keywords.add(memories)
        # Just written, likely recalled on the next turn: cache them as stored.
        self._records.put([_memory(m.id, m.text, _metadata(m)) for m in memories])

    def search(
        self,
        npc_id: str,
        player_id: str | None,
        query: str,
        limit: int,
        *,
        keywords: bool = True,
    ) -> list[Candidate]:
        """The nearest memories by meaning (MiniLM), joined by the best keyword (BM25)
        matches when ``keywords``; each keyword match carries its rank for fusion."""
        own = self._collection(_own_name(npc_id), npc_id, create=False)
        shard = (
            self._collection(_player_shard(npc_id, player_id), npc_id, create=False)
            if player_id is not None
            else None
        )
        if limit <= 0 or (own is None and shard is None):
            return []
        vector = self._embed([query])
        if self.shared:
            return self._search_on_server(own, shard, player_id, query, vector, limit, keywords)
        candidates = self._nearest(own, vector, limit, None) if own is not None else []
        if shard is not None and player_id is not None:
            if self._keywords.count_of(npc_id, player_id) <= EXACT_SEARCH_LIMIT:
                # What one player said is a few hundred memories under the consolidation
                # caps: compared one by one. Chroma's HNSW answers are approximate, and
                # missed the nearest ones once a shard had deletions and many identical
                # lines (the recall probe through the server lost 2 to 6 of 60 facts).
                candidates += self._player_nearest(shard, npc_id, player_id, vector, limit)
            else:
                candidates += self._nearest(shard, vector, limit, player_id)
        candidates.sort(key=lambda c: c.relevance, reverse=True)
        candidates = candidates[:limit]
        if keywords:
            matches = self._keywords.search(npc_id, player_id, query, limit)
            candidates = self._join_keyword_matches(
                candidates, [memory_id for memory_id, _ in matches], [own, shard], vector
            )
        return [c for c in candidates if c.memory.superseded_by is None]

    def _search_on_server(
        self,
        own: Any,
        shard: Any,
        player_id: str | None,
        query: str,
        vector: Any,
        limit: int,
        keywords: bool,
    ) -> list[Candidate]:
        """``search`` on a Chroma server, where every call is a round trip and nothing may
        be cached: the nearest of each collection and the keyword matches come with their
        records in one request each, the requests run at once (a search takes about the
        longest of them), and a shard's other players are dropped here (a ``where`` on
        player_id made the server's query 8x slower: it filters before the vector search).
        """
        scopes = [(own, None), (shard, player_id)] if player_id is not None else [(own, None)]
        scopes = [(collection, who) for collection, who in scopes if collection is not None]
        dense = [
            self._requests.submit(self._server_nearest, collection, who, vector, limit)
            for collection, who in scopes
        ]
        terms = _server_terms(query) if keywords else []
        lexical = [
            self._requests.submit(
                self._server_keyword_matches, collection, who, terms, vector, limit
            )
            for collection, who in scopes
            if terms
        ]
        candidates = sorted(
            (c for done in dense for c in done.result()), key=lambda c: c.relevance, reverse=True
        )[:limit]
        if lexical:
            scored = sorted(
                (pair for done in lexical for pair in done.result()),
                key=lambda pair: pair[0],
                reverse=True,
            )[:limit]
            rank = {c.memory.id: place for place, (_, c) in enumerate(scored)}
            joined = [replace(c, keyword_rank=rank.get(c.memory.id)) for c in candidates]
            seen = {c.memory.id for c in candidates}
            joined += [
                replace(c, keyword_rank=rank[c.memory.id])
                for _, c in scored
                if c.memory.id not in seen
            ]
            candidates = joined
        return [c for c in candidates if c.memory.superseded_by is None]

    def _server_nearest(
        self, collection: Any, player_id: str | None, vector: Any, limit: int
    ) -> list[Candidate]:
        wanted = limit if player_id is None else limit * self.OVERFETCH
        found = collection.query(
            query_embeddings=vector,
            n_results=wanted,
            include=["documents", "metadatas", "distances"],
        )
        records = _memories({key: found[key][0] for key in ("ids", "documents", "metadatas")})
        hits = [
            Candidate(memory, 1.0 - float(distance))
            for memory, distance in zip(records, found["distances"][0], strict=True)
            if player_id is None or memory.player_id == player_id
        ]
        if player_id is None or len(hits) >= limit or len(records) < wanted:
            return hits[:limit]
        # A shard shared by many players: this one's memories by a filter after all.
        return self._exact(collection, vector, limit, where={"player_id": player_id})

    def _server_keyword_matches(
        self, collection: Any, player_id: str | None, terms: list[str], vector: Any, limit: int
    ) -> list[tuple[float, Candidate]]:
        """The keyword half on a Chroma server: its full-text filter finds the memories
        holding the query's rarest telling words (any case), scored by how rare the words
        each holds are (wordfreq's Zipf scale standing in for BM25's IDF), each with its
        cosine to ``vector``.

        A word in most of what the filter returned is, like the local index's words in a
        third of an NPC's memories, no help in telling memories apart, and makes the
        server scan and send the most: it is left out of this collection's searches for a
        while (a hint kept here; nothing of the world)."""
        from wordfreq import zipf_frequency

        now = time.monotonic()
        with self._lock:
            terms = [
                t for t in terms if self._common_terms.get(f"{collection.name}\x1f{t}", 0.0) < now
            ]
        if not terms:
            return []
        spellings = [{"$contains": form} for t in terms for form in {t, t.capitalize()}]
        contains = spellings[0] if len(spellings) == 1 else {"$or": spellings}
        weight = {t: max(8.0 - zipf_frequency(t, "en"), 0.5) for t in terms}
        words = {t: re.compile(rf"\b{re.escape(t)}\b", re.I) for t in terms}
        wanted = limit * 2
        found = collection.get(
            # A shard holds several players: without the filter, others' matches could
            # fill the page and hide this player's.
            where={"player_id": player_id} if player_id is not None else None,
            where_document=contains,
            limit=wanted,
            include=["documents", "metadatas", "embeddings"],
        )
        if not found["ids"]:
            return []
        memories = _memories(found)
        if len(memories) >= wanted:  # the filter had more to give: which words are common?
            for term in terms:
                holding = sum(1 for m in memories if words[term].search(m.text))
                if holding * 2 >= len(memories):
                    with self._lock:
                        self._common_terms.remember(
                            f"{collection.name}\x1f{term}", now + COMMON_TERM_SECONDS
                        )
        similarity = _unit_rows(found["embeddings"]) @ _unit_rows(vector)[0]
        scored = []
        for memory, cosine in zip(memories, similarity, strict=True):
            score = sum(weight[t] for t in terms if words[t].search(memory.text))
            if score > 0:
                scored.append((score, Candidate(memory, float(cosine))))
        return scored

    def _join_keyword_matches(
        self,
        candidates: list[Candidate],
        matched_ids: list[str],
        collections: list[Any],
        vector: Any,
    ) -> list[Candidate]:
        """Mark dense candidates that are also keyword matches with their keyword rank,
        and add the keyword matches the dense search missed, with their own cosine."""
        rank = {memory_id: place for place, memory_id in enumerate(matched_ids)}
        joined = [replace(c, keyword_rank=rank.get(c.memory.id)) for c in candidates]
        missing = [i for i in matched_ids if i not in {c.memory.id for c in candidates}]
        for collection in collections:
            if collection is None or not missing:
                continue
            for found in self._exact(collection, vector, len(missing), ids=missing):
                joined.append(replace(found, keyword_rank=rank[found.memory.id]))
                missing.remove(found.memory.id)
        return joined

    def _nearest(
        self, collection: Any, vector: Any, limit: int, player_id: str | None
    ) -> list[Candidate]:
        total = collection.count()
        if total == 0:
            return []
        wanted = limit if player_id is None else min(total, limit * self.OVERFETCH)
        found = self._query(collection, vector, wanted, None)
        if player_id is None:
            return found
        mine = [c for c in found if c.memory.player_id == player_id]
        if len(mine) >= limit or wanted >= total:
            return mine[:limit]
        return self._exact(collection, vector, limit, where={"player_id": player_id})

    def _player_nearest(
        self, shard: Any, npc_id: str, player_id: str, vector: Any, limit: int
    ) -> list[Candidate]:
        """The ``limit`` nearest of one player's memories, by exact cosine similarity over
        their vectors (cached in RAM between searches)."""
        key = (npc_id, player_id)
        entry, epoch = self._player_vectors.get(key)
        if entry is None:
            found = shard.get(where={"player_id": player_id}, include=["embeddings"])
            entry = (list(found["ids"]), _unit_rows(found["embeddings"]))
            self._player_vectors.put(key, entry[0], entry[1], epoch)
        return self._ranked(shard, entry[0], entry[1], vector, limit)

    def _exact(
        self,
        collection: Any,
        vector: Any,
        limit: int,
        *,
        where: dict[str, Any] | None = None,
        ids: list[str] | None = None,
    ) -> list[Candidate]:
        """The ``limit`` nearest among the records ``where`` or ``ids`` select, by exact
        cosine similarity."""
        result = collection.get(where=where, ids=ids, include=["embeddings"])
        return self._ranked(
            collection, list(result["ids"]), _unit_rows(result["embeddings"]), vector, limit
        )

    def _ranked(
        self, collection: Any, ids: list[str], unit_rows: Any, vector: Any, limit: int
    ) -> list[Candidate]:
        """The ``limit`` of ``ids`` nearest to ``vector`` (their vectors: ``unit_rows``)."""
        import numpy as np

        if not ids:
            return []
        query = np.asarray(vector, dtype=np.float32).reshape(-1)
        similarity = unit_rows @ (query / max(float(np.linalg.norm(query)), 1e-12))
        best = np.argsort(-similarity)[:limit]
        records = self._cached_records(collection, [ids[i] for i in best])
        return [Candidate(records[ids[i]], float(similarity[i])) for i in best if ids[i] in records]

    def _query(
        self, collection: Any, vector: Any, count: int, where: dict[str, Any] | None
    ) -> list[Candidate]:
        result = collection.query(
            query_embeddings=vector, n_results=count, where=where, include=["distances"]
        )
        ids = result["ids"][0]
        distances = (result.get("distances") or [[]])[0]
        found = self._cached_records(collection, ids)
        return [
            Candidate(found[memory_id], 1.0 - float(distance))
            for memory_id, distance in zip(ids, distances, strict=True)
            if memory_id in found  # deleted between the query and the fetch
        ]

    def _cached_records(self, collection: Any, ids: Sequence[str]) -> dict[str, Memory]:
        found = {i: m for i in ids if (m := self._records.get(i)) is not None}
        missing = [i for i in ids if i not in found]
        if missing:
            with self._record_writes:
                result = collection.get(ids=missing, include=["documents", "metadatas"])
                fetched = _memories(result)
                self._records.put(fetched)
            found.update((m.id, m) for m in fetched)
        return found

    def recent(
        self, npc_id: str, player_id: str | None, limit: int, *, player_only: bool = False
    ) -> list[Memory]:
        if limit <= 0:
            return []
        memories = []
        own = self._collection(_own_name(npc_id), npc_id, create=False)
        if own is not None and not (player_only and player_id is not None):
            memories += self._newest(own, limit)
        if player_id is not None:
            shard = self._collection(_player_shard(npc_id, player_id), npc_id, create=False)
            if shard is not None:
                memories += self._newest_of_player(shard, player_id, limit)
        memories.sort(key=lambda m: m.created_at, reverse=True)
        return memories[:limit]

    @staticmethod
    def _newest(collection: Any, limit: int) -> list[Memory]:
        """The ``limit`` newest memories of a collection, without reading all of it.

        Chroma cannot sort. But any ``limit`` stored memories bound the answer: the
        limit-th newest is at least as new as the oldest of them. The last stored are
        usually the newest, so the filtered read returns about ``limit`` records (6 ms at
        10,000 memories, against 250 ms for reading them all).
        """
        total = collection.count()
        result = None
        if total > limit:
            sample = collection.get(limit=limit, offset=total - limit, include=["metadatas"])
            stamps = [float((m or {}).get("created_at", 0)) for m in sample["metadatas"] or []]
            if len(stamps) == limit:  # else deleted meanwhile: no bound, read everything
                result = collection.get(
                    where={"created_at": {"$gte": min(stamps)}},
                    include=["documents", "metadatas"],
                )
        if result is None:
            result = collection.get(include=["documents", "metadatas"])
        return _memories(result)

    def _newest_of_player(self, shard: Any, player_id: str, limit: int) -> list[Memory]:
        """A player's newest memories in a shard: the metadata alone picks them, then only
        those records are read whole."""
        result = shard.get(where={"player_id": player_id}, include=["metadatas"])
        stamped = sorted(
            zip(result["ids"], result["metadatas"] or [], strict=True),
            key=lambda pair: float((pair[1] or {}).get("created_at", 0)),
            reverse=True,
        )
        found = self._cached_records(shard, [memory_id for memory_id, _ in stamped[:limit]])
        return list(found.values())

    def touch(
        self,
        npc_id: str,
        memory_ids: Sequence[str],
        when: datetime,
        game_time: float | None = None,
    ) -> None:
        if not memory_ids:
            return
        stamp = _timestamp(when)
        refreshed: dict[str, str | int | float | bool] = {"last_accessed_at": stamp}
        if game_time is not None:
            refreshed["accessed_game_time"] = game_time
        with self._lock:  # recalled memories came from collections opened by search()
            opened = {n: self._collections[n] for n in _names_of(npc_id) if n in self._collections}
        with self._record_writes:
            # A recalled memory is usually cached, so its collection is known and it is
            # there (forget drops it from the cache first): updated at once. Chroma ignores
            # an update of an id it lacks, but each costs a write, so others are looked up
            # in the NPC's open collections (up to 9) first.
            known: dict[str, list[str]] = {}
            unknown: list[str] = []
            for memory_id in dict.fromkeys(memory_ids):  # Chroma refuses repeated ids
                cached = self._records.get(memory_id)
                if cached is not None and cached.npc_id == npc_id:
                    known.setdefault(_home_name(cached), []).append(memory_id)
                else:
                    unknown.append(memory_id)
            for name, collection in opened.items():
                ids = known.get(name, [])
                if unknown:
                    ids += collection.get(ids=unknown, include=[])["ids"]
                if ids:
                    collection.update(ids=ids, metadatas=[refreshed for _ in ids])
            self._records.touch(memory_ids, _from_timestamp(stamp), game_time)

    def forget(
        self,
        npc_id: str,
        *,
        player_id: str | None = None,
        memory_ids: Sequence[str] | None = None,
        everything: bool = False,
    ) -> int:
        where: dict[str, Any] | None = None
        if everything or memory_ids is not None:
            scopes = self._all_of(npc_id)
        elif player_id is not None:
            shard = self._collection(_player_shard(npc_id, player_id), npc_id, create=False)
            scopes = [shard] if shard is not None else []
            where = {"player_id": player_id}
        else:
            raise ValueError("forget needs player_id, memory_ids or everything=True")
        count = 0
        for collection in scopes:
            if memory_ids is not None and not everything:
                doomed = collection.get(ids=list(memory_ids), include=[])["ids"]
            else:
                doomed = collection.get(where=where, include=[])["ids"]
            if doomed:
                with self._record_writes:
                    self._archive_before_forget(collection, list(doomed))
                    try:
                        collection.delete(ids=list(doomed))
                        self._keywords.delete(doomed)
                    except BaseException:
                        self._index_synced.clear()  # the index may hold what Chroma lost
                        raise
                    self._records.discard(doomed)
                    self._player_vectors.drop(npc_id)
                count += len(doomed)
        return count

    def of_player(self, npc_id: str, player_id: str) -> list[Memory]:
        """Every memory tied to this player (superseded ones too), in no set order."""
        shard = self._collection(_player_shard(npc_id, player_id), npc_id, create=False)
        if shard is None:
            return []
        found = shard.get(where={"player_id": player_id}, include=["documents", "metadatas"])
        return _memories(found)

    def mark_superseded(
        self, npc_id: str, player_id: str, memory_ids: Sequence[str], by: str
    ) -> None:
        """Keep these memories as history, no longer recalled: ``by`` replaced them."""
        if not memory_ids:
            return
        shard = self._collection(_player_shard(npc_id, player_id), npc_id, create=False)
        if shard is None:
            return
        with self._record_writes:
            present = shard.get(ids=list(memory_ids), include=[])["ids"]
            if present:  # Chroma merges the new key into each record's metadata
                shard.update(ids=present, metadatas=[{"superseded_by": by} for _ in present])
            self._records.discard(memory_ids)

    def oldest(self, npc_id: str, limit: int, kinds: Sequence[MemoryKind]) -> list[Memory]:
        """Reads every matching record's metadata (Chroma cannot sort): for the rare
        trim of an NPC over its cap, not for a turn."""
        found: list[Memory] = []
        for collection in self._all_of(npc_id):
            result = collection.get(
                where={"kind": {"$in": list(kinds)}}, include=["documents", "metadatas"]
            )
            found += _memories(result)
        found.sort(key=lambda m: m.created_at)
        return found[:limit]

    # -- rumours (see npc_engine/rumours.py) ---------------------------------------------

    def made_between(
        self, npc_id: str, since: datetime, until: datetime, min_importance: int
    ) -> Iterator[Memory]:
        """The NPC's memories (its own and every player's) made in [since, until) with at
        least this importance, most important first, then oldest: what it may pass on at
        a world tick. Read lazily, a few at a time: a tick stops once it has chosen."""
        index = self._synced_index()
        if index is None:  # no local index on a shared server: scan its collections
            yield from sorted(
                self._scan_made_between(npc_id, since, until, min_importance),
                key=lambda m: (-m.importance, m.created_at),
            )
            return
        rows = index.made_between(npc_id, _timestamp(since), _timestamp(until), min_importance)
        for start in range(0, len(rows), TICK_READ_BATCH):
            chunk = rows[start : start + TICK_READ_BATCH]
            wanted: dict[str, list[str]] = {}
            for memory_id, player_id in chunk:
                name = _own_name(npc_id) if player_id is None else _player_shard(npc_id, player_id)
                wanted.setdefault(name, []).append(memory_id)
            found: dict[str, Memory] = {}
            for name, ids in wanted.items():
                collection = self._collection(name, npc_id, create=False)
                if collection is not None:
                    found.update(self._cached_records(collection, ids))
            yield from (found[i] for i, _player in chunk if i in found)

    def _scan_made_between(
        self, npc_id: str, since: datetime, until: datetime, min_importance: int
    ) -> list[Memory]:
        # One range condition only: Chroma plans "$and" with importance as a scan of every
        # collection's metadata (~0.5 s a shard at 100,000 memories, against ~10 ms).
        where = {"created_at": {"$gte": _timestamp(since)}}
        found: list[Memory] = []
        for collection in self._all_of(npc_id):
            got = _memories(collection.get(where=where, include=["documents", "metadatas"]))
            found += [m for m in got if m.created_at < until and m.importance >= min_importance]
        return found

    def origins_known(self, npc_id: str, origins: Sequence[str]) -> set[str]:
        """Which of these rumour origins the NPC already has a memory of (rumours of a
        player's words live with that player's memories: every collection is read)."""
        if not origins:
            return set()
        index = self._synced_index()
        if index is not None:
            return index.origins_known(npc_id, origins)
        known: set[str] = set()
        for collection in self._all_of(npc_id):
            got = collection.get(where={"origin": {"$in": list(origins)}}, include=["metadatas"])
            known |= {str((m or {}).get("origin")) for m in got.get("metadatas") or []}
        return known

    def faded_rumours(
        self, npc_id: str, now: datetime, game_now: float | None, fade_minutes: float
    ) -> list[str]:
        """The ids of the NPC's rumours older than ``fade_minutes`` (in game time where
        both the rumour and the tick have one, else in real time)."""
        index = self._synced_index()
        if index is None:
            return [
                m.id
                for m in self.rumours_of(npc_id)
                if faded_at(m.created_at, m.game_time, now, game_now, fade_minutes)
            ]
        return [
            memory_id
            for memory_id, created, game_time in index.rumours_of(npc_id)
            if faded_at(_from_timestamp(created), game_time, now, game_now, fade_minutes)
        ]

    def rumours_of(self, npc_id: str) -> list[Memory]:
        found: list[Memory] = []
        for collection in self._all_of(npc_id):
            got = collection.get(where={"kind": "rumour"}, include=["documents", "metadatas"])
            found += _memories(got)
        return found

    def _synced_index(self) -> KeywordIndex | None:
        """The local index, once it holds every live memory (None on a shared server): it
        is filled from Chroma in the background when the store opens (and remade after a
        schema change), and a tick must not pass on a rumour twice meanwhile."""
        if not isinstance(self._keywords, KeywordIndex):
            return None
        if not self._index_synced.is_set():
            with self._sync_lock:  # the background fill may be at it: wait for that one
                if not self._index_synced.is_set():
                    self.sync_keywords()
        return self._keywords

    def count(self, npc_id: str, player_id: str | None = None) -> int:
        """Memories of an NPC, or (with ``player_id``) those tied to that player."""
        if player_id is None:
            return sum(int(c.count()) for c in self._all_of(npc_id))
        shard = self._collection(_player_shard(npc_id, player_id), npc_id, create=False)
        if shard is None:
            return 0
        return len(shard.get(where={"player_id": player_id}, include=[])["ids"])

    def lore_vectors(self) -> Any:
        """The lorebook's vectors, in this store's Chroma (see ``lore_vectors.py``)."""
        from npc_engine.memory.lore_vectors import ChromaLoreVectors, SharedLoreVectors

        if self._lore_cache is not None and self._shared_lore is None:
            self._shared_lore = SharedLoreVectors(self._lore_cache, self._dimension())
        return ChromaLoreVectors(self._client, self._embed, EMBEDDING_MODEL, self._shared_lore)

    @property
    def embedder(self) -> Any:
        """The sentence embedder (MiniLM): list of texts in, list of vectors out."""
        return self._embed

    def _state_collection(self) -> Any:
        # One collection for every game-state record; its name cannot be an NPC's (those
        # are npc-<sha1>-…). Chroma needs a vector per record: a constant one.
        return self._collection(STATE_COLLECTION, "", create=True)

    def load_state(self, key: str) -> dict[str, Any] | None:
        found = self._state_collection().get(ids=[key], include=["documents"])
        documents = found.get("documents") or []
        return json.loads(documents[0]) if documents and documents[0] else None

    def save_state(
        self, key: str, value: dict[str, Any], labels: dict[str, str] | None = None
    ) -> None:
        self._state_collection().upsert(
            ids=[key],
            documents=[json.dumps(value, sort_keys=True)],
            metadatas=[_state_labels(key, labels)],
            embeddings=ONE_VECTOR,
        )

    def state_keys(self, labels: dict[str, str]) -> list[str]:
        """Keys of the state records carrying all of ``labels``."""
        return list(self._state_collection().get(where=_where(labels), include=[])["ids"])

    def delete_state(self, keys: list[str]) -> None:
        if keys:
            self._state_collection().delete(ids=list(keys))

    # -- saves (see npc_engine/memory/saves.py for the design) ---------------------------

    def _saves(self) -> Any:
        return self._collection(SAVES_COLLECTION, "", create=True)

    def _archive(self) -> Any:
        return self._collection(ARCHIVE_COLLECTION, "", create=True)

    def _memory_collections(self) -> dict[str, Any]:
        names = [c.name for c in self._client.list_collections()]
        found = {n: self._collection(n, "", create=False) for n in names}
        return {n: c for n, c in found.items() if c is not None and _MEMORY_COLLECTION.fullmatch(n)}

    # -- embedding format ----------------------------------------------------------------

    def embedding_format(self) -> str | None:
        """How this store's vectors were made: CONTENT_VECTORS, or None for a store of an
        older version (vectors of the whole third-person text: run ``reindex``)."""
        saves = self._collection(SAVES_COLLECTION, "", create=False)
        if saves is not None:
            found = saves.get(ids=[STORE_FORMAT], include=["metadatas"])
            if found["ids"]:
                return str((found["metadatas"][0] or {}).get("embedding"))
        return None

    def _mark_if_new(self) -> bool:
        """A store without memories yet is written the current way from the start.
        Returns whether it has no memories."""
        names = [c.name for c in self._client.list_collections()]
        fresh = not any(_MEMORY_COLLECTION.fullmatch(name) for name in names)
        if fresh and self.embedding_format() is None:
            self._mark_format()
        return fresh

    def _mark_format(self) -> None:
        self._saves().upsert(
            ids=[STORE_FORMAT],
            metadatas=[{"kind": "format", "embedding": CONTENT_VECTORS}],
            embeddings=ONE_VECTOR,
        )

    def reindex(self, progress: Any = None, batch: int = 256) -> int:
        """Re-embed every memory (live and archived) from what was said: the one-off step
        that converts a store written before content vectors. Returns how many."""
        names = [*self._memory_collections(), ARCHIVE_COLLECTION]
        collections = [self._collection(n, "", create=n == ARCHIVE_COLLECTION) for n in names]
        total = sum(int(c.count()) for c in collections if c is not None)
        done = 0
        for collection in collections:
            if collection is None:
                continue
            count = int(collection.count())
            for offset in range(0, count, batch):
                page = collection.get(
                    limit=batch, offset=offset, include=["documents", "metadatas"]
                )
                contents = [
                    str((meta or {}).get("content") or _said(document or ""))
                    for document, meta in zip(page["documents"], page["metadatas"], strict=True)
                ]
                collection.update(
                    ids=page["ids"],
                    embeddings=self._embed(contents),
                    metadatas=[
                        {"content": content}
                        if content != document
                        else {"kind": str((meta or {}).get("kind", "dialogue"))}
                        for content, document, meta in zip(
                            contents, page["documents"], page["metadatas"], strict=True
                        )
                    ],
                )
                done += len(page["ids"])
                if progress is not None:
                    progress(done, total)
        self._records.clear()
        self._player_vectors.drop()
        self._mark_format()
        self.sync_keywords(rewrite=True)
        return done

    def open_collections_in_background(self) -> threading.Thread:
        """Read every memory collection once on a background thread: Chroma loads a
        collection's segments on first use (~25 ms each; 0.8 s for 10 NPCs), which would
        otherwise land on the first save (it lists them all) or an NPC's first recall."""

        def open_all() -> None:
            try:
                if self.shared:  # on a server there is no local index to fill
                    return
                if self._index_synced.is_set():  # in step since the last clean close
                    for collection in self._memory_collections().values():
                        collection.count()
                else:
                    self.sync_keywords()
            except Exception:  # only a warm-up: the real call reports its own failure
                log.debug("opening collections ahead failed", exc_info=True)

        thread = threading.Thread(target=open_all, name="npc-chroma-open", daemon=True)
        thread.start()
        return thread

    def sync_keywords(self, *, rewrite: bool = False) -> int:
        """Make the keyword index hold exactly the live memories (Chroma is the record):
        adds what is missing, drops what is gone, or with ``rewrite`` remakes it all.
        Returns how many memories were indexed anew."""
        with self._sync_lock:
            return self._sync_keywords(rewrite)

    def _sync_keywords(self, rewrite: bool) -> int:
        live = self._live_ids()
        indexed = set() if rewrite else self._keywords.ids()
        wanted = {i for ids in live.values() for i in ids}
        if rewrite:
            self._keywords.rebuild([])
        self._keywords.delete(sorted(indexed - wanted))
        added = 0
        for name, ids in live.items():
            missing = [i for i in ids if i not in indexed]
            collection = self._collection(name, "", create=False)
            for start in range(0, len(missing), 1000):
                if collection is None:
                    break
                found = collection.get(
                    ids=missing[start : start + 1000], include=["documents", "metadatas"]
                )
                self._keywords.add(_memories(found))
                added += len(found["ids"])
        if added:
            log.info("keyword index: %d memories indexed anew", added)
        self._index_synced.set()
        return added

    def _live_ids(self) -> dict[str, list[str]]:
        found = {n: list(c.get(include=[])["ids"]) for n, c in self._memory_collections().items()}
        return {name: ids for name, ids in found.items() if ids}

    def _manifest(self, save_id: str) -> dict[str, Any] | None:
        found = self._saves().get(ids=[save_id], include=["metadatas"])
        metadatas = found.get("metadatas") or []
        if not metadatas or not metadatas[0] or "manifest" not in metadatas[0]:
            return None
        return unpack(str(metadatas[0]["manifest"]))

    def _referenced(self) -> set[str]:
        """Every memory id some save names (cached until saves change; on a server,
        where another replica may save, read each time)."""
        with self._saves_lock:
            if self._referenced_ids is None or self.shared:
                ids: set[str] = set()
                for info in self.list_saves():
                    manifest = self._manifest(info.save_id) or {}
                    for names in manifest.get("memories", {}).values():
                        ids.update(names)
                self._referenced_ids = ids
            return self._referenced_ids

    def list_saves(self) -> list[SaveInfo]:
        found = self._saves().get(where={"kind": "save"}, include=["metadatas"])
        infos = [
            SaveInfo(
                str(save_id),
                _from_timestamp(meta.get("created_at", 0)),
                int(meta.get("memories", 0)),
            )
            for save_id, meta in zip(found["ids"], found.get("metadatas") or [], strict=True)
            if meta
        ]
        return sorted(infos, key=lambda info: info.created_at)

    def create_save(self, save_id: str) -> SaveInfo:
        check_save_id(save_id)
        with self._saves_lock:
            known = {info.save_id for info in self.list_saves()}
            if save_id not in known and len(known) >= MAX_SAVES:
                raise SaveError("save_id", f"at most {MAX_SAVES} saves: delete one first")
            live = self._live_ids()
            state = self._state_collection().get(include=["documents", "metadatas"])
            manifest = {
                "memories": live,
                "state": {
                    key: [document, metadata or {}]
                    for key, document, metadata in zip(
                        state["ids"],
                        state.get("documents") or [],
                        state.get("metadatas") or [],
                        strict=True,
                    )
                },
            }
            info = SaveInfo(save_id, utc_now(), sum(len(ids) for ids in live.values()))
            # One record, one write: a save is there whole or not at all.
            self._saves().upsert(
                ids=[save_id],
                metadatas=[
                    {
                        "kind": "save",
                        "created_at": _timestamp(info.created_at),
                        "memories": info.memories,
                        "manifest": pack(manifest),
                    }
                ],
                embeddings=ONE_VECTOR,
            )
            if self._referenced_ids is not None:
                for ids in live.values():
                    self._referenced_ids.update(ids)
            return info

    def delete_save(self, save_id: str) -> bool:
        check_save_id(save_id)
        with self._saves_lock:
            existed = bool(self._saves().get(ids=[save_id], include=[])["ids"])
            if existed:
                self._saves().delete(ids=[save_id])
                self._referenced_ids = None
        if existed:
            self._collect_archive()
        return existed

    def load_save(self, save_id: str) -> SaveInfo:
        """Make the live store exactly what the save names: memories made since are
        removed (archived if another save names them), forgotten ones come back from the
        archive, and the game state (trust, flags, histories) is replaced. A load
        interrupted by a crash is finished when the store next opens."""
        check_save_id(save_id)
        with self._saves_lock:
            manifest = self._manifest(save_id)
            info = next((i for i in self.list_saves() if i.save_id == save_id), None)
            if manifest is None or info is None:
                raise unknown_save(save_id)
            try:  # checked before anything changes: a load that starts runs to its end
                _check_stored_manifest(manifest)
            except (ValueError, RecursionError) as exc:
                raise SaveError(
                    "save_id", f"save {save_id!r} is damaged and cannot be loaded ({exc})"
                ) from exc
            self._saves().upsert(
                ids=[PENDING_LOAD],
                metadatas=[{"kind": "pending", "save_id": save_id}],
                embeddings=ONE_VECTOR,
            )
        self._apply(manifest)
        with self._saves_lock:
            self._saves().delete(ids=[PENDING_LOAD])
        return info

    def _resume_interrupted_load(self) -> None:
        saves = self._collection(SAVES_COLLECTION, "", create=False)
        if saves is None:
            return
        found = saves.get(ids=[PENDING_LOAD], include=["metadatas"])
        metadatas = found.get("metadatas") or []
        if metadatas and metadatas[0]:
            save_id = str(metadatas[0].get("save_id", ""))
            log.warning("finishing the load of save %r that was interrupted", save_id)
            # A load that cannot finish is given up, never retried at every start: the
            # engine must always be able to open its data directory.
            try:
                manifest = self._manifest(save_id)
                if manifest is not None:
                    _check_stored_manifest(manifest)
                    self._apply(manifest)
            except Exception as exc:
                if is_unavailable(exc):  # the server is down: retry at the next start
                    raise
                log.error(
                    "could not finish loading save %r (%s): given up; the memories and "
                    "game state may be partly as they were before the load and partly as "
                    "the save has them. Load a save again to make them whole.",
                    save_id,
                    exc,
                    exc_info=True,
                )
            saves.delete(ids=[PENDING_LOAD])

    def _apply(self, manifest: dict[str, Any]) -> None:
        self._index_synced.clear()  # until sync_keywords below: Chroma changes under it
        wanted: dict[str, list[str]] = manifest.get("memories", {})
        live = self._live_ids()
        referenced = self._referenced()
        with self._record_writes:
            for name in sorted(set(live) | set(wanted)):
                now, want = set(live.get(name, [])), set(wanted.get(name, []))
                gone = sorted(now - want)
                if gone:
                    collection = self._collection(name, "", create=False)
                    assert collection is not None
                    self._move(collection, self._archive(), [i for i in gone if i in referenced])
                    collection.delete(ids=gone)
                back = sorted(want - now)
                if back:
                    self._restore(name, back)
            self._records.clear()
            self._player_vectors.drop()
        self.sync_keywords()
        state = self._state_collection()
        current = state.get(include=[])["ids"]
        if current:
            state.delete(ids=list(current))
        records: dict[str, list[Any]] = manifest.get("state", {})
        if records:
            keys = sorted(records)
            state.upsert(
                ids=keys,
                documents=[records[k][0] for k in keys],
                metadatas=[records[k][1] or _state_labels(k, None) for k in keys],
                embeddings=ONE_VECTOR * len(keys),
            )
        self._collect_archive()

    @staticmethod
    def _move(source: Any, target: Any, ids: list[str]) -> None:
        """Copy records (vectors included) from one collection into another."""
        if not ids:
            return
        found = source.get(ids=ids, include=["embeddings", "documents", "metadatas"])
        if found["ids"]:
            target.upsert(
                ids=found["ids"],
                embeddings=found["embeddings"],
                documents=found["documents"],
                metadatas=found["metadatas"],
            )

    def _restore(self, name: str, ids: list[str]) -> None:
        found = self._archive().get(ids=ids, include=["embeddings", "documents", "metadatas"])
        if len(found["ids"]) < len(ids):
            log.error(
                "%d memories of a save are missing from the archive", len(ids) - len(found["ids"])
            )
        if not found["ids"]:
            return
        npc_id = str((found["metadatas"][0] or {}).get("npc_id", ""))
        collection = self._collection(name, npc_id, create=True)
        assert collection is not None
        collection.upsert(
            ids=found["ids"],
            embeddings=found["embeddings"],
            documents=found["documents"],
            metadatas=found["metadatas"],
        )

    def _collect_archive(self) -> None:
        """Drop archived memories no save names any more."""
        archive = self._archive()
        held = archive.get(include=[])["ids"]
        if not held:
            return
        unused = [i for i in held if i not in self._referenced()]
        if unused:
            archive.delete(ids=unused)

    def _archive_before_forget(self, collection: Any, ids: list[str]) -> None:
        """A forgotten memory that a save names is kept in the archive for that save."""
        saves = self._collection(SAVES_COLLECTION, "", create=False)
        if saves is None or saves.count() == 0:
            return
        referenced = self._referenced()
        self._move(collection, self._archive(), [i for i in ids if i in referenced])

    def export_save(self, save_id: str) -> bytes:
        check_save_id(save_id)
        manifest = self._manifest(save_id)
        info = next((i for i in self.list_saves() if i.save_id == save_id), None)
        if manifest is None or info is None:
            raise unknown_save(save_id)
        records: dict[str, dict[str, Any]] = {}
        sources = [*self._memory_collections().values(), self._archive()]
        wanted = {i for ids in manifest.get("memories", {}).values() for i in ids}
        for source in sources:
            missing = sorted(wanted - records.keys())
            if not missing:
                break
            found = source.get(ids=missing, include=["embeddings", "documents", "metadatas"])
            for memory_id, vector, document, metadata in zip(
                found["ids"],
                found["embeddings"],
                found["documents"],
                found["metadatas"],
                strict=True,
            ):
                records[memory_id] = {
                    "document": document,
                    "metadata": metadata,
                    "vector": [float(x) for x in vector],
                }
        return encode_export(info, manifest, records)

    def import_save(self, save_id: str, data: bytes) -> SaveInfo:
        """Store an exported save under ``save_id``; its memories wait in the archive
        until the save is loaded. The file is untrusted: read and checked whole first
        (``read_import``: its memories get new ids, so it reaches nothing but its own
        records), then written, or nothing is."""
        check_save_id(save_id)
        with self._saves_lock:
            known = {info.save_id for info in self.list_saves()}
            if save_id not in known and len(known) >= MAX_SAVES:
                raise SaveError("save_id", f"at most {MAX_SAVES} saves: delete one first")
            imported = read_import(data, self._dimension())
            archive = self._archive()
            written: list[str] = []
            try:
                for start in range(0, len(imported.ids), 1000):
                    chunk = slice(start, start + 1000)
                    written += imported.ids[chunk]
                    archive.add(
                        ids=imported.ids[chunk],
                        embeddings=imported.vectors[chunk],
                        documents=imported.documents[chunk],
                        metadatas=imported.metadatas[chunk],
                    )
                created = utc_now()
                count = len(imported.ids)
                self._saves().upsert(
                    ids=[save_id],
                    metadatas=[
                        {
                            "kind": "save",
                            "created_at": _timestamp(created),
                            "memories": count,
                            "manifest": pack(imported.manifest),
                        }
                    ],
                    embeddings=ONE_VECTOR,
                )
            except BaseException:
                if written:  # new ids: nothing but this import's own records
                    archive.delete(ids=written)
                raise
            finally:
                self._referenced_ids = None
        return SaveInfo(save_id, created, count)

    def _dimension(self) -> int:
        """How many numbers this store's embedder puts in a vector."""
        return len(self._embed(["dimension"])[0])

    def close(self) -> None:
        self._requests.shutdown(wait=False)
        if isinstance(self._keywords, KeywordIndex):
            self._keywords.close(in_step=self._index_synced.is_set())
        else:
            self._keywords.close()
        with self._lock:
            self._collections.clear()
        if self._shared_lore is not None:
            self._shared_lore.close()
