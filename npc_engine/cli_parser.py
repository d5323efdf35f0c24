"""The ``npc-engine`` command line: its subcommands, flags and help texts (``cli.py`` runs
them)."""

from __future__ import annotations

import argparse
from pathlib import Path

from npc_engine import __version__

SCHEMA_NAMES = ("persona", "world", "lore", "protocol")


def _engine_flags(parser: argparse.ArgumentParser, *, several_models: bool = False) -> None:
    group = parser.add_argument_group("engine settings (override env and config file)")
    group.add_argument("--personas", dest="personas_dir", type=Path, help="personas folder")
    group.add_argument("--data-dir", type=Path, help="memory folder (one engine owns it)")
    group.add_argument("--cache-dir", type=Path, help="model cache folder")
    if several_models:
        group.add_argument(
            "--model",
            action="append",
            help="known model id or GGUF path; repeat to compare models side by side",
        )
    else:
        group.add_argument("--model", help="known model id or path to a GGUF file")
    group.add_argument("--chat-format", help="chat format for a GGUF without a template")
    group.add_argument("--n-ctx", type=int)
    group.add_argument("--n-threads", type=int)
    group.add_argument("--n-gpu-layers", type=int)
    group.add_argument("--seed", type=int)
    group.add_argument("--temperature", type=float)


def _personas_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--personas", dest="personas_dir", type=Path, help="personas folder")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="npc-engine", description="Local-first dialogue engine for game NPCs."
    )
    parser.add_argument("--version", action="version", version=f"npc-engine {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("--config", type=Path, help="YAML config file (default: ./npc-engine.yaml)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    validate = commands.add_parser(
        "validate",
        help="check persona, world and lore files; report each NPC's prompt prefix size",
    )
    validate.add_argument(
        "paths", nargs="*", type=Path, help="files or folders (default: personas)"
    )
    validate.add_argument(
        "--no-sizes", action="store_true", help="skip the prefix sizes (no model needed)"
    )
    _engine_flags(validate)

    new = commands.add_parser("new", help="write a persona skeleton, every field explained")
    new.add_argument("npc_id", help="the new NPC's id (also its file name)")
    new.add_argument("--out", type=Path, help="folder (default: the personas folder)")
    new.add_argument("--force", action="store_true", help="overwrite an existing file")
    _personas_flag(new)

    importer = commands.add_parser(
        "import",
        help="a Character Card (V1/V2/V3 .json, .png, .charx) as a persona, or a lorebook "
        "(SillyTavern World Info, a character_book on its own) as lore/NAME.yaml",
    )
    importer.add_argument("file", type=Path, help="the card or lorebook")
    importer.add_argument("--out", type=Path, help="folder (default: the personas folder)")
    importer.add_argument(
        "--id", dest="npc_id", help="NPC id, or lorebook name (default: from the name)"
    )
    importer.add_argument(
        "--known-by",
        action="append",
        default=[],
        metavar="NAMES",
        help="a lorebook: NPC ids or factions that know it, comma-separated (default: all)",
    )
    importer.add_argument("--force", action="store_true", help="overwrite existing files")
    _personas_flag(importer)

    exporter = commands.add_parser(
        "export", help="a persona as a Character Card V3, or a lorebook file (--lore)"
    )
    exporter.add_argument("npc_id", nargs="?", help="the NPC to export")
    exporter.add_argument(
        "--lore",
        metavar="FILE",
        help="a lorebook file (lore/NAME.yaml, or NAME) as a lorebook JSON instead",
    )
    exporter.add_argument(
        "--format",
        choices=["card-v3", "world-info", "lorebook-v3", "character-book"],
        help="card-v3 for an NPC; for --lore, the shape it was imported in (default: "
        "SillyTavern world-info)",
    )
    exporter.add_argument("--png", type=Path, metavar="AVATAR", help="write a PNG card on it")
    exporter.add_argument(
        "--out", type=Path, help="file (default: NPC_ID.json / NPC_ID.png / NAME.json)"
    )
    _personas_flag(exporter)

    say = commands.add_parser("say", help="one reply from an NPC, streamed; memory is written")
    say.add_argument("--npc", required=True, help="NPC id")
    say.add_argument("--player", default="player", help="player id (default: player)")
    say.add_argument(
        "--context", action="append", default=[], metavar="KEY=VALUE", help="game context"
    )
    say.add_argument("--max-tokens", type=int, help="cap on this reply")
    say.add_argument("--show-prompt", action="store_true", help="print prompt and memories")
    say.add_argument("--json", action="store_true", help="print the turn as JSON at the end")
    say.add_argument("text", help="what the player says")
    _engine_flags(say)

    models = commands.add_parser("models", help="list, install or verify known models")
    models.add_argument("action", nargs="?", default="list", choices=["list", "install", "verify"])
    models.add_argument("ids", nargs="*", help="model ids (default: the defaults)")
    models.add_argument("--cache-dir", type=Path)

    serve_cmd = commands.add_parser("serve", help="run the WebSocket server (protocol v1)")
    serve_cmd.add_argument("--host", help="listen address (default 127.0.0.1)")
    serve_cmd.add_argument("--port", type=int, help="port (default 8765; 0 picks a free one)")
    serve_cmd.add_argument("--token", help="required from clients; mandatory off loopback")
    serve_cmd.add_argument(
        "--origin",
        action="append",
        help="browser Origin allowed to connect, e.g. https://mygame.itch.io (repeat); "
        "native clients send none and are always allowed",
    )
    serve_cmd.add_argument(
        "--allow-inspect",
        action="store_true",
        default=None,
        help="serve say.inspect (the whole prompt, secrets included) to every connection",
    )
    serve_cmd.add_argument("--tls-cert", type=Path, help="PEM certificate chain: serve wss://")
    serve_cmd.add_argument("--tls-key", type=Path, help="PEM private key for --tls-cert")
    serve_cmd.add_argument(
        "--warm",
        nargs="+",
        metavar="ID",
        help="prepare these NPCs' prompts at start (all: every NPC), so their first lines "
        "come as fast as a warm turn; kept on disk, so a restart is warm at once",
    )
    _engine_flags(serve_cmd)

    memory = commands.add_parser("memory", help="maintain a data directory's memories")
    memory.add_argument(
        "action",
        choices=["reindex"],
        help="reindex: re-embed every memory from what was said (one-off, after upgrading)",
    )
    _engine_flags(memory)

    saves = commands.add_parser(
        "save", help="list, export or import save slots (while no server uses the data dir)"
    )
    saves.add_argument("action", choices=["list", "export", "import"])
    saves.add_argument("save_id", nargs="?", help="the save slot")
    saves.add_argument("file", nargs="?", type=Path, help="the .npcsave file to write or read")
    _engine_flags(saves)

    playtest = commands.add_parser(
        "playtest", help="talk to NPCs in a terminal UI, or run golden-conversation scripts"
    )
    playtest.add_argument("--npc", help="NPC to start with")
    playtest.add_argument("--player", default="player", help="player id (default: player)")
    playtest.add_argument("--max-tokens", type=int, help="cap on each reply in the UI")
    playtest.add_argument("--url", help="use a running server (ws://…) instead of in-process")
    playtest.add_argument("--token", help="token for --url")
    playtest.add_argument("--script", type=Path, help="run a golden-conversation YAML, no UI")
    playtest.add_argument(
        "--out", type=Path, help="report folder for --script (default: playtest-results/NAME)"
    )
    _engine_flags(playtest, several_models=True)

    schema = commands.add_parser("schema", help="print a JSON Schema")
    schema.add_argument("name", choices=SCHEMA_NAMES)

    demo_web = commands.add_parser(
        "demo-web", help="serve the browser demo (examples/web/) on loopback"
    )
    demo_web.add_argument("--port", type=int, default=8080, help="port (0 picks a free one)")
    demo_web.add_argument("--server", default="ws://127.0.0.1:8765/", help="engine URL")
    return parser
