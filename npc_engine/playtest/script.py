"""Golden conversations: scripted player turns with checks, run on one or more models.

A script is a YAML file (format in docs/playtest.md). Each run writes a transcript and a
report (Markdown and JSON) and says whether every check passed, so a team can run the
same conversations before swapping a model or editing a persona.
"""

from __future__ import annotations

import json
import re
import statistics
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from npc_engine.errors import NpcEngineError
from npc_engine.persona.loader import validate_yaml_file
from npc_engine.playtest.session import PlaytestSession, TurnView


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _compiled(patterns: list[str]) -> list[str]:
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {pattern!r} ({exc})") from exc
    return patterns


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScriptEvent(_Strict):
    text: str = Field(min_length=1, description="What the NPCs witnessed.")
    npc_ids: list[str] | None = Field(
        None, description="Who witnessed it (default: the turn's NPC); ['*'] for everyone."
    )
    player_id: str | None = Field(
        None, description="Tie the memory to one player (default: known to every player)."
    )
    importance: int | None = Field(None, ge=1, le=10)


class Expect(_Strict):
    """Checks on one turn; every pattern is a case-insensitive regular expression."""

    must_match: list[str] = Field(default_factory=list, description="The reply must match.")
    must_not_match: list[str] = Field(
        default_factory=list, description="The reply must not match (e.g. a secret)."
    )
    must_recall: list[str] = Field(
        default_factory=list, description="A memory recalled for this turn must match."
    )
    must_not_recall: list[str] = Field(
        default_factory=list, description="No memory recalled for this turn may match."
    )
    must_not_leak: list[Annotated[str, StringConstraints(pattern=r"^secrets\.\d+$")]] = Field(
        default_factory=list,
        description="Secrets of the persona (secrets.0, …) the reply must not tell: none of "
        "their key terms, no sentence as close in meaning as the guard's threshold.",
    )
    guard: Literal["secret", "out_of_world", "none"] | None = Field(
        None, description="The guard must have cut the reply for this reason (none: not cut)."
    )

    _lists = field_validator(
        "must_match",
        "must_not_match",
        "must_recall",
        "must_not_recall",
        "must_not_leak",
        mode="before",
    )(_as_list)

    @field_validator("must_match", "must_not_match", "must_recall", "must_not_recall")
    @classmethod
    def _valid_patterns(cls, value: list[str]) -> list[str]:
        return _compiled(value)

    def count(self) -> int:
        lists = (
            self.must_match,
            self.must_not_match,
            self.must_recall,
            self.must_not_recall,
            self.must_not_leak,
        )
        return sum(len(p) for p in lists) + (self.guard is not None)


class ScriptState(_Strict):
    """Game state the game sets before the line (state.set)."""

    trust: int | None = Field(None, ge=-100, le=100, description="This NPC's trust, set.")
    trust_delta: int | None = Field(None, ge=-200, le=200, description="…or changed by this.")
    flags: dict[str, bool | int | str | None] = Field(
        default_factory=dict, description="The player's flags; null deletes one."
    )


SceneEnding = Literal["max_turns", "ended"]
SCENE_ENDINGS: tuple[SceneEnding, ...] = ("max_turns", "ended")


class LineExpect(Expect):
    """Checks on one line of a scene, in order; ``npc`` names who must say it."""

    npc: str | None = Field(None, description="The NPC that must say this line.")


class ScriptScene(_Strict):
    """NPCs talk among themselves (the script's player listens, not present)."""

    npcs: list[str] = Field(min_length=2, max_length=6)
    topic: str = ""
    max_turns: int = Field(4, ge=1, le=40)
    ends: list[SceneEnding] = Field(
        default_factory=lambda: list(SCENE_ENDINGS), description="How it may end."
    )
    lines: list[LineExpect] = Field(
        default_factory=list, description="Checks on the first lines, one per line."
    )


class ScriptTurn(_Strict):
    say: str | None = Field(None, min_length=1, description="The player's line.")
    npc: str | None = Field(None, description="Talk to this NPC (default: the script's).")
    player: str | None = Field(None, description="Speak as this player (default: the script's).")
    context: dict[str, Any] = Field(default_factory=dict, description="Game context this turn.")
    events: list[ScriptEvent] = Field(
        default_factory=list, description="Sent before the line, as the game would."
    )
    restart: bool = Field(
        False, description="Restart the engine here (in-process only): memory must survive."
    )
    max_tokens: int | None = Field(None, ge=1, le=1024)
    state: ScriptState | None = Field(None, description="Set before the line, as the game would.")
    scene: ScriptScene | None = Field(None, description="A scene instead of a player's line.")
    expect: Expect = Field(default_factory=Expect)

    @model_validator(mode="after")
    def _does_something(self) -> ScriptTurn:
        busy = self.say or self.restart or self.events or self.state or self.scene
        if not busy:
            raise ValueError("a turn needs `say`, `scene`, `events`, `state` or `restart: true`")
        if self.say is not None and self.scene is not None:
            raise ValueError("a turn has `say` or `scene`, not both")
        if self.say is None and self.expect.count():
            raise ValueError("`expect` needs a `say` in the same turn")
        return self


class Sampling(_Strict):
    temperature: float = Field(0.0, ge=0, le=2, description="0: the same reply every run.")
    seed: int = 1234


class PlaytestScript(_Strict):
    name: str
    description: str = ""
    npc: str = Field(description="The NPC the turns talk to unless a turn names another.")
    player: str = "playtester"
    context: dict[str, Any] = Field(default_factory=dict, description="Context for every turn.")
    max_tokens: int | None = Field(48, ge=1, le=1024)
    sampling: Sampling = Field(default_factory=Sampling)
    turns: list[ScriptTurn] = Field(min_length=1)


def load_script(path: Path) -> PlaytestScript:
    """Parse and validate a script; problems name the file, line and field."""
    script, _parsed, problems = validate_yaml_file(path, PlaytestScript)
    if problems or script is None:
        listed = "\n".join(f"  {problem}" for problem in problems) or f"  {path}: empty script"
        raise NpcEngineError(f"Invalid playtest script {path}:\n{listed}")
    assert isinstance(script, PlaytestScript)
    return script


# -- running -------------------------------------------------------------------------------


@dataclass
class CheckResult:
    kind: str
    pattern: str
    passed: bool
    detail: str = ""


@dataclass
class TurnOutcome:
    index: int
    action: str  # "say", "events", "restart"
    npc_id: str = ""
    player_id: str = ""
    say: str = ""
    reply: str = ""
    reason: str = ""
    recalled: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    ttft_ms: float | None = None
    total_ms: float | None = None
    tokens_per_second: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    checks: list[CheckResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)


@dataclass
class ModelRun:
    label: str
    outcomes: list[TurnOutcome] = field(default_factory=list)
    error: str | None = None

    @property
    def checks(self) -> list[CheckResult]:
        return [check for outcome in self.outcomes for check in outcome.checks]

    @property
    def passed(self) -> bool:
        return self.error is None and all(check.passed for check in self.checks)

    def median(self, attribute: str) -> float | None:
        values = [getattr(o, attribute) for o in self.outcomes if getattr(o, attribute)]
        return statistics.median(values) if values else None


def check_turn(expect: Expect, view: TurnView) -> list[CheckResult]:
    results = []
    flags = re.IGNORECASE
    for pattern in expect.must_match:
        found = re.search(pattern, view.text, flags)
        results.append(
            CheckResult("must_match", pattern, found is not None, "" if found else "no match")
        )
    for pattern in expect.must_not_match:
        found = re.search(pattern, view.text, flags)
        detail = f"matched {found.group(0)!r}" if found else ""
        results.append(CheckResult("must_not_match", pattern, found is None, detail))
    recalled = [m.text for m in view.memories]
    for pattern in expect.must_recall:
        hit = next((text for text in recalled if re.search(pattern, text, flags)), None)
        detail = f"recalled {hit!r}" if hit else f"not among {len(recalled)} recalled memories"
        results.append(CheckResult("must_recall", pattern, hit is not None, detail))
    for pattern in expect.must_not_recall:
        hit = next((text for text in recalled if re.search(pattern, text, flags)), None)
        detail = f"recalled {hit!r}" if hit else ""
        results.append(CheckResult("must_not_recall", pattern, hit is None, detail))
    if expect.guard is not None:
        cut = view.guard or "none"
        detail = f"guard: {cut}" + (
            f" ({view.guard_entry}: {view.guard_reason})" if view.guard else ""
        )
        results.append(CheckResult("guard", expect.guard, cut == expect.guard, detail))
    return results


SessionOpener = Callable[[], Awaitable[PlaytestSession]]
Progress = Callable[[str], None]


async def run_script(
    script: PlaytestScript,
    label: str,
    open_session: SessionOpener,
    *,
    can_restart: bool,
    progress: Progress = lambda _message: None,
) -> ModelRun:
    """Run every turn on a fresh session; a restart closes it and opens a new one."""
    run = ModelRun(label)
    session = await open_session()
    try:
        for index, turn in enumerate(script.turns, start=1):
            outcome = TurnOutcome(index, "say" if turn.say else "events")
            npc_id, player_id = turn.npc or script.npc, turn.player or script.player
            outcome.npc_id, outcome.player_id = npc_id, player_id
            run.outcomes.append(outcome)
            if turn.restart:
                outcome.action = "restart"
                if not can_restart:
                    outcome.checks.append(
                        CheckResult("restart", "", False, "restart needs the in-process engine")
                    )
                    continue
                progress(f"[{label}] turn {index}: restarting the engine")
                await session.close()
                session = await open_session()
            if turn.state is not None:
                await session.set_state(
                    npc_id,
                    player_id,
                    trust=turn.state.trust,
                    trust_delta=turn.state.trust_delta,
                    flags=turn.state.flags or None,
                )
            for event in turn.events:
                targets = event.npc_ids or [npc_id]
                await session.event(targets, event.text, event.player_id, event.importance)
                outcome.events.append(event.text)
            if turn.scene is not None:
                await _run_scene(session, turn.scene, outcome, turn.max_tokens or script.max_tokens)
                continue
            if turn.say is None:
                continue
            progress(f"[{label}] turn {index}: {player_id} → {npc_id}: {turn.say}")
            view = await session.say(
                npc_id,
                player_id,
                turn.say,
                context={**script.context, **turn.context} or None,
                max_tokens=turn.max_tokens or script.max_tokens,
            )
            outcome.say, outcome.reply, outcome.reason = turn.say, view.text, view.reason
            outcome.recalled = [m.text for m in view.memories]
            outcome.ttft_ms, outcome.total_ms = view.ttft_ms, view.total_ms
            outcome.tokens_per_second = view.tokens_per_second
            outcome.prompt_tokens, outcome.cached_tokens = view.prompt_tokens, view.cached_tokens
            outcome.completion_tokens = view.completion_tokens
            outcome.checks = check_turn(turn.expect, view)
            for entry in turn.expect.must_not_leak:
                why = await session.tells_secret(npc_id, entry, view.text)
                outcome.checks.append(CheckResult("must_not_leak", entry, why is None, why or ""))
    except NpcEngineError as exc:
        run.error = str(exc)
    finally:
        await session.close()
    return run


async def _run_scene(
    session: PlaytestSession, scene: ScriptScene, outcome: TurnOutcome, max_tokens: int | None
) -> None:
    """A scene turn: each line checked by its ``lines`` entry, the end by ``ends``."""
    views: list[TurnView] = []
    reason = await session.scene(
        scene.npcs,
        player_id=None,
        topic=scene.topic,
        max_turns=scene.max_turns,
        max_tokens=max_tokens,
        on_line=views.append,
    )
    outcome.action, outcome.npc_id, outcome.reason = "scene", ", ".join(scene.npcs), reason
    outcome.reply = "\n".join(f"{view.npc_id}: {' '.join(view.text.split())}" for view in views)
    outcome.recalled = [m.text for view in views for m in view.memories]
    outcome.ttft_ms = statistics.median([v.ttft_ms for v in views if v.ttft_ms]) if views else None
    outcome.checks.append(
        CheckResult("scene_end", "|".join(scene.ends), reason in scene.ends, f"ended: {reason}")
    )
    for number, expect in enumerate(scene.lines, start=1):
        if number > len(views):
            outcome.checks.append(CheckResult("line", str(number), False, "not spoken"))
            continue
        view = views[number - 1]
        if expect.npc is not None:
            said_by = f"said by {view.npc_id}"
            outcome.checks.append(
                CheckResult("line_npc", expect.npc, view.npc_id == expect.npc, said_by)
            )
        outcome.checks += check_turn(expect, view)


# -- reports -------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return f"{value:,.0f} ms" if value is not None else "–"


def _rate(value: float | None) -> str:
    return f"{value:.1f}" if value is not None else "–"


def _quote(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") or "∅"


def report_markdown(script: PlaytestScript, source: Path, runs: list[ModelRun]) -> str:
    verdict = "PASSED" if all(r.passed for r in runs) else "FAILED"
    lines = [f"# Playtest report: {script.name} — {verdict}", ""]
    if script.description:
        lines += [script.description, ""]
    lines += [f"Script: `{source}`", ""]
    lines += [
        "| model | checks passed | median first token | median total | median tokens/s |",
        "|---|---|---|---|---|",
    ]
    for run in runs:
        passed = sum(c.passed for c in run.checks)
        status = f"{passed}/{len(run.checks)}" + (f" (error: {run.error})" if run.error else "")
        lines.append(
            f"| {run.label} | {status} | {_ms(run.median('ttft_ms'))} | "
            f"{_ms(run.median('total_ms'))} | {_rate(run.median('tokens_per_second'))} |"
        )
    lines.append("")
    for index, turn in enumerate(script.turns, start=1):
        title = turn.say or ("(restart)" if turn.restart else "(events)")
        lines += [f"## Turn {index}: {title}", ""]
        if turn.events:
            lines += [f"- event: {event.text}" for event in turn.events] + [""]
        if turn.say is None:
            continue
        lines += [
            "| model | reply | first token | total | tokens/s | checks |",
            "|---|---|---|---|---|---|",
        ]
        for run in runs:
            outcome = next((o for o in run.outcomes if o.index == index), None)
            if outcome is None:
                lines.append(f"| {run.label} | (not reached) | | | | |")
                continue
            checks = "<br>".join(
                f"{'✅' if c.passed else '❌'} {c.kind} `{_quote(c.pattern)}`"
                + (f" — {_quote(c.detail)}" if c.detail and not c.passed else "")
                for c in outcome.checks
            )
            lines.append(
                f"| {run.label} | {_quote(outcome.reply)} | {_ms(outcome.ttft_ms)} | "
                f"{_ms(outcome.total_ms)} | {_rate(outcome.tokens_per_second)} | {checks or '–'} |"
            )
        lines.append("")
    return "\n".join(lines)


def transcript_markdown(script: PlaytestScript, runs: list[ModelRun]) -> str:
    lines = [f"# Transcript: {script.name}", ""]
    for run in runs:
        lines += [f"## {run.label}", ""]
        for outcome in run.outcomes:
            if outcome.action == "restart":
                lines.append("*— engine restarted —*")
            for event in outcome.events:
                lines.append(f"*event: {event}*")
            if outcome.say:
                lines.append(f"**{outcome.player_id}:** {outcome.say}  ")
                lines.append(f"**{outcome.npc_id}:** {outcome.reply} *({outcome.reason})*")
            if outcome.action == "scene":
                lines.append(f"*scene: {outcome.npc_id}*  ")
                for said in outcome.reply.splitlines():
                    speaker, _, text = said.partition(": ")
                    lines.append(f"**{speaker}:** {text}  ")
                lines.append(f"*(scene ended: {outcome.reason})*")
            lines.append("")
        if run.error:
            lines += [f"**Stopped:** {run.error}", ""]
    return "\n".join(lines)


def write_reports(
    script: PlaytestScript, source: Path, runs: list[ModelRun], out_dir: Path
) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {
        "script": script.name,
        "source": str(source),
        "passed": all(run.passed for run in runs),
        "runs": [
            {
                "label": run.label,
                "passed": run.passed,
                "error": run.error,
                "outcomes": [
                    {**asdict(outcome), "passed": outcome.passed} for outcome in run.outcomes
                ],
            }
            for run in runs
        ],
    }
    written = {
        out_dir / "report.md": report_markdown(script, source, runs),
        out_dir / "report.json": json.dumps(data, indent=2, ensure_ascii=False),
        out_dir / "transcript.md": transcript_markdown(script, runs),
    }
    for path, text in written.items():
        path.write_text(text + "\n", encoding="utf-8")
    return list(written)


def scratch_data_dir() -> Path:
    """A fresh memory folder per run, so golden conversations start from nothing."""
    return Path(tempfile.mkdtemp(prefix="npc-playtest-"))
