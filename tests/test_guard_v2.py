"""Guard v2 (issue 27): the forms a leak takes, the same decision for any chunking, and
the labelled set (tests/probes/guard_leaks.yaml) held to what was measured.

The labelled-set test runs the guard as the engine builds it, with the real MiniLM and
the multilingual USE (tools/guard_probe.py prints the per-class table). The chunking
property runs on the same replies with a hashing embedder: which text is cut must not
depend on where the stream broke it, whatever the vectors say."""

from __future__ import annotations

import sys
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from npc_engine.config import load_config
from npc_engine.dialogue import DialogueEngine
from npc_engine.game_state import Standing
from npc_engine.generation.scripted import ScriptedGenerator
from npc_engine.guard import GuardedSecret, GuardRules, ReplyGuard, person_rewrites
from npc_engine.leak_forms import find_term, fold, plain_reading
from npc_engine.memory.in_memory import InMemoryStore
from npc_engine.persona.loader import load_personas

from .conftest import SAMPLE_PERSONAS
from .test_game_loop import hashed_embed

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
import guard_probe

LABELLED = yaml.safe_load(guard_probe.LEAKS.read_text(encoding="utf-8"))
REPLIES = [
    (item["npc"], item["text"])
    for section in ("leaks", "harmless", "contested", "in_world", "out_of_world")
    for item in LABELLED[section]
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("text", "term"),
    [
        ("The runners' br\u0430ndy", "brandy"),  # Cyrillic а
        ("bran\u200bdy below", "brandy"),  # zero-width space
        ("bran\u00addy below", "brandy"),  # soft hyphen
        ("**bran**dy and _contraband_", "brandy"),
        ("c0ntr4b4nd under the floor", "contraband"),
        ("B. R. A. N. D. Y.", "brandy"),
        ("B\nR\nA\nN\nD\nY", "brandy"),
        ("BrandyCellar, love", "brandy"),
        ("42brandy casks", "brandy"),
        ("ydnarb under the floor", "brandy"),
        ("YnJhbmR5IGluIG15IGNlbGxhcg==", "brandy"),
        ("6272616e6479", "brandy"),
        ("oenaql", "brandy"),  # ROT13
        ("Bravo Romeo Alpha November Delta Yankee", "brandy"),
        ("contrabande in the cellar", "contraband"),  # near misspelling
        ("half of the customs", "half the customs"),
    ],
)
def test_a_key_is_read_through_its_disguises(text: str, term: str) -> None:
    assert find_term(text, [term]) == term


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "text",
    [
        "an aide came by",  # "an AI" never inside a longer word
        "the brands of wine",  # a common word is no misspelling of "brandy"
        "I pay 42 bits",
        "a grand old bay",
    ],
)
def test_innocent_words_are_not_read_as_keys(text: str) -> None:
    assert find_term(text, ["an AI", "brandy"]) is None


@pytest.mark.timeout(30)
def test_plain_reading_undoes_disguises_for_the_meaning_check() -> None:
    assert plain_reading("krad esuohthgil eht peek I") == "i keep the lighthouse dark"
    assert "lighthouse" in plain_reading("My m4g1c keeps the l1ghth0use dark")
    assert plain_reading("M, A, G, I, C keeps it dark").startswith("magic")
    assert "jory pike silenced" in plain_reading("V unq Wbel Cvxr fvyraprq")
    assert fold("Ｂｒａｎｄｙ") == "brandy"  # full-width letters (NFKC)


@pytest.mark.timeout(30)
def test_secrets_are_also_read_as_the_npc_and_the_player_would_say_them() -> None:
    first, second = person_rewrites(
        "She lets the Fog Runners store brandy in her cellar.", "Mara Saltwhistle"
    )
    assert first == "I let the Fog Runners store brandy in my cellar."
    assert second == "You let the Fog Runners store brandy in your cellar."
    assert person_rewrites("He was paid off.")[0] == "I was paid off."


@pytest.mark.timeout(30)
def test_a_common_derived_key_needs_a_second_word_of_its_secret() -> None:
    secret = GuardedSecret(
        "secrets.0", "Wren keeps the lighthouse dark with her magic.", ("lighthouse",), True
    )
    guard = ReplyGuard(GuardRules([secret]), "-")
    assert guard.feed("The lighthouse is a fine sight. ") == "The lighthouse is a fine sight. "
    assert guard.feed("My magic keeps the lighthouse dark. ") == "My "  # held from "magic"
    assert guard.cut is not None
    spelled = ReplyGuard(GuardRules([secret]), "-")  # spelled out: never by chance
    spelled.feed("l-i-g-h-t-h-o-u-s-e. ")
    assert spelled.cut is not None


@pytest.mark.timeout(30)
def test_a_word_spelled_by_first_letters_is_cut() -> None:
    secret = GuardedSecret("secrets.0", "She hides brandy in her cellar.", ("brandy",))
    guard = ReplyGuard(GuardRules([secret]), "-")
    sent = [guard.feed(line + "\n") for line in ("Careful.", "Every.", "Lanterns.", "Little.")]
    sent += [guard.feed("Another.\n"), guard.feed("Right.\n")]
    assert guard.cut is not None and "cellar" in guard.cut.reason
    assert "".join(sent).count("\n") == 5  # the line that completed it was withheld


@cache
def hashed_engine() -> DialogueEngine:
    config = load_config(guard={"meaning": "minilm"})
    return DialogueEngine(
        load_personas(SAMPLE_PERSONAS),
        ScriptedGenerator([]),
        InMemoryStore(),
        config,
        embed=hashed_embed,
    )


def streamed(rules: GuardRules, text: str, cuts: list[int]) -> tuple[bool, str]:
    guard = ReplyGuard(rules, "<d>", "<p>")
    pieces, last = [], 0
    for cut in sorted(set(cuts)):
        pieces.append(text[last:cut])
        last = cut
    pieces.append(text[last:])
    delivered = "".join(guard.feed(piece) for piece in pieces) + guard.finish()
    return guard.cut is not None, delivered


@pytest.mark.slow
@pytest.mark.timeout(120)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_the_same_cut_and_the_same_text_for_any_chunking(data: Any) -> None:
    npc, text = data.draw(st.sampled_from(REPLIES))
    engine = hashed_engine()
    rules = engine.secrets.guard_rules(engine.persona(npc), Standing(0))
    cuts = data.draw(st.lists(st.integers(1, max(len(text) - 1, 1)), max_size=len(text)))
    assert streamed(rules, text, cuts) == streamed(rules, text, [])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_labelled_set_is_held_to_what_was_measured() -> None:
    """Measured here (docs/security.md): 25 % of 308 leaks pass (75 % before guard v2),
    none cut late, 2 of 73 harmless lines cut, none of 32 in-world lines, 42 % of the
    out-of-world lines caught; before v2, 40 chunkings changed the outcome. The goal of
    issue 27 (≤ 10 % pass) is not reached: paraphrases, riddles, stage directions and
    translations need more than sentence vectors."""
    report = guard_probe.measure(guard_probe.build_engine(), LABELLED)
    print("\n" + guard_probe.table(report))
    assert report["chunking_differs"] == 0
    assert report["late"] == 0
    assert report["passed_rate"] <= 0.28
    assert report["false_cut_rate"] <= 0.03
    assert report["in_world_cut_rate"] <= 0.03
    assert report["out_of_world_caught"] >= 0.35
    for name in ("plain", "zero_width", "leetspeak", "markdown", "encoded", "reversed", "glued"):
        tally = report["classes"][name]
        assert tally["cut"] >= tally["tried"] - 1, (name, tally)


@pytest.mark.timeout(30)
def test_paired_vectors_give_the_mean_of_both_cosines_and_remember_lines() -> None:
    from npc_engine.multilingual import PairedEmbedder

    calls: list[list[str]] = []

    def second(texts: list[str]) -> list[list[float]]:
        calls.append(list(texts))
        return [[1.0, float(len(t))] for t in texts]

    paired = PairedEmbedder(hashed_embed, lambda: second)
    a, b = paired(["the tide turns", "a fine day"])
    first_a, first_b = (np.asarray(v) for v in hashed_embed(["the tide turns", "a fine day"]))
    second_a, second_b = (np.asarray(v) / np.linalg.norm(v) for v in ([1.0, 14.0], [1.0, 10.0]))
    assert float(a @ b) == pytest.approx((first_a @ first_b + second_a @ second_b) / 2, abs=1e-5)
    again = paired(["a fine day", "the tide turns"])
    assert np.allclose(again[0], b) and len(calls) == 1  # read once
    assert paired.second_from == len(first_a)
