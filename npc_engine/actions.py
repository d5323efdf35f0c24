"""Declared game actions: what an NPC may do, the grammar that lets the model choose only
among them, and the check that turns the model's choice into an action the game can run.

After the spoken line has streamed, the model answers one short question ("does the NPC do
one of these now?") under a GBNF grammar built from the declared actions alone, so every
output is ``none`` or one declared action with arguments of the declared types. The parse
checks it again (ranges, lengths): nothing else ever reaches the game, whatever the model.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field

from npc_engine.conditions import GameFacts, parse_condition
from npc_engine.persona.model import GameActionSpec, IntegerParam, Persona, TextParam, World

NO_ACTION = "none"
ACTION_MAX_TOKENS = 32  # the longest declared call fits in this many tokens


@dataclass(frozen=True)
class ChosenAction:
    name: str
    args: dict[str, str | int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "args": dict(self.args)}


def offered_actions(
    persona: Persona, world: World | None, facts: GameFacts
) -> list[GameActionSpec]:
    """The actions this NPC can take now: the world's and its own (its own win on a name
    clash), those with a ``when`` only while it holds."""
    by_name = {a.name: a for a in (world.actions if world is not None else [])}
    by_name.update((a.name, a) for a in persona.actions)
    return [a for a in by_name.values() if a.when is None or parse_condition(a.when).holds(facts)]


def action_text(action: GameActionSpec) -> str:
    """What an action is about, in words, for the meaning check (its description and the
    words it takes)."""
    words = [
        w.replace("_", " ")
        for spec in action.params.values()
        if isinstance(spec, list)
        for w in spec
    ]
    return " ".join([action.name.replace("_", " ") + ":", action.description, *words])


def _literal(text: str) -> str:
    return json.dumps(text)  # a GBNF string literal is a JSON string


def _param_rule(spec: list[str] | IntegerParam | TextParam) -> str:
    if isinstance(spec, list):
        return " | ".join(_literal(word) for word in spec)
    if isinstance(spec, IntegerParam):
        return '"-"? [0-9]{1,7}'
    # No quote, backslash or control character (GBNF escapes; NUL ends llama.cpp's
    # strings, so the range starts at 0x01: parse_action strips whatever else comes).
    return f'"\\"" [^"\\\\\\x01-\\x1f\\x7f]{{0,{spec.max_length}}} "\\""'


def action_grammar(actions: Sequence[GameActionSpec]) -> str:
    """GBNF: ``none`` or ``name(param=value, …)`` of one declared action."""
    rules = []
    choices = [_literal(NO_ACTION)]
    for index, action in enumerate(actions):
        parts = [_literal(f"{action.name}(")]
        for position, (param, spec) in enumerate(action.params.items()):
            prefix = ", " if position else ""
            parts.append(_literal(f"{prefix}{param}="))
            parts.append(f"({_param_rule(spec)})")
        parts.append(_literal(")"))
        rules.append(f"action{index} ::= " + " ".join(parts))
        choices.append(f"action{index}")
    return "\n".join([f"root ::= {' | '.join(choices)}", *rules]) + "\n"


def _signature(action: GameActionSpec) -> str:
    params = []
    for param, spec in action.params.items():
        if isinstance(spec, list):
            params.append(f"{param}={'|'.join(spec)}")
        elif isinstance(spec, IntegerParam):
            params.append(f"{param}=<number {spec.min} to {spec.max}>")
        else:
            params.append(f'{param}="<up to {spec.max_length} letters>"')
    return f"{action.name}({', '.join(params)})"


def action_question(npc_name: str, actions: Sequence[GameActionSpec]) -> str:
    """The question asked after the spoken line (never shown to the player)."""
    lines = [
        f"(Game: does {npc_name} now do one of these things, as the words just spoken say or "
        "promise? Answer none unless the words clearly do it.)"
    ]
    lines += [f"- {_signature(action)}: {action.description}" for action in actions]
    lines.append(f"- {NO_ACTION}: nothing")
    return "\n".join(lines)


def plain_text(text: str) -> str:
    """``text`` as a game may show it: control and format characters (terminal escapes,
    carriage returns, bidi overrides, zero-width marks) taken out, spaces collapsed."""
    kept = []
    for char in text:
        category = unicodedata.category(char)
        if category == "Cc":
            kept.append(" " if char.isspace() else "")
        elif not category.startswith("C"):  # Cf, Cs, Co, Cn: format, surrogate, unassigned
            kept.append(char)
    return " ".join("".join(kept).split())


_CALL = re.compile(r"^([a-z][a-z0-9_]*)\((.*)\)$", re.DOTALL)
_ARG = re.compile(r'\s*([A-Za-z0-9_-]+)=("(?:[^"\\\n])*"|[^,"]+)\s*(?:,|$)')


def parse_action(output: str, actions: Sequence[GameActionSpec]) -> ChosenAction | None:
    """The model's answer as an action, or None: ``none``, anything not declared, and any
    argument out of its declared type or range all give None."""
    text = output.strip()
    match = _CALL.match(text)
    if text == NO_ACTION or match is None:
        return None
    by_name = {a.name: a for a in actions}
    action = by_name.get(match.group(1))
    if action is None:
        return None
    raw_args = match.group(2)
    found = {m.group(1): m.group(2).strip() for m in _ARG.finditer(raw_args)}
    if set(found) != set(action.params):
        return None
    args: dict[str, str | int] = {}
    for param, spec in action.params.items():
        value = found[param]
        if isinstance(spec, list):
            if value not in spec:
                return None
            args[param] = value
        elif isinstance(spec, IntegerParam):
            if not re.fullmatch(r"-?[0-9]{1,7}", value) or not spec.min <= int(value) <= spec.max:
                return None
            args[param] = int(value)
        else:
            if not (value.startswith('"') and value.endswith('"')):
                return None
            inner = value[1:-1]
            if len(inner) > spec.max_length:
                return None
            inner = plain_text(inner)
            if not inner:
                return None
            args[param] = inner
    return ChosenAction(action.name, args)


# -- choosing by meaning -------------------------------------------------------------------
# The embedder decides most turns: the player's line is compared with each offered action's
# example lines (and its description). A line near one action's examples, and clearly nearer
# than any other action's, is that action, with no model call; a line near none is no action;
# only lines near several (or near one whose arguments the line does not give) are put to the
# model under the grammar of those few actions. Thresholds: config ``actions.*``, calibrated
# by tools/action_probe.py on tests/probes/game_actions.yaml.

_SMALL_NUMBERS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
]
_NUMBER_WORDS = {word: value for value, word in enumerate(_SMALL_NUMBERS)}
_NUMBER_WORDS.update(
    {"thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80}
)
_NUMBER_WORDS.update({"ninety": 90, "hundred": 100, "a hundred": 100, "dozen": 12, "a dozen": 12})
_NUMBER = re.compile(
    r"\b(\d{1,7}|(?:twenty|thirty|forty|fifty|sixty|seventy|eighty|ninety)[- ](?:one|two|three|"
    r"four|five|six|seven|eight|nine)|a hundred|a dozen|" + "|".join(_NUMBER_WORDS) + r")\b",
    re.IGNORECASE,
)


def numbers_in(text: str) -> list[int]:
    """Whole numbers a player says, in digits or words ("five bits", "twenty-five", "12")."""
    found = []
    for match in _NUMBER.finditer(text):
        word = match.group(1).lower()
        if word.isdigit():
            found.append(int(word))
        elif word in _NUMBER_WORDS:
            found.append(_NUMBER_WORDS[word])
        else:
            tens, ones = re.split(r"[- ]", word)
            found.append(_NUMBER_WORDS[tens] + _NUMBER_WORDS[ones])
    return found


def _mentioned(value: str, text: str) -> bool:
    words = value.replace("_", " ").replace("-", " ").lower()
    return re.search(rf"\b{re.escape(words)}\b", text.lower()) is not None


@dataclass(frozen=True)
class LabelledLine:
    """A line that means an action: one of its examples, or its own description."""

    action: GameActionSpec
    text: str
    args: dict[str, str] = field(default_factory=dict)


def labelled_lines(actions: Sequence[GameActionSpec]) -> list[LabelledLine]:
    lines = []
    for action in actions:
        lines += [LabelledLine(action, e.say, dict(e.args)) for e in action.examples]
        lines.append(LabelledLine(action, action_text(action)))
    return lines


def fill_args(
    action: GameActionSpec, text: str, nearest: Sequence[LabelledLine]
) -> dict[str, str | int] | None:
    """The action's arguments from the player's line (a list value it names, a number in
    range it says), else from its nearest examples that give them; None when one cannot be
    known without the model."""
    args: dict[str, str | int] = {}
    for param, spec in action.params.items():
        if isinstance(spec, list):
            named = [value for value in spec if _mentioned(value, text)]
            if len(named) == 1:
                args[param] = named[0]
                continue
            given = [line.args[param] for line in nearest if param in line.args]
            if not given:
                return None
            args[param] = given[0]
        elif isinstance(spec, IntegerParam):
            amounts = [n for n in numbers_in(text) if spec.min <= n <= spec.max]
            if not amounts:
                return None
            args[param] = amounts[0]
        else:
            return None
    return args


@dataclass(frozen=True)
class MeaningChoice:
    """What the player's line means for the offered actions: ``decided`` when the meaning is
    clear (an action, or None for no action); otherwise ``ask`` lists the close actions to
    put to the model."""

    decided: bool
    action: ChosenAction | None = None
    ask: list[GameActionSpec] = field(default_factory=list)
    best: float = 0.0  # cosine of the nearest labelled line
    margin: float = 0.0  # over the nearest line of another action
    # On a close call, what the meaning points to: the nearest action, with the arguments
    # known from the line or its examples. The model's answer counts only if it agrees.
    guess: ChosenAction | None = None

    def agrees(self, answer: ChosenAction | None) -> bool:
        """The model's answer on a close call agrees with the meaning: the same action, and
        the same value for every argument the meaning knows."""
        if answer is None or self.guess is None or answer.name != self.guess.name:
            return False
        return all(answer.args.get(k) == v for k, v in self.guess.args.items())


def choose_by_meaning(
    text: str,
    line_vector: Sequence[float],
    lines: Sequence[LabelledLine],
    line_vectors: Sequence[Sequence[float]],
    *,
    near: float,
    accept: float,
    margin: float,
) -> MeaningChoice:
    import numpy as np

    if not lines:
        return MeaningChoice(decided=True)
    scores = np.asarray(line_vectors, dtype=np.float32) @ np.asarray(line_vector)
    order = [int(i) for i in np.argsort(-scores)]
    best_of: dict[str, float] = {}
    for index in order:
        best_of.setdefault(lines[index].action.name, float(scores[index]))
    ranked = sorted(best_of.items(), key=lambda item: -item[1])
    top_name, top = ranked[0]
    runner_up = ranked[1][1] if len(ranked) > 1 else -1.0
    if top < near:
        return MeaningChoice(decided=True, best=top, margin=top - runner_up)
    close = [lines[i].action for i in order if float(scores[i]) >= near]
    ask = list({a.name: a for a in close}.values())
    action = next(line.action for line in lines if line.action.name == top_name)
    nearest = [lines[i] for i in order if lines[i].action.name == top_name]
    args = fill_args(action, text, nearest)
    if top >= accept and top - runner_up >= margin and args is not None:
        chosen = ChosenAction(action.name, args)
        return MeaningChoice(True, chosen, best=top, margin=top - runner_up)
    known = {k: v for k, v in (args or {}).items() if isinstance(action.params[k], list)}
    guess = ChosenAction(action.name, known)
    return MeaningChoice(False, ask=ask, best=top, margin=top - runner_up, guess=guess)
