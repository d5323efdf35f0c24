from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from npc_engine.cleaning import StreamCleaner


def clean(pieces: list[str], name: str = "Mara Saltwhistle") -> str:
    cleaner = StreamCleaner(name)
    out = "".join(cleaner.feed(p) for p in pieces) + cleaner.finish()
    assert out == cleaner.text
    return out


def test_plain_text_passes_through() -> None:
    assert clean(["Aye", ", one", " left upstairs."]) == "Aye, one left upstairs."


def test_role_tokens_and_name_prefix_are_removed() -> None:
    assert clean(["Mara:", " Aye<|im", "_end|>"]) == "Aye"
    assert clean(["<|im_start|>assistant", "\nHello there."]) == "assistant\nHello there."
    assert clean(["Hi [INST] there"]) == "Hi  there"


def test_ai_boilerplate_sentence_is_dropped() -> None:
    text = clean(["Well. As an AI", " language model, I cannot", " say. But the inn is open."])
    assert text == "Well. But the inn is open."
    assert clean(["As an aide to the duke, I know."]) == "As an aide to the duke, I know."
    # A small model forgetting the character (tools/eval.py saw both from the 0.5B).
    said = ["Old Wren sells remedies. I'm sorry, but I can't ", "assist with that."]
    assert clean(said) == "Old Wren sells remedies."
    assert clean(["Welcome, love! How can I assist", " you today?"]) == "Welcome, love!"


def test_trailing_whitespace_is_not_emitted() -> None:
    assert clean(["Hello ", "  \n"]) == "Hello"


def test_text_streams_without_waiting_for_the_end() -> None:
    cleaner = StreamCleaner("Tom Hale")
    assert cleaner.feed("Halt") == "Halt"
    assert cleaner.feed(" there,") == " there,"


@given(
    st.lists(
        st.sampled_from(
            [
                "Mara:",
                " Aye",
                ". ",
                "As an AI",
                " I",
                " can't.",
                " <|im_end|>",
                "Bye",
                "!",
                " ",
                "\n",
            ]
        ),
        max_size=12,
    ),
    st.data(),
)
def test_chunking_does_not_change_the_result(pieces: list[str], data: st.DataObject) -> None:
    whole = "".join(pieces)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(whole)), max_size=6)))
    chunks, last = [], 0
    for cut in [*cuts, len(whole)]:
        chunks.append(whole[last:cut])
        last = cut
    assert clean(chunks) == clean([whole])
