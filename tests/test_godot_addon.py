"""The Godot addon's files: plugin wiring, the API the issue promises, and wire names.

Godot itself is not installable here, so the GDScript is parsed and linted with gdtoolkit
(in `tools/dev.sh test`), and these tests check what can be checked from the outside.
"""

from __future__ import annotations

import configparser
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import TypeAdapter

from npc_engine.protocol import REQUEST_TYPES, ServerMessage
from tests.conftest import REPO

ADDON = REPO / "godot_bridge/addons/npc_engine"
CLIENT = (ADDON / "npc_engine_client.gd").read_text()
HELPER = (ADDON / "npc_protocol.gd").read_text()
GD_FILES = sorted(REPO.glob("godot_bridge/**/*.gd")) + sorted(
    (REPO / "examples/godot_demo").glob("*.gd")
)


def test_plugin_cfg_points_at_the_plugin_script_which_registers_the_autoload() -> None:
    parser = configparser.ConfigParser()
    parser.read(ADDON / "plugin.cfg")
    script = parser["plugin"]["script"].strip('"')
    assert (ADDON / script).is_file()
    plugin = (ADDON / script).read_text()
    assert "extends EditorPlugin" in plugin
    assert "add_autoload_singleton(" in plugin and "remove_autoload_singleton(" in plugin
    autoload_path = re.search(r'AUTOLOAD_PATH := "res://addons/npc_engine/([^"]+)"', plugin)
    assert autoload_path is not None and (ADDON / autoload_path.group(1)).is_file()


def test_client_has_the_promised_signals_and_methods() -> None:
    signals = set(re.findall(r"^signal (\w+)", CLIENT, re.MULTILINE))
    assert {
        "connected",
        "reply_started",
        "reply_delta",
        "reply_finished",
        "error_received",
        "disconnected",
        "scene_line_started",
        "scene_line_delta",
        "scene_line_finished",
        "scene_ended",
        "rumours_spread",
    } <= signals
    methods = set(re.findall(r"^func (\w+)", CLIENT, re.MULTILINE))
    assert {"say", "cancel", "send_event", "list_npcs", "_process"} <= methods
    assert {"start_scene", "say_in_scene", "world_tick"} <= methods
    assert "WebSocketPeer" in CLIENT and "_socket.poll()" in CLIENT


def _function(name: str) -> str:
    """The body of a GDScript function of the client (up to the next top-level line)."""
    match = re.search(rf"^func {name}\(.*?(?=^\S)", CLIENT + "\n#", re.MULTILINE | re.DOTALL)
    assert match is not None, name
    return match.group(0)


def test_inbound_buffer_fits_the_largest_memory_answer() -> None:
    """Size arithmetic: the biggest 100-item memory.items the server can send, encoded as
    the server encodes it, fits the buffer the addon gives every socket it opens."""
    from npc_engine.protocol import MemoryItem, MemoryItems, encode
    from npc_engine.turns import MAX_MEMORY_CHARS

    longest_id = "x" * 64
    worst_text = f"The player {longest_id} told me: '" + "\U0001f41f" * MAX_MEMORY_CHARS + "'"
    item = MemoryItem(
        id=longest_id,
        text=worst_text,
        kind="dialogue",
        importance=10,
        player_id=longest_id,
        created_at="2026-12-02T13:09:07.123456Z",
        score=-123.456789012345,
    )
    frame = encode(MemoryItems(re="r" * 128, items=[item] * 100), "json")
    size = len(frame.encode("utf-8") if isinstance(frame, str) else frame)
    assert size > 64 * 1024  # Godot's default would not hold it
    declared = re.search(r"^@export var inbound_buffer_bytes := (.+)$", CLIENT, re.MULTILINE)
    assert declared is not None
    buffer_bytes = eval(declared.group(1), {"__builtins__": {}})  # an arithmetic literal
    assert size <= buffer_bytes
    assert "_socket.inbound_buffer_size = inbound_buffer_bytes" in _function("_open")


def test_a_refused_hello_closes_and_lost_requests_are_reported() -> None:
    on_error = _function("_on_error")
    # Any error answering the hello closes the socket (no client stuck in HANDSHAKE) ...
    assert "request_id == _hello_id" in on_error and "_socket.close(" in on_error
    assert "FINAL_HELLO_ERRORS" in on_error  # ... and gives up only where retrying is futile
    on_closed = _function("_on_closed")
    # Requests that were sent and never answered end with an error signal on a drop.
    assert 'error_received.emit(request_id, "disconnected"' in on_closed
    assert "reply_finished.emit(request_id, cut_off)" in on_closed


def test_every_message_type_in_the_gdscript_exists_in_protocol_v1() -> None:
    built = set(re.findall(r'"type": "([\w.]+)"', HELPER))
    assert built and built <= REQUEST_TYPES
    schema = TypeAdapter(ServerMessage).json_schema()
    server_types = {
        definition["properties"]["type"]["const"]
        for definition in schema["$defs"].values()
        if "type" in definition.get("properties", {})
    }
    handled = set(re.findall(r'^\t\t"([\w.]+)":', CLIENT, re.MULTILINE))
    handled |= set(re.findall(r'"(reply\.\w+)"', HELPER))
    assert handled <= server_types
    assert {"welcome", "error", "reply.start", "reply.delta", "reply.end", "scene.end"} <= handled
    assert {"scene.start", "world.tick"} <= built


def test_demo_uses_the_addon_through_its_autoload() -> None:
    project = (REPO / "examples/godot_demo/project.godot").read_text()
    assert 'NpcEngine="*res://addons/npc_engine/npc_engine_client.gd"' in project
    assert (REPO / "examples/godot_demo/addons/npc_engine/plugin.cfg").is_file()


@pytest.mark.parametrize("path", GD_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_gdscript_parses(path: Path) -> None:
    gdparse = Path(sys.executable).with_name("gdparse")
    result = subprocess.run([gdparse, str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
