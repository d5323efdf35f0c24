from __future__ import annotations

from datetime import UTC, datetime, timedelta

from npc_engine.config import RetrievalConfig
from npc_engine.memory.importance import rate_importance
from npc_engine.memory.in_memory import InMemoryStore
from npc_engine.memory.scoring import recency_of, score_candidates
from npc_engine.memory.types import Candidate, Memory

NOW = datetime(2026, 11, 29, 12, tzinfo=UTC)


def memory(
    text: str, hours_ago: float = 0, importance: int = 3, player: str | None = "p1"
) -> Memory:
    when = NOW - timedelta(hours=hours_ago)
    return Memory(
        npc_id="mara", player_id=player, text=text, importance=importance, created_at=when
    )


def test_recency_decays_per_hour_like_the_paper() -> None:
    assert recency_of(NOW, NOW, 0.995) == 1.0
    assert abs(recency_of(NOW - timedelta(hours=138), NOW, 0.995) - 0.5) < 0.01


# The score's arithmetic, without the relevance bar (test_the_relevance_bar below).
UNGATED = {"min_relevance": -1.0, "min_relevance_small_talk": -1.0}


def test_relevance_importance_and_recency_all_count() -> None:
    config = RetrievalConfig(**UNGATED)
    relevant = Candidate(memory("name is Aria", hours_ago=5, importance=8), 0.6)
    recent_noise = Candidate(memory("weather talk", hours_ago=0, importance=2), 0.1)
    scored = score_candidates([recent_noise, relevant], NOW, config)
    assert [s.memory.text for s in scored] == ["name is Aria", "weather talk"]
    weights_recency_only = RetrievalConfig(
        weight_relevance=0, weight_importance=0, weight_recency=1, **UNGATED
    )
    assert (
        score_candidates([relevant, recent_noise], NOW, weights_recency_only)[0].memory.text
        == "weather talk"
    )


def test_tiny_spreads_are_not_stretched() -> None:
    config = RetrievalConfig(weight_relevance=0, weight_importance=0, weight_recency=1, **UNGATED)
    a = Candidate(memory("a", hours_ago=0.001), 0.5)
    b = Candidate(memory("b", hours_ago=0.0), 0.5)
    scores = [s.score for s in score_candidates([a, b], NOW, config)]
    assert max(scores) - min(scores) < 0.01


def test_importance_rules() -> None:
    assert rate_importance("My name is Aria") == 8
    assert rate_importance("I promise to pay you back") == 7
    assert rate_importance("They killed my brother") == 9
    assert rate_importance("nice weather") == 2
    assert rate_importance("What ale do you have on tap today?") == 3


def test_in_memory_store_keeps_players_apart() -> None:
    store = InMemoryStore()
    store.add(
        [
            memory("Aria's secret", player="aria"),
            memory("Bo's secret", player="bo"),
            memory("world news", player=None),
        ]
    )
    seen_by_bo = {c.memory.text for c in store.search("mara", "bo", "secret news", 10)}
    assert seen_by_bo == {"Bo's secret", "world news"}
    assert {m.text for m in store.recent("mara", None, 10)} == {"world news"}


def test_the_same_words_remembered_twice_take_one_place() -> None:
    """A stock reply stored every turn must not fill the recalled slots (recall probe at
    K=50: 53/60 facts in the top 3 with repeats, 60/60 without)."""
    config = RetrievalConfig(**UNGATED)
    repeats = [
        Candidate(memory("Fish, onions and whatever the gulls didn't steal.", hours_ago=h), 0.5)
        for h in (0.1, 0.2, 0.3)
    ]
    fact = Candidate(memory("I used to be a bell founder.", hours_ago=2), 0.45)
    scored = score_candidates([*repeats, fact], NOW, config)
    texts = [s.memory.text for s in scored]
    assert texts.count("Fish, onions and whatever the gulls didn't steal.") == 1
    assert scored[0].memory is repeats[0].memory  # the best-scored copy (the newest) stays
    assert "I used to be a bell founder." in texts[:2]


def test_the_relevance_bar_is_higher_for_what_says_nothing_about_the_player() -> None:
    config = RetrievalConfig()
    said = Memory(npc_id="mara", text='The player p1 told me: "I grew up on a farm."')
    asked = Memory(npc_id="mara", text='The player p1 told me: "Is it going to rain?"')
    answered = Memory(npc_id="mara", text='I answered the player p1: "Always, love."')
    summary = Memory(npc_id="mara", text="Earlier talk with the player p1", kind="summary")
    fact = Memory(npc_id="mara", text="The player p1's name is Rook.", kind="fact")
    event = Memory(npc_id="mara", text="A storm broke the pier.", kind="event")
    middling = (config.min_relevance + config.min_relevance_small_talk) / 2
    kept = score_candidates(
        [Candidate(m, middling) for m in (said, asked, answered, summary, fact, event)],
        NOW,
        config,
    )
    assert {s.memory.text for s in kept} == {said.text, fact.text, event.text}
    below = score_candidates([Candidate(said, config.min_relevance - 0.01)], NOW, config)
    assert below == []
    vague = score_candidates([Candidate(event, config.min_relevance_events)], NOW, config)
    assert [s.memory.text for s in vague] == [event.text]  # the game's events: a lower bar
    assert config.min_relevance_events < config.min_relevance
    close = score_candidates([Candidate(asked, config.min_relevance_small_talk)], NOW, config)
    assert [s.memory.text for s in close] == [asked.text]
