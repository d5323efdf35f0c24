"""The ``npc-engine`` command.

Errors reach the user as one message; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from npc_engine.cli_parser import build_parser
from npc_engine.config import EngineConfig, load_config
from npc_engine.errors import NpcEngineError


def _config(args: argparse.Namespace, extra: dict[str, Any] | None = None) -> EngineConfig:
    names = [
        "personas_dir",
        "data_dir",
        "cache_dir",
        "model",
        "chat_format",
        "n_ctx",
        "n_threads",
        "n_gpu_layers",
        "seed",
        "temperature",
    ]
    overrides = {name: getattr(args, name, None) for name in names}
    overrides.update(extra or {})
    return load_config(args.config, **overrides)


def cmd_validate(args: argparse.Namespace) -> int:
    from npc_engine.persona.authoring import prefix_warnings, secret_leaks
    from npc_engine.persona.loader import load_personas

    config = _config(args)
    paths = args.paths or [config.personas_dir]
    registry = load_personas(paths)
    for problem in registry.problems:
        print(problem)
    warnings = [w for loaded in registry.personas.values() for w in secret_leaks(loaded)]
    if registry.personas and not args.no_sizes:
        sizes = _prefix_sizes(registry, config)
        if sizes:
            print(f"Stable prompt prefix (tokens of {config.model}, n_ctx={config.n_ctx}):")
            for npc_id, size in sizes.items():
                print(f"  {npc_id}: {size} ({size / config.n_ctx:.0%} of n_ctx)")
            warnings += prefix_warnings(registry, sizes, config.n_ctx)
    for warning in warnings:
        print(warning)
    loaded = len(registry.personas)
    if registry.problems:
        print(f"{len(registry.problems)} problem(s); {loaded} persona(s) valid.", file=sys.stderr)
        return 1
    worlds = len(registry.worlds)
    lore = sum(len(w.lore) for w in registry.worlds.values())
    print(
        f"OK: {loaded} persona(s), {worlds} world file(s) and {lore} lore entries valid"
        + (f"; {len(warnings)} warning(s)." if warnings else ".")
    )
    return 0


def _prefix_sizes(registry: Any, config: EngineConfig) -> dict[str, int]:
    from npc_engine.model_files import resolve_chat_model
    from npc_engine.persona.authoring import prefix_sizes

    try:
        model_path, chat_format = resolve_chat_model(config, _progress)
        return prefix_sizes(registry, model_path, chat_format, config.n_ctx)
    except NpcEngineError as exc:
        print(f"(prompt prefix sizes not reported: {exc})", file=sys.stderr)
        return {}


def cmd_new(args: argparse.Namespace) -> int:
    from npc_engine.persona.authoring import schema_ref, skeleton

    folder = args.out or _config(args).personas_dir
    path = folder / f"{args.npc_id}.yaml"
    if path.exists() and not args.force:
        raise NpcEngineError(f"{path} exists; pass --force to overwrite it")
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(skeleton(args.npc_id, schema_ref("persona", folder)))
    print(f"wrote {path}; fill it in, then: npc-engine validate {folder}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from npc_engine.card_files import read_card
    from npc_engine.cards import card_to_persona, check_target
    from npc_engine.lorebook_formats import lorebook_format
    from npc_engine.persona.authoring import check_written, write_persona_files

    folder = args.out or _config(args).personas_dir
    card = read_card(args.file)
    if lorebook_format(card) is not None:
        return _import_lorebook(args, folder, card)
    if args.known_by:
        raise NpcEngineError("--known-by is for a lorebook; a card's lore is its own NPC's")
    imported = card_to_persona(args.file, args.npc_id, card)
    check_target(args.file, folder, imported)
    for warning in imported.warnings:
        print(f"warning: {warning}")
    written = write_persona_files(
        folder, imported.persona, imported.lore, args.file.name, force=args.force
    )
    for path in written:
        print(f"wrote {path}")
    for note in imported.notes:
        print(f"note: {note}")
    problems = [p for p in check_written(written) if any(str(w) in p for w in written)]
    for problem in problems:
        print(problem)
    return 1 if problems else 0


def _import_lorebook(args: argparse.Namespace, folder: Path, book: dict[str, Any]) -> int:
    """``lore/<name>.yaml`` from a standalone lorebook (docs/lore.md, "Lorebooks")."""
    from npc_engine.lorebooks import check_lore_target, lorebook_to_lore, write_lorebook
    from npc_engine.persona.loader import load_personas

    known_by = [n.strip() for names in args.known_by for n in names.split(",") if n.strip()]
    imported = lorebook_to_lore(args.file, book, args.npc_id, known_by or None)
    warnings = check_lore_target(args.file, folder, imported, force=args.force)
    for warning in [*imported.warnings, *warnings]:
        print(f"warning: {warning}")
    written = write_lorebook(folder, imported, args.file.name, force=args.force)
    for path in written:
        print(f"wrote {path}")
    for note in imported.notes:
        print(f"note: {note}")
    problems = [str(p) for p in load_personas(folder).problems if any(p.file == w for w in written)]
    for problem in problems:
        print(problem)
    return 1 if problems else 0


def _export_lorebook(args: argparse.Namespace) -> int:
    from npc_engine.lorebook_export import lore_to_lorebook, read_lore_file, write_lorebook_json
    from npc_engine.persona.loader import LORE_FOLDER

    path = Path(args.lore)
    if not path.suffix and not path.exists():
        path = _config(args).personas_dir / LORE_FOLDER / f"{args.lore}.yaml"
    if args.png is not None or args.format == "card-v3":
        raise NpcEngineError("--lore writes a lorebook JSON; --png and card-v3 are for an NPC")
    lore = read_lore_file(path)
    parts = path.with_suffix("").parts
    inside = [i for i, part in enumerate(parts) if part == LORE_FOLDER]
    name = ".".join(parts[inside[-1] + 1 :]) if inside else path.stem  # the loader's ids
    out = args.out or Path(f"{path.stem}.json")
    write_lorebook_json(lore_to_lorebook(lore, name, args.format), out)
    print(f"wrote {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from npc_engine.card_export import persona_to_card, write_card_json, write_card_png
    from npc_engine.errors import UnknownNpcError
    from npc_engine.persona.authoring import own_lore
    from npc_engine.runtime import load_registry

    if args.lore is not None:
        return _export_lorebook(args)
    if args.npc_id is None or args.format not in (None, "card-v3"):
        raise NpcEngineError("export: name an NPC, or a lorebook file with --lore")
    registry = load_registry(_config(args))
    loaded = registry.get(args.npc_id)
    if loaded is None:
        raise UnknownNpcError(args.npc_id, registry.ids())
    card = persona_to_card(loaded.persona, own_lore(loaded))
    if args.png is not None:
        out = args.out or Path(f"{args.npc_id}.png")
        write_card_png(card, args.png, out)
    else:
        out = args.out or Path(f"{args.npc_id}.json")
        write_card_json(card, out)
    print(f"wrote {out}")
    return 0


def _parse_context(pairs: Sequence[str]) -> dict[str, str]:
    context = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise NpcEngineError(f"--context expects KEY=VALUE, got {pair!r}")
        context[key.strip()] = value.strip()
    return context


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cmd_say(args: argparse.Namespace) -> int:
    from npc_engine.errors import UnknownNpcError
    from npc_engine.runtime import load_registry, open_engine

    context = _parse_context(args.context)
    config = _config(args)
    registry = load_registry(config)  # a typo in --npc fails before any model loads
    if registry.get(args.npc) is None:
        raise UnknownNpcError(args.npc, registry.ids())
    runtime = open_engine(config, _progress)
    try:
        result = runtime.engine.say(
            args.npc,
            args.text,
            player_id=args.player,
            context=context,
            max_tokens=args.max_tokens,
            on_delta=lambda piece: print(piece, end="", flush=True),
        )
        print(flush=True)
        ids = result.memory_write.result(timeout=60) if result.memory_write else []
        timings = result.timings
        ttft = f"{timings.ttft_ms:.0f}" if timings.ttft_ms is not None else "-"
        print(
            f"[{result.reason} · first token {ttft} ms · total {timings.total_ms:.0f} ms · "
            f"retrieval {timings.retrieval_ms:.0f} ms · prompt {result.prompt_tokens} tokens "
            f"({result.cached_tokens} cached) · {result.completion_tokens} generated · "
            f"{len(result.memories)} memories recalled · {len(ids)} stored]",
            file=sys.stderr,
        )
        if result.error:
            print(f"generation failed, fallback line used: {result.error}", file=sys.stderr)
        if args.show_prompt:
            print("--- memories ---", file=sys.stderr)
            for m in result.memories:
                print(
                    f"{m.score:.2f} (rel {m.relevance:.2f} rec {m.recency:.3f} "
                    f"imp {m.importance:.1f}) {m.memory.text}",
                    file=sys.stderr,
                )
            print("--- prompt ---", file=sys.stderr)
            print(result.prompt, file=sys.stderr)
        if args.json:
            print(json.dumps(_turn_json(result, ids), indent=2))
        return 0 if result.reason != "error" else 1
    finally:
        runtime.close()


def _turn_json(result: Any, ids: list[str]) -> dict[str, Any]:
    """The turn as ``reply.end`` reports it (with ``inspect``), and what only a local run
    knows: who chose the game action, every timing, the ids of the memories stored."""
    from npc_engine.serving.wire import reply_end

    return {
        "npc_id": result.npc_id,
        "player_id": result.player_id,
        **reply_end(result).model_dump(mode="json", exclude={"type", "re", "scene_id"}),
        "game_action_by": result.action_by,  # "meaning" (the embedder), "model", or null
        "timings_ms": vars(result.timings),
        "stored_memory_ids": ids,
    }


def cmd_models(args: argparse.Namespace) -> int:
    from npc_engine.model_registry import DEFAULT_CHAT_MODEL, EMBEDDING_MODEL, MODELS, ModelCache

    config = load_config(args.config, cache_dir=args.cache_dir)
    cache = ModelCache(config.cache_dir)
    unknown = [model_id for model_id in args.ids if model_id not in MODELS]
    if unknown:
        raise NpcEngineError(f"Unknown model(s): {', '.join(unknown)}. Known: {', '.join(MODELS)}")
    if args.action == "list":
        print(f"Model cache: {config.cache_dir}")
        for spec in MODELS.values():
            state = "installed" if cache.is_installed(spec) else "not installed"
            default = " (default)" if spec.id in (DEFAULT_CHAT_MODEL, EMBEDDING_MODEL) else ""
            size = f"{spec.size / 1e6:,.0f} MB"
            print(
                f"  {spec.id:<28} {spec.kind:<9} {size:>8}  {state:<14} {spec.description}", end=""
            )
            print(default)
            print(f"  {'':<28} licence: {spec.license}")
            if spec.speed:
                print(f"  {'':<28} speed: {spec.speed}")
            print(f"  {'':<28} {cache.model_dir(spec)}")
        return 0
    ids = args.ids or [DEFAULT_CHAT_MODEL, EMBEDDING_MODEL]
    if args.action == "install":
        for model_id in ids:
            path = cache.install(MODELS[model_id], _progress)
            print(f"{model_id}: installed and verified in {path}")
        return 0
    failed = False
    for model_id in ids:
        problems = cache.verify(MODELS[model_id])
        for problem in problems:
            print(problem)
        failed = failed or bool(problems)
        if not problems:
            print(f"{model_id}: every file matches its pinned sha256")
    return 1 if failed else 0


def cmd_schema(args: argparse.Namespace) -> int:
    from npc_engine.schemas import schema_text

    sys.stdout.write(schema_text(args.name))
    return 0


WEB_DEMO = Path(__file__).resolve().parent.parent / "examples" / "web"


def cmd_demo_web(args: argparse.Namespace) -> int:
    """A static file server for examples/web/ (a source checkout's: the demo is not part of
    the installed package), on 127.0.0.1 only."""
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import quote

    if not (WEB_DEMO / "index.html").is_file():
        raise NpcEngineError(
            f"demo-web serves {WEB_DEMO}, which is missing: run it from a source checkout "
            "of npc-engine (or serve examples/web/ with any static file server)."
        )

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def end_headers(self) -> None:
            self.send_header("Cache-Control", "no-store")
            super().end_headers()

    handler = functools.partial(Quiet, directory=str(WEB_DEMO))
    with ThreadingHTTPServer(("127.0.0.1", args.port), handler) as httpd:
        origin = f"http://127.0.0.1:{httpd.server_address[1]}"
        print(
            f"npc-engine web demo at {origin}/?server={quote(args.server, safe=':/')}", flush=True
        )
        print(f"the engine must allow this page: npc-engine serve --origin {origin}", flush=True)
        httpd.serve_forever()  # until Ctrl+C
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from npc_engine.runtime import open_engine
    from npc_engine.server import NpcServer, refuse_public_without_token, tls_context

    config = _config(
        args,
        {
            "host": args.host,
            "port": args.port,
            "token": args.token,
            "origins": args.origin,
            "allow_inspect": args.allow_inspect,
            "tls_cert": args.tls_cert,
            "tls_key": args.tls_key,
            "warm": args.warm,
        },
    )
    refuse_public_without_token(config.host, config.token)  # before any model loads
    if (config.tls_cert is None) != (config.tls_key is None):
        raise NpcEngineError("TLS needs both --tls-cert and --tls-key.")
    ssl_context = (
        tls_context(str(config.tls_cert), str(config.tls_key))
        if config.tls_cert is not None and config.tls_key is not None
        else None
    )
    runtime = open_engine(config, _progress)
    warm = runtime.registry.ids() if config.warm == ["all"] else config.warm
    for npc_id in warm:
        runtime.engine.persona(npc_id)  # an unknown id stops here, before serving

    async def run() -> None:
        server = NpcServer(
            runtime.engine,
            host=config.host,
            port=config.port,
            token=config.token,
            limits=config.limits,
            origins=config.origins,
            allow_inspect=config.allow_inspect,
            ssl_context=ssl_context,
        )
        await server.start()
        npcs = ", ".join(runtime.registry.ids())
        print(f"npc-engine serving {server.url} · NPCs: {npcs}", flush=True)
        if warm:
            server.warm_in_background(warm, _progress)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(signum, stop.set)
            except (NotImplementedError, AttributeError):  # Windows' loops have none
                signal.signal(signum, lambda *_: loop.call_soon_threadsafe(stop.set))
        await stop.wait()
        await server.stop()

    try:
        asyncio.run(run())
    finally:
        runtime.close()
    return 0


def cmd_memory(args: argparse.Namespace) -> int:
    from npc_engine.backends import make_store
    from npc_engine.memory.chroma_store import ChromaMemoryStore

    store = make_store(_config(args), _progress)
    if not isinstance(store, ChromaMemoryStore):
        store.close()
        raise NpcEngineError("memory reindex needs the Chroma store (memory.backend: chroma).")
    try:

        def report(done: int, total: int) -> None:
            print(f"\rre-embedded {done} of {total} memories", end="", file=sys.stderr)

        count = store.format.reindex(report)
        print(f"\nreindexed {count} memories", file=sys.stderr)
    finally:
        store.close()
    return 0


def cmd_save(args: argparse.Namespace) -> int:
    from npc_engine.backends import make_store
    from npc_engine.memory.saves import read_save_file

    config = _config(args)
    if args.action != "list" and (args.save_id is None or args.file is None):
        raise NpcEngineError(f"save {args.action} needs SAVE_ID and FILE.")
    store = make_store(config, _progress)
    try:
        if args.action == "list":
            for info in store.saves.list_saves():
                print(f"{info.save_id}\t{info.iso_created_at()}\t{info.memories} memories")
        elif args.action == "export":
            args.file.write_bytes(store.saves.export_save(args.save_id))
            print(f"wrote {args.file}")
        else:
            info = store.saves.import_save(args.save_id, read_save_file(args.file))
            print(f"imported {info.save_id} ({info.memories} memories)")
    finally:
        store.close()
    return 0


def cmd_playtest(args: argparse.Namespace) -> int:
    from npc_engine.playtest.launch import run_playtest

    models: list[str] = args.model or []
    args.model = None
    return run_playtest(args, _config(args), models, _progress)


COMMANDS = {
    "validate": cmd_validate,
    "new": cmd_new,
    "import": cmd_import,
    "export": cmd_export,
    "say": cmd_say,
    "models": cmd_models,
    "schema": cmd_schema,
    "demo-web": cmd_demo_web,
    "serve": cmd_serve,
    "save": cmd_save,
    "memory": cmd_memory,
    "playtest": cmd_playtest,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.ERROR,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return COMMANDS[args.command](args)
    except NpcEngineError as exc:
        if args.debug:
            raise
        print(f"npc-engine: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # an unexpected bug: still one line unless --debug
        if args.debug:
            raise
        print(
            f"npc-engine: internal error: {type(exc).__name__}: {exc} "
            "(run with --debug for details)",
            file=sys.stderr,
        )
        return 3


if __name__ == "__main__":
    sys.exit(main())
