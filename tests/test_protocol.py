"""The sans-I/O protocol layer, directly: every rule, and fuzzing."""

from __future__ import annotations

import json

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from npc_engine.protocol import Error, ProtocolSession, Say, encode
from npc_engine.schemas import committed_schema_path, schema_text


def hello(session: ProtocolSession, binary: bool = False) -> None:
    frame = {"type": "hello", "id": "h", "protocol": "1"}
    outcome = session.receive(msgpack.packb(frame) if binary else json.dumps(frame))
    assert outcome.error is None


def code_of(session: ProtocolSession, frame: str | bytes) -> tuple[str | None, str | None]:
    outcome = session.receive(frame)
    assert outcome.error is not None
    return outcome.error.code, outcome.error.re


def test_handshake_rules() -> None:
    session = ProtocolSession(token="s3cret")
    assert code_of(session, '{"type":"say","id":"1"}') == ("hello_required", "1")
    assert code_of(session, '{"type":"nonsense","id":"2"}') == ("hello_required", "2")
    assert session.receive('{"type":"ping","id":"p"}').request is not None
    outcome = session.receive('{"type":"hello","id":"3","protocol":"1","token":"nope"}')
    assert outcome.error is not None and outcome.error.code == "unauthorized"
    assert outcome.close_code == 4401
    outcome = session.receive('{"type":"hello","id":"4","protocol":"9","token":"s3cret"}')
    assert outcome.error is not None and outcome.error.details["supported"] == ["1"]
    assert (
        session.receive('{"type":"hello","id":"5","protocol":"1","token":"s3cret"}').error is None
    )
    assert code_of(session, '{"type":"hello","id":"6","protocol":"1"}') == ("invalid_request", "6")


def test_request_errors() -> None:
    session = ProtocolSession(max_frame_bytes=200)
    hello(session)
    assert code_of(session, "not json") == ("bad_frame", None)
    assert code_of(session, "[1, 2]") == ("bad_frame", None)
    assert code_of(session, b"\xc1") == ("bad_frame", None)
    assert code_of(session, "x" * 201) == ("too_large", None)
    assert code_of(session, '{"type":"say","npc_id":"mara","text":"hi"}') == (
        "invalid_request",
        None,
    )
    assert code_of(session, '{"type":"say","id":7}') == ("invalid_request", None)
    assert code_of(session, '{"type":"dance","id":"8"}') == ("unknown_type", "8")
    outcome = session.receive('{"type":"say","id":"9","npc_id":"mara","text":""}')
    assert outcome.error is not None and outcome.error.details["field"] == "text"
    assert code_of(session, '{"type":"memory.forget","id":"10","npc_id":"mara"}') == (
        "invalid_request",
        "10",
    )
    session.in_flight.add("11")
    assert code_of(session, '{"type":"ping","id":"11"}') == ("invalid_request", "11")


def test_typed_requests_ignore_unknown_fields_and_follow_encoding() -> None:
    session = ProtocolSession()
    hello(session, binary=True)
    assert session.encoding == "msgpack"
    frame = {"type": "say", "id": "1", "npc_id": "mara", "text": "hi", "colour": "red"}
    outcome = session.receive(msgpack.packb(frame))
    assert isinstance(outcome.request, Say) and outcome.request.player_id == "player"
    error = encode(Error(code="busy", message="later"), "json")
    assert json.loads(error) == {"type": "error", "code": "busy", "message": "later", "details": {}}


def test_committed_protocol_schema_is_fresh() -> None:
    assert committed_schema_path("protocol").read_text() == schema_text("protocol")


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)
request_like = st.fixed_dictionaries(
    {
        "type": st.sampled_from(
            ["say", "event", "memory.list", "memory.forget", "cancel", "ping", "x"]
        )
    },
    optional={
        "id": st.one_of(st.text(max_size=5), st.integers(0, 1000)),
        "npc_id": json_values,
        "text": json_values,
        "npc_ids": json_values,
        "limit": json_values,
        "all": json_values,
    },
)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(st.binary(max_size=300), st.text(max_size=300), request_like, json_values),
    st.booleans(),
)
def test_fuzz_never_raises(frame: object, binary: bool) -> None:
    session = ProtocolSession(max_frame_bytes=4096)
    hello(session)
    if isinstance(frame, (bytes, str)):
        raw: str | bytes = frame
    else:
        raw = msgpack.packb(frame) if binary else json.dumps(frame)
    outcome = session.receive(raw)
    assert (outcome.request is None) != (outcome.error is None)
    if outcome.error is not None:
        encode(outcome.error, outcome.encoding)  # every error can be sent back
    # and the session still serves a normal request afterwards
    ok = session.receive('{"type":"say","id":"after","npc_id":"mara","text":"hi"}')
    assert isinstance(ok.request, Say)
