"""Character fidelity, measured with deterministic checks (no judge model).

The evaluation set (``tests/probes/eval_conversations.yaml``) is a list of scripted
conversations; ``tools/eval.py`` plays them through a real engine and this module judges
each reply. Sans-I/O: it sees text, never a model or a store, so every check is unit-tested
on written replies and the same code scores any model.

Checks on every reply:
- **in character**: no assistant boilerplate, no word of the world's ``out_of_world`` list,
  no name of a real model or company;
- **ends by itself**: the model stopped (not ``max_tokens``) at the end of a sentence;
- **no loop**: no sentence said twice in one reply, no long phrase said three times, no
  sentence repeated from an earlier reply of the same conversation;
- **no parroting**: no sentence copied from the persona's example lines, and no echo of
  the player's own line.
Checks on the turns that ask something (``expect``): the reply names one of the expected
words (``knows_self``, ``uses_told``, ``knows_world``) and none of the forbidden ones.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

Kind = Literal["knows_self", "uses_told", "knows_world"]
KINDS: tuple[Kind, ...] = ("knows_self", "uses_told", "knows_world")


class Expect(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Kind
    names_any: list[str] = Field(min_length=1)
    names_none: list[str] = Field(default_factory=list)


class EvalTurn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    say: str = Field(min_length=1)
    expect: Expect | None = None
    tells: str | None = None  # the turn that tells a fact (what the later question asks)


class Conversation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    npc: str
    turns: list[EvalTurn] = Field(min_length=1)

    def with_filler(self, keep: int | None) -> Conversation:
        """The conversation with at most ``keep`` filler turns (turns that neither tell nor
        ask) between a fact told and the question: a bounded run keeps the shape, with a
        shorter gap."""
        if keep is None:
            return self
        turns: list[EvalTurn] = []
        run = 0
        for turn in self.turns:
            if turn.expect is None and turn.tells is None:
                run += 1
                if run > keep:
                    continue
            else:
                run = 0
            turns.append(turn)
        return self.model_copy(update={"turns": turns})


class EvalSet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    conversations: list[Conversation] = Field(min_length=1)


def load_eval_set(path: Path) -> EvalSet:
    return EvalSet.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))


# What an assistant says and a character does not. Lower-case, matched as whole phrases.
ASSISTANT_PHRASES = (
    "as an ai",
    "an ai language model",
    "language model",
    "i'm an ai",
    "i am an ai",
    "artificial intelligence",
    "virtual assistant",
    "ai assistant",
    "how can i assist you",
    "how may i assist you",
    "how can i help you today",
    "i'm here to help",
    "i am here to help",
    "feel free to ask",
    "if you have any other questions",
    "if you have any more questions",
    "i don't have personal",
    "i do not have personal",
    "i cannot provide",
    "i'm sorry, but i can't",
    "i'm sorry, but i cannot",
    "as a fictional character",
    "in this role-play",
    "roleplay",
    "role-play",
    "openai",
    "chatgpt",
    "qwen",
    "alibaba",
    "smollm",
    "hugging face",
    "user:",
    "assistant:",
    "<|im_start|>",
    "<|im_end|>",
    "```",
)
_SENTENCE_END = re.compile(r"(?<=[.!?…])[\"'”’)\]*]*\s+")
_WORD = re.compile(r"[\w']+", re.UNICODE)
_CLOSES = ".!?…\"'”’)*~"


def _normal(text: str) -> str:
    return " ".join(_WORD.findall(text.lower().replace("’", "'")))


def names(reply: str, phrase: str) -> bool:
    """``phrase`` said in ``reply`` as whole words, whatever the case and punctuation."""
    needle = _normal(phrase)
    return bool(needle) and f" {needle} " in f" {_normal(reply)} "


def sentences(text: str) -> list[str]:
    return [part.strip() for part in _SENTENCE_END.split(text.strip()) if part.strip()]


def out_of_character(reply: str, out_of_world: Iterable[str] = ()) -> list[str]:
    """The assistant phrases and out-of-world words the reply contains."""
    lowered = reply.lower().replace("’", "'")
    found = [phrase for phrase in ASSISTANT_PHRASES if phrase in lowered]
    found += [term for term in out_of_world if names(reply, term)]
    return found


def ends_by_itself(reply: str, finish_reason: str) -> bool:
    """The model stopped on its own, at the end of a sentence (or an emote)."""
    text = reply.rstrip()
    return finish_reason == "stop" and bool(text) and text[-1] in _CLOSES


def _long_sentences(text: str, words: int) -> list[str]:
    return [s for s in (_normal(s) for s in sentences(text)) if len(s.split()) >= words]


def loops_within(reply: str, ngram: int = 4, times: int = 3) -> list[str]:
    """A sentence said twice, or a run of ``ngram`` words said ``times`` times."""
    said = _long_sentences(reply, 3)
    found = [s for s, n in Counter(said).items() if n > 1]
    words = _normal(reply).split()
    grams = Counter(tuple(words[i : i + ngram]) for i in range(len(words) - ngram + 1))
    found += [" ".join(g) for g, n in grams.items() if n >= times]
    return found


def repeated_from(reply: str, earlier: Sequence[str], words: int = 4) -> list[str]:
    """Sentences of at least ``words`` words that an earlier text already said."""
    before = {s for text in earlier for s in _long_sentences(text, words)}
    return [s for s in _long_sentences(reply, words) if s in before]


@dataclass
class TurnVerdict:
    conversation: str
    npc: str
    turn: int
    said: str
    reply: str
    kind: Kind | None = None
    named: bool | None = None  # the expected words were named (turns with expect)
    forbidden: list[str] = field(default_factory=list)
    out_of_character: list[str] = field(default_factory=list)
    ended: bool = True
    loops: list[str] = field(default_factory=list)
    repeated: list[str] = field(default_factory=list)  # from earlier replies
    parroted: list[str] = field(default_factory=list)  # from the persona's examples
    echoed: list[str] = field(default_factory=list)  # the player's own line said back

    @property
    def passed(self) -> bool:
        return (
            self.named is not False
            and not self.forbidden
            and not self.out_of_character
            and self.ended
            and not self.loops
            and not self.repeated
            and not self.parroted
            and not self.echoed
        )


def judge(
    conversation: Conversation,
    index: int,
    reply: str,
    finish_reason: str,
    *,
    earlier_replies: Sequence[str],
    examples: Sequence[str],
    out_of_world: Iterable[str],
) -> TurnVerdict:
    turn = conversation.turns[index]
    verdict = TurnVerdict(conversation.id, conversation.npc, index, turn.say, reply)
    if turn.expect is not None:
        verdict.kind = turn.expect.kind
        verdict.named = any(names(reply, word) for word in turn.expect.names_any)
        verdict.forbidden = [word for word in turn.expect.names_none if names(reply, word)]
    verdict.out_of_character = out_of_character(reply, out_of_world)
    verdict.ended = ends_by_itself(reply, finish_reason)
    verdict.loops = loops_within(reply)
    verdict.repeated = repeated_from(reply, earlier_replies)
    verdict.parroted = repeated_from(reply, examples, words=5)
    verdict.echoed = repeated_from(reply, [turn.say])
    return verdict


@dataclass
class Scores:
    """Shares over a run's verdicts (0..1), and counts where a share would hide them."""

    turns: int
    in_character: float
    ends_by_itself: float
    loops: int  # replies with a loop within, or a sentence repeated from an earlier reply
    parroted: int  # replies with a sentence copied from the persona's example lines
    echoed: int  # replies that say the player's own line back
    by_kind: dict[str, tuple[int, int]]  # kind: (named, asked)

    def share(self, kind: Kind) -> float:
        named, asked = self.by_kind.get(kind, (0, 0))
        return named / asked if asked else float("nan")


def score(verdicts: Sequence[TurnVerdict]) -> Scores:
    total = len(verdicts) or 1
    by_kind: dict[str, tuple[int, int]] = {}
    for kind in KINDS:
        asked = [v for v in verdicts if v.kind == kind]
        by_kind[kind] = (sum(1 for v in asked if v.named and not v.forbidden), len(asked))
    return Scores(
        turns=len(verdicts),
        in_character=sum(1 for v in verdicts if not v.out_of_character) / total,
        ends_by_itself=sum(1 for v in verdicts if v.ended) / total,
        loops=sum(1 for v in verdicts if v.loops or v.repeated),
        parroted=sum(1 for v in verdicts if v.parroted),
        echoed=sum(1 for v in verdicts if v.echoed),
        by_kind=by_kind,
    )
