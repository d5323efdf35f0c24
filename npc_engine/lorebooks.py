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
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from npc_engine.card_files import CardError, read_card
from npc_engine.cards import (
    _USER,
    ENGINE_KEY,
    PLAYER_WORDS,
    RESERVED_IDS,
    _message,
    _slug,
)
from npc_engine.lorebook_formats import (
    BOOK_KEY,
    CHAR,
    LOGIC,
    LOREBOOK_V3,
    MAX_KEYS,
    WORLD_INFO,
    ImportedLorebook,
    Source,
    book_entries,
    book_of,
    lorebook_format,
    split_ours,
    world_info_entries,
)
from npc_engine.persona.model import LORE_ID_PATTERN, NPC_ID_PATTERN, LoreFile
from npc_engine.persona.yaml_source import MAX_DEPTH as MAX_YAML_DEPTH
from npc_engine.persona.yaml_source import MAX_FILE_BYTES as MAX_YAML_BYTES
from npc_engine.persona.yaml_source import MAX_NODES as MAX_YAML_NODES


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
    book, prefix = book_of(path, data, shape)
    notes: list[str] = []
    warnings: list[str] = []
    book_ours, book_extensions = split_ours(book)
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
        sources, left_out = world_info_entries(path, book["entries"])
    else:
        sources, left_out = book_entries(path, prefix, book["entries"])

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
    source: Source,
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
    return out, bool(CHAR.search(text))


def _validated(
    path: Path, prefix: str, lore: dict[str, Any], sources: list[Source], flag: bool
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
