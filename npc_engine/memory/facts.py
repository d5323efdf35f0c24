"""Durable facts a player states about themself, found by rules (issue 16).

"My name is Aria", "I used to work as a bell founder", "I'm allergic to shellfish": each
becomes a ``kind: fact`` memory with a subject ("name", "former trade: bell founder",
"allergy: shellfish"), rendered in the third person for the prompt. A newer fact on the same subject
supersedes the older (``superseding``). Rules, not the model: they run on every line in
microseconds, cannot be talked into writing a "fact" a player dictates in another form
(the value is a bounded clause of the player's own words, quoted by position, never
structure), and their precision is measured on a committed set
(tests/probes/fact_lines.yaml). What no rule catches stays an ordinary dialogue memory,
still recalled by search. No library extracts first-person facts from game chat; the
patterns are ours.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from npc_engine.memory.types import Memory

FACT_IMPORTANCE = 8
MAX_VALUE_WORDS = 8
MAX_VALUE_CHARS = 60
MAX_FACTS_PER_LINE = 4
FACT_ID_MARK = ".fact"  # a fact's id is its line's id + this + a number

# The value of a fact: the player's own words up to the end of the clause.
_VALUE = r"(?P<value>[^,.;!?()\"]{1,80}?)"
_END = (
    r"(?=\s*(?:[,.;!?()\"]|\b(?:and|but|so|because|though|although|which|who|now|today"
    r"|these days|nowadays|anymore)\b|$))"
)
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'"})
_I_AM = r"(?:i'?m|i am)"

_OCCUPATIONS = (
    "baker|blacksmith|smith|farmer|fisherman|fisher|hunter|trapper|merchant|trader|sailor"
    "|soldier|guard|knight|mercenary|priest|priestess|monk|nun|healer|herbalist|physician"
    "|doctor|nurse|midwife|miner|mason|carpenter|cooper|tanner|weaver|tailor|cobbler"
    "|shoemaker|brewer|innkeeper|cook|chef|butcher|scribe|clerk|teacher|scholar|mage"
    "|wizard|witch|alchemist|apothecary|bard|minstrel|musician|thief|smuggler|pirate"
    "|shepherd|goatherd|woodcutter|lumberjack|miller|potter|jeweller|jeweler|goldsmith"
    "|fletcher|bowyer|armourer|armorer|courier|messenger|stablehand|groom|ferryman"
    "|cartographer|sellsword|squire|servant|maid|bounty hunter|ranger|scout|painter"
    "|sculptor|glassblower|bell founder|locksmith|watchman|sheriff|captain|navigator"
)
_RELATIONS = (
    "mother|father|mum|mom|dad|sister|brother|wife|husband|son|daughter|uncle|aunt"
    "|grandmother|grandfather|grandma|grandpa|cousin|niece|nephew|fiance|fiancee"
    "|partner|twin|master|mentor|apprentice"
)
_ANIMALS = "horse|dog|cat|crow|raven|hawk|falcon|mule|donkey|pony|goat|ship|boat|sword|blade"

# A value that is only one of these words is not a fact ("my name is not important").
_EMPTY_VALUES = {
    "not", "no", "none", "nothing", "nobody", "a", "an", "the", "that", "this", "it", "so",
    "very", "really", "quite", "too", "just", "here", "there", "what", "whatever", "secret",
    "unimportant", "irrelevant", "none of your business",
}  # fmt: skip


@dataclass(frozen=True)
class _Rule:
    subject: str  # may name the groups "thing" and "value": "favourite {thing}"
    pattern: re.Pattern[str]
    statement: str  # "{who}'s name is {value}": {who} is the player, named in the prompt


def _rule(subject: str, pattern: str, statement: str, end: str = _END) -> _Rule:
    return _Rule(subject, re.compile(pattern + end, re.IGNORECASE), statement)


# A name may be followed by where it is used: "they call me Old Tam in these parts".
_NAME_END = r"(?=\s*(?:[,.;!?()\"]|\b(?:and|but|so|in|around|here|among|to|now|though)\b|$))"


_RULES: tuple[_Rule, ...] = (
    _rule(
        "name",
        r"\b(?:my name(?:'s| is)|(?:you (?:can|may|should) )?call me|"
        + _I_AM
        + r" called|(?:people|they|folk|friends) call me|i go by|name's)\s+"
        r"(?!(?:a|an|the|not|no|never|whatever|you)\b)(?P<value>[a-z][\w'-]*(?: [A-Z][\w'-]*)?)",
        "{who}'s name is {value}",
        _NAME_END,
    ),
    # Former trades add up ("I was a soldier", later "I used to be a cook"): one per trade.
    _rule(
        "former trade:{value}",
        r"\bi (?:used to (?:be|work as)|once worked as|was once|worked as) (?P<article>an? )?"
        + _VALUE,
        "{who} used to be {article}{value}",
    ),
    _rule(
        "trade",
        r"\bi(?: work as|'m working as| am working as| earn my (?:living|bread) as) "
        r"(?P<article>an? )?" + _VALUE,
        "{who} works as {article}{value}",
    ),
    _rule(
        "former trade:{value}",
        r"\bi was (?P<article>an? )(?P<value>(?:\w+ )?(?:"
        + _OCCUPATIONS
        + r")\b[^,.;!?()\"]{0,60}?)",
        "{who} used to be {article}{value}",
    ),
    _rule(
        "trade",
        r"\bi make (?:my|a) living (?:as (?P<article>an? )|by )?" + _VALUE,
        "{who} makes a living {article}{value}",
    ),
    _rule(
        "trade",
        r"\bmy (?:trade|job|work|profession) is(?: being)? (?P<article>an? )?" + _VALUE,
        "{who}'s trade is {article}{value}",
    ),
    _rule(
        "trade",
        r"\b"
        + _I_AM
        + r" (?P<article>an? )?(?P<value>(?:\w+ )?(?:"
        + _OCCUPATIONS
        + r"))(?: by trade)?",
        "{who} works as {article}{value}",
    ),
    _rule(
        "allergy:{value}",
        r"\b" + _I_AM + r" allergic to " + _VALUE,
        "{who} is allergic to {value}",
    ),
    _rule(
        "fear:{value}",
        r"\b" + _I_AM + r" (?:(?:very|really|so|deathly) )?(?:terrified|afraid|scared|frightened)"
        r" of " + _VALUE,
        "{who} is afraid of {value}",
    ),
    _rule(
        "origin",
        r"\b(?:"
        + _I_AM
        + r" (?:originally )?from|i (?:come|came|hail) from|i was born in) "
        + _VALUE,
        "{who} comes from {value}",
    ),
    _rule(
        "origin",
        r"\bi grew up (?P<value>(?:in|on|at|near|by) [^,.;!?()\"]{1,80}?)",
        "{who} grew up {value}",
    ),
    _rule(
        "home",
        r"\b(?:i (?:now )?live|i(?:'ve| have) settled) "
        r"(?P<value>(?:in|at|on|near|by) [^,.;!?()\"]{1,80}?)",
        "{who} lives {value}",
    ),
    _rule(
        "home",
        r"\b(?:i(?:'ve| have) (?:just )?moved|i moved) (?:in )?(?:to|into) " + _VALUE,
        "{who} has moved to {value}",
    ),
    _rule(
        "age",
        r"\b" + _I_AM + r" (?P<value>\d{1,3}|[a-z]+(?:[- ][a-z]+)?) (?:years|winters|summers) old"
        r"(?: (?:this|next) \w+)?",
        "{who} is {value} years old",
    ),
    _rule(
        "favourite {thing}",
        r"\bmy (?:favou?rite|fav) (?P<thing>\w+(?: \w+)?) (?:is|are) " + _VALUE,
        "{who}'s favourite {thing} is {value}",
    ),
    _rule(
        "{thing}'s name",
        r"\bmy (?P<thing>" + _ANIMALS + r"|" + _RELATIONS + r")(?:'s name is| is (?:called|named))"
        r" (?P<value>[a-z][\w'-]*(?: [A-Z][\w'-]*)?)",
        "{who}'s {thing} is called {value}",
    ),
    _rule(
        "{thing}",
        r"\bmy (?P<thing>" + _RELATIONS + r") (?:is|was) (?!called\b|named\b)" + _VALUE,
        "{who}'s {thing} {verb} {value}",
    ),
    _rule(
        "searching for",
        r"\b" + _I_AM + r" (?:looking|searching|hunting) for " + _VALUE,
        "{who} is looking for {value}",
    ),
)

_PRONOUNS = {
    "my": "their", "me": "them", "i": "they", "mine": "theirs", "myself": "themself",
    "i'm": "they're", "i've": "they've", "i'd": "they'd", "i'll": "they'll", "am": "are",
}  # fmt: skip
_WORD = re.compile(r"[\w']+")
_TRAILING = re.compile(
    r"\s+(?:now|these days|anymore|any more|nowadays|actually|really|too)$", re.I
)
_SENTENCE = re.compile(r"[^.!?]+[.!?]*")


@dataclass(frozen=True)
class Fact:
    subject: str
    template: str  # the rule's statement
    parts: tuple[tuple[str, str], ...]  # what fills it, the player's words among them

    def statement(self, who: str) -> str:
        """The fact about ``who`` ("the player p1"); the player's words are values, never
        part of the format string."""
        return self.template.format(who=who, **dict(self.parts))

    def in_own_words(self) -> str:
        """The fact as the player would state it ("I work as a smith"): what its vector is
        made from, as close to the player's questions about it ("What's my trade?") as a
        player's own line is, unlike the third-person wording."""
        return _first_person(self.template).format(**dict(self.parts))


_THIRD_TO_FIRST = (
    ("{who}'s", "my"),
    ("{who} is", "I am"),
    ("{who} has", "I have"),
    ("{who} works", "I work"),
    ("{who} makes", "I make"),
    ("{who} comes", "I come"),
    ("{who} lives", "I live"),
    ("{who}", "I"),
    ("{value}", "{own}"),
)


def _first_person(template: str) -> str:
    for third, first in _THIRD_TO_FIRST:
        template = template.replace(third, first)
    return template


def _value_of(raw: str) -> tuple[str, str] | None:
    """(the value as said, the value about the player: "my brother" -> "their brother")."""
    value = _TRAILING.sub("", raw.strip())
    words = value.split()
    too_long = len(words) > MAX_VALUE_WORDS or len(value) > MAX_VALUE_CHARS
    if not words or too_long or value.lower() in _EMPTY_VALUES:
        return None
    if words[0].lower() in _EMPTY_VALUES - {"a", "an", "the", "this", "that"}:
        return None
    return value, _WORD.sub(lambda m: _PRONOUNS.get(m.group(0).lower(), m.group(0)), value)


def extract_facts(text: str) -> list[Fact]:
    """The facts a player's line states about the player, at most one per subject."""
    found: dict[str, Fact] = {}
    for sentence in _SENTENCE.findall(text.translate(_APOSTROPHES)):
        if sentence.rstrip().endswith("?") or re.search(r"\bif\b", sentence, re.I):
            continue  # questions and conditionals state nothing
        for rule in _RULES:
            for match in rule.pattern.finditer(sentence):
                values = _value_of(match.group("value"))
                if values is None:
                    continue
                own, value = values
                groups = match.groupdict()
                thing = (groups.get("thing") or "").lower()
                article = (groups.get("article") or "").lower()
                verb = "was" if re.search(r"\bwas\b", match.group(0), re.I) else "is"
                subject = rule.subject.format(thing=thing, value=value.lower())
                parts = (
                    ("value", value),
                    ("own", own),
                    ("thing", thing),
                    ("article", article),
                    ("verb", verb),
                )
                found.setdefault(subject, Fact(subject, rule.statement, parts))
    return list(found.values())[:MAX_FACTS_PER_LINE]


def fact_memories(line: Memory) -> list[Memory]:
    """The fact memories of a player's line (its dialogue memory: what was said, cleaned
    for memory, is its ``content``)."""
    if line.player_id is None:
        return []
    facts = []
    for number, fact in enumerate(extract_facts(line.content or "")):
        statement = fact.statement("the player " + line.player_id)
        facts.append(
            Memory(
                npc_id=line.npc_id,
                player_id=line.player_id,
                kind="fact",
                text=statement[:1].upper() + statement[1:] + ".",
                importance=FACT_IMPORTANCE,
                id=f"{line.id}{FACT_ID_MARK}{number}",
                created_at=line.created_at,
                game_time=line.game_time,
                content=fact.in_own_words() + ".",
                subject=fact.subject,
            )
        )
    return facts


def source_line_id(fact_id: str) -> str | None:
    """The id of the dialogue line a fact was found in."""
    head, mark, _number = fact_id.rpartition(FACT_ID_MARK)
    return head if mark else None


def superseding(current: Iterable[Memory], newer: Sequence[Memory]) -> dict[str, str]:
    """Which of the ``current`` facts the ``newer`` ones replace: {old id: new id}. A fact's
    source line goes with it, so the old wording is not recalled as current either."""
    replaced: dict[str, str] = {}
    by_subject = {fact.subject: fact for fact in newer if fact.kind == "fact" and fact.subject}
    for old in current:
        new = by_subject.get(old.subject or "")
        if new is None or old.id == new.id or old.superseded_by is not None:
            continue
        replaced[old.id] = new.id
        source = source_line_id(old.id)
        if source is not None:
            replaced[source] = new.id
    return replaced
