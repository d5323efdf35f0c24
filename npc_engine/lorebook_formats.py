"""The shapes a lorebook comes in (SillyTavern World Info, a ``character_book`` on its own,
the V3 spec's ``lorebook_v3``), told apart by content, and their entries read into
``Source`` records with what our lore entries have no place for kept aside."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from npc_engine.card_files import CardError
from npc_engine.cards import (
    ENGINE_KEY,
    BookEntry,
    _message,
)

BOOK_KEY = "lorebook"  # the lore file's extensions key for the book's own settings
WORLD_INFO = "world-info"  # SillyTavern's World Info file
CHARACTER_BOOK = "character-book"  # a card's character_book, on its own
LOREBOOK_V3 = "lorebook-v3"  # {"spec": "lorebook_v3", "data": character_book}
FORMATS = (WORLD_INFO, CHARACTER_BOOK, LOREBOOK_V3)
# SillyTavern's selectiveLogic numbers (world_info_logic in public/scripts/world-info.js)
LOGIC = ("and_any", "not_all", "not_any", "and_all")
# What SillyTavern writes for a new entry: a kept field of this value is left out of the
# lore file (it would be most of it) and written back by an export.
WI_DEFAULTS: dict[str, Any] = {
    "keysecondary": [],
    "comment": "",
    "constant": False,
    "selective": True,
    "selectiveLogic": 0,
    "addMemo": True,
    "order": 100,
    "position": 0,
    "disable": False,
    "excludeRecursion": False,
    "preventRecursion": False,
    "delayUntilRecursion": False,
    "probability": 100,
    "useProbability": True,
    "depth": 4,
    "group": "",
    "groupOverride": False,
    "groupWeight": 100,
    "scanDepth": None,
    "caseSensitive": None,
    "matchWholeWords": None,
    "useGroupScoring": None,
    "automationId": "",
    "role": None,
    "vectorized": False,
    "sticky": 0,
    "cooldown": 0,
    "delay": 0,
}
MAX_KEYS = 32  # WorldLore.keys; more are kept in the entry's extensions
CHAR = re.compile(r"\{\{char\}\}|<BOT>", re.IGNORECASE)


def _key_list(value: Any) -> Any:
    """Older World Info files hold keys as one comma-separated string."""
    if isinstance(value, str):
        return [part for part in value.split(",") if part.strip()]
    return value


KeyList = Annotated[list[str], BeforeValidator(_key_list)]


class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow")


class WorldInfoEntry(_Loose):
    key: KeyList = Field(default_factory=list)
    keysecondary: KeyList = Field(default_factory=list)
    content: str = ""
    comment: str = ""
    constant: bool = False
    selective: bool = True
    selectiveLogic: int = 0  # SillyTavern's name
    disable: bool = False
    extensions: dict[str, Any] = Field(default_factory=dict)


@dataclass
class ImportedLorebook:
    name: str  # the file stem: lore/<name>.yaml
    lore: dict[str, Any]  # a LoreFile, YAML-ready
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def lorebook_format(data: dict[str, Any]) -> str | None:
    """Which lorebook shape ``data`` is, or None for a card."""
    if data.get("spec") == "lorebook_v3":
        return LOREBOOK_V3
    if "spec" in data or "data" in data:
        return None  # a V2/V3 card
    entries = data.get("entries")
    if isinstance(entries, dict):
        return WORLD_INFO
    if isinstance(entries, list) and not {"first_mes", "description"} & set(data):
        return CHARACTER_BOOK
    return None


@dataclass
class Source:
    """One entry of the book, in the terms of a lore entry."""

    where: str  # its place in the book, for errors: "entries.3"
    fields: dict[str, str]  # lore entry field -> the book's field name (for errors)
    text: str
    keys: list[str]
    secondary: list[str]
    logic: int | None  # None: secondary keys not acted on (kept)
    constant: bool
    priority: int | None
    title: str
    ours: dict[str, Any]  # the entry's extensions.npc_engine (an exported lore entry)
    kept: dict[str, Any]  # what has no place in a lore entry


WI_FIELDS = {
    "text": "content",
    "keys": "key",
    "secondary_keys": "keysecondary",
    "secondary_logic": "selectiveLogic",
    "always": "constant",
}
BOOK_FIELDS = {
    "text": "content",
    "keys": "keys",
    "secondary_keys": "secondary_keys",
    "secondary_logic": "extensions.selectiveLogic",
    "always": "constant",
    "priority": "priority",
}


def _validated_entry(path: Path, where: str, model: type[BaseModel], raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise CardError(path, where, "an entry is a JSON object")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = ".".join(str(part) for part in error["loc"])
        raise CardError(path, f"{where}.{loc}" if loc else where, _message(error)) from None


def split_ours(raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the entry's extensions.npc_engine, its other extensions)."""
    extensions = raw.get("extensions")
    extensions = dict(extensions) if isinstance(extensions, dict) else {}
    ours = extensions.pop(ENGINE_KEY, None)
    return (dict(ours) if isinstance(ours, dict) else {}), extensions


def _same(value: Any, default: Any) -> bool:
    return type(value) is type(default) and value == default  # 0 is not False here


def world_info_entries(
    path: Path, entries: dict[str, Any]
) -> tuple[list[Source], list[dict[str, Any]]]:
    live: list[Source] = []
    left_out: list[dict[str, Any]] = []
    for label, raw in entries.items():
        where = (
            f"entries.{label if re.fullmatch(r'[A-Za-z0-9_-]{1,40}', label) else repr(label[:40])}"
        )
        entry: WorldInfoEntry = _validated_entry(path, where, WorldInfoEntry, raw)
        if entry.disable or not entry.content.strip():
            left_out.append(raw)
            continue
        ours, extensions = split_ours(raw)
        mapped = {"key", "content", "constant", "disable", "extensions"}
        secondary = [k.strip() for k in entry.keysecondary if k.strip()]
        logic: int | None = None
        if entry.selective and secondary and entry.key:
            mapped |= {"keysecondary", "selective", "selectiveLogic"}
            logic = entry.selectiveLogic
        kept = {
            k: v
            for k, v in raw.items()
            if k not in mapped
            and not (k in WI_DEFAULTS and _same(v, WI_DEFAULTS[k]))
            and not (k == "displayIndex" and _same(v, raw.get("uid")))
        }  # an export writes the defaults back
        if extensions:
            kept["extensions"] = extensions
        priority = ours.pop("priority", None)
        live.append(
            Source(
                where,
                WI_FIELDS,
                entry.content,
                [k.strip() for k in entry.key if k.strip()],
                secondary if logic is not None else [],
                logic,
                entry.constant,
                priority if isinstance(priority, int) else None,
                entry.comment,
                ours,
                kept,
            )
        )
    return live, left_out


def book_entries(
    path: Path, prefix: str, entries: list[Any]
) -> tuple[list[Source], list[dict[str, Any]]]:
    live: list[Source] = []
    left_out: list[dict[str, Any]] = []
    for index, raw in enumerate(entries):
        where = f"{prefix}entries.{index}"
        entry: BookEntry = _validated_entry(path, where, BookEntry, raw)
        if not entry.enabled or not entry.content.strip():
            left_out.append(raw)
            continue
        ours, extensions = split_ours(raw)
        mapped = {"keys", "content", "constant", "priority", "enabled", "extensions"}
        keys = [k.strip() for k in entry.keys if k.strip()]
        if entry.use_regex:
            keys = [k if k.startswith("/") else f"/{k}/" for k in keys]
        secondary = [k.strip() for k in entry.secondary_keys or [] if k.strip()]
        logic: int | None = None
        if entry.selective and secondary and keys:
            raw_logic = extensions.pop("selectiveLogic", 0)
            logic = raw_logic if isinstance(raw_logic, int) else -1
            mapped |= {"secondary_keys", "selective"}
            if entry.use_regex:
                secondary = [k if k.startswith("/") else f"/{k}/" for k in secondary]
        lines = entry.content.splitlines()  # V3 decorators, as cards.py
        decorators = [line.strip() for line in lines if line.strip().startswith("@@")]
        text = "\n".join(line for line in lines if not line.strip().startswith("@@"))
        if not text.strip():  # decorators alone: nothing to know
            left_out.append(raw)
            continue
        kept = {
            k: v
            for k, v in raw.items()
            if k not in mapped and not (k == "insertion_order" and v == index)
        }  # what an export writes anyway
        if extensions:
            kept["extensions"] = extensions
        if decorators:
            kept["decorators"] = decorators
        live.append(
            Source(
                where,
                BOOK_FIELDS,
                text,
                keys,
                secondary,
                logic,
                bool(entry.constant),
                entry.priority,
                entry.name or entry.comment or "",
                ours,
                kept,
            )
        )
    return live, left_out


def book_of(path: Path, data: dict[str, Any], shape: str) -> tuple[dict[str, Any], str]:
    """The book object and the prefix of its fields in the file."""
    if shape != LOREBOOK_V3:
        return data, ""
    book = data.get("data")
    if not isinstance(book, dict):
        raise CardError(path, "data", "should be an object (the lorebook)")
    if not isinstance(book.get("entries"), list):
        raise CardError(path, "data.entries", "should be a list of entries")
    return book, "data."
