"""Emotion and action for a finished reply, without slowing the tokens down.

Constraining generation with a grammar makes every token several times slower on a CPU
(llama-cpp-python applies the grammar to the whole vocabulary at each step), and a second
model call would double the latency. Games need only a coarse emotion for an animation or
a portrait and the stage directions the model already writes (``*wipes the counter*``),
so both are read off the finished text: a keyword lexicon and a pattern, a few
microseconds per reply, measured in ``tools/bench.py``.
"""

from __future__ import annotations

import re
from typing import Any

EMOTIONS = ("neutral", "happy", "angry", "sad", "afraid", "surprised", "suspicious")

# Lowercase cue words and phrases per emotion; a hit on a phrase counts double.
_CUES: dict[str, tuple[str, ...]] = {
    "happy": (
        "glad",
        "happy",
        "wonderful",
        "welcome",
        "delighted",
        "laugh",
        "grin",
        "smile",
        "lovely",
        "splendid",
        "haha",
        "ha!",
        "thank you",
        "cheers",
        "good to see",
    ),
    "angry": (
        "angry",
        "furious",
        "damn",
        "curse",
        "how dare",
        "get out",
        "enough",
        "fool",
        "idiot",
        "scowl",
        "growl",
        "snarl",
        "shut up",
        "bastard",
        "leave me",
    ),
    "sad": (
        "sorry",
        "sad",
        "alas",
        "grief",
        "tears",
        "weep",
        "miss him",
        "miss her",
        "lost",
        "mourn",
        "sigh",
        "heavy heart",
        "died",
        "dead",
    ),
    "afraid": (
        "afraid",
        "scared",
        "fear",
        "terrified",
        "danger",
        "hide",
        "run!",
        "tremble",
        "please don't",
        "mercy",
        "help me",
        "shiver",
    ),
    "surprised": (
        "what?!",
        "really?",
        "surprised",
        "can't believe",
        "cannot believe",
        "oh!",
        "by the gods",
        "astonish",
        "no way",
        "truly?",
        "gasp",
    ),
    "suspicious": (
        "hmm",
        "why do you ask",
        "suspicious",
        "who sent you",
        "what's it to you",
        "none of your business",
        "narrow",
        "careful",
        "i don't trust",
        "stranger",
    ),
}
_STAGE_DIRECTION = re.compile(r"\*([^*\n]{2,120})\*")
_MOOD_TO_EMOTION = {
    "cheerful": "happy",
    "friendly": "happy",
    "jolly": "happy",
    "amused": "happy",
    "tense": "suspicious",
    "wary": "suspicious",
    "grumpy": "angry",
    "angry": "angry",
    "sad": "sad",
    "grieving": "sad",
    "nervous": "afraid",
    "afraid": "afraid",
}


def _cue_pattern(cue: str) -> re.Pattern[str]:
    """A cue as a whole word, with its common endings: "smile" finds "smiled", while
    "sad" does not find "crusade" nor "hide" "hideous"."""
    ending = r"(?:s|es|d|ed|ing|ly|ful)?(?![a-z])" if cue[-1].isalpha() else ""
    return re.compile(r"(?<![a-z])" + re.escape(cue) + ending)


_CUE_PATTERNS = {
    emotion: [(_cue_pattern(cue), 2 if " " in cue else 1) for cue in cues]
    for emotion, cues in _CUES.items()
}


def _score(text: str) -> dict[str, int]:
    lowered = text.lower()
    scores = {}
    for emotion, patterns in _CUE_PATTERNS.items():
        score = sum(weight for pattern, weight in patterns if pattern.search(lowered))
        if score:
            scores[emotion] = score
    return scores


def mood_emotion(mood: str | None) -> str:
    """The emotion a persona's resting mood suggests (``busy but friendly`` → happy)."""
    for word in re.findall(r"[a-z]+", (mood or "").lower()):
        if word in _MOOD_TO_EMOTION:
            return _MOOD_TO_EMOTION[word]
    return "neutral"


def infer_emotion(text: str, mood: str | None = None) -> str:
    """One of ``EMOTIONS``: the strongest cue in the reply, else the persona's mood."""
    scores = _score(text)
    if not scores:
        return mood_emotion(mood)
    return max(scores, key=lambda emotion: (scores[emotion], -EMOTIONS.index(emotion)))


def infer_action(text: str) -> dict[str, Any] | None:
    """The first stage direction in the reply, e.g. ``*slides a key across*``."""
    match = _STAGE_DIRECTION.search(text)
    if match is None:
        return None
    return {"type": "gesture", "description": match.group(1).strip()}
