"""Consolidation and caps (issue 16, item 5), fast: scripted replies, the in-memory store.
The 1,000-turn goal on real Chroma with MiniLM: test_memory_probes_real.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from npc_engine.dialogue import DialogueEngine
from npc_engine.memory.upkeep import summarize

from .test_memory_facts import make_engine

pytestmark = pytest.mark.timeout(180)
CHATTER = [
    "Busy night tonight?",
    "What's in the stew?",
    "Is it going to rain?",
    "How much is an ale?",
    "The music is nice.",
]
FACTS = [
    ("My horse is called Thistle.", "The player p1's horse is called Thistle."),
    ("I'm allergic to shellfish.", "The player p1 is allergic to shellfish."),
    ("I used to work as a bell founder.", "The player p1 used to be a bell founder."),
]


def talk(engine: DialogueEngine, turns: int, player: str = "p1", facts_every: int = 0) -> None:
    for turn in range(turns):
        if facts_every and turn % facts_every == 0 and turn // facts_every < len(FACTS):
            engine.say("mara", FACTS[turn // facts_every][0], player_id=player)
        else:
            engine.say("mara", CHATTER[turn % len(CHATTER)], player_id=player)


@pytest.mark.slow
def test_a_thousand_turns_fold_into_summaries_and_keep_every_fact(sample_personas: Path) -> None:
    engine = make_engine(sample_personas)
    talk(engine, 1000, facts_every=300)
    engine.writer.flush(60)
    kept = engine.store.of_player("mara", "p1")
    made = 1000 * 2 + len(FACTS)  # each turn: the player's line and the reply; the facts
    summaries = [m for m in kept if m.kind == "summary"]
    print(f"\n1,000 turns: {made} memories made, {len(kept)} kept, {len(summaries)} summaries")
    assert len(kept) <= 0.5 * made
    assert summaries
    facts = {m.text for m in kept if m.kind == "fact" and m.superseded_by is None}
    assert facts == {text for _, text in FACTS}
    # A fact's own line is never folded, and what the player said lives on in summaries.
    assert any("Thistle" in m.text for m in kept if m.kind == "dialogue")
    assert all('"Busy night tonight?"' in m.text for m in summaries)
    assert all(m.importance <= 4 for m in summaries)
    recalled = [m.memory.text for m in engine.recall("mara", "p1", "What's my horse called?", 3)]
    assert "The player p1's horse is called Thistle." in recalled
    engine.close()


def test_the_newest_turns_are_never_folded(sample_personas: Path) -> None:
    engine = make_engine(sample_personas)
    talk(engine, 200)
    engine.writer.flush(30)
    kept = sorted(engine.store.of_player("mara", "p1"), key=lambda m: m.created_at)
    recent = kept[-40:]
    assert all(m.kind == "dialogue" for m in recent)
    assert any(m.kind == "summary" for m in kept)  # older ones were folded
    engine.close()


@pytest.mark.slow
def test_caps_bound_one_player_and_one_npc(sample_personas: Path) -> None:
    engine = make_engine(
        sample_personas,
        memory={"consolidation": {"max_per_player": 50, "max_per_npc": 1000, "every": 20}},
    )
    talk(engine, 400)
    engine.writer.flush(30)
    rules = engine.config.memory.consolidation
    assert len(engine.store.of_player("mara", "p1")) <= rules.max_per_player + rules.every
    for player in range(40):  # 40 players, 40 turns each: 3,200 memories made
        talk(engine, 40, player=f"q{player}")
    engine.writer.flush(30)
    assert engine.store.count("mara") <= rules.max_per_npc + rules.every
    assert engine.store.count("mara") >= 0.9 * rules.max_per_npc  # trimmed, not wiped
    engine.close()


def test_consolidation_can_be_turned_off(sample_personas: Path) -> None:
    engine = make_engine(sample_personas, memory={"consolidation": {"enabled": False}})
    talk(engine, 150)
    engine.writer.flush(30)
    assert len(engine.store.of_player("mara", "p1")) == 300
    engine.close()


def test_a_summary_is_bounded_and_quotes_the_player(sample_personas: Path) -> None:
    engine = make_engine(sample_personas)
    talk(engine, 30)
    engine.writer.flush(10)
    lines = sorted(engine.store.of_player("mara", "p1"), key=lambda m: m.created_at)[:20]
    for line in lines:
        line.content = (line.content or "") + " " + "word " * 40
    summary = summarize("mara", "p1", lines)
    assert len(summary.text) <= 800
    assert summary.kind == "summary" and summary.created_at == lines[-1].created_at
    assert summary.text.startswith("Earlier talk with the player p1 (20 lines): they said")
    engine.close()


def test_a_flood_of_statements_about_oneself_is_bounded_too(sample_personas: Path) -> None:
    """Lines a player says about themself are never folded; the per-player cap still holds
    (a client cannot grow one NPC's store by talking about itself)."""
    engine = make_engine(
        sample_personas, memory={"consolidation": {"max_per_player": 50, "every": 20}}
    )
    engine.say("mara", "My name is Aria.", player_id="p1")
    for turn in range(200):
        engine.say("mara", f"I think thought number {turn} is mine.", player_id="p1")
    engine.writer.flush(30)
    kept = engine.store.of_player("mara", "p1")
    rules = engine.config.memory.consolidation
    assert len([m for m in kept if m.kind != "fact"]) <= rules.max_per_player + rules.every
    assert [m.text for m in kept if m.kind == "fact"] == ["The player p1's name is Aria."]
    engine.close()
