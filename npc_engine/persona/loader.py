"""Load a folder of persona files, reporting every problem as ``file:line: field: message``."""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from npc_engine.persona.model import LoreFile, Persona, World, WorldLore
from npc_engine.persona.yaml_source import Location, ParsedYaml, dotted, parse_yaml_file

WORLD_FILE = "world.yaml"
LORE_FOLDER = "lore"  # beside world.yaml: lorebook files, not personas
PERSONA_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class PersonaProblem:
    file: Path
    line: int
    field: str
    message: str
    warning: bool = False  # the file loads; the writer should still look (validate)

    def __str__(self) -> str:
        kind = "warning: " if self.warning else ""
        return f"{self.file}:{self.line}: {self.field}: {kind}{self.message}"


@dataclass
class LoadedPersona:
    persona: Persona
    path: Path
    world: World | None

    @property
    def id(self) -> str:
        assert self.persona.id is not None
        return self.persona.id


@dataclass
class PersonaRegistry:
    """The personas that loaded cleanly, plus every problem found on the way."""

    personas: dict[str, LoadedPersona] = field(default_factory=dict)
    worlds: dict[Path, World] = field(default_factory=dict)
    problems: list[PersonaProblem] = field(default_factory=list)

    def get(self, npc_id: str) -> LoadedPersona | None:
        return self.personas.get(npc_id)

    def ids(self) -> list[str]:
        return sorted(self.personas)


def _model_fields_at(model: type[BaseModel], location: Location) -> list[str] | None:
    """Field names of the model that sits at ``location`` inside ``model`` (for "did you mean")."""
    current: Any = model
    for part in location:
        if isinstance(current, type) and issubclass(current, BaseModel):
            info = current.model_fields.get(str(part))
            if info is None:
                return None
            current = info.annotation
        else:
            current = _element_type(current)
        current = _unwrap_optional(current)
    current = _unwrap_optional(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return None


def _unwrap_optional(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(members) == 1:
            return _unwrap_optional(members[0])
    if origin is typing.Annotated:
        return _unwrap_optional(typing.get_args(annotation)[0])
    return annotation


def _element_type(annotation: Any) -> Any:
    args = typing.get_args(annotation)
    return args[-1] if args else None


def _problems_from_validation(
    path: Path, parsed: ParsedYaml, model: type[BaseModel], exc: ValidationError
) -> list[PersonaProblem]:
    problems = []
    for error in exc.errors():
        location: Location = tuple(error["loc"])
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            known = _model_fields_at(model, location[:-1]) or []
            guess = difflib.get_close_matches(str(location[-1]), known, n=1, cutoff=0.6)
            message = "unknown field"
            if guess:
                message += f"; did you mean '{guess[0]}'?"
            elif known:
                message += f" (allowed: {', '.join(known)})"
        elif error["type"] == "missing":
            message = "required field is missing"
        elif error["type"] == "value_error":  # our own validators already say what was wrong
            message = message.removeprefix("Value error, ")
        elif "input" in error and error["type"] not in ("string_too_short",):
            shown = repr(error["input"])
            if len(shown) > 60:
                shown = shown[:57] + "..."
            message = f"{message} (got {shown})"
        line = parsed.line_of(location)
        problems.append(PersonaProblem(path, line, dotted(location), message))
    return problems


def validate_yaml_file(
    path: Path, model: type[BaseModel]
) -> tuple[Any, ParsedYaml, list[PersonaProblem]]:
    """Parse a YAML file and validate it; every problem carries file, line and field."""
    parsed = parse_yaml_file(path)
    problems: list[PersonaProblem] = [
        PersonaProblem(path, p.line, p.field, p.message) for p in parsed.problems
    ]
    if parsed.data is None:
        return None, parsed, problems
    data = parsed.data
    if model is Persona and isinstance(data, dict) and "id" not in data:
        data = {**data, "id": path.stem}
    try:
        instance = model.model_validate(data)
    except ValidationError as exc:
        problems.extend(_problems_from_validation(path, parsed, model, exc))
        return None, parsed, problems
    return (instance if not problems else None), parsed, problems


def _find_world(persona_path: Path, root: Path, worlds: dict[Path, World | None]) -> World | None:
    folder = persona_path.parent
    while True:
        if folder in worlds:
            return worlds[folder]
        if folder == root or folder.parent == folder:
            return None
        folder = folder.parent


def is_lore_file(path: Path, root: Path) -> bool:
    return LORE_FOLDER in path.relative_to(root).parts[:-1]


def persona_files(paths: Iterable[Path]) -> tuple[list[tuple[Path, Path]], list[PersonaProblem]]:
    """Expand folders into ``(file, root)`` pairs (lorebook files not among them); missing
    paths become problems."""
    found: list[tuple[Path, Path]] = []
    problems: list[PersonaProblem] = []
    for path in paths:
        if path.is_dir():
            for candidate in sorted(path.rglob("*")):
                if (
                    candidate.suffix in PERSONA_SUFFIXES
                    and candidate.is_file()
                    and not is_lore_file(candidate, path)
                ):
                    found.append((candidate, path))
        elif path.is_file():
            found.append((path, path.parent))
        else:
            problems.append(PersonaProblem(path, 1, "(document)", "no such file or folder"))
    return found, problems


def lore_files(world_path: Path) -> list[Path]:
    folder = world_path.parent / LORE_FOLDER
    if not folder.is_dir():
        return []
    return [p for p in sorted(folder.rglob("*")) if p.suffix in PERSONA_SUFFIXES and p.is_file()]


def _with_lorebook(
    world: World, world_path: Path, parsed: ParsedYaml, problems: list[PersonaProblem]
) -> World:
    """The world with the entries of its lorebook files after its own lore. A broken file
    is reported and left out; the rest loads. Entry ids must be unique in the world."""
    entries: list[WorldLore] = list(world.lore)
    where: dict[str, tuple[Path, int]] = {
        entry.id or "": (world_path, parsed.line_of(("lore", index)))
        for index, entry in enumerate(world.lore)
    }
    folder = world_path.parent / LORE_FOLDER
    for path in lore_files(world_path):
        book, book_parsed, book_problems = validate_yaml_file(path, LoreFile)
        problems.extend(book_problems)
        if book is None:
            continue
        stem = ".".join(path.relative_to(folder).with_suffix("").parts)
        for index, entry in enumerate(book.resolved(stem)):
            line = book_parsed.line_of(("entries", index))
            first = where.get(entry.id or "")
            if first is not None:
                problems.append(
                    PersonaProblem(
                        path,
                        line,
                        dotted(("entries", index, "id")),
                        f"duplicate lore id {entry.id!r} (also at {first[0]}:{first[1]})",
                    )
                )
                continue
            where[entry.id or ""] = (path, line)
            entries.append(entry)
    return world.model_copy(update={"lore": entries}) if len(entries) > len(world.lore) else world


def load_personas(paths: Path | Sequence[Path]) -> PersonaRegistry:
    """Load every persona under ``paths``. Broken files are reported and skipped; good ones load."""
    roots = [paths] if isinstance(paths, Path) else list(paths)
    registry = PersonaRegistry()
    files, registry.problems = persona_files(roots)

    worlds: dict[Path, World | None] = {}
    world_paths = [(f, r) for f, r in files if f.name == WORLD_FILE]
    for world_path, _root in world_paths:
        world, parsed, problems = validate_yaml_file(world_path, World)
        registry.problems.extend(problems)
        if world is not None:
            world = _with_lorebook(world, world_path, parsed, registry.problems)
        worlds[world_path.parent] = world
        if world is not None:
            registry.worlds[world_path] = world

    candidates: list[tuple[LoadedPersona, ParsedYaml]] = []
    declared: set[str] = set()
    for persona_path, root in files:
        if persona_path.name == WORLD_FILE:
            continue
        persona, parsed, problems = validate_yaml_file(persona_path, Persona)
        registry.problems.extend(problems)
        raw_id = parsed.data.get("id") if isinstance(parsed.data, dict) else None
        declared.add(str(raw_id) if raw_id else persona_path.stem)
        if persona is not None:
            world = _find_world(persona_path, root, worlds)
            candidates.append((LoadedPersona(persona, persona_path, world), parsed))

    by_id: dict[str, list[tuple[LoadedPersona, ParsedYaml]]] = {}
    for loaded, parsed in candidates:
        by_id.setdefault(loaded.id, []).append((loaded, parsed))
    for npc_id, entries in by_id.items():
        if len(entries) > 1:
            for loaded, parsed in entries:
                others = ", ".join(str(e[0].path) for e in entries if e[0] is not loaded)
                registry.problems.append(
                    PersonaProblem(
                        loaded.path,
                        parsed.line_of(("id",)),
                        "id",
                        f"duplicate id {npc_id!r} (also used by {others}); ids must be unique",
                    )
                )
            continue
        registry.personas[npc_id] = entries[0][0]

    # Relationship targets are checked against every id that was declared, even by a file
    # that failed for another reason, so one broken file does not cascade into many errors.
    for loaded, parsed in candidates:
        if loaded.id not in registry.personas:
            continue
        for target in loaded.persona.relationships:
            if target not in declared:
                guess = difflib.get_close_matches(target, sorted(declared), n=1, cutoff=0.6)
                hint = f"; did you mean '{guess[0]}'?" if guess else ""
                registry.problems.append(
                    PersonaProblem(
                        loaded.path,
                        parsed.line_of(("relationships", target)),
                        f"relationships.{target}",
                        f"no NPC with id {target!r} is defined{hint}",
                    )
                )
                registry.personas.pop(loaded.id, None)
    registry.problems.sort(key=lambda p: (str(p.file), p.line))
    return registry
