"""The reply's guarantees, with no socket and no model: ReplyStream directly, and fuzzed."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npc_engine.protocol import ReplyDelta, ReplyEnd
from npc_engine.reply_stream import FinishedTurn, ReplyMessage, ReplyStream

pytestmark = pytest.mark.timeout(60)


def stream(interval: float = 0.015) -> ReplyStream:
    return ReplyStream("7", fallback_line=lambda: "Not now.", delta_interval=interval)


def test_first_delta_at_once_then_gathered_per_interval() -> None:
    reply = stream(0.015)
    first = reply.text("Aye", now=1.0)
    assert [m.text for m in first if isinstance(m, ReplyDelta)] == ["Aye"]
    assert reply.text(",", now=1.005) == []  # gathered
    assert reply.text(" one", now=1.010) == []
    assert reply.due() == pytest.approx(1.015)
    assert reply.tick(1.012) == []  # not due yet
    (gathered,) = reply.tick(1.015)
    assert isinstance(gathered, ReplyDelta) and gathered.seq == 1 and gathered.text == ", one"
    assert reply.due() is None
    out = reply.finished(FinishedTurn("stop", emotion="happy"))
    assert isinstance(out[-1], ReplyEnd) and out[-1].text == "Aye, one"
    assert out[-1].emotion == "happy"


def test_zero_interval_sends_every_piece() -> None:
    reply = stream(0.0)
    sent = [m for piece in ["a", "b", "c"] for m in reply.text(piece, now=5.0)]
    assert [m.text for m in sent if isinstance(m, ReplyDelta)] == ["a", "b", "c"]


def test_deadline_sends_the_fallback_once_and_nothing_after() -> None:
    reply = stream()
    out = reply.deadline_passed(500)
    assert [type(m) for m in out] == [ReplyDelta, ReplyEnd]
    end = out[-1]
    assert isinstance(end, ReplyEnd) and end.text == "Not now." and end.error is not None
    assert end.error.code == "deadline"
    assert reply.text("late token", now=9.0) == []
    assert reply.finished(FinishedTurn("stop")) == []
    assert reply.shutdown() == []


def test_deadline_after_a_token_changes_nothing() -> None:
    reply = stream()
    reply.text("Hm", now=0.0)
    assert reply.deadline_passed(500) == []
    assert not reply.ended


def test_failure_keeps_what_was_sent() -> None:
    reply = stream()
    reply.text("Half a", now=0.0)
    reply.text(" line", now=0.001)
    out = reply.failed("internal", "boom")
    end = out[-1]
    assert isinstance(end, ReplyEnd) and end.text == "Half a line"  # no fallback appended
    assert end.reason == "error" and end.error is not None and end.error.code == "internal"


def test_failure_before_any_text_sends_the_fallback() -> None:
    out = stream().failed("internal", "boom")
    assert [m.text for m in out if isinstance(m, ReplyDelta)] == ["Not now."]


def test_cancel_and_shutdown_reasons() -> None:
    cancelled = stream().finished(FinishedTurn("cancelled"))
    assert isinstance(cancelled[-1], ReplyEnd) and cancelled[-1].reason == "cancelled"
    stopping = stream().finished(FinishedTurn("cancelled"), stopping=True)
    end = stopping[-1]
    assert isinstance(end, ReplyEnd) and end.error is not None and end.error.code == "shutdown"
    reply = stream()
    reply.text("Wait", now=0.0)
    reply.text("ing", now=0.001)
    out = reply.shutdown()
    assert [m.text for m in out if isinstance(m, ReplyDelta)] == ["ing"]  # flushed first
    assert isinstance(out[-1], ReplyEnd) and out[-1].text == "Waiting"


EVENTS = st.lists(
    st.one_of(
        st.tuples(st.just("text"), st.text(max_size=5)),
        st.tuples(st.just("wait"), st.floats(0, 0.05)),
        st.tuples(st.just("tick"), st.none()),
        st.tuples(st.just("finished"), st.sampled_from(["stop", "length", "cancelled", "error"])),
        st.tuples(st.just("failed"), st.none()),
        st.tuples(st.just("deadline"), st.none()),
        st.tuples(st.just("shutdown"), st.none()),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(EVENTS, st.sampled_from([0.0, 0.01, 0.015]))
def test_fuzz_any_order_of_events_keeps_the_guarantees(
    events: list[tuple[str, object]], interval: float
) -> None:
    reply = stream(interval)
    now = 0.0
    out: list[ReplyMessage] = []
    for kind, value in events:
        if kind == "text":
            out += reply.text(str(value), now)
        elif kind == "wait":
            now += float(value)  # type: ignore[arg-type]
        elif kind == "tick":
            out += reply.tick(now)
        elif kind == "finished":
            out += reply.finished(FinishedTurn(str(value)))
        elif kind == "failed":
            out += reply.failed("internal", "x")
        elif kind == "deadline":
            out += reply.deadline_passed(100)
        else:
            out += reply.shutdown()
    out += reply.shutdown()  # the server always ends a reply in the end
    ends = [m for m in out if isinstance(m, ReplyEnd)]
    assert len(ends) == 1 and out[-1] is ends[0]  # exactly one end, and nothing after it
    deltas = [m for m in out if isinstance(m, ReplyDelta)]
    assert [d.seq for d in deltas] == list(range(len(deltas)))  # gap-free seq
    assert all(d.text for d in deltas)
    assert "".join(d.text for d in deltas) == ends[0].text
