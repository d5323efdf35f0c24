"""Persona files: every problem reported as file:line: field: message; good files still load."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from npc_engine.persona.loader import load_personas
from npc_engine.schemas import committed_schema_path, schema_text
from tests.conftest import run_cli

GOOD = """\
name: Ann
role: Baker
description: Bakes bread.
"""


def write(folder: Path, name: str, text: str | bytes) -> Path:
    path = folder / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def messages(folder: Path) -> list[str]:
    return [str(p) for p in load_personas(folder).problems]


def test_sample_personas_are_valid(sample_personas: Path) -> None:
    registry = load_personas(sample_personas)
    assert registry.problems == []
    assert len(registry.personas) >= 4
    assert all(p.world is not None for p in registry.personas.values())
    assert all(p.persona.secrets for p in registry.personas.values())


def test_samples_cover_every_field(sample_personas: Path) -> None:
    import yaml

    from npc_engine.persona.model import Persona

    used: set[str] = set()
    for path in sample_personas.glob("*.yaml"):
        if path.name != "world.yaml":
            used |= set(yaml.safe_load(path.read_text()))
    assert set(Persona.model_fields) - used == set()


def test_misspelled_key_gets_line_and_suggestion(tmp_path: Path) -> None:
    write(tmp_path, "ann.yaml", GOOD + "personalty: [kind]\n")
    (problem,) = messages(tmp_path)
    assert (
        problem
        == f"{tmp_path / 'ann.yaml'}:4: personalty: unknown field; did you mean 'personality'?"
    )


def test_nested_misspelling_and_wrong_type(tmp_path: Path) -> None:
    write(
        tmp_path,
        "ann.yaml",
        GOOD
        + "generation:\n  temprature: 0.5\n  max_tokens: lots\n"
        + "example_dialogue:\n  - player: hi\n    npx: hello\n",
    )
    found = messages(tmp_path)
    path = tmp_path / "ann.yaml"
    assert f"{path}:5: generation.temprature: unknown field; did you mean 'temperature'?" in found
    assert any(m.startswith(f"{path}:6: generation.max_tokens: ") and "integer" in m for m in found)
    assert f"{path}:9: example_dialogue[0].npx: unknown field; did you mean 'npc'?" in found
    assert f"{path}:8: example_dialogue[0].npc: required field is missing" in found


def test_empty_name_missing_field_and_bad_yaml(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", 'name: "  "\nrole: Baker\n')
    write(tmp_path, "b.yaml", "name: Bob\nrole: [unclosed\n")
    found = messages(tmp_path)
    assert any(m.startswith(f"{tmp_path / 'a.yaml'}:1: name: ") for m in found)
    assert f"{tmp_path / 'a.yaml'}:1: description: required field is missing" in found
    assert any(m.startswith(f"{tmp_path / 'b.yaml'}:") and "invalid YAML" in m for m in found)


def test_not_a_mapping_non_utf8_and_duplicate_keys(tmp_path: Path) -> None:
    write(tmp_path, "list.yaml", "- name: Ann\n")
    write(
        tmp_path, "latin.yaml", "name: Ann\nrole: Baker\ndescription: caf\xe9\n".encode("latin-1")
    )
    write(tmp_path, "dup.yaml", GOOD + "name: Anna\n")
    found = messages(tmp_path)
    assert any("list.yaml:1: (document): expected a mapping" in m for m in found)
    assert any("latin.yaml:3: (document): file is not UTF-8" in m for m in found)
    assert any("dup.yaml:4: name: duplicate key (first given on line 1)" in m for m in found)


def test_huge_file_and_alias_bomb_fail_fast(tmp_path: Path) -> None:
    write(tmp_path, "huge.yaml", GOOD + "knowledge:\n" + "  - a fact worth knowing\n" * 20000)
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for level in range(1, 12):
        prev = f"*a{level - 1}"
        lines.append(f"a{level}: &a{level} [{', '.join([prev] * 10)}]")
    write(tmp_path, "bomb.yaml", "\n".join(lines) + "\nname: Bob\n")
    started = time.perf_counter()
    found = messages(tmp_path)
    assert time.perf_counter() - started < 5
    assert any("huge.yaml:1: (document): file is" in m and "limited" in m for m in found)
    assert any("bomb.yaml:1: (document): file expands to more than" in m for m in found)


def test_self_referencing_alias_and_deep_nesting_are_reported(tmp_path: Path) -> None:
    write(tmp_path, "cycle.yaml", GOOD + "knowledge: &loop [*loop]\n")
    write(tmp_path, "deep.yaml", GOOD + "knowledge: " + "[" * 5000 + "]" * 5000 + "\n")
    write(tmp_path, "nested.yaml", GOOD + "knowledge: " + "[" * 80 + "]" * 80 + "\n")
    found = messages(tmp_path)
    assert any(m.startswith(f"{tmp_path / 'cycle.yaml'}:4: knowledge") for m in found), found
    assert any("cycle.yaml" in m and "refers to the value that contains it" in m for m in found)
    assert any("deep.yaml:1: (document): nested more than" in m for m in found), found
    assert any("nested.yaml:4: knowledge[0]" in m and "nested more than" in m for m in found)


def test_duplicate_ids_and_unknown_relationship(tmp_path: Path) -> None:
    write(tmp_path, "ann.yaml", GOOD)
    write(tmp_path, "other.yaml", "id: ann\n" + GOOD)
    write(
        tmp_path,
        "cal.yaml",
        GOOD.replace("Ann", "Cal") + "relationships:\n  an:\n    attitude: likes\n",
    )
    registry = load_personas(tmp_path)
    found = [str(p) for p in registry.problems]
    assert any("other.yaml:1: id: duplicate id 'ann'" in m for m in found)
    assert any("ann.yaml:1: id: duplicate id 'ann'" in m for m in found)
    assert any(
        "cal.yaml:5: relationships.an: no NPC with id 'an' is defined; did you mean 'ann'?" in m
        for m in found
    )
    assert registry.personas == {}


def test_good_files_load_beside_broken_ones(tmp_path: Path) -> None:
    write(tmp_path, "ann.yaml", GOOD)
    write(tmp_path, "bad.yaml", GOOD + "moood: sad\n")
    registry = load_personas(tmp_path)
    assert list(registry.personas) == ["ann"]
    assert len(registry.problems) == 1


def test_world_file_applies_to_its_folder(tmp_path: Path) -> None:
    write(tmp_path, "world.yaml", "name: Dale\nsetting: A valley.\nrules: [no guns]\n")
    write(tmp_path, "ann.yaml", GOOD)
    loaded = load_personas(tmp_path).personas["ann"]
    assert loaded.world is not None and loaded.world.rules == ["no guns"]


def test_validate_cli_reports_everything_and_exits_1(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", GOOD + "goalz: [x]\n")
    write(tmp_path, "b.yaml", "name: [\n")
    result = run_cli("validate", str(tmp_path))
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    assert f"{tmp_path / 'a.yaml'}:4: goalz: unknown field; did you mean 'goals'?" in result.stdout
    assert f"{tmp_path / 'b.yaml'}:" in result.stdout


@pytest.mark.slow
def test_validate_cli_accepts_samples(sample_personas: Path) -> None:
    result = run_cli("validate", str(sample_personas))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK: 4 persona(s)" in result.stdout


@pytest.mark.parametrize("name", ["persona", "world", "lore"])
def test_committed_schema_is_fresh(name: str) -> None:
    assert committed_schema_path(name).read_text() == schema_text(name), (
        f"run: npc-engine schema {name} > {committed_schema_path(name)}"
    )
    schema = json.loads(schema_text(name))
    assert schema["additionalProperties"] is False


def test_sample_files_reference_the_schema(sample_personas: Path) -> None:
    for path in sample_personas.glob("*.yaml"):
        first = path.read_text().splitlines()[0]
        assert first.startswith("# yaml-language-server: $schema=../npc_engine/schemas/")
        target = (path.parent / first.split("=", 1)[1]).resolve()
        assert target.is_file()
