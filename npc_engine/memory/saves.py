"""Save slots: what a save is, and the file format of an exported save.

A save is a *manifest*: the ids of the memories alive when it was made (per collection) and
every game-state record (trust, flags, conversation histories). Memories themselves are not
copied: a memory is immutable once written, so the live store already holds every memory a
recent save names. Only a memory that leaves the live store (forgotten, or undone by a load)
while some save still names it is moved to an archive, from which a load brings it back.
That makes ``save.create`` cost one id listing and one write (no copy of 10,000 vectors) and
``save.load`` cost the difference between now and the save, not the size of the world.
"""

from __future__ import annotations

import base64
import gzip
import json
import math
import re
import zlib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

from npc_engine.errors import FieldError
from npc_engine.game_state import (
    FLAG_NAME_PATTERN,
    MAX_FLAG_TEXT,
    MAX_FLAGS_PER_PLAYER,
    TRUST_MAX,
    TRUST_MIN,
)
from npc_engine.ids import ID_PATTERN, save_name_problem
from npc_engine.memory.types import MEMORY_KINDS, Memory

SAVE_FORMAT = "npc-engine-save"
SAVE_FORMAT_VERSION = 1
MAX_SAVES = 100  # save ids are the client's choice: bounded
MAX_IMPORT_BYTES = 512 << 20  # a save file larger than this is refused before parsing
# An imported save file comes from someone else: it is inflated piece by piece and refused
# as soon as it grows past what a real save could be (a 1 MB gzip bomb inflates to 1 GiB).
# Exported saves are JSON of floats and text, which gzip shrinks 2-5x; past a free first
# 64 MiB a file may grow at most 64x its own size, and never past 1 GiB.
MAX_SAVE_JSON_BYTES = 1 << 30
FREE_INFLATE_BYTES = 64 << 20
MAX_INFLATE_RATIO = 64
_INFLATE_CHUNK = 1 << 20
# What one record of a save may hold (engine-written ones are far below these).
MAX_MEMORY_TEXT = 20_000
MAX_SHORT_TEXT = 1000  # subject, source, origin, superseded_by
MAX_HISTORY_TURNS = 1000
MAX_TURN_TEXT = 200_000
MAX_TIMESTAMP = 1e11  # seconds since 1970: year ~5100; datetime cannot go far past it
_ID = re.compile(ID_PATTERN)
# Game-state keys, as game_state.py and conversations.py write them (ids: the id alphabet).
_ID_CHARS = r"[A-Za-z0-9_.:@-]{1,64}"
_TRUST_KEY = re.compile(rf"trust:{_ID_CHARS}:{_ID_CHARS}")
_PLAYER_KEY = re.compile(rf"player:{_ID_CHARS}")
_HISTORY_KEY = re.compile(rf"history:({_ID_CHARS})\x1f({_ID_CHARS})")
TICK_STATE_KEY = "world-tick"  # rumours.TICK_STATE
_FLAG_NAME = re.compile(FLAG_NAME_PATTERN)  # always fullmatch: "$" passes a final newline
_TURN_TEXTS = ("player_text", "reply_text", "notes", "scene", "scene_shown", "standing_shown")


class SaveError(FieldError):
    """A save request the engine refuses; ``field`` names the field at fault."""


@dataclass(frozen=True)
class SaveInfo:
    save_id: str
    created_at: datetime
    memories: int

    def iso_created_at(self) -> str:
        return self.created_at.isoformat().replace("+00:00", "Z")


def read_save_file(path: Path) -> bytes:
    """A save file's bytes, refused by its size before a byte is read."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise SaveError("file", f"cannot read the save file ({exc.strerror})") from None
    if size > MAX_IMPORT_BYTES:
        raise SaveError("file", "the save file is larger than an engine save can be")
    return path.read_bytes()


def check_save_id(save_id: str) -> str:
    problem = save_name_problem(save_id)
    if problem is not None:
        raise SaveError("save_id", f"save_id: {problem}")
    return save_id


def unknown_save(save_id: str) -> SaveError:
    return SaveError("save_id", f"No save with id {save_id!r}.")


def refuse(why: str) -> NoReturn:
    """Refuse an imported save file: ``why`` names what in it is wrong."""
    raise SaveError("file", f"not a valid npc-engine save file: {why}")


def pack(document: dict[str, Any]) -> str:
    """JSON, compressed, as text (Chroma metadata holds strings, not bytes)."""
    raw = json.dumps(document, separators=(",", ":"), sort_keys=True).encode("utf-8")
    return base64.b64encode(gzip.compress(raw, compresslevel=1)).decode("ascii")


def unpack(text: str) -> dict[str, Any]:
    return dict(json.loads(gzip.decompress(base64.b64decode(text))))


def encode_export(
    info: SaveInfo, manifest: dict[str, Any], records: dict[str, dict[str, Any]]
) -> bytes:
    """An exported save: the manifest and every memory it names (text, metadata, vector)."""
    document = {
        "format": SAVE_FORMAT,
        "version": SAVE_FORMAT_VERSION,
        "save_id": info.save_id,
        "created_at": info.iso_created_at(),
        "manifest": manifest,
        "records": records,
    }
    return gzip.compress(json.dumps(document, separators=(",", ":")).encode("utf-8"), 6)


def inflate_limit(compressed: int) -> int:
    """How large the JSON of a save file of ``compressed`` bytes may inflate to."""
    return min(MAX_SAVE_JSON_BYTES, max(FREE_INFLATE_BYTES, compressed * MAX_INFLATE_RATIO))


def inflate(data: bytes, limit: int) -> bytearray:
    """gzip ``data`` inflated a piece at a time; SaveError past ``limit`` bytes (never
    holding more than that), or if it is not whole gzip."""
    out = bytearray()
    rest = data
    if not rest:
        refuse("the file is empty")
    while rest:
        if rest[:2] != b"\x1f\x8b":
            if rest.strip(b"\x00"):  # gzip allows zero padding after the last member
                refuse("not gzip data" if rest is data else "data after the gzip stream")
            break
        inflater = zlib.decompressobj(wbits=31)
        pending = rest
        try:
            while not inflater.eof:
                chunk = inflater.decompress(pending, _INFLATE_CHUNK)
                pending = inflater.unconsumed_tail
                if not chunk and not pending:
                    refuse("the gzip stream is cut short")
                out += chunk
                if len(out) > limit:
                    raise SaveError(
                        "file", f"the save file inflates past {limit >> 20} MiB: not a save"
                    )
        except zlib.error as exc:
            refuse(f"broken gzip data ({exc})")
        rest = inflater.unused_data
    return out  # not copied into bytes: json reads a bytearray as well


def decode_export(data: bytes) -> dict[str, Any]:
    """An exported save, checked for shape; refuses anything else with a clear error."""
    if not isinstance(data, bytes | bytearray | memoryview):
        refuse("not bytes")
    if len(data) > MAX_IMPORT_BYTES:
        raise SaveError("file", "the save file is larger than an engine save can be")
    raw = inflate(bytes(data), inflate_limit(len(data)))
    try:
        document = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        refuse(f"its JSON does not parse ({str(exc)[:200]})")
    del raw
    if not isinstance(document, dict) or document.get("format") != SAVE_FORMAT:
        raise SaveError("file", "not an npc-engine save file")
    if document.get("version") != SAVE_FORMAT_VERSION:
        raise SaveError(
            "file", f"save file version {str(document.get('version'))[:40]} is not supported"
        )
    manifest, records = document.get("manifest"), document.get("records")
    if not isinstance(manifest, dict) or not isinstance(records, dict):
        raise SaveError("file", "the save file has no manifest or no memories")
    return document


# -- checks of what an imported save holds (shared by every store) -----------------------


def check_text(value: Any, where: str, limit: int) -> str:
    if not isinstance(value, str) or len(value) > limit:
        refuse(f"{where} is not a text of at most {limit} characters")
    return value


def check_number(value: Any, where: str, low: float, high: float) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not low <= value <= high
    ):
        refuse(f"{where} is not a number in {low}..{high}")
    return float(value)


def check_int(value: Any, where: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        refuse(f"{where} is not an integer in {low}..{high}")
    return value


def check_memory_id(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        refuse(f"{where} is not a memory id")
    return value


def check_memory(memory: Memory, where: str) -> Memory:
    """A memory from a save file: every field as the engine itself would write it."""
    if not isinstance(memory.npc_id, str) or not _ID.fullmatch(memory.npc_id):
        refuse(f"{where}: npc_id is not an id")
    if memory.player_id is not None and (
        not isinstance(memory.player_id, str) or not _ID.fullmatch(memory.player_id)
    ):
        refuse(f"{where}: player_id is not an id")
    check_memory_id(memory.id, f"{where}: id")
    if memory.kind not in MEMORY_KINDS:
        refuse(f"{where}: kind is not one of {', '.join(MEMORY_KINDS)}")
    check_int(memory.importance, f"{where}: importance", 1, 10)
    check_text(memory.text, f"{where}: text", MAX_MEMORY_TEXT)
    for name in ("created_at", "last_accessed_at"):
        moment = getattr(memory, name)
        if not isinstance(moment, datetime) or moment.utcoffset() is None:
            refuse(f"{where}: {name} is not a time with a zone")
        check_number(moment.timestamp(), f"{where}: {name}", 0, MAX_TIMESTAMP)
    for name in ("game_time", "accessed_game_time"):
        if getattr(memory, name) is not None:
            check_number(getattr(memory, name), f"{where}: {name}", 0, 1e15)
    if memory.content is not None:
        check_text(memory.content, f"{where}: content", MAX_MEMORY_TEXT)
    for name in ("subject", "superseded_by", "source", "origin"):
        if getattr(memory, name) is not None:
            check_text(getattr(memory, name), f"{where}: {name}", MAX_SHORT_TEXT)
    check_int(memory.hops, f"{where}: hops", 0, 1000)
    return memory


def _check_turn(turn: Any, where: str) -> dict[str, Any]:
    known = {*_TURN_TEXTS, "memory_ids", "noted", "greeting", "heard"}
    if not isinstance(turn, dict) or not set(turn) <= known:
        refuse(f"{where} is not a turn")
    if "player_text" not in turn or "reply_text" not in turn:
        refuse(f"{where} has no player_text or reply_text")
    for name in (*_TURN_TEXTS, "heard"):
        if name in turn:
            check_text(turn[name], f"{where}.{name}", MAX_TURN_TEXT)
    ids = turn.get("memory_ids", [])
    if not isinstance(ids, list) or len(ids) > 1000:
        refuse(f"{where}.memory_ids is not a list of ids")
    for memory_id in ids:
        check_text(memory_id, f"{where}.memory_ids", MAX_SHORT_TEXT)
    noted = turn.get("noted", [])
    if not isinstance(noted, list) or len(noted) > 1000:
        refuse(f"{where}.noted is not a list of [id, line] pairs")
    for pair in noted:
        if not isinstance(pair, list) or len(pair) != 2:
            refuse(f"{where}.noted is not a list of [id, line] pairs")
        check_text(pair[0], f"{where}.noted", MAX_SHORT_TEXT)
        check_text(pair[1], f"{where}.noted", MAX_TURN_TEXT)
    if not isinstance(turn.get("greeting", False), bool):
        refuse(f"{where}.greeting is not true or false")
    return turn


def check_state_record(key: Any, value: Any, labels: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """A game-state record of a save file (trust, flags, a history, the world tick), held
    to the rules ``state.set`` and the engine's own writes follow; returns the value and
    its labels (what ``save_state`` would store)."""
    if not isinstance(key, str) or len(key) > 200:
        refuse("a game-state key is not a short text")
    where = f"state {key[:140]!r}"
    if not isinstance(value, dict):
        refuse(f"{where} is not an object")
    if labels is None or labels == {}:
        labels = {"kind": key.split(":", 1)[0]}
    if not isinstance(labels, dict):
        refuse(f"{where}: labels are not an object")
    if _TRUST_KEY.fullmatch(key):
        if set(value) != {"trust"}:
            refuse(f"{where} is not a trust record")
        check_int(value["trust"], f"{where}.trust", TRUST_MIN, TRUST_MAX)
        wanted = {"kind": "trust"}
    elif _PLAYER_KEY.fullmatch(key):
        flags, game_time = value.get("flags", {}), value.get("game_time")
        if not set(value) <= {"flags", "game_time"} or not isinstance(flags, dict):
            refuse(f"{where} is not a player record")
        if len(flags) > MAX_FLAGS_PER_PLAYER:
            refuse(f"{where} has more than {MAX_FLAGS_PER_PLAYER} flags")
        for name, flag in flags.items():
            if not _FLAG_NAME.fullmatch(name):
                refuse(f"{where}: flag {name[:40]!r} is not a flag name")
            if isinstance(flag, bool):
                continue
            if isinstance(flag, int):
                check_int(flag, f"{where}.flags.{name}", -(2**63), 2**64 - 1)
            else:
                check_text(flag, f"{where}.flags.{name}", MAX_FLAG_TEXT)
        if game_time is not None:
            check_number(game_time, f"{where}.game_time", 0, 1e15)
        wanted = {"kind": "player"}
    elif match := _HISTORY_KEY.fullmatch(key):
        turns = value.get("turns")
        if set(value) != {"turns"} or not isinstance(turns, list):
            refuse(f"{where} is not a history")
        if len(turns) > MAX_HISTORY_TURNS:
            refuse(f"{where} has more than {MAX_HISTORY_TURNS} turns")
        for index, turn in enumerate(turns):
            _check_turn(turn, f"{where}.turns[{index}]")
        wanted = {"kind": "history", "npc_id": match.group(1), "player_id": match.group(2)}
    elif key == TICK_STATE_KEY:
        if set(value) != {"last"}:
            refuse(f"{where} is not the world tick")
        check_number(value["last"], f"{where}.last", 0, MAX_TIMESTAMP)
        wanted = {"kind": TICK_STATE_KEY}
    else:
        refuse(f"{where} is not a game-state record the engine keeps")
    if labels != wanted:
        refuse(f"{where}: labels do not agree with the key")
    return value, wanted


def check_vector(value: Any, where: str, dimension: int) -> list[float]:
    """A memory's vector: ``dimension`` finite numbers (the store's embedder's)."""
    if not isinstance(value, list) or len(value) != dimension:
        refuse(f"{where}: the vector does not have this store's {dimension} dimensions")
    for x in value:
        if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
            refuse(f"{where}: the vector holds something other than finite numbers")
    return [float(x) for x in value]
