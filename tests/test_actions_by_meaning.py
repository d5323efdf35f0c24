"""Game actions chosen by meaning (issue 30): the embedder decides clear lines from the
actions' examples, the model only close calls; measured on the two labelled sets."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from npc_engine.actions import (
    LabelledLine,
    choose_by_meaning,
    fill_args,
    labelled_lines,
    numbers_in,
)
from npc_engine.persona.loader import load_personas
from npc_engine.persona.model import GameActionSpec
from tests.conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import action_probe

GIVE = GameActionSpec.model_validate(
    {
        "name": "give_item",
        "description": "hand the player something",
        "params": {"item": ["room_key", "ale"]},
        "examples": [
            {"say": "I need a bed.", "args": {"item": "room_key"}},
            {"say": "Pour me one.", "args": {"item": "ale"}},
        ],
    }
)
PAY = GameActionSpec.model_validate(
    {
        "name": "take_payment",
        "description": "accept coins",
        "params": {"bits": {"min": 1, "max": 100}},
        "examples": ["Here's my coin."],
    }
)


def test_numbers_in_digits_and_words() -> None:
    assert numbers_in("Here are five bits, and 12 more") == [5, 12]
    assert numbers_in("twenty-five bits, or a dozen eggs") == [25, 12]
    assert numbers_in("No money here.") == []


def test_arguments_come_from_the_line_then_from_the_nearest_example() -> None:
    lines = labelled_lines([GIVE])
    ale_first = [lines[1], lines[0]]
    assert fill_args(GIVE, "Give me the room key.", ale_first) == {"item": "room_key"}
    assert fill_args(GIVE, "Something to drink?", ale_first) == {"item": "ale"}
    assert fill_args(PAY, "Take twelve bits.", []) == {"bits": 12}
    assert fill_args(PAY, "Take 500 bits.", []) is None  # out of range: the model decides
    assert fill_args(PAY, "Take my coin.", []) is None


def unit(*values: float) -> list[float]:
    norm = sum(v * v for v in values) ** 0.5
    return [v / norm for v in values]


def test_clear_lines_are_decided_close_calls_go_to_the_model() -> None:
    lines = [LabelledLine(GIVE, "I need a bed.", {"item": "room_key"}), LabelledLine(PAY, "coin")]
    vectors = [unit(1, 0, 0), unit(0, 1, 0)]
    settings = {"near": 0.35, "accept": 0.5, "margin": 0.05}
    clear = choose_by_meaning("A bed, please.", unit(1, 0.1, 0), lines, vectors, **settings)
    assert clear.decided and clear.action is not None
    assert (clear.action.name, clear.action.args) == ("give_item", {"item": "room_key"})
    far = choose_by_meaning("Nice weather.", unit(0, 0, 1), lines, vectors, **settings)
    assert far.decided and far.action is None
    close = choose_by_meaning("A bed for coin?", unit(1, 0.95, 0), lines, vectors, **settings)
    assert not close.decided and [a.name for a in close.ask] == ["give_item", "take_payment"]
    # Near one action but its argument unknown: the model is asked about that one only.
    no_amount = choose_by_meaning("My coin.", unit(0, 1, 0), lines, vectors, **settings)
    assert not no_amount.decided and [a.name for a in no_amount.ask] == ["take_payment"]


def test_an_example_naming_an_undeclared_value_is_refused_with_file_and_line(
    tmp_path: Path,
) -> None:
    (tmp_path / "innkeeper.yaml").write_text(
        "name: Ina\nrole: Innkeeper\ndescription: Runs the inn.\nactions:\n"
        "  - name: give_item\n    description: hand something over\n"
        "    params:\n      item: [ale]\n    examples:\n"
        "      - {say: 'A sword, please.', args: {item: sword}}\n"
    )
    registry = load_personas(tmp_path)
    assert not registry.personas
    problem = str(registry.problems[0])
    assert "innkeeper.yaml" in problem and "sword" in problem and "actions" in problem


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_embedder_alone_on_both_labelled_sets(tmp_path: Path) -> None:
    """Real MiniLM, real Chroma, scripted replies: close calls count as no action here.
    Thresholds: tools/action_probe.py's table in docs/models.md, less a small margin."""
    labelled, held_out = action_probe.probe_engine(None, tmp_path / "data")
    assert labelled.right / labelled.total >= 0.78, labelled.wrong
    assert labelled.false_actions == 0, labelled.wrong
    assert held_out.right / held_out.total >= 0.55, held_out.wrong
    assert held_out.false_actions / held_out.quiet <= 0.1, held_out.wrong
    assert labelled.decided / labelled.total >= 0.75  # most lines need no model call
