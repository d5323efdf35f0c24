"""Reveal conditions: the expression language, its errors, and persona files that use it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from npc_engine.conditions import ConditionError, GameFacts, parse_condition
from npc_engine.persona.loader import load_personas

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    ("source", "facts", "expected"),
    [
        ("trust >= 40", GameFacts(trust=40), True),
        ("trust >= 40", GameFacts(trust=39), False),
        ("trust >= 40 or flags.quest_pier >= 2", GameFacts(flags={"quest_pier": 2}), True),
        ("trust >= 40 and flags.quest_pier >= 2", GameFacts(trust=50), False),
        ("not flags.betrayed_mara", GameFacts(), True),
        ("not flags.betrayed_mara", GameFacts(flags={"betrayed_mara": True}), False),
        ("flags.paid_room", GameFacts(flags={"paid_room": True}), True),
        ("flags.paid_room", GameFacts(flags={"paid_room": False}), False),
        ("flags.name == 'Rook'", GameFacts(flags={"name": "Rook"}), True),
        ('flags.name != "Rook"', GameFacts(flags={"name": "Aria"}), True),
        ("flags.name == 3", GameFacts(flags={"name": "3"}), False),  # a word is not a number
        ("flags.stage > 1", GameFacts(flags={"stage": "two"}), False),
        ("game_time >= 1440", GameFacts(game_time=2000), True),
        ("game_time >= 1440", GameFacts(), False),  # no clock sent: never true
        ("flags.missing < 3", GameFacts(), False),  # an absent flag compares false
        ("(trust > 10 or flags.a) and not (trust > 90)", GameFacts(trust=50), True),
        ("trust > -20", GameFacts(trust=-10), True),
    ],
)
def test_conditions_evaluate(source: str, facts: GameFacts, expected: bool) -> None:
    assert parse_condition(source).holds(facts) is expected


@pytest.mark.parametrize(
    ("source", "says"),
    [
        ("trust >=", "unexpected the end at column"),
        ("trus > 3", "unknown name 'trus'"),
        ("flags > 2", "write flags.NAME"),
        ("flags.a.b > 2", "unexpected '.'"),
        ('__import__("os").system("x")', "unexpected '('"),
        ("trust >= 40 && flags.x", "unexpected '&'"),
        ("1 < 2 < 3", "unexpected '<'"),
        ("", "empty condition"),
        ("trust > 1 or " * 60 + "trust > 1", "longer than"),
    ],
)
def test_bad_conditions_say_what_is_wrong(source: str, says: str) -> None:
    with pytest.raises(ConditionError, match=says.replace("(", r"\(")):
        parse_condition(source)


def test_a_bad_condition_in_a_persona_is_reported_with_file_line_and_field(
    tmp_path: Path,
) -> None:
    (tmp_path / "mara.yaml").write_text(
        "name: Mara\n"
        "role: Innkeeper\n"
        "description: Runs the inn.\n"
        "knowledge:\n"
        "  - Rooms cost five bits.\n"
        "  - text: The cellar holds brandy.\n"
        "    reveal_when: trust >= 40 or flags.quest_pier >=\n"
        "secrets:\n"
        "  - text: She owes the Fog Runners.\n"
        "    reveal_when: trus > 3\n"
    )
    registry = load_personas(tmp_path)
    problems = [str(p) for p in registry.problems]
    assert problems == [
        f"{tmp_path / 'mara.yaml'}:7: knowledge[1].reveal_when: unexpected the end at column "
        "33 of 'trust >= 40 or flags.quest_pier >='; a condition reads like 'trust >= 40 or "
        "flags.quest_pier >= 2'",
        f"{tmp_path / 'mara.yaml'}:10: secrets[0].reveal_when: unknown name 'trus': use trust, "
        "game_time or flags.NAME",
    ]
    assert "mara" not in registry.personas


def test_the_persona_schema_documents_both_forms_of_an_entry() -> None:
    from npc_engine.schemas import schema_text

    schema = json.loads(schema_text("persona"))
    for field_name, model in (("knowledge", "GatedFact"), ("secrets", "Secret")):
        items = schema["properties"][field_name]["items"]
        kinds = {entry.get("type") or entry["$ref"].rsplit("/", 1)[-1] for entry in items["anyOf"]}
        assert kinds == {"string", model}
    assert "reveal_when" in schema["$defs"]["Secret"]["properties"]
