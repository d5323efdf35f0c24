"""Starts the playtest UI or script mode from `npc-engine playtest` arguments."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from pathlib import Path

from npc_engine.config import EngineConfig
from npc_engine.errors import NpcEngineError
from npc_engine.playtest.local_session import LocalSession
from npc_engine.playtest.remote_session import RemoteSession
from npc_engine.playtest.script import (
    ModelRun,
    load_script,
    run_script,
    scratch_data_dir,
    write_reports,
)
from npc_engine.playtest.session import PlaytestSession

Progress = Callable[[str], None]


def run_playtest(
    args: argparse.Namespace, config: EngineConfig, models: list[str], progress: Progress
) -> int:
    if args.script is not None:
        return run_script_mode(args, config, models, progress)
    if len(models) > 1:
        raise NpcEngineError("Several --model values compare models in --script mode only.")
    if models:
        config = config.model_copy(update={"model": models[0]})
    from npc_engine.playtest.app import PlaytestApp

    async def open_session(report: Progress) -> PlaytestSession:
        if args.url:
            return await RemoteSession.open(args.url, args.token)
        return await LocalSession.open(config, report)

    app = PlaytestApp(
        open_session, npc_id=args.npc, player_id=args.player, max_tokens=args.max_tokens
    )
    app.run()
    return 0


def run_script_mode(
    args: argparse.Namespace, config: EngineConfig, models: list[str], progress: Progress
) -> int:
    script = load_script(args.script)
    if args.url and models:
        raise NpcEngineError("--model and --url exclude each other: the server has its model.")
    labels = [args.url] if args.url else (models or [config.model])
    runs: list[ModelRun] = []
    for label in labels:
        run_config = config.model_copy(
            update={
                "model": label,
                "temperature": script.sampling.temperature,
                "seed": script.sampling.seed,
                # A fresh memory folder per model unless --data-dir was given.
                "data_dir": args.data_dir or scratch_data_dir(),
            }
        )

        async def open_session(run_config: EngineConfig = run_config) -> PlaytestSession:
            if args.url:
                return await RemoteSession.open(args.url, args.token)
            return await LocalSession.open(run_config, progress)

        runs.append(
            asyncio.run(
                run_script(script, label, open_session, can_restart=not args.url, progress=progress)
            )
        )
    out_dir = args.out or Path("playtest-results") / args.script.stem
    written = write_reports(script, args.script, runs, out_dir)
    for run in runs:
        checks = run.checks
        failed = [c for c in checks if not c.passed]
        verdict = "passed" if run.passed else "FAILED"
        print(f"{run.label}: {verdict} ({len(checks) - len(failed)}/{len(checks)} checks)")
        for outcome in run.outcomes:
            for check in outcome.checks:
                if not check.passed:
                    print(f"  turn {outcome.index}: {check.kind} {check.pattern!r}: {check.detail}")
        if run.error:
            print(f"  stopped: {run.error}")
    print("report: " + ", ".join(str(path) for path in written), file=sys.stderr)
    return 0 if all(run.passed for run in runs) else 1
