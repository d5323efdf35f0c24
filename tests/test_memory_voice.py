"""Designer questions asked in the player's own voice (issue 30, memory queries)."""

from __future__ import annotations

import pytest

from npc_engine.memory.voice import player_voice


@pytest.mark.parametrize(
    ("designer", "player"),
    [
        ("what is the player's name?", "What is my name?"),
        ("Where is the player from?", "Where am I from?"),
        ("What does the player's sister do?", "What does my sister do?"),
        ("How much money does the player owe?", "How much money do I owe?"),
        ("Has the player ever met the Duke?", "Have I ever met the Duke?"),
        ("Who raised the player?", "Who raised me?"),
        ("What did the player tell you about the mayor?", "What did I tell you about the mayor?"),
        ("The player carries a compass.", "I carry a compass."),
        ("What is the traveller afraid of?", "What am I afraid of?"),
    ],
)
def test_third_person_questions_become_the_players_own(designer: str, player: str) -> None:
    assert player_voice(designer) == player


def test_questions_not_about_the_player_are_unchanged() -> None:
    for query in ("Who is the mayor?", "What happened at the pier?", "players of dice"):
        assert player_voice(query) == query
