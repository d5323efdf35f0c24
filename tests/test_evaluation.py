"""Character fidelity (issue 30): the checks on written replies, the committed evaluation
set, and a bounded run of it on the default model (what the player hears)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from npc_engine.evaluation import (
    Conversation,
    EvalTurn,
    Expect,
    ends_by_itself,
    judge,
    load_eval_set,
    loops_within,
    names,
    out_of_character,
    repeated_from,
    score,
)
from npc_engine.model_registry import DEFAULT_CHAT_MODEL
from tests.conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import eval as eval_tool

pytestmark = pytest.mark.timeout(60)


def test_names_are_whole_words_whatever_the_case() -> None:
    assert names("Aye, Zephyrine. I remember.", "zephyrine")
    assert names("You came in from lantern bay, love.", "Lantern Bay")
    assert not names("Zephyrines are birds.", "Zephyrine")
    assert names("I'm Tom Hale, the watch.", "Tom Hale")
    assert not names("Tomorrow, perhaps.", "Tom")


def test_assistant_talk_and_out_of_world_words_are_out_of_character() -> None:
    assert out_of_character("As an AI language model, I cannot help.") != []
    assert out_of_character("How can I assist you today?") == ["how can i assist you"]
    assert out_of_character("I'll send you an email.", ["email", "radio"]) == ["email"]
    assert out_of_character("Five bits a night, love. Supper included.", ["email"]) == []


def test_a_reply_ends_by_itself_at_a_sentence_end() -> None:
    assert ends_by_itself("Five bits, love.", "stop")
    assert ends_by_itself('She said "go home."', "stop")
    assert ends_by_itself("*wipes the counter*", "stop")
    assert not ends_by_itself("Five bits, love.", "length")
    assert not ends_by_itself("Five bits and", "stop")
    assert not ends_by_itself("", "stop")


def test_loops_and_repeats_are_caught() -> None:
    assert loops_within("Aye, the fog is thick. Aye, the fog is thick.") != []
    assert loops_within("the fog the fog the fog the fog the fog the fog") != []
    assert loops_within("Fog again. Ale or a room? I'll fetch the key.") == []
    earlier = ["One left upstairs, love. Five bits a night."]
    assert repeated_from("Aye. One left upstairs, love!", earlier) == ["one left upstairs love"]
    assert repeated_from("Aye. Five bits.", earlier) == []  # too short to count


def conversation(*turns: EvalTurn) -> Conversation:
    return Conversation(id="c", npc="mara", turns=list(turns))


def test_judge_and_score_a_conversation() -> None:
    told = EvalTurn(say="My name is Zephyrine.", tells="name")
    filler = EvalTurn(say="Cold night.")
    asked = EvalTurn(
        say="What was my name?", expect=Expect(kind="uses_told", names_any=["Zephyrine"])
    )
    chat = conversation(told, filler, filler, asked)
    examples = ["One left upstairs, love. Five bits, and supper's fish stew."]
    good = judge(chat, 3, "Zephyrine, love.", "stop", earlier_replies=[], examples=examples,
                 out_of_world=[])  # fmt: skip
    bad = judge(
        chat,
        3,
        "One left upstairs, love. Five bits, and supper's fish stew.",
        "stop",
        earlier_replies=[],
        examples=examples,
        out_of_world=[],
    )
    assert good.passed and good.named
    echo = judge(chat, 1, "Cold night. Cold night for you, love.", "stop", earlier_replies=[],
                 examples=examples, out_of_world=[])  # fmt: skip
    assert echo.echoed == [] and echo.loops == []  # two words: too short to count
    said_back = judge(chat, 0, "My name is Zephyrine. Welcome.", "stop", earlier_replies=[],
                      examples=examples, out_of_world=[])  # fmt: skip
    assert said_back.echoed == ["my name is zephyrine"] and not said_back.passed
    assert not bad.passed and bad.named is False and bad.parroted
    filler_verdict = judge(chat, 1, "Aye, and colder tomorrow", "length", earlier_replies=[],
                           examples=examples, out_of_world=[])  # fmt: skip
    assert filler_verdict.kind is None and not filler_verdict.ended
    scores = score([good, bad, filler_verdict])
    assert scores.by_kind["uses_told"] == (1, 2)
    assert scores.parroted == 1 and scores.ends_by_itself == pytest.approx(2 / 3)
    # A bounded run keeps the shape with fewer filler turns before the question.
    assert [t.say for t in chat.with_filler(1).turns] == [
        "My name is Zephyrine.",
        "Cold night.",
        "What was my name?",
    ]


def test_the_committed_set_covers_every_sample_npc_and_kind() -> None:
    evaluation = load_eval_set(eval_tool.EVAL_SET)
    turns = [t for c in evaluation.conversations for t in c.turns]
    assert len(turns) >= 150
    assert {c.npc for c in evaluation.conversations} == {"mara", "guard_tom", "wren", "ysolde"}
    kinds = [t.expect.kind for t in turns if t.expect is not None]
    assert kinds.count("uses_told") >= 16 and kinds.count("knows_self") >= 16
    assert len({c.id for c in evaluation.conversations}) == len(evaluation.conversations)
    # Every told fact is asked back after exactly 10 filler turns (K = 10).
    for chat in evaluation.conversations:
        told = [i for i, t in enumerate(chat.turns) if t.tells]
        asked = [i for i, t in enumerate(chat.turns) if t.expect and t.expect.kind == "uses_told"]
        assert [a - t for t, a in zip(told, asked, strict=True)] == [11] * len(told), chat.id


# The bounded run: each NPC's first identity conversation (name, role, home) and two
# told-and-asked facts with two filler turns between. Thresholds are the measured shares
# of the default model on this subset (docs/models.md) less a margin for other builds.
BOUNDED = [
    "mara-identity-1",
    "guard_tom-identity-1",
    "wren-identity-1",
    "ysolde-identity-1",
    "mara-fact-name",
    "wren-fact-name",
]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_default_model_stays_in_character_knows_itself_and_uses_what_it_was_told(
    tmp_path: Path,
) -> None:
    chats = [
        c.with_filler(2) for c in load_eval_set(eval_tool.EVAL_SET).conversations if c.id in BOUNDED
    ]
    run = eval_tool.play(DEFAULT_CHAT_MODEL, chats, tmp_path / "data", progress=False)
    failed = "\n".join(
        f"{v.conversation}[{v.turn}] {v.said!r} -> {v.reply!r}"
        for v in run.verdicts
        if not v.passed
    )
    scores = run.scores
    # Measured on this subset (docs/models.md): in character 24/24, knows itself 10/12,
    # uses what it was told 2/2, 2 replies with a loop, 23/24 ended by itself, on an AMD
    # EPYC (AVX2). On an Intel Xeon with AVX-512 the same greedy run knew itself 6/12
    # (2026-12-07): llama.cpp's kernels differ per CPU, and so do the greedy replies.
    assert scores.in_character == 1.0, failed
    assert scores.share("knows_self") >= 6 / 12, failed
    assert scores.share("uses_told") >= 0.5, failed
    assert scores.loops <= 4, failed
    assert scores.ends_by_itself >= 0.85, failed
