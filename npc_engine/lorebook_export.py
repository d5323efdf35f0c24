"""Lore files to lorebooks: ``npc-engine export --lore FILE``. The book comes back in the
shape it was imported from (default: SillyTavern World Info), with what ``lorebooks.py``
kept aside on import (order, position, the book's settings, its disabled entries) put
back; our fields a book lacks go in ``extensions.npc_engine``."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from npc_engine.cards import ENGINE_KEY, PLAYER_WORDS, BookEntry
from npc_engine.lorebook_formats import (
    BOOK_KEY,
    FORMATS,
    LOGIC,
    LOREBOOK_V3,
    WI_DEFAULTS,
    WORLD_INFO,
    WorldInfoEntry,
)
from npc_engine.persona.model import LoreFile, WorldLore


def _as_book_text(text: str) -> str:
    return re.sub(rf"\b{re.escape(PLAYER_WORDS)}\b", "{{user}}", text)


def read_lore_file(path: Path) -> LoreFile:
    from npc_engine.errors import NpcEngineError
    from npc_engine.persona.loader import validate_yaml_file

    if not path.is_file():
        raise NpcEngineError(f"{path}: no such lorebook file")
    lore, _parsed, problems = validate_yaml_file(path, LoreFile)
    if lore is None:
        raise NpcEngineError(str(problems[0]) if problems else f"{path}: not a lorebook file")
    return lore


def lore_to_lorebook(lore: LoreFile, name: str, shape: str | None = None) -> dict[str, Any]:
    """A lorebook of the file's entries, in the shape it was imported from (default:
    SillyTavern World Info). Our fields a book lacks go in ``extensions.npc_engine``."""
    kept = _as_dict(lore.extensions.get(BOOK_KEY))
    source_format = kept.pop("format", None)
    shape = shape or (source_format if source_format in FORMATS else WORLD_INFO)
    kept["source_format"] = source_format or shape
    left_out = _as_list(kept.pop("entries_left_out", []))
    outer = _as_dict(kept.pop("outer", {}))
    extensions = _as_dict(kept.pop("extensions", {}))
    ours: dict[str, Any] = {"name": name}
    if lore.known_by:
        ours["known_by"] = list(lore.known_by)
    extensions[ENGINE_KEY] = ours
    if kept.pop("source_format") != shape and left_out:  # raw entries of another shape
        ours["entries_left_out"], left_out = left_out, []
    entries = [_entry_out(e, i, shape, lore.known_by) for i, e in enumerate(lore.resolved(name))]
    if shape == WORLD_INFO:
        by_uid: dict[str, Any] = {}
        for index, entry in enumerate([*entries, *left_out]):
            uid = entry.get("uid", index) if isinstance(entry, dict) else index
            label = str(uid) if str(uid) not in by_uid else str(index)
            while label in by_uid:
                label += "_"
            by_uid[label] = entry
        return {**kept, "entries": by_uid, "extensions": extensions}
    book = {**kept, "extensions": extensions, "entries": [*entries, *left_out]}
    if shape == LOREBOOK_V3:
        return {"spec": "lorebook_v3", **outer, "data": book}
    return book


def _as_dict(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, dict) else {}


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list) else []


def _fitting(kept: dict[str, Any], model: type[BaseModel]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(what ``model`` reads as it is, what goes in the entry's extensions): an entry kept
    from another shape (World Info's numbered ``position``) written as a book entry."""
    fits: dict[str, Any] = {}
    moved: dict[str, Any] = {}
    for key, value in kept.items():
        try:
            model.model_validate({key: value})
        except ValidationError:
            moved[key] = value
        else:
            fits[key] = value
    return fits, moved


def _entry_out(entry: WorldLore, index: int, shape: str, file_known_by: list[str]) -> Any:
    kept = dict(entry.extensions)
    ours: dict[str, Any] = {"id": entry.id}
    if entry.reveal_when:
        ours["reveal_when"] = entry.reveal_when
    if entry.known_by and entry.known_by != file_known_by:
        ours["known_by"] = list(entry.known_by)
    extensions = {**_as_dict(kept.pop("extensions", {})), ENGINE_KEY: ours}
    kept, moved = _fitting(kept, WorldInfoEntry if shape == WORLD_INFO else BookEntry)
    extensions = {**moved, **extensions}
    keys = [*entry.keys, *_as_list(kept.pop("more_keys", []))]
    secondary = [*entry.secondary_keys, *_as_list(kept.pop("more_secondary_keys", []))]
    logic = LOGIC.index(entry.secondary_logic)
    decorators = [str(line) for line in _as_list(kept.pop("decorators", []))]
    content = "\n".join([*decorators, _as_book_text(entry.text)])
    title = (entry.id or "").rsplit(".", 1)[-1]
    if shape == WORLD_INFO:
        if entry.priority:
            ours["priority"] = entry.priority
        out: dict[str, Any] = {"uid": index, "key": keys, "comment": title, "content": content}
        out.update(WI_DEFAULTS)
        out.update(comment=title, displayIndex=kept.get("uid", index))
        out.update(kept)
        out.update(key=keys, content=content, constant=entry.constant)
        if entry.secondary_keys:
            out.update(keysecondary=secondary, selective=True, selectiveLogic=logic)
        out["extensions"] = extensions
        return out
    if entry.secondary_keys:
        extensions["selectiveLogic"] = logic
    out = {
        "keys": keys,
        "content": content,
        "extensions": extensions,
        "enabled": True,
        "insertion_order": index,
        "constant": entry.constant,
        "priority": entry.priority,
        "name": title,
    }
    out.update(kept)
    out.update(keys=keys, content=content, constant=entry.constant, priority=entry.priority)
    if entry.secondary_keys:
        out.update(secondary_keys=secondary, selective=True)
    return out


def write_lorebook_json(book: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(book, indent=2, ensure_ascii=False) + "\n")
