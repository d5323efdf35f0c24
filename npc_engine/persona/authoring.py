"""Aids for writers: a persona skeleton (``npc-engine new``), what ``validate`` warns about
beyond schema errors (stable-prefix size, secrets told by the persona's own text), and
writing imported cards out as persona and lorebook files."""

from __future__ import annotations

import os
import re
import textwrap
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from npc_engine.errors import NpcEngineError
from npc_engine.persona.loader import (
    LORE_FOLDER,
    WORLD_FILE,
    LoadedPersona,
    PersonaProblem,
    PersonaRegistry,
)
from npc_engine.persona.model import NPC_ID_PATTERN, Persona
from npc_engine.persona.yaml_source import parse_yaml_file

SCHEMA_COMMENT = "# yaml-language-server: $schema={}\n"
# validate warns when the stable prefix leaves the conversation less than this share of n_ctx
MIN_CONVERSATION_SHARE = 0.5
LEAK_MIN_WORDS = 2  # rare words of a secret found together in one public text

# What ``new`` writes for each field (commented out unless required): an example a writer
# edits. Descriptions come from the model itself, so they never drift from the schema.
EXAMPLES: dict[str, Any] = {
    "id": None,
    "name": "New Character",
    "role": "What they do in the world, e.g. Blacksmith of the harbour",
    "description": "Their backstory in the third person: where they come from, what shaped them.",
    "personality": ["gruff", "kind to children"],
    "speech_style": "Short sentences, sailor's oaths, never says please.",
    "scenario": "It is market day and the forge is busy.",
    "greeting": "Mind the sparks. What do you need?",
    "alternate_greetings": ["Back again? The forge is hot, be quick."],
    "knowledge": [
        "The mine road is flooded since the spring rains.",
        {"text": "The smugglers pay in foreign silver.", "reveal_when": "trust >= 40"},
    ],
    "secrets": [{"text": "They forged the Duke's seal for the smugglers.", "keys": ["seal"]}],
    "trust": 0,
    "factions": ["The Fog Runners"],
    "deflections": ["That's not for strangers' ears."],
    "goals": ["Pay off the debt to the moneylender."],
    "relationships": {"other_npc_id": "Owes them money."},
    "example_dialogue": [{"player": "Can you fix my sword?", "npc": "Leave it. Tomorrow."}],
    "mood": "neutral",
    "fallback_lines": ["Hm. Give me a moment."],
    "generation": {"temperature": 0.7},
    "actions": [{"name": "give_item", "description": "hand the player an item"}],
    "creator_notes": "Notes for other writers.",
    "tags": ["smith", "harbour"],
    "extensions": {"my_tool": {"voice": "gruff_male_2"}},
}


def schema_ref(name: str, folder: Path) -> str:
    """The JSON Schema shipped with the package, as a path from ``folder`` (what the YAML
    language server reads for completion and checks)."""
    from npc_engine.schemas import committed_schema_path

    return os.path.relpath(committed_schema_path(name).resolve(), folder.resolve())


def _comment(text: str) -> str:
    return "".join(f"# {line}\n" for line in textwrap.wrap(text, 88))


def skeleton(npc_id: str, schema_path: str) -> str:
    """A persona file with every field explained in place: the required ones filled with
    placeholders (the file validates as written), the others commented out."""
    if not re.fullmatch(NPC_ID_PATTERN, npc_id):
        raise NpcEngineError(f"{npc_id!r} is not a valid NPC id (letters, digits, _ and -)")
    out = [SCHEMA_COMMENT.format(schema_path), f"# A persona for {npc_id}; see docs/personas.md.\n"]
    for name, info in Persona.model_fields.items():
        description = info.description or ""
        if name == "id":
            out.append("\n" + _comment(description) + f"id: {npc_id}\n")
            continue
        example = EXAMPLES.get(name, info.get_default(call_default_factory=True))
        block = yaml.safe_dump({name: example}, sort_keys=False, allow_unicode=True, width=88)
        if not info.is_required():
            block = "".join(f"# {line}\n" for line in block.splitlines())
        out.append("\n" + _comment(description) + block)
    return "".join(out)


# -- validate: warnings ------------------------------------------------------------------


def _public_texts(persona: Persona) -> list[tuple[str, str]]:
    """What the NPC may say freely, by field: where a secret's words must not be."""
    texts = [("greeting", persona.greeting), ("scenario", persona.scenario)]
    texts += [(f"alternate_greetings.{i}", g) for i, g in enumerate(persona.alternate_greetings)]
    texts += [(f"knowledge.{i}", fact.text) for i, fact in enumerate(persona.knowledge)]
    texts += [
        (f"example_dialogue.{i}", f"{e.player}\n{e.npc}")
        for i, e in enumerate(persona.example_dialogue)
    ]
    return [(where, text) for where, text in texts if text]


_WORD = re.compile(r"[A-Za-z][A-Za-z'-]+")


def secret_leaks(loaded: LoadedPersona) -> list[PersonaProblem]:
    """A secret the persona's own greeting, knowledge or examples already tell: one of its
    declared keys, or two or more of its rare words, in one of those texts."""
    from wordfreq import zipf_frequency

    from npc_engine.guard import RARE_ZIPF

    persona = loaded.persona
    parsed = parse_yaml_file(loaded.path)
    warnings = []
    for index, secret in enumerate(persona.secrets):
        rare = {
            w.lower()
            for w in _WORD.findall(secret.text)
            if len(w) >= 4 and zipf_frequency(w.lower(), "en") < RARE_ZIPF
        }
        for where, text in _public_texts(persona):
            lower = text.lower()
            # Declared keys are what the guard checks; without them, the rare words are.
            keys = [k for k in secret.keys if re.search(_phrase(k), lower)]
            words = {w.lower() for w in _WORD.findall(text)}
            shared = [] if secret.keys else sorted(rare & words)
            if keys or len(shared) >= LEAK_MIN_WORDS:
                told = ", ".join(repr(w) for w in (keys or shared))
                warnings.append(
                    PersonaProblem(
                        loaded.path,
                        parsed.line_of(tuple(_location(where))),
                        f"secrets.{index}",
                        f"{where} says {told}, words of this secret: the NPC may tell it, "
                        "and the guard cannot tell the secret's words from its own",
                        warning=True,
                    )
                )
    return warnings


def _phrase(key: str) -> str:
    return rf"(?<!\w){re.escape(key.lower())}(?!\w)"


def _location(dotted: str) -> list[str | int]:
    return [int(part) if part.isdigit() else part for part in dotted.split(".")]


class _TemplateOnly:
    """What PromptBuilder needs of a generator to render a prompt: the chat template and a
    context size (no weights are loaded: the GGUF's vocabulary only)."""

    def __init__(self, chat: Any, n_ctx: int) -> None:
        self.chat, self.n_ctx = chat, n_ctx

    def render(self, messages: Any, shared: int = 0) -> Any:
        return self.chat.render(messages, shared)


def prefix_sizes(
    registry: PersonaRegistry, model_path: Path, chat_format: str | None, n_ctx: int
) -> dict[str, int]:
    """Each NPC's stable prompt prefix (world, persona, examples) in the model's tokens,
    rendered by the same builder and template as a real turn."""
    from llama_cpp import Llama
    from llama_cpp._utils import suppress_stdout_stderr

    from npc_engine.generation.llama import ChatModel
    from npc_engine.prompt import PromptBuilder

    with suppress_stdout_stderr(disable=False):  # llama.cpp's own notes on a vocab-only load
        llama = Llama(model_path=str(model_path), vocab_only=True, verbose=False)
    builder = PromptBuilder(_TemplateOnly(ChatModel(llama, model_path, chat_format), 1 << 20))  # type: ignore[arg-type]
    names = {npc_id: p.persona.name for npc_id, p in registry.personas.items()}
    sizes = {}
    for npc_id, loaded in sorted(registry.personas.items()):
        built = builder.build(
            persona=loaded.persona,
            world=loaded.world,
            names=names,
            history=[],
            memories=[],
            context={},
            player_id="player",
            player_text="Hello.",
            max_tokens=1,
            now=datetime.now(UTC),
        )
        sizes[npc_id] = built.rendered.head_tokens
    return sizes


def prefix_warnings(
    registry: PersonaRegistry, sizes: dict[str, int], n_ctx: int
) -> list[PersonaProblem]:
    warnings = []
    for npc_id, size in sizes.items():
        if size > n_ctx * (1 - MIN_CONVERSATION_SHARE):
            loaded = registry.personas[npc_id]
            warnings.append(
                PersonaProblem(
                    loaded.path,
                    1,
                    "(persona)",
                    f"its stable prompt prefix is {size} tokens, leaving the conversation, "
                    f"memories and lore less than {MIN_CONVERSATION_SHARE:.0%} of n_ctx={n_ctx}: "
                    "shorten it, move world lore into lorebook entries, or raise n_ctx",
                    warning=True,
                )
            )
    return warnings


# -- writing imported cards --------------------------------------------------------------


def _yaml_text(schema: str, header: str, data: dict[str, Any]) -> str:
    body = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)
    return SCHEMA_COMMENT.format(schema) + header + body


def write_persona_files(
    out: Path,
    persona: dict[str, Any],
    lore: dict[str, Any] | None,
    source: str,
    *,
    force: bool = False,
    say: Callable[[str], None] = print,
) -> list[Path]:
    """``OUT/<id>.yaml`` and, for a card with a lorebook, ``OUT/lore/<id>.yaml`` (and a
    minimal ``world.yaml`` when ``OUT`` has none, since lore files belong to a world).
    Existing files are kept unless ``force``."""
    npc_id = persona["id"]
    persona_path = out / f"{npc_id}.yaml"
    targets = [persona_path]
    lore_path = out / LORE_FOLDER / f"{npc_id}.yaml"
    world_path = out / WORLD_FILE
    if lore is not None:
        targets.append(lore_path)
    existing = [p for p in targets if p.exists()]
    if existing and not force:
        raise NpcEngineError(
            f"{existing[0]} exists; pass --force to overwrite it, or --id for another id"
        )
    out.mkdir(parents=True, exist_ok=True)
    header = f"# Imported from {source}; see docs/lore.md for what maps where.\n"
    out.mkdir(parents=True, exist_ok=True)
    persona_path.write_text(_yaml_text(schema_ref("persona", out), header, persona))
    written = [persona_path]
    if lore is not None:
        lore_path.parent.mkdir(exist_ok=True)
        lore_path.write_text(_yaml_text(schema_ref("lore", lore_path.parent), header, lore))
        written.append(lore_path)
        if not world_path.exists():
            world = {
                "name": f"{persona['name']}'s world",
                "setting": persona.get("scenario") or f"The world of {persona['name']}.",
            }
            world_path.write_text(_yaml_text(schema_ref("world", out), header, world))
            written.append(world_path)
            say(f"note: {world_path} written (lorebook files belong to a world); edit it")
    return written


def own_lore(loaded: LoadedPersona) -> list[Any]:
    """The lorebook entries that are this NPC's own (known by it alone): what a card of it
    carries as its character book."""
    if loaded.world is None:
        return []
    return [entry for entry in loaded.world.lore if entry.known_by == [loaded.id]]


def check_written(paths: Sequence[Path]) -> list[str]:
    """Problems ``validate`` would report for the folder the files were written to."""
    from npc_engine.persona.loader import load_personas

    folder = paths[0].parent
    return [str(p) for p in load_personas(folder).problems]
