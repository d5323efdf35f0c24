"""The output guard on its own (no model): what it holds back, what it cuts, what it lets by."""

from __future__ import annotations

import random

import pytest

from npc_engine.guard import (
    BOILERPLATE,
    GuardedSecret,
    GuardRules,
    ReplyGuard,
    distinctive_words,
    find_term,
)

pytestmark = pytest.mark.timeout(60)

BRANDY = GuardedSecret("secrets.0", "She hides brandy in her cellar.", ("brandy", "contraband"))


def stream(guard: ReplyGuard, text: str, seed: int = 0) -> tuple[list[str], str]:
    """Feed ``text`` in random small pieces (as tokens arrive); the pieces sent and the end."""
    rng = random.Random(seed)
    sent, position = [], 0
    while position < len(text):
        size = rng.randint(1, 5)
        sent.append(guard.feed(text[position : position + size]))
        position += size
    return sent, guard.finish()


@pytest.mark.parametrize(
    ("text", "terms", "found"),
    [
        ("We keep brandies below.", ["brandy"], "brandy"),
        ("A branch broke.", ["brandy"], None),
        ("b-r-a-n-d-y, if you must know", ["brandy"], "brandy"),
        ("B R A N D Y", ["brandy"], "brandy"),
        ("the open air", ["OpenAI"], None),
        ("As an AI, I cannot say.", BOILERPLATE, "an AI"),
        ("a  silver\nmark", ["silver mark"], "silver mark"),
        ("they smuggled it in", ["smuggle"], "smuggle"),
        ("Is that a Computer?", ["computer"], "computer"),
        ("computing the tide", ["computer"], None),
    ],
)
def test_terms_match_whole_words_inflections_and_spelled_out_letters(
    text: str, terms: list[str], found: str | None
) -> None:
    assert find_term(text, terms) == found


@pytest.mark.parametrize("seed", range(5))
def test_a_leaking_sentence_never_leaves_however_the_text_is_split(seed: int) -> None:
    guard = ReplyGuard(GuardRules([BRANDY]), "Ask me something else.")
    sent, end = stream(guard, "Aye, a room is five bits. We keep the brandy below! Come.", seed)
    released = "".join(sent)
    # Words stream until the secret's first word; that sentence is held, then cut. (How
    # much of "the" went depends on the split: a word being written goes unless it could
    # still become a telling one.)
    assert released.startswith("Aye, a room is five bits. We keep th")
    assert "b" not in released.split("We keep")[1]
    assert end == "— Ask me something else."  # broken off mid-sentence
    assert guard.cut is not None and guard.cut.entry == "secrets.0" and guard.cut.kind == "secret"
    assert "brandy" in guard.cut.withheld


def test_a_harmless_reply_passes_whole_and_in_order() -> None:
    text = "Aye, a room is five bits. Supper's included! Will you stay?"
    for seed in range(5):
        guard = ReplyGuard(GuardRules([BRANDY], ("computer",)), "-")
        sent, end = stream(guard, text, seed)
        assert "".join(sent) + end == text and guard.cut is None


def test_words_stream_until_a_sentence_turns_to_a_secret_or_a_term() -> None:
    guard = ReplyGuard(GuardRules([BRANDY]), "-")
    assert guard.feed("Well now, friend, let me think ") == "Well now, friend, let me think "
    assert guard.feed("about the cellar and ") == "about the "  # "cellar": held from here…
    # …to its end; a word goes once it is whole (its white space came)
    assert guard.feed("the stew. Come") == "cellar and the stew. "
    assert guard.feed(" in, love, we have an ") == "Come in, love, we have "  # "an AI"?
    assert guard.feed("aide. ") == "an aide. "  # never inside a longer word
    assert guard.finish() == "" and guard.cut is None


def test_an_out_of_world_sentence_is_cut_before_its_term_is_sent() -> None:
    guard = ReplyGuard(GuardRules([], ("computer", "internet")), "-", "What strange words.")
    sent, end = stream(guard, "Hm. A computer is a machine that thinks for you.", 3)
    released = "".join(sent)
    assert "comp" not in released and released.startswith("Hm.")
    assert end.endswith("What strange words.") and guard.cut is not None
    assert guard.cut.kind == "out_of_world" and guard.cut.entry == "computer"


def test_boilerplate_of_chat_models_is_always_out_of_world() -> None:
    guard = ReplyGuard(GuardRules([], ()), "-", "Eh?")
    sent, end = stream(guard, "I'm sorry, but as an AI language model I cannot say.")
    assert "AI" not in "".join(sent) and end.endswith("Eh?")
    assert guard.cut is not None and guard.cut.kind == "out_of_world"


def test_the_meaning_check_cuts_a_paraphrase_without_any_key() -> None:
    """With a fake embedder whose vectors say "these two sentences mean the same"."""
    meaning = {"She hides brandy in her cellar.": [1.0, 0.0]}

    def embed(texts: list[str]) -> list[list[float]]:
        return [meaning.get(t, [0.9, 0.3] if "liquor" in t else [0.0, 1.0]) for t in texts]

    rules = GuardRules([GuardedSecret("secrets.0", BRANDY.text, ())], (), embed, 0.8)
    guard = ReplyGuard(rules, "Enough.")
    released = guard.feed("The inn is warm. There is liquor under my floor. ")
    # Streamed to the sentence's end (only then can its meaning be read), cut there.
    assert released == "The inn is warm. There is liquor under my " and guard.cut is not None
    assert "similar to the secret" in guard.cut.reason and guard.finish() == "— Enough."


def test_distinctive_words_are_rare_and_not_said_elsewhere_in_the_prompt() -> None:
    secret = "She lets the Fog Runners store brandy in her cellar in exchange for half the customs."
    public = "Keep the customs men out of her cellar. The Fog Runners are smugglers."
    assert distinctive_words(secret, public) == ("brandy",)


def test_telling_words_are_caught_in_any_form_before_they_go_out() -> None:
    """A possessive holds the sentence; letters spelled out with dashes or spaces never go
    out one by one, and are cut once they spell the key."""
    secret = GuardedSecret("secrets.0", "Jory Pike was silenced.", ("silenced",))
    guard = ReplyGuard(GuardRules([secret]), "-")
    assert guard.feed("It was Jory's ") == "It was "  # "Jory's" starts a telling sentence
    for seed, reply in enumerate(("Well, s-i-l-e-n-c-e-d it was. ", "Well, s i l e n c e d. ")):
        guard = ReplyGuard(GuardRules([secret]), "-")
        sent, _end = stream(guard, reply, seed)
        assert "".join(sent).startswith("Well") and "s" not in "".join(sent)[4:]
        assert guard.cut is not None


def test_read_ahead_embeds_in_one_batch_every_probe_the_checks_then_need() -> None:
    """A world tick reads its candidates ahead: the one-by-one checks that follow must find
    every vector remembered (they once embedded lower-cased texts the batch had not)."""
    from npc_engine.guard_rules import read_ahead, tells_secret
    from npc_engine.multilingual import PairedEmbedder

    embedded: list[list[str]] = []

    def english(texts: list[str]) -> list[list[float]]:
        embedded.append(list(texts))
        return [[1.0, float(len(t) % 7)] for t in texts]

    def multilingual(texts: list[str]) -> list[list[float]]:
        return [[float(len(t) % 5), 1.0] for t in texts]

    rules = GuardRules(
        [GuardedSecret("secrets.0", BRANDY.text, ())],
        (),
        PairedEmbedder(english, lambda: multilingual),
        1.01,
    )
    memories = [
        ["I saw Boat 3 come in with 40 crates.", "Then it sank."],
        ["The tide was high, and the gulls were loud, while the nets lay drying on the quay."],
        ["Aye."],
    ]
    rules.secret_vectors()
    embedded.clear()
    read_ahead(rules, memories)
    assert len(embedded) == 1 and len(embedded[0]) >= 5  # sentences, clauses, pairs at once
    for sentences in memories:
        assert tells_secret(rules, sentences) is None
    assert len(embedded) == 1  # nothing more was embedded
