from __future__ import annotations

from npc_engine.expression import EMOTIONS, infer_action, infer_emotion, mood_emotion


def test_emotion_follows_the_strongest_cue() -> None:
    assert infer_emotion("How dare you! Get out of my inn, you fool.") == "angry"
    assert infer_emotion("Welcome, welcome! Lovely to see you, ha!") == "happy"
    assert infer_emotion("Hmm. Why do you ask, stranger?") == "suspicious"
    assert infer_emotion("Alas, he died at sea. I miss him.") == "sad"


def test_cues_are_whole_words_with_their_endings() -> None:
    # Words that merely contain a cue carry no emotion of their own.
    for text in [
        "A crusade, you say.",  # sad
        "What a hideous coat.",  # hide
        "The deadline is dawn.",  # dead
        "Lostwithiel is north.",  # lost
        "Sadler sells saddles.",  # sad
    ]:
        assert infer_emotion(text) == "neutral", text
    # Inflected cues still count.
    assert infer_emotion("She smiled and laughed.") == "happy"
    assert infer_emotion("He hides in the cellar, trembling.") == "afraid"
    assert infer_emotion("Ha! Good one.") == "happy"


def test_without_cues_the_persona_mood_decides() -> None:
    assert infer_emotion("The room is upstairs.", "busy but friendly") == "happy"
    assert infer_emotion("The room is upstairs.", "tense") == "suspicious"
    assert infer_emotion("The room is upstairs.", None) == "neutral"
    assert mood_emotion("calm") == "neutral"
    assert all(infer_emotion(t) in EMOTIONS for t in ["", "?!", "oh! really? what?!"])


def test_stage_directions_become_actions() -> None:
    assert infer_action("Here. *slides a brass key across the counter* Room three.") == {
        "type": "gesture",
        "description": "slides a brass key across the counter",
    }
    assert infer_action("No directions here.") is None
    assert infer_action("A lone * star") is None
