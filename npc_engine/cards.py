"""Character Card V2/V3 (the format SillyTavern and its peers share characters in) to
personas: ``npc-engine import FILE`` (``card_export.py`` is the way back,
``npc-engine export NPC_ID``; ``card_files.py`` reads the files).

Read: ``.json`` (V1, V2 or V3), ``.png`` (the ``ccv3`` text chunk, else ``chara``: base64
JSON), ``.charx`` (a zip with ``card.json``). Written: a V3 card as JSON, or as a PNG
carrying ``ccv3`` and, for older readers, ``chara`` (the same card labelled V2).

Mapping (docs/lore.md has the table): name, description, personality (split at commas),
scenario, first_mes → greeting, alternate_greetings, mes_example (``<START>`` blocks of
``{{user}}:``/``{{char}}:`` lines) → example_dialogue, creator_notes, tags; the card's
``character_book`` → a lorebook file known by this NPC. ``{{char}}`` becomes the name,
``{{user}}`` "the player". Everything else (system prompts, creator, version, the card's
own extensions, book settings, disabled entries...) is kept under the persona's
``extensions`` so an export gives it back. A persona's fields that cards lack (role,
secrets, trust, relationships...) travel in the card's ``extensions.npc_engine``.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from npc_engine.card_files import CardError, read_card
from npc_engine.persona.model import (
    LORE_ID_PATTERN,
    NPC_ID_PATTERN,
    LoreFile,
    Persona,
)
from npc_engine.persona.yaml_source import MAX_FILE_BYTES as MAX_YAML_BYTES

PLAYER_WORDS = "the player"
ENGINE_KEY = "npc_engine"  # the card's extensions key for persona fields cards lack
CARD_KEY = "card"  # the persona's extensions key for card fields personas lack
# Persona fields a card has its own place for; the rest travel in extensions.npc_engine.
CARD_MAPPED = {
    "name",
    "description",
    "personality",
    "scenario",
    "greeting",
    "alternate_greetings",
    "example_dialogue",
    "creator_notes",
    "tags",
    "extensions",
}


class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow")


class BookEntry(_Loose):
    keys: list[str] = Field(default_factory=list)
    content: str = ""
    extensions: dict[str, Any] = Field(default_factory=dict)
    enabled: bool = True
    insertion_order: int = 0
    case_sensitive: bool | None = None
    use_regex: bool | None = None  # V3
    constant: bool | None = None
    name: str | None = None
    comment: str | None = None
    priority: int | None = None
    id: int | str | None = None
    selective: bool | None = None
    secondary_keys: list[str] | None = None
    position: str | None = None


class CharacterBook(_Loose):
    name: str | None = None
    description: str | None = None
    scan_depth: int | None = None
    token_budget: int | None = None
    recursive_scanning: bool | None = None
    extensions: dict[str, Any] = Field(default_factory=dict)
    entries: list[BookEntry] = Field(default_factory=list)


class CardData(_Loose):
    name: str = Field(min_length=1)
    description: str = ""
    personality: str = ""
    scenario: str = ""
    first_mes: str = ""
    mes_example: str = ""
    creator_notes: str = ""
    system_prompt: str = ""
    post_history_instructions: str = ""
    alternate_greetings: list[str] = Field(default_factory=list)
    character_book: CharacterBook | None = None
    tags: list[str] = Field(default_factory=list)
    creator: str = ""
    character_version: str = ""
    extensions: dict[str, Any] = Field(default_factory=dict)


def card_data(path: Path, card: dict[str, Any]) -> tuple[CardData, str]:
    """The card's data and its spec (V1 cards have their fields at the top level)."""
    spec = card.get("spec", "chara_card_v1")
    if not isinstance(spec, str) or len(spec) > 100:
        raise CardError(path, "spec", "should be a short string ('chara_card_v3')")
    data = card.get("data") if "data" in card else card
    prefix = "data." if "data" in card else ""
    if not isinstance(data, dict):
        raise CardError(path, "data", "should be an object")
    try:
        return CardData.model_validate(data), spec
    except ValidationError as exc:
        error = exc.errors()[0]
        where = prefix + ".".join(str(part) for part in error["loc"])
        message = "required field is missing" if error["type"] == "missing" else error["msg"]
        raise CardError(path, where or "data", message) from None
    except RecursionError:  # _check_tree bounds the depth; this is a second line
        raise CardError(path, "data", "nested too deeply") from None


# -- card → persona ----------------------------------------------------------------------

_CHAR = re.compile(r"\{\{char\}\}|<BOT>", re.IGNORECASE)
_USER = re.compile(r"\{\{user\}\}|<USER>", re.IGNORECASE)
# [^\S\n]: blanks within the line; ``\s*`` would span blank lines and take quadratic time
# over a card of newlines.
_START = re.compile(r"^[^\S\n]*<START>[^\S\n]*$", re.IGNORECASE | re.MULTILINE)


def resolve_macros(text: str, name: str) -> str:
    # A function, not a template: a name is text, never an escape (``\\1``).
    return _USER.sub(PLAYER_WORDS, _CHAR.sub(lambda _match: name, text)).strip()


def parse_examples(mes_example: str, name: str) -> tuple[list[dict[str, str]], list[str]]:
    """``<START>`` blocks of ``{{user}}: …`` / ``{{char}}: …`` lines → (player, npc) pairs;
    and the blocks that held no such pair, kept as written."""
    pairs: list[dict[str, str]] = []
    unparsed: list[str] = []
    speaker_line = re.compile(
        rf"^\s*(\{{\{{user\}}\}}|<USER>|\{{\{{char\}}\}}|<BOT>|{re.escape(name)})\s*:\s*(.*)$",
        re.IGNORECASE,
    )
    for block in _START.split(mes_example):
        if not block.strip():
            continue
        turns: list[tuple[str, str]] = []
        for line in block.splitlines():
            match = speaker_line.match(line)
            if match:
                who = "player" if match.group(1).lower() in ("{{user}}", "<user>") else "npc"
                turns.append((who, match.group(2)))
            elif turns and line.strip():
                turns[-1] = (turns[-1][0], f"{turns[-1][1]}\n{line.strip()}")
        found = 0
        for (first, said), (second, answer) in itertools.pairwise(turns):
            if first == "player" and second == "npc" and said.strip() and answer.strip():
                pairs.append(
                    {"player": resolve_macros(said, name), "npc": resolve_macros(answer, name)}
                )
                found += 1
        if not found:
            unparsed.append(block.strip())
    return pairs, unparsed


def _slug(text: str, limit: int = 63) -> str:
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", text.strip().lower()).strip("_-")
    return (slug or "npc")[:limit]


@dataclass
class ImportedCard:
    persona: dict[str, Any]
    lore: dict[str, Any] | None
    notes: list[str] = field(default_factory=list)  # what the writer should know
    # What the card asked for and was refused (a card is untrusted; docs/lore.md)
    warnings: list[str] = field(default_factory=list)


# A card comes from outside: its extensions.npc_engine describes the character, never how
# the engine serves it or what other NPCs know (docs/lore.md, "What a card may not do").
CARD_REFUSED = {
    "model": "a card may not choose the served model; dropped (the engine's model is used)",
    "lora": "a card may not choose LoRA adapters; dropped",
}
# Ids a persona file of which would be something else: world.yaml, Windows device names.
RESERVED_IDS = {"world", "con", "prn", "aux", "nul"} | {
    f"{device}{n}" for device in ("com", "lpt") for n in range(1, 10)
}
# Where a persona field came from in the card (for an error naming the card's field).
CARD_FIELD_OF = {
    "name": "name",
    "description": "description",
    "personality": "personality",
    "scenario": "scenario",
    "greeting": "first_mes",
    "alternate_greetings": "alternate_greetings",
    "example_dialogue": "mes_example",
    "creator_notes": "creator_notes",
    "tags": "tags",
    "extensions": "extensions",
}
ENTRY_FIELD_OF = {"text": "content", "keys": "keys", "always": "constant", "priority": "priority"}


def _personality(text: str) -> list[str]:
    parts = [p.strip() for p in re.split(r"[,;\n]", text) if p.strip()]
    return parts if all(len(p) <= 80 for p in parts) else [text.strip()] if text.strip() else []


def _lore_entry(
    entry: BookEntry,
    index: int,
    name: str,
    used: set[str],
    npc_id: str,
    exported_as: str,
    warnings: list[str],
) -> dict[str, Any]:
    """One book entry as a lorebook entry. Its id is the NPC's id and the entry's own name
    (ids are unique in a world, and several cards may name an entry "kraken"); an entry
    this engine exported (``exported_as``: the NPC's id then) keeps its name. Known by
    this NPC alone, whatever the card says."""
    keys = [k.strip() for k in entry.keys if k.strip()]
    if entry.use_regex:
        keys = [k if k.startswith("/") else f"/{k}/" for k in keys]
    card_extensions = dict(entry.extensions)
    ours = card_extensions.pop(ENGINE_KEY, None)
    ours = dict(ours) if isinstance(ours, dict) else {}
    # V3 decorators (``@@depth 4`` lines) steer SillyTavern's insertion, not the story.
    lines = entry.content.splitlines()
    decorators = [line.strip() for line in lines if line.strip().startswith("@@")]
    content = "\n".join(line for line in lines if not line.strip().startswith("@@"))
    out: dict[str, Any] = {"text": resolve_macros(content, name)}
    restored = str(ours.pop("id", "") or "").removeprefix(f"{exported_as}.")
    local = restored or _slug(entry.name or entry.comment or "", 40)
    wanted = f"{npc_id}.{local}"
    if local and local != "npc" and wanted not in used and re.fullmatch(LORE_ID_PATTERN, wanted):
        out["id"] = wanted
        used.add(wanted)
    if keys:
        out["keys"] = keys[:32]
    if entry.constant:
        out["always"] = True  # in this NPC's head only: the entry is known by it alone
    if entry.priority is not None:
        out["priority"] = max(-100, min(100, entry.priority))
    if ours.get("reveal_when"):
        out["reveal_when"] = ours["reveal_when"]
    known_by = ours.get("known_by")
    if known_by not in (None, [], [npc_id]):
        warnings.append(
            f"character_book.entries.{index}: known_by {known_by!r} dropped: a card's lore "
            f"is known by its own character only ({npc_id})"
        )
    kept = {
        k: v
        for k, v in entry.model_dump(exclude_none=True).items()
        if k not in ("keys", "content", "constant", "priority", "enabled", "extensions")
        and v not in ({}, [], "")
        and not (k == "insertion_order" and v == index)  # what an export writes anyway
    }
    if card_extensions:
        kept["extensions"] = card_extensions
    if decorators:
        kept["decorators"] = decorators
    if kept:
        out["extensions"] = kept
    return out


def _guarded(secrets: Any, warnings: list[str]) -> Any:
    """A card's secrets, every one guarded (``guard: false`` is the studio's call)."""
    if not isinstance(secrets, list):
        return secrets  # validation says what is wrong
    out = []
    for index, secret in enumerate(secrets):
        if isinstance(secret, dict) and "guard" in secret:
            if secret["guard"] is not True:
                warnings.append(
                    f"secrets[{index}].guard: a card may not unguard a secret; it stays guarded"
                )
            secret = {k: v for k, v in secret.items() if k != "guard"}
        out.append(secret)
    return out


def _message(error: Any) -> str:
    if error["type"] == "missing":
        return "required field is missing"
    return str(error["msg"]).removeprefix("Value error, ")


def _validated(
    path: Path,
    prefix: str,
    persona: dict[str, Any],
    lore: dict[str, Any] | None,
    origins: list[int],
) -> None:
    """What the import would write validates in full, or nothing is written: a CardError
    naming the card's field."""
    try:
        Persona.model_validate(persona)
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = [str(part) for part in error["loc"]] or ["data"]
        head = CARD_FIELD_OF.get(loc[0], f"extensions.{ENGINE_KEY}.{loc[0]}")
        raise CardError(path, prefix + ".".join([head, *loc[1:]]), _message(error)) from None
    if lore is None:
        return
    try:
        LoreFile.model_validate(lore)
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = [str(part) for part in error["loc"]]
        where = "character_book"
        if len(loc) >= 2 and loc[0] == "entries" and loc[1].isdigit():
            where += f".entries.{origins[int(loc[1])]}"
            if len(loc) >= 3:
                field_name = ENTRY_FIELD_OF.get(loc[2], f"extensions.{ENGINE_KEY}.{loc[2]}")
                where += "." + ".".join([field_name, *loc[3:]])
        raise CardError(path, prefix + where, _message(error)) from None
    for what, data in (("the persona", persona), ("the lorebook", lore)):
        size = len(yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100).encode())
        if size > MAX_YAML_BYTES - 1024:  # the header and schema comment fit in the rest
            raise CardError(
                path,
                prefix + ("character_book" if what == "the lorebook" else "data"),
                f"{what} would be a {size >> 10} KB file; a file holds at most "
                f"{MAX_YAML_BYTES >> 10} KB",
            )


def card_to_persona(
    path: Path, npc_id: str | None = None, card: dict[str, Any] | None = None
) -> ImportedCard:
    """A persona (as YAML-ready data) and its lorebook file from the card at ``path``
    (``card``: its JSON, when already read), validated in full: a card that would not load
    is a CardError and nothing to write."""
    card = read_card(path) if card is None else card
    data, spec = card_data(path, card)
    prefix = "data." if "data" in card else ""
    name = data.name.strip()
    engine = data.extensions.get(ENGINE_KEY)
    engine = dict(engine) if isinstance(engine, dict) else {}
    notes: list[str] = []
    warnings: list[str] = []
    persona: dict[str, Any] = {}
    exported_as = engine.pop("id", "")
    exported_as = exported_as if isinstance(exported_as, str) else ""
    if exported_as and not re.fullmatch(NPC_ID_PATTERN, exported_as):
        warnings.append(f"id {exported_as[:70]!r}: not an NPC id; made from the name instead")
        exported_as = ""
    chosen_id = npc_id or exported_as or _slug(name)
    if not re.fullmatch(NPC_ID_PATTERN, chosen_id):  # fullmatch: "brine\n" is no id
        raise CardError(path, "data.name", "cannot make an NPC id of it; pass --id")
    if chosen_id.lower() in RESERVED_IDS:
        raise CardError(path, "data.name", f"{chosen_id!r} cannot be an NPC id; pass --id")
    persona["id"] = chosen_id
    persona["name"] = name
    role = engine.pop("role", None)
    if not role:
        role = "Character"
        notes.append("role: cards have none; 'Character' was written, say what the NPC does")
    persona["role"] = role
    description = resolve_macros(data.description, name)
    if not description:
        description = f"{name}."
        notes.append("description: the card has none; write the NPC's backstory")
    persona["description"] = description
    if data.personality.strip():
        persona["personality"] = _personality(resolve_macros(data.personality, name))
    if data.scenario.strip():
        persona["scenario"] = resolve_macros(data.scenario, name)
    if data.first_mes.strip():
        persona["greeting"] = resolve_macros(data.first_mes, name)
    greetings = [resolve_macros(g, name) for g in data.alternate_greetings if g.strip()]
    if greetings:
        persona["alternate_greetings"] = greetings
    examples, unparsed = parse_examples(data.mes_example, name)
    if examples:
        persona["example_dialogue"] = examples
    if data.creator_notes.strip():
        persona["creator_notes"] = data.creator_notes.strip()
    tags = [t.strip() for t in data.tags if t.strip()]
    if tags:
        persona["tags"] = tags
    # Persona fields carried by an exported card come back as they were, but for what a
    # card may not decide (CARD_REFUSED, unguarded secrets).
    for key, value in engine.items():
        if key in CARD_REFUSED:
            warnings.append(f"{key}: {CARD_REFUSED[key]}")
        elif key not in Persona.model_fields or key in CARD_MAPPED or key == "id":
            warnings.append(f"extensions.{ENGINE_KEY}.{key}: ignored (the card's own wins)")
        elif key == "secrets":
            persona[key] = _guarded(value, warnings)
        elif key not in persona:
            persona[key] = value
    if engine.get("factions"):
        notes.append(
            f"factions {engine['factions']!r} (from the card): this NPC knows the lore "
            "those factions know; check that is meant"
        )

    card_kept: dict[str, Any] = {"spec": spec}
    for key in ("system_prompt", "post_history_instructions", "creator", "character_version"):
        value = getattr(data, key)
        if value:
            card_kept[key] = value
    # V3 fields (nickname, assets…) and unknown ones
    card_kept.update({k: v for k, v in (data.model_extra or {}).items() if v not in ({}, [], "")})
    if unparsed:
        card_kept["unparsed_examples"] = unparsed
        notes.append(f"example_dialogue: {len(unparsed)} example block(s) had no user/char pair")
    if data.system_prompt or data.post_history_instructions:
        notes.append(
            "system_prompt / post_history_instructions: kept under extensions.card, not used "
            "(the engine builds its own prompt; fold what matters into the persona)"
        )
    extensions = {k: v for k, v in data.extensions.items() if k != ENGINE_KEY}

    lore: dict[str, Any] | None = None
    origins: list[int] = []  # each lore entry's index in the card's book
    book = data.character_book
    if book is not None:
        used: set[str] = set()
        entries = []
        live = [(i, e) for i, e in enumerate(book.entries) if e.enabled and e.content.strip()]
        for index, (origin, entry) in enumerate(live):
            made = _lore_entry(entry, index, name, used, chosen_id, exported_as, warnings)
            if not made["text"]:
                notes.append(f"character_book.entries.{origin}: no text but decorators; left out")
                continue
            entries.append(made)
            origins.append(origin)
        disabled = [e.model_dump(exclude_none=True) for e in book.entries if not e.enabled]
        settings = book.model_dump(exclude_none=True, exclude={"entries"})
        settings = {k: v for k, v in settings.items() if v not in ({}, [], "")}
        if settings or disabled:
            card_kept["character_book"] = {**settings, "disabled_entries": disabled}
        if entries:
            lore = {"known_by": [chosen_id], "entries": entries}
    if set(card_kept) - {"spec"}:  # the spec alone is not worth keeping
        extensions[CARD_KEY] = card_kept
    if extensions:
        persona["extensions"] = extensions
    _validated(path, prefix, persona, lore, origins)
    return ImportedCard(persona, lore, notes, warnings)


def check_target(card: Path, folder: Path, imported: ImportedCard) -> None:
    """Refuse, before anything is written, an import that would change what the folder's
    other NPCs are: an id another persona file declares (both would be dropped), an id that
    names one of the world's factions (the card's lore would be known by its members), or
    lore ids the world already uses."""
    from npc_engine.persona.loader import LORE_FOLDER, load_personas

    if not folder.is_dir():
        return
    npc_id = imported.persona["id"]
    registry = load_personas(folder)
    own_file = (folder / f"{npc_id}.yaml").resolve()
    for loaded in registry.personas.values():
        if loaded.id == npc_id and loaded.path.resolve() != own_file:
            raise CardError(card, "id", f"{npc_id!r} is the id of {loaded.path}; pass --id")
    lore_file = folder / LORE_FOLDER / f"{npc_id}.yaml"
    for world in registry.worlds.values():
        factions = {faction.name for faction in world.factions}
        if npc_id in factions:
            raise CardError(card, "id", f"{npc_id!r} is a faction of this world; pass --id")
        if imported.lore is None or lore_file.exists():  # replaced (--force) or refused
            continue
        taken = {entry.id for entry in world.lore}
        for index, entry in enumerate(imported.lore["entries"]):
            entry_id = entry.get("id") or f"{npc_id}.{index}"
            if entry_id in taken:
                raise CardError(card, "id", f"lore id {entry_id!r} is taken; pass --id")
