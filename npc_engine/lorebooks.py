"""Standalone lorebooks into lore files: ``npc-engine import WORLD.json``
(``lorebook_export.py`` is the way back, ``npc-engine export --lore FILE``).

Read (chosen by content, docs/lore.md "Lorebooks"): SillyTavern World Info (``{"entries":
{"0": {"uid", "key", "keysecondary", "content", "constant", "selective", "selectiveLogic",
"order", "position", "disable", "comment", ...}}}``), a V2/V3 ``character_book`` on its own
(``{"entries": [...]}``) and the V3 spec's ``{"spec": "lorebook_v3", "data": {...}}``.
Written: ``lore/<name>.yaml`` beside ``world.yaml``, known by every NPC of the world unless
``--known-by``. The mapping is the cards' one (``content`` → ``text``, keys, ``constant`` →
``always``, ``/regex/`` keys through RE2) plus secondary keys and their logic; what has no
place in a lore entry (order, position, depth, uid, ...) is kept in the entry's
``extensions``, the book's own settings and its disabled entries in the file's, so an
export gives them back.

A lorebook comes from outside: it is read with the cards' bounded JSON reader (size, depth,
no lone surrogates), validated whole against ``LoreFile`` and the file size limit before
anything is written, and every failure is one ``CardError`` line naming the file and the
lorebook's field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from npc_engine.card_files import CardError, read_card
from npc_engine.cards import (
    _USER,
    ENGINE_KEY,
    PLAYER_WORDS,
    RESERVED_IDS,
    BookEntry,
    _message,
    _slug,
)
from npc_engine.persona.model import LORE_ID_PATTERN, NPC_ID_PATTERN, LoreFile
from npc_engine.persona.yaml_source import MAX_DEPTH as MAX_YAML_DEPTH
from npc_engine.persona.yaml_source import MAX_FILE_BYTES as MAX_YAML_BYTES
from npc_engine.persona.yaml_source import MAX_NODES as MAX_YAML_NODES

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
_CHAR = re.compile(r"\{\{char\}\}|<BOT>", re.IGNORECASE)


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
class _Source:
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


def _ours(raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the entry's extensions.npc_engine, its other extensions)."""
    extensions = raw.get("extensions")
    extensions = dict(extensions) if isinstance(extensions, dict) else {}
    ours = extensions.pop(ENGINE_KEY, None)
    return (dict(ours) if isinstance(ours, dict) else {}), extensions


def _same(value: Any, default: Any) -> bool:
    return type(value) is type(default) and value == default  # 0 is not False here


def _world_info_entries(
    path: Path, entries: dict[str, Any]
) -> tuple[list[_Source], list[dict[str, Any]]]:
    live: list[_Source] = []
    left_out: list[dict[str, Any]] = []
    for label, raw in entries.items():
        where = (
            f"entries.{label if re.fullmatch(r'[A-Za-z0-9_-]{1,40}', label) else repr(label[:40])}"
        )
        entry: WorldInfoEntry = _validated_entry(path, where, WorldInfoEntry, raw)
        if entry.disable or not entry.content.strip():
            left_out.append(raw)
            continue
        ours, extensions = _ours(raw)
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
            _Source(
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


def _book_entries(
    path: Path, prefix: str, entries: list[Any]
) -> tuple[list[_Source], list[dict[str, Any]]]:
    live: list[_Source] = []
    left_out: list[dict[str, Any]] = []
    for index, raw in enumerate(entries):
        where = f"{prefix}entries.{index}"
        entry: BookEntry = _validated_entry(path, where, BookEntry, raw)
        if not entry.enabled or not entry.content.strip():
            left_out.append(raw)
            continue
        ours, extensions = _ours(raw)
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
            _Source(
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


def _book_of(path: Path, data: dict[str, Any], shape: str) -> tuple[dict[str, Any], str]:
    """The book object and the prefix of its fields in the file."""
    if shape != LOREBOOK_V3:
        return data, ""
    book = data.get("data")
    if not isinstance(book, dict):
        raise CardError(path, "data", "should be an object (the lorebook)")
    if not isinstance(book.get("entries"), list):
        raise CardError(path, "data.entries", "should be a list of entries")
    return book, "data."


def lorebook_to_lore(
    path: Path,
    data: dict[str, Any] | None = None,
    name: str | None = None,
    known_by: list[str] | None = None,
) -> ImportedLorebook:
    """A lorebook file (as YAML-ready data) from the lorebook at ``path``, validated in
    full: one that would not load is a CardError and nothing to write."""
    data = read_card(path) if data is None else data
    shape = lorebook_format(data)
    if shape is None:
        raise CardError(path, "entries", "not a lorebook (no entries)")
    book, prefix = _book_of(path, data, shape)
    notes: list[str] = []
    warnings: list[str] = []
    book_ours, book_extensions = _ours(book)
    exported_as = book_ours.get("name")
    if not isinstance(exported_as, str) or not re.fullmatch(NPC_ID_PATTERN, exported_as):
        exported_as = ""
    book_name = book.get("name") if isinstance(book.get("name"), str) else ""
    chosen = name or exported_as or _slug(book_name or path.stem, 40)
    where = "--id" if name else "name"
    if not re.fullmatch(NPC_ID_PATTERN, chosen) or len(chosen) > 40:
        raise CardError(path, where, f"cannot make a lorebook name of {chosen[:50]!r}; pass --id")
    if chosen.lower() in RESERVED_IDS:  # world: world.yaml's own lore ids are world.N
        raise CardError(path, where, f"{chosen!r} cannot be a lorebook name; pass --id")

    if shape == WORLD_INFO:
        sources, left_out = _world_info_entries(path, book["entries"])
    else:
        sources, left_out = _book_entries(path, prefix, book["entries"])

    file_known_by: list[str] = list(known_by or [])
    if not file_known_by:
        restored = book_ours.get("known_by")
        if isinstance(restored, list) and all(isinstance(k, str) for k in restored):
            file_known_by = list(restored)
    used: set[str] = set()
    entries: list[dict[str, Any]] = []
    braces = 0
    for index, source in enumerate(sources):
        entry, has_char = _lore_entry(source, index, chosen, exported_as, used, known_by, warnings)
        if file_known_by and entry.get("known_by") == file_known_by:
            # Said again of one entry, the file's own readers are inherited: stored as an
            # export writes it, so a book imported, exported and imported again is the same.
            del entry["known_by"]
        braces += has_char
        entries.append(entry)
    if braces:
        notes.append(
            f"{braces} entr{'y' if braces == 1 else 'ies'} say {{{{char}}}}: a world lorebook "
            "has no one character, so it is kept as written; reword those entries"
        )
    constant = sum(1 for e in entries if e.get("always"))
    if constant:
        who = ", ".join(file_known_by) if file_known_by else "every NPC of the world"
        notes.append(
            f"{constant} constant entr{'y is' if constant == 1 else 'ies are'} 'always': in "
            f"the prompt head of {who}; check that text belongs there"
        )
    settings = {k: v for k, v in book.items() if k not in ("entries", "extensions")}
    if book_extensions:
        settings["extensions"] = book_extensions
    kept: dict[str, Any] = {"format": shape, **settings}
    if shape == LOREBOOK_V3:
        kept["outer"] = {k: v for k, v in data.items() if k not in ("data", "spec")}
    carried = book_ours.get("entries_left_out")  # exported in another shape
    if isinstance(carried, list):
        left_out = [*carried, *left_out]
    if left_out:
        kept["entries_left_out"] = left_out
        notes.append(f"{len(left_out)} disabled or empty entries: kept, not used")
    lore: dict[str, Any] = {}
    if file_known_by:
        lore["known_by"] = file_known_by
    lore["entries"] = entries
    lore["extensions"] = {BOOK_KEY: kept}
    _validated(path, prefix, lore, sources, known_by is not None and bool(known_by))
    return ImportedLorebook(chosen, lore, notes, warnings)


def _unique(wanted: str, fallback: str, used: set[str]) -> str:
    for candidate in (wanted, fallback):
        if candidate and candidate not in used and re.fullmatch(LORE_ID_PATTERN, candidate):
            used.add(candidate)
            return candidate
    number = 2
    while f"{fallback}-{number}" in used:
        number += 1
    used.add(f"{fallback}-{number}")
    return f"{fallback}-{number}"


def _lore_entry(
    source: _Source,
    index: int,
    name: str,
    exported_as: str,
    used: set[str],
    known_by: list[str] | None,
    warnings: list[str],
) -> tuple[dict[str, Any], bool]:
    text = _USER.sub(PLAYER_WORDS, source.text).strip()
    out: dict[str, Any] = {"text": text}
    ours = dict(source.ours)
    restored = str(ours.pop("id", "") or "")
    if exported_as:
        restored = restored.removeprefix(f"{exported_as}.")
    local = restored or _slug(source.title, 80)
    if local.isdigit() or local == "npc":
        local = ""
    out["id"] = _unique(f"{name}.{local}" if local else "", f"{name}.{index}", used)
    kept = dict(source.kept)
    if source.keys:
        out["keys"] = source.keys[:MAX_KEYS]
        if len(source.keys) > MAX_KEYS:
            kept["more_keys"] = source.keys[MAX_KEYS:]
            warnings.append(
                f"{source.where}: {len(source.keys)} keys; the first {MAX_KEYS} are used, "
                "the rest kept"
            )
    if source.logic is not None:
        out["secondary_keys"] = source.secondary[:MAX_KEYS]
        if len(source.secondary) > MAX_KEYS:
            kept["more_secondary_keys"] = source.secondary[MAX_KEYS:]
        out["secondary_logic"] = LOGIC[source.logic] if 0 <= source.logic < 4 else source.logic
    if source.constant:
        out["always"] = True
    if source.priority is not None:
        out["priority"] = max(-100, min(100, source.priority))
    if ours.get("reveal_when"):
        out["reveal_when"] = ours["reveal_when"]
    entry_known_by = ours.get("known_by")
    if entry_known_by not in (None, []):
        if known_by and not (
            isinstance(entry_known_by, list)
            and all(isinstance(k, str) for k in entry_known_by)
            and set(entry_known_by) <= set(known_by)
        ):
            warnings.append(
                f"{source.where}: known_by {entry_known_by!r} dropped: the lorebook is known "
                f"by {known_by!r} (--known-by) and an entry may not reach further"
            )
        else:
            out["known_by"] = entry_known_by
    if kept:
        out["extensions"] = kept
    return out, bool(_CHAR.search(text))


def _validated(
    path: Path, prefix: str, lore: dict[str, Any], sources: list[_Source], flag: bool
) -> None:
    """What the import would write validates in full, or nothing is written."""
    try:
        LoreFile.model_validate(lore)
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = [str(part) for part in error["loc"]]
        if len(loc) >= 2 and loc[0] == "entries" and loc[1].isdigit():
            source = sources[int(loc[1])]
            where = source.where
            if len(loc) >= 3:
                head = source.fields.get(loc[2], f"extensions.{ENGINE_KEY}.{loc[2]}")
                where += "." + ".".join([head, *loc[3:]])
            message = _message(error)
            if loc[2:3] == ["secondary_logic"]:
                message = "should be 0 (AND ANY), 1 (NOT ALL), 2 (NOT ANY) or 3 (AND ALL)"
        else:
            head = "--known-by" if flag else f"{prefix}extensions.{ENGINE_KEY}"
            where, message = ".".join([head, *loc]), _message(error)
        raise CardError(path, where, message) from None
    nodes, deepest = _shape_of(lore)
    if deepest is not None:
        raise CardError(path, deepest, f"nested more than {MAX_YAML_DEPTH} levels deep in the file")
    if nodes > MAX_YAML_NODES - 100:
        raise CardError(
            path,
            f"{prefix}entries",
            f"the lorebook would hold {nodes:,} values; a file holds at most "
            f"{MAX_YAML_NODES:,} (split it, or leave out disabled entries)",
        )
    size = len(yaml.safe_dump(lore, sort_keys=False, allow_unicode=True, width=100).encode())
    if size > MAX_YAML_BYTES - 1024:
        raise CardError(
            path,
            f"{prefix}entries",
            f"the lorebook would be a {size >> 10} KB file; a file holds at most "
            f"{MAX_YAML_BYTES >> 10} KB (split it, or leave out disabled entries)",
        )


def _shape_of(value: Any) -> tuple[int, str | None]:
    """How many values the file would hold (the YAML loader's budget), and where it is
    nested past the loader's depth, if anywhere."""
    nodes = 0
    stack: list[tuple[Any, tuple[str, ...]]] = [(value, ())]
    while stack:
        node, at = stack.pop()
        nodes += 1
        if len(at) > MAX_YAML_DEPTH - 1:
            return nodes, ".".join(at[:4])
        if isinstance(node, dict):
            stack.extend((item, (*at, str(key))) for key, item in node.items())
        elif isinstance(node, list):
            stack.extend((item, (*at, str(index))) for index, item in enumerate(node))
    return nodes, None


# -- writing -----------------------------------------------------------------------------


def check_lore_target(
    source: Path, folder: Path, imported: ImportedLorebook, *, force: bool = False
) -> list[str]:
    """Refuse, before anything is written, a lorebook whose entry ids the world already
    uses elsewhere, or a file that exists (unless ``force``). Returns warnings: names in
    ``known_by`` that are no NPC or faction of the world."""
    from npc_engine.persona.loader import LORE_FOLDER, WORLD_FILE, load_personas

    target = folder / LORE_FOLDER / f"{imported.name}.yaml"
    if target.exists() and not force:
        raise CardError(source, "name", f"{target} exists; pass --force, or --id for another name")
    if not folder.is_dir():
        return []
    registry = load_personas(folder)
    world = registry.worlds.get(folder / WORLD_FILE)
    if world is None:
        return []
    replaced: set[str] = set()
    if target.exists():
        from npc_engine.persona.loader import validate_yaml_file

        old, _parsed, _problems = validate_yaml_file(target, LoreFile)
        if old is not None:
            replaced = {entry.id for entry in old.resolved(imported.name)}
    taken = {entry.id for entry in world.lore} - replaced
    for entry in imported.lore["entries"]:
        if entry["id"] in taken:
            raise CardError(source, "name", f"lore id {entry['id']!r} is taken; pass --id")
    known = set(registry.personas) | {faction.name for faction in world.factions}
    names = set(imported.lore.get("known_by", []))
    for entry in imported.lore["entries"]:
        names |= set(entry.get("known_by", []))
    return [
        f"known_by {n!r}: no NPC or faction of this world has it" for n in sorted(names - known)
    ]


def write_lorebook(
    folder: Path, imported: ImportedLorebook, source: str, *, force: bool = False
) -> list[Path]:
    """``FOLDER/lore/<name>.yaml`` and a minimal ``world.yaml`` when the folder has none."""
    from npc_engine.persona.authoring import _yaml_text, schema_ref
    from npc_engine.persona.loader import LORE_FOLDER, WORLD_FILE

    path = folder / LORE_FOLDER / f"{imported.name}.yaml"
    if path.exists() and not force:
        raise CardError(Path(source), "name", f"{path} exists; pass --force")
    path.parent.mkdir(parents=True, exist_ok=True)
    header = f"# Imported from {source}; see docs/lore.md for what maps where.\n"
    path.write_text(_yaml_text(schema_ref("lore", path.parent), header, imported.lore))
    written = [path]
    world_path = folder / WORLD_FILE
    if not world_path.exists():
        world = {"name": imported.name, "setting": f"The world of {imported.name}."}
        world_path.write_text(_yaml_text(schema_ref("world", folder), header, world))
        written.append(world_path)
    return written
