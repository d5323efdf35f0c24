"""Reveal conditions: the small expression language of persona and world files.

    trust >= 40 or flags.quest_pier >= 2
    not flags.betrayed_mara and game_time > 1440

Comparisons (``== != < <= > >=``) over ``trust`` (this NPC's regard for the player,
-100…100), ``flags.NAME`` (the player's game flags: booleans, integers, short strings) and
``game_time`` (minutes of game time), joined by ``and``, ``or``, ``not`` and parentheses.
A name alone is true when its value is truthy (``flags.paid_room``). A flag the game never
set is absent: every comparison with it is false, and it is false alone.

Parsing is lark's (an LALR grammar: a writer's typo is reported with its column at persona
load); evaluation walks the tree over a fixed set of names. Nothing is ever ``eval``-ed,
and a condition cannot loop, call or reach anything but the values it is given.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any

from lark import Lark, Token, Tree
from lark.exceptions import LarkError, UnexpectedCharacters, UnexpectedInput

FlagValue = bool | int | str

_GRAMMAR = r"""
?start: or_test
?or_test: and_test ("or" and_test)*
?and_test: not_test ("and" not_test)*
?not_test: "not" not_test -> negation
         | comparison
?comparison: atom (COMPARE atom)?
?atom: NUMBER -> number
     | STRING -> string
     | "true" -> true
     | "false" -> false
     | name
     | "(" or_test ")"
name: NAME ("." NAME)?
COMPARE: ">=" | "<=" | "==" | "!=" | ">" | "<"
NAME: /[A-Za-z_][A-Za-z0-9_]*/
NUMBER: /-?\d+/
STRING: /"[^"\\]{0,200}"/ | /'[^'\\]{0,200}'/
%ignore /[ \t]+/
"""

_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
    "==": operator.eq,
    "!=": operator.ne,
}
MAX_CONDITION_CHARS = 500
_ABSENT = object()


class ConditionError(ValueError):
    """A condition that does not parse or names something unknown."""


@cache
def _parser() -> Lark:
    return Lark(_GRAMMAR, parser="lalr")


@dataclass(frozen=True)
class GameFacts:
    """What a condition may read: the player's standing with one NPC, their flags, the
    game clock (None when the game does not send one)."""

    trust: int = 0
    flags: Mapping[str, FlagValue] | None = None
    game_time: float | None = None


@dataclass(frozen=True)
class Condition:
    """A parsed condition; ``holds(facts)`` evaluates it."""

    source: str
    _tree: Any

    def holds(self, facts: GameFacts) -> bool:
        return bool(_truthy(_evaluate(self._tree, facts)))

    def __str__(self) -> str:
        return self.source


@lru_cache(maxsize=4096)  # conditions are few and fixed per persona file; checked per turn
def parse_condition(source: str) -> Condition:
    """Parse and check a condition; ``ConditionError`` says what is wrong and where."""
    text = source.strip()
    if not text:
        raise ConditionError("empty condition")
    if len(text) > MAX_CONDITION_CHARS:
        raise ConditionError(f"longer than {MAX_CONDITION_CHARS} characters")
    try:
        tree = _parser().parse(text)
    except UnexpectedCharacters as exc:
        raise ConditionError(
            f"unexpected {text[exc.column - 1]!r} at column {exc.column} of {text!r}"
        ) from None
    except UnexpectedInput as exc:
        token = getattr(exc, "token", None)
        shown = "the end" if not token or token.type == "$END" else repr(str(token))
        raise ConditionError(
            f"unexpected {shown} at column {exc.column} of {text!r}; a condition reads like "
            "'trust >= 40 or flags.quest_pier >= 2'"
        ) from None
    except LarkError as exc:  # anything else lark refuses
        raise ConditionError(f"cannot parse {text!r}: {exc}") from None
    _check_names(tree)
    return Condition(text, tree)


def _check_names(node: Any) -> None:
    if isinstance(node, Tree):
        if node.data == "name":
            parts = [str(token) for token in node.children]
            if parts[0] == "flags":
                if len(parts) != 2:
                    raise ConditionError("write flags.NAME, e.g. flags.quest_pier")
            elif len(parts) != 1 or parts[0] not in ("trust", "game_time"):
                raise ConditionError(
                    f"unknown name {'.'.join(parts)!r}: use trust, game_time or flags.NAME"
                )
            return
        for child in node.children:
            _check_names(child)


def _truthy(value: Any) -> bool:
    return value is not _ABSENT and value is not None and bool(value)


def _evaluate(node: Any, facts: GameFacts) -> Any:
    if isinstance(node, Token):  # unreachable with this grammar; defensive
        raise ConditionError(f"unexpected token {node!r}")
    kind = node.data
    if kind == "or_test":
        return any(_truthy(_evaluate(child, facts)) for child in node.children)
    if kind == "and_test":
        return all(_truthy(_evaluate(child, facts)) for child in node.children)
    if kind == "negation":
        return not _truthy(_evaluate(node.children[0], facts))
    if kind == "comparison":
        left, op, right = node.children
        a, b = _evaluate(left, facts), _evaluate(right, facts)
        if a is _ABSENT or b is _ABSENT or a is None or b is None:
            return False
        if isinstance(a, bool) != isinstance(b, bool) or isinstance(a, str) != isinstance(b, str):
            return str(op) == "!="  # a number is never equal to a word or a yes/no
        return _COMPARE[str(op)](a, b)
    if kind == "number":
        return int(node.children[0])
    if kind == "string":
        return str(node.children[0])[1:-1]
    if kind == "true":
        return True
    if kind == "false":
        return False
    if kind == "name":
        parts = [str(token) for token in node.children]
        if parts[0] == "trust":
            return facts.trust
        if parts[0] == "game_time":
            return facts.game_time
        return (facts.flags or {}).get(parts[1], _ABSENT)
    raise ConditionError(f"unknown expression {kind!r}")
