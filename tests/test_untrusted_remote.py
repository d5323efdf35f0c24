"""The openai backend facing a server that is misconfigured, down, hostile or slow: what
a game client may learn from its errors (nothing of the URL's credentials, nothing of the
server's error body), a token/text mismatch said at start, a whole-request deadline, the
game-action grammar in the chat form, and text arguments without control characters."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import unicodedata
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import servers

from npc_engine.actions import action_grammar, parse_action
from npc_engine.backends import make_generator
from npc_engine.client import NpcClient
from npc_engine.config import load_config
from npc_engine.errors import ConfigError, GenerationError, GenerationUnavailableError
from npc_engine.generation.base import GenerationParams
from npc_engine.model_registry import MODELS, TINY_CHAT_MODEL, ModelCache
from npc_engine.persona.model import GameActionSpec
from npc_engine.runtime import open_engine
from npc_engine.server import NpcServer
from tests.conftest import SAMPLE_PERSONAS

SECRETS = ("gameops", "S3cretPass", "sk-live-XYZ")
MESSAGES = [
    {"role": "system", "content": "You are Mara, an innkeeper. The vault code is 7712."},
    {"role": "user", "content": "A room, please."},
]


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])  # nothing listens there once closed


def remote(url: str, **settings: Any) -> Any:
    config = load_config(
        generation={"backend": "openai", "url": url, "connect_timeout": 1, **settings}
    )
    return make_generator(config, lambda _message: None)


# -- what a client learns from an error -----------------------------------------------------


@pytest.mark.timeout(30)
def test_urls_are_logged_without_their_secrets() -> None:
    from npc_engine.generation.remote import redact_url

    shown = redact_url("https://gameops:S3cretPass@gen.internal:8443/v1?api_key=sk-live-XYZ&x=1")
    assert shown == "https://***@gen.internal:8443/v1?api_key=%2A%2A%2A&x=%2A%2A%2A"
    assert redact_url("http://127.0.0.1:8080/v1") == "http://127.0.0.1:8080/v1"


@pytest.mark.timeout(120)
async def test_a_turn_against_a_closed_port_tells_the_client_no_secret(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = closed_port()
    url = f"http://gameops:S3cretPass@127.0.0.1:{port}/v1?api_key=sk-live-XYZ"
    config = load_config(
        personas_dir=SAMPLE_PERSONAS,
        data_dir=tmp_path / "data",
        generation={"backend": "openai", "url": url, "retries": 0, "model": "tiny"},
        memory={"backend": "memory"},
    )
    runtime = open_engine(config)
    server = NpcServer(runtime.engine, port=0)
    await server.start()
    try:
        with caplog.at_level(logging.WARNING):
            async with await NpcClient.connect(server.url) as client:
                stream = await client.say("mara", "Got a room?", max_tokens=8)
                deltas = [delta async for delta in stream]
                end = await stream.result()
    finally:
        await server.stop()
        runtime.close()
    assert end["reason"] == "error"
    assert end["error"]["code"] == "unavailable"
    assert end["error"]["message"] == "the model server is unavailable"
    told = json.dumps([end, deltas])
    for secret in (*SECRETS, str(port)):
        assert secret not in told
    # The operator's log has the detail, with the URL's secrets starred out.
    logged = caplog.text
    assert f"http://***@127.0.0.1:{port}/v1?api_key=%2A%2A%2A" in logged
    for secret in SECRETS:
        assert secret not in logged


class RefusingServer:
    """Answers every completion with ``status`` and an error body quoting the request (as
    llama-cpp-python's server's validation errors do: the whole prompt)."""

    def __init__(self, status: int) -> None:
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                """Quiet."""

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                echoed = json.dumps({"error": {"message": f"invalid input: {body.decode()}"}})
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(echoed)))
                self.end_headers()
                self.wfile.write(echoed.encode())

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/v1"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("status", "error", "message"),
    [
        (422, GenerationError, "the model server refused the request (HTTP 4xx)"),
        (500, GenerationUnavailableError, "the model server is unavailable (HTTP 5xx)"),
    ],
)
def test_the_servers_error_body_never_reaches_the_error(
    status: int, error: type[Exception], message: str
) -> None:
    server = RefusingServer(status)
    try:
        generator = remote(server.url, send="text", retries=0, model="tiny")
        with pytest.raises(error) as failure:
            generator.generate(generator.render(MESSAGES), GenerationParams(), lambda _p: None)
        generator.close()
    finally:
        server.close()
    assert str(failure.value) == message
    assert "7712" not in str(failure.value) and "invalid input" not in str(failure.value)


# -- a server that takes text only, told at start -------------------------------------------


@pytest.fixture(scope="module")
def text_only_server() -> Iterator[str]:
    """llama-cpp-python's OpenAI-compatible server on the tiny model: text prompts only."""
    model = ModelCache(load_config().cache_dir).path_of(MODELS[TINY_CHAT_MODEL])
    with servers.llama_cpp_server(model, 2048, threads=2) as url:
        yield url


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_send_tokens_to_a_text_only_server_fails_at_start_naming_the_setting(
    text_only_server: str,
) -> None:
    with pytest.raises(ConfigError, match=r"generation\.send.*set generation\.send: text"):
        remote(text_only_server)
    generator = remote(text_only_server, send="text")  # the setting it names works
    pieces: list[str] = []
    stats = generator.generate(
        generator.render(MESSAGES), GenerationParams(max_tokens=4, temperature=0), pieces.append
    )
    generator.close()
    assert stats.finish_reason in ("stop", "length") and "".join(pieces)


NAME = GameActionSpec.model_validate(
    {"name": "tell_name", "description": "say a name", "params": {"name": {"max_length": 8}}}
)
GIVE = GameActionSpec.model_validate(
    {"name": "give_item", "description": "hand over", "params": {"item": ["room_key", "ale"]}}
)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_chat_form_chooses_actions_under_the_grammar(text_only_server: str) -> None:
    generator = remote(text_only_server, api="chat")
    messages = [
        *MESSAGES,
        {"role": "assistant", "content": "Here is your key."},
        {"role": "user", "content": "Does Mara now do one of: give_item, tell_name, none?"},
    ]
    answers = []
    for seed in (1, 2, 3):
        pieces: list[str] = []
        params = GenerationParams(
            max_tokens=32, temperature=1.0, seed=seed, grammar=action_grammar([GIVE, NAME])
        )
        generator.generate(generator.render(messages), params, pieces.append)
        answers.append("".join(pieces))
    generator.close()
    for answer in answers:  # free text (no grammar sent) is neither
        assert answer == "none" or parse_action(answer, [GIVE, NAME]) is not None, answers


# -- a trickling server: the deadline is per request ---------------------------------------


class TricklingServer:
    """Accepts, then sends one byte every ``every`` seconds, for ``seconds`` at most: of
    the response headers (``phase="headers"``) or of an SSE event that never ends."""

    def __init__(self, phase: str, every: float = 0.2, seconds: float = 30.0) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/v1"
        self.stop = threading.Event()
        self.phase, self.every, self.seconds = phase, every, seconds
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn: socket.socket) -> None:
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nX-Slow: "
        event = b'data: {"id":"x","object":"text_completion","choices":[{"text":"' + b"a" * 9999
        with conn:
            conn.recv(65536)
            try:
                if self.phase == "headers":
                    payload = head + b"x" * 9999
                else:
                    conn.sendall(head + b"1\r\n\r\n")
                    payload = event
                ends = time.monotonic() + self.seconds
                for byte in payload:
                    if self.stop.wait(self.every) or time.monotonic() > ends:
                        return
                    conn.sendall(bytes([byte]))
            except OSError:
                return

    def close(self) -> None:
        self.stop.set()
        self.listener.close()
        self.thread.join(5)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("phase", ["headers", "body"])
def test_a_trickling_server_is_cut_off_at_the_deadline(phase: str) -> None:
    server = TricklingServer(phase)
    try:
        generator = remote(server.url, send="text", retries=0, model="tiny", timeout=1.5)
        started = time.monotonic()
        with pytest.raises(GenerationUnavailableError, match="timed out"):
            generator.generate(generator.render(MESSAGES), GenerationParams(), lambda _p: None)
        took = time.monotonic() - started
        generator.close()
    finally:
        server.close()
    assert 1.4 < took < 4.0, took  # each read (a byte every 0.2 s) is well within 1.5 s


# -- text arguments of a chosen action --------------------------------------------------------


@pytest.mark.timeout(30)
def test_text_arguments_reach_the_game_without_control_characters() -> None:
    chosen = parse_action('tell_name(name="Ro\x1bo\rk\u202e\u200b")', [NAME])
    assert chosen is not None
    assert chosen.args == {"name": "Roo k"}
    assert parse_action('tell_name(name="\x07\x1b\u200b")', [NAME]) is None  # nothing left
    assert all(not unicodedata.category(c).startswith("C") for c in str(chosen.args["name"]))
    # The grammar lets no control character through in the first place.
    assert "\\x01-\\x1f\\x7f" in action_grammar([NAME])
