"""Personas to Character Cards: ``npc-engine export NPC_ID``. A V3 card as JSON, or as a
PNG carrying ``ccv3`` and, for older readers, ``chara`` (the same card labelled V2). A
persona's fields that cards lack travel in the card's ``extensions.npc_engine``; what an
import kept aside (``cards.py``) is given back."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path
from typing import Any

from npc_engine.card_files import CardError
from npc_engine.cards import CARD_KEY, CARD_MAPPED, ENGINE_KEY, PLAYER_WORDS
from npc_engine.persona.model import (
    Persona,
    WorldLore,
)


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
