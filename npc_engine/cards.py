"""Character Card V2/V3 (the format SillyTavern and its peers share characters in) to and
from personas: ``npc-engine import FILE`` and ``npc-engine export NPC_ID``.

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

import base64
import binascii
import io
import itertools
import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from npc_engine.errors import NpcEngineError
from npc_engine.persona.model import LORE_ID_PATTERN, NPC_ID_PATTERN, Persona, WorldLore

MAX_CARD_BYTES = 16 << 20  # a card with a big lorebook is a few MB; more is not a card
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


class CardError(NpcEngineError):
    """A card that cannot be read: says which file and which field."""

    def __init__(self, path: Path, field_name: str, message: str) -> None:
        super().__init__(f"{path}: {field_name}: {message}")
        self.path, self.field, self.reason = path, field_name, message


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


# -- reading -----------------------------------------------------------------------------


def _json_of(path: Path, raw: bytes, where: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CardError(path, where, f"not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise CardError(path, where, "a card is a JSON object")
    return value


def _from_png(path: Path) -> dict[str, Any]:
    from PIL import Image, PngImagePlugin

    # Pillow refuses text chunks over 1 MB (a guard against decompression bombs); a card
    # with a big lorebook needs more, and MAX_CARD_BYTES still bounds it.
    PngImagePlugin.MAX_TEXT_CHUNK = MAX_CARD_BYTES
    try:
        with Image.open(path) as image:
            if image.format != "PNG":
                raise CardError(path, "(file)", f"not a PNG image ({image.format})")
            chunks = dict(getattr(image, "text", {}) or {})
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise CardError(path, "(file)", f"not a readable PNG ({exc})") from None
    for chunk in ("ccv3", "chara"):
        if chunk in chunks:
            try:
                raw = base64.b64decode(chunks[chunk], validate=False)
            except (binascii.Error, ValueError) as exc:
                raise CardError(path, f"{chunk} chunk", f"not base64 ({exc})") from None
            return _json_of(path, raw, f"{chunk} chunk")
    raise CardError(path, "(file)", "a PNG without a character card (no ccv3 or chara chunk)")


def _from_charx(path: Path) -> dict[str, Any]:
    try:
        with zipfile.ZipFile(path) as archive:
            try:
                info = archive.getinfo("card.json")
            except KeyError:
                raise CardError(path, "card.json", "the CHARX archive has no card.json") from None
            if info.file_size > MAX_CARD_BYTES:
                raise CardError(path, "card.json", f"larger than {MAX_CARD_BYTES >> 20} MB")
            raw = archive.read(info)
    except zipfile.BadZipFile as exc:
        raise CardError(path, "(file)", f"not a CHARX (zip) archive ({exc})") from None
    return _json_of(path, raw, "card.json")


def read_card(path: Path) -> dict[str, Any]:
    """The card's JSON object, from any of the three containers (chosen by content)."""
    if not path.is_file():
        raise CardError(path, "(file)", "no such file")
    if path.stat().st_size > MAX_CARD_BYTES * 2:
        raise CardError(path, "(file)", f"larger than {MAX_CARD_BYTES >> 19} MB")
    head = path.read_bytes()[:8]
    if head.startswith(b"\x89PNG"):
        return _from_png(path)
    if head.startswith(b"PK"):
        return _from_charx(path)
    return _json_of(path, path.read_bytes(), "(file)")


def card_data(path: Path, card: dict[str, Any]) -> tuple[CardData, str]:
    """The card's data and its spec (V1 cards have their fields at the top level)."""
    spec = str(card.get("spec", "chara_card_v1"))
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


# -- card → persona ----------------------------------------------------------------------

_CHAR = re.compile(r"\{\{char\}\}|<BOT>", re.IGNORECASE)
_USER = re.compile(r"\{\{user\}\}|<USER>", re.IGNORECASE)
_START = re.compile(r"^\s*<START>\s*$", re.IGNORECASE | re.MULTILINE)


def resolve_macros(text: str, name: str) -> str:
    return _USER.sub(PLAYER_WORDS, _CHAR.sub(name, text)).strip()


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


def _personality(text: str) -> list[str]:
    parts = [p.strip() for p in re.split(r"[,;\n]", text) if p.strip()]
    return parts if all(len(p) <= 80 for p in parts) else [text.strip()] if text.strip() else []


def _lore_entry(
    entry: BookEntry, index: int, name: str, used: set[str], npc_id: str, exported_as: str
) -> dict[str, Any]:
    """One book entry as a lorebook entry. Its id is the NPC's id and the entry's own name
    (ids are unique in a world, and several cards may name an entry "kraken"); an entry
    this engine exported (``exported_as``: the NPC's id then) keeps its name."""
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
    if local and local != "npc" and wanted not in used and re.match(LORE_ID_PATTERN, wanted):
        out["id"] = wanted
        used.add(wanted)
    if keys:
        out["keys"] = keys[:32]
    if entry.constant:
        out["always"] = True
    if entry.priority is not None:
        out["priority"] = max(-100, min(100, entry.priority))
    for key in ("reveal_when", "known_by"):
        if ours.get(key):
            out[key] = ours[key]
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


def card_to_persona(path: Path, npc_id: str | None = None) -> ImportedCard:
    """A persona (as YAML-ready data) and its lorebook file from the card at ``path``."""
    data, spec = card_data(path, read_card(path))
    name = data.name.strip()
    engine = data.extensions.get(ENGINE_KEY)
    engine = dict(engine) if isinstance(engine, dict) else {}
    notes: list[str] = []
    persona: dict[str, Any] = {}
    exported_as = str(engine.pop("id", "") or "")
    chosen_id = npc_id or exported_as or _slug(name)
    if not re.match(NPC_ID_PATTERN, chosen_id):
        raise CardError(path, "data.name", "cannot make an NPC id of it; pass --id")
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
    # Persona fields carried by an exported card come back as they were.
    for key, value in engine.items():
        if key in Persona.model_fields and key not in persona:
            persona[key] = value

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
    book = data.character_book
    if book is not None:
        used: set[str] = set()
        entries = [
            _lore_entry(e, index, name, used, chosen_id, exported_as)
            for index, e in enumerate(e for e in book.entries if e.enabled and e.content.strip())
        ]
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
    return ImportedCard(persona, lore, notes)


# -- persona → card ----------------------------------------------------------------------


def _as_card_text(text: str, name: str) -> str:
    """The engine's words back into the card's macros (import turns them back again)."""
    text = re.sub(rf"\b{re.escape(PLAYER_WORDS)}\b", "{{user}}", text)
    return re.sub(rf"(?<!\w){re.escape(name)}(?!\w)", "{{char}}", text)


def persona_to_card(persona: Persona, lore: list[WorldLore]) -> dict[str, Any]:
    """A V3 card of ``persona``; ``lore``: the entries of its own lorebook (known by it)."""
    name = persona.name
    extensions = dict(persona.extensions)
    kept = dict(extensions.pop(CARD_KEY, {}) or {})
    kept.pop("spec", None)
    book_settings = dict(kept.pop("character_book", {}) or {})
    disabled = list(book_settings.pop("disabled_entries", []) or [])
    unparsed = list(kept.pop("unparsed_examples", []) or [])
    engine = persona.model_dump(mode="json", exclude=CARD_MAPPED, exclude_defaults=True)
    engine["id"] = persona.id
    engine["role"] = persona.role
    extensions[ENGINE_KEY] = engine
    blocks = [
        f"{{{{user}}}}: {_as_card_text(e.player, name)}\n{{{{char}}}}: {_as_card_text(e.npc, name)}"
        for e in persona.example_dialogue
    ] + unparsed
    data: dict[str, Any] = {
        "name": name,
        "description": _as_card_text(persona.description, name),
        "personality": _as_card_text(", ".join(persona.personality), name),
        "scenario": _as_card_text(persona.scenario, name),
        "first_mes": _as_card_text(persona.greeting, name),
        "mes_example": "\n".join(f"<START>\n{block}" for block in blocks),
        "creator_notes": persona.creator_notes,
        "system_prompt": kept.pop("system_prompt", ""),
        "post_history_instructions": kept.pop("post_history_instructions", ""),
        "alternate_greetings": [_as_card_text(g, name) for g in persona.alternate_greetings],
        "tags": list(persona.tags),
        "creator": kept.pop("creator", ""),
        "character_version": kept.pop("character_version", ""),
        "extensions": extensions,
        "group_only_greetings": kept.pop("group_only_greetings", []),
    }
    data.update(kept)  # V3 and unknown fields the import kept
    if lore or disabled or book_settings:
        entries = [_book_entry(entry, index, persona) for index, entry in enumerate(lore)]
        data["character_book"] = {**book_settings, "entries": entries + disabled}
    return {"spec": "chara_card_v3", "spec_version": "3.0", "data": data}


def _book_entry(entry: WorldLore, index: int, persona: Persona) -> dict[str, Any]:
    kept = dict(entry.extensions)
    decorators = [str(line) for line in kept.pop("decorators", []) or []]
    ours: dict[str, Any] = {"id": entry.id}
    if entry.reveal_when:
        ours["reveal_when"] = entry.reveal_when
    if entry.known_by and entry.known_by != [persona.id]:
        ours["known_by"] = list(entry.known_by)
    out: dict[str, Any] = {
        "keys": list(entry.keys),
        "content": "\n".join([*decorators, _as_card_text(entry.text, persona.name)]),
        "extensions": {**dict(kept.pop("extensions", {}) or {}), ENGINE_KEY: ours},
        "enabled": True,
        "insertion_order": index,
        "constant": entry.constant,
        "priority": entry.priority,
    }
    out.update(kept)  # what the import kept of the card's entry (its name, order, flags)
    return out


def write_card_json(card: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n")


def write_card_png(card: dict[str, Any], avatar: Path, path: Path) -> None:
    """The avatar re-saved as PNG with the card in ``ccv3`` (V3) and ``chara`` (the same
    card labelled V2, for readers that know only that chunk)."""
    from PIL import Image, PngImagePlugin

    v2 = {**card, "spec": "chara_card_v2", "spec_version": "2.0"}
    info = PngImagePlugin.PngInfo()
    info.add_text("chara", base64.b64encode(json.dumps(v2).encode()).decode("ascii"))
    info.add_text("ccv3", base64.b64encode(json.dumps(card).encode()).decode("ascii"))
    try:
        with Image.open(avatar) as image:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG", pnginfo=info)
    except (OSError, ValueError) as exc:
        raise CardError(avatar, "(file)", f"not a readable image ({exc})") from None
    path.write_bytes(buffer.getvalue())
