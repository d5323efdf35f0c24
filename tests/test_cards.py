"""Character Card V1/V2/V3 import (JSON, PNG, CHARX) and V3 export (issue 14, part 2)."""

from __future__ import annotations

import base64
import copy
import json
import shutil
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image, PngImagePlugin

from npc_engine.card_export import persona_to_card
from npc_engine.card_files import CardError, read_card
from npc_engine.cards import card_to_persona
from npc_engine.persona.authoring import own_lore, write_persona_files
from npc_engine.persona.loader import load_personas

from .conftest import SAMPLE_PERSONAS, run_cli

pytestmark = pytest.mark.timeout(120)


def card_v2() -> dict[str, Any]:
    return {
        "spec": "chara_card_v2",
        "spec_version": "2.0",
        "data": {
            "name": "Captain Brine",
            "description": "{{char}} is an old pirate who lost a leg to a shark. "
            "{{char}} distrusts {{user}} on sight.",
            "personality": "gruff, loyal, superstitious",
            "scenario": "{{char}} sits by the fire of a harbour tavern.",
            "first_mes": "Another landlubber. What do you want, {{user}}?",
            "mes_example": "<START>\n{{user}}: Tell me about the sea.\n{{char}}: The sea "
            "takes what it wants.\n<START>\n{{user}}: Got any rum?\n{{char}}: Always.\n"
            "And it's mine.\n<START>\nJust a note with no speakers.",
            "creator_notes": "Made for the tests.",
            "system_prompt": "You are Captain Brine.",
            "post_history_instructions": "Stay gruff.",
            "alternate_greetings": ["Arr. Sit down, {{user}}."],
            "tags": ["pirate", "tavern"],
            "creator": "tester",
            "character_version": "1.2",
            "extensions": {"talkativeness": "0.5", "depth_prompt": {"prompt": "x", "depth": 4}},
            "character_book": {
                "name": "Brine's book",
                "scan_depth": 3,
                "token_budget": 400,
                "extensions": {},
                "entries": [
                    {
                        "keys": ["kraken", "sea beast"],
                        "content": "@@depth 4\n{{char}} says the kraken sleeps under Gull Point.",
                        "extensions": {"probability": 100},
                        "enabled": True,
                        "insertion_order": 10,
                        "priority": 5,
                        "name": "Kraken",
                        "selective": True,
                        "secondary_keys": ["deep"],
                    },
                    {
                        "keys": [],
                        "content": "Rum is paid for in silver.",
                        "extensions": {},
                        "enabled": True,
                        "insertion_order": 1,
                        "constant": True,
                    },
                    {
                        "keys": ["ghost"],
                        "content": "An entry the writer turned off.",
                        "extensions": {},
                        "enabled": False,
                        "insertion_order": 2,
                    },
                ],
            },
        },
    }


def card_v3() -> dict[str, Any]:
    card = card_v2()
    card["spec"], card["spec_version"] = "chara_card_v3", "3.0"
    card["data"]["nickname"] = "Old Brine"
    card["data"]["group_only_greetings"] = []
    card["data"]["assets"] = [{"type": "icon", "uri": "ccdefault:", "name": "main", "ext": "png"}]
    card["data"]["character_book"]["entries"][0]["use_regex"] = False
    return card


def encoded(card: dict[str, Any]) -> str:
    return base64.b64encode(json.dumps(card).encode()).decode("ascii")


def encoded_text(text: str) -> str:
    return base64.b64encode(text.encode()).decode("ascii")


def write_png(path: Path, **chunks: str) -> Path:
    info = PngImagePlugin.PngInfo()
    for name, value in chunks.items():
        info.add_text(name, value)
    Image.new("RGB", (8, 8), (200, 40, 40)).save(path, format="PNG", pnginfo=info)
    return path


def write_charx(path: Path, card: dict[str, Any] | None) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        if card is not None:
            archive.writestr("card.json", json.dumps(card))
        archive.writestr("assets/icon/images/main.png", b"\x89PNG fake")
    return path


def imported_folder(tmp_path: Path, card_path: Path, name: str = "out") -> Path:
    """Import into a copy of the sample world (so the card's lore joins Saltwhistle's)."""
    folder = tmp_path / name
    if not folder.exists():
        shutil.copytree(SAMPLE_PERSONAS, folder)
    imported = card_to_persona(card_path)
    write_persona_files(
        folder, imported.persona, imported.lore, card_path.name, say=lambda _m: None
    )
    return folder


def test_v2_json_maps_every_field_and_keeps_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "brine.json"
    path.write_text(json.dumps(card_v2()))
    imported = card_to_persona(path)
    persona, lore = imported.persona, imported.lore
    assert persona["id"] == "captain_brine"
    assert persona["description"].startswith("Captain Brine is an old pirate")
    assert "distrusts the player" in persona["description"]
    assert persona["personality"] == ["gruff", "loyal", "superstitious"]
    assert persona["scenario"] == "Captain Brine sits by the fire of a harbour tavern."
    assert persona["greeting"] == "Another landlubber. What do you want, the player?"
    assert persona["alternate_greetings"] == ["Arr. Sit down, the player."]
    assert persona["example_dialogue"] == [
        {"player": "Tell me about the sea.", "npc": "The sea takes what it wants."},
        {"player": "Got any rum?", "npc": "Always.\nAnd it's mine."},
    ]
    assert persona["creator_notes"] == "Made for the tests."
    assert persona["tags"] == ["pirate", "tavern"]
    kept = persona["extensions"]
    assert kept["talkativeness"] == "0.5" and kept["depth_prompt"]["depth"] == 4
    card = kept["card"]
    assert card["system_prompt"] == "You are Captain Brine."
    assert card["post_history_instructions"] == "Stay gruff."
    assert card["creator"] == "tester" and card["character_version"] == "1.2"
    assert card["unparsed_examples"] == ["Just a note with no speakers."]
    assert card["character_book"]["name"] == "Brine's book"
    assert card["character_book"]["disabled_entries"][0]["content"].startswith("An entry")
    assert "{{" not in json.dumps({k: v for k, v in persona.items() if k != "extensions"})
    assert lore is not None and lore["known_by"] == ["captain_brine"]
    kraken, rum = lore["entries"]
    assert kraken["id"] == "captain_brine.kraken" and kraken["keys"] == ["kraken", "sea beast"]
    assert kraken["priority"] == 5 and kraken["text"].startswith("Captain Brine says")
    assert kraken["extensions"]["secondary_keys"] == ["deep"]
    assert kraken["extensions"]["decorators"] == ["@@depth 4"]  # not in the text
    assert rum["always"] is True
    assert any("role" in note for note in imported.notes)


@pytest.mark.slow  # runs the CLI in a subprocess
def test_imported_card_validates_with_its_lorebook(tmp_path: Path) -> None:
    path = tmp_path / "brine.json"
    path.write_text(json.dumps(card_v2()))
    folder = imported_folder(tmp_path, path)
    registry = load_personas(folder)
    assert registry.problems == []
    brine = registry.personas["captain_brine"]
    assert brine.world is not None
    ids = {entry.id for entry in own_lore(brine)}
    assert ids == {"captain_brine.kraken", "captain_brine.1"}
    result = run_cli("validate", "--no-sizes", str(folder))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK: 5 persona(s)" in result.stdout


def test_v1_card_fields_at_the_top_level(tmp_path: Path) -> None:
    path = tmp_path / "v1.json"
    path.write_text(
        json.dumps({"name": "Ferris", "description": "A ferryman.", "first_mes": "Hm?"})
    )
    persona = card_to_persona(path).persona
    assert persona["name"] == "Ferris" and persona["greeting"] == "Hm?"
    assert "extensions" not in persona  # nothing else was in the card


def test_png_cards_v2_and_v3(tmp_path: Path) -> None:
    v2 = write_png(tmp_path / "v2.png", chara=encoded(card_v2()))
    from_v2 = card_to_persona(v2).persona
    json_path = tmp_path / "same.json"
    json_path.write_text(json.dumps(card_v2()))
    assert from_v2 == card_to_persona(json_path).persona

    older = card_v2()
    older["data"]["name"] = "Stale Name"  # readers prefer ccv3 when both are present
    v3 = write_png(tmp_path / "v3.png", chara=encoded(older), ccv3=encoded(card_v3()))
    persona = card_to_persona(v3).persona
    assert persona["name"] == "Captain Brine"
    card = persona["extensions"]["card"]
    assert card["spec"] == "chara_card_v3"
    assert card["nickname"] == "Old Brine" and card["assets"][0]["type"] == "icon"


def test_charx_card(tmp_path: Path) -> None:
    path = write_charx(tmp_path / "brine.charx", card_v3())
    persona = card_to_persona(path).persona
    assert persona["name"] == "Captain Brine"
    assert persona["extensions"]["card"]["spec"] == "chara_card_v3"


@pytest.mark.parametrize(
    ("make", "field", "message"),
    [
        (lambda p: p.write_text("{not json"), "(file)", "not valid JSON"),
        (lambda p: p.write_text("[1, 2]"), "(file)", "a card is a JSON object"),
        (
            lambda p: p.write_text(json.dumps({"spec": "chara_card_v2", "data": {"tags": []}})),
            "data.name",
            "required field is missing",
        ),
        (
            lambda p: p.write_text(json.dumps({"spec": "chara_card_v2", "data": {"name": 3}})),
            "data.name",
            "valid string",
        ),
        (
            lambda p: p.write_text(
                json.dumps({"data": {"name": "X", "character_book": {"entries": [{"keys": 5}]}}})
            ),
            "data.character_book.entries.0.keys",
            "valid list",
        ),
        (lambda p: write_png(p), "(file)", "no ccv3 or chara chunk"),
        (lambda p: write_png(p, chara="%%%not base64%%%"), "chara chunk", "not base64"),
        (lambda p: write_png(p, chara=encoded_text("{oops")), "chara chunk", "not valid JSON"),
        (lambda p: write_charx(p, None), "card.json", "has no card.json"),
    ],
)
def test_malformed_cards_name_file_and_field(
    tmp_path: Path, make: Any, field: str, message: str
) -> None:
    path = tmp_path / "bad.card"
    make(path)
    with pytest.raises(CardError) as caught:
        card_to_persona(path)
    assert caught.value.field == field
    assert message in caught.value.reason
    assert str(caught.value).startswith(f"{path}: {field}: ")


def test_malformed_card_on_the_command_line_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text(json.dumps({"spec": "chara_card_v2", "data": {"description": "no name"}}))
    result = run_cli("import", str(path), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "Traceback" not in result.stdout + result.stderr
    assert f"{path}: data.name: required field is missing" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # runs the CLI in a subprocess
def test_import_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    path = tmp_path / "brine.json"
    path.write_text(json.dumps(card_v2()))
    out = tmp_path / "out"
    first = run_cli("import", str(path), "--out", str(out))
    assert first.returncode == 0, first.stderr
    assert (out / "captain_brine.yaml").is_file() and (out / "lore/captain_brine.yaml").is_file()
    assert (out / "world.yaml").is_file()  # lore files belong to a world: a minimal one
    again = run_cli("import", str(path), "--out", str(out))
    assert again.returncode == 2 and "--force" in again.stderr
    assert run_cli("import", str(path), "--out", str(out), "--force").returncode == 0


def loaded_view(folder: Path, npc_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    registry = load_personas(folder)
    assert registry.problems == []
    loaded = registry.personas[npc_id]
    lore = [entry.model_dump(exclude={"id"}) for entry in own_lore(loaded)]
    return loaded.persona.model_dump(), lore


@pytest.mark.slow  # runs the CLI in a subprocess
@pytest.mark.parametrize("png", [False, True])
def test_import_export_import_round_trips(tmp_path: Path, png: bool) -> None:
    path = write_png(tmp_path / "brine.png", ccv3=encoded(card_v3()))
    first = imported_folder(tmp_path, path, "first")
    before = loaded_view(first, "captain_brine")

    exported = tmp_path / ("export.png" if png else "export.json")
    args = ["export", "captain_brine", "--personas", str(first), "--out", str(exported)]
    if png:
        args += ["--png", str(write_png(tmp_path / "avatar.png"))]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    card = read_card(exported)
    assert card["spec"] == "chara_card_v3" and card["data"]["name"] == "Captain Brine"
    assert "{{char}}" in card["data"]["description"]  # written back in the card's macros
    if png:
        with Image.open(exported) as image:
            assert json.loads(base64.b64decode(image.text["chara"]))["spec"] == "chara_card_v2"

    second = imported_folder(tmp_path, exported, "second")
    assert loaded_view(second, "captain_brine") == before


def test_sample_persona_round_trips_through_a_card(tmp_path: Path) -> None:
    """Our own persona (secrets, trust, relationships, actions...) and its own lore entries
    go out as a card and come back the same."""
    folder = tmp_path / "first"
    shutil.copytree(SAMPLE_PERSONAS, folder)
    book = yaml.safe_load((folder / "lore/saltwhistle.yaml").read_text())
    own = {"known_by": ["ysolde"], "entries": [copy.deepcopy(e) for e in book["entries"][2:4]]}
    for entry in own["entries"]:
        entry["id"] = f"ysolde-{entry['id']}"
    own["entries"][0]["reveal_when"] = "trust >= 20"
    (folder / "lore/ysolde.yaml").write_text(yaml.safe_dump(own))
    before = loaded_view(folder, "ysolde")
    registry = load_personas(folder)
    card = persona_to_card(
        registry.personas["ysolde"].persona, own_lore(registry.personas["ysolde"])
    )
    exported = tmp_path / "ysolde.json"
    exported.write_text(json.dumps(card))
    second = tmp_path / "second"
    shutil.copytree(SAMPLE_PERSONAS, second)
    (second / "ysolde.yaml").unlink()
    imported = card_to_persona(exported)
    write_persona_files(second, imported.persona, imported.lore, "ysolde.json")
    assert loaded_view(second, "ysolde") == before
