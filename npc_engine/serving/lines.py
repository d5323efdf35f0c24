"""Handlers of the requests that stream NPC lines: say, greet, and scenes.

A line is submitted to the generation scheduler; its text and its end arrive in the
reply's inbox and ``ReplyStream`` (sans I/O) turns them into ``reply.*`` frames.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial
from typing import TYPE_CHECKING

from npc_engine.errors import FieldError, NpcEngineError, is_unavailable
from npc_engine.protocol import Greet, ReplyStart, Say, SceneEnd, SceneStart
from npc_engine.reply_stream import FinishedTurn, ReplyMessage, ReplyStream
from npc_engine.serving.admission import LineRequest, Refusal
from npc_engine.serving.connection import Reply, SceneRun
from npc_engine.serving.routes import handles
from npc_engine.serving.wire import finished_turn
from npc_engine.turns import TurnResult

if TYPE_CHECKING:
    from npc_engine.serving.connection import Connection
    from npc_engine.serving.router import Router

log = logging.getLogger(__name__)
PREPARED_SPEAKERS = 2  # NPCs of a scene prepared while another speaks
UNAVAILABLE = "The memory store cannot be reached; try again shortly."
LineWork = Callable[[Callable[[str], None]], TurnResult | None]


def _refused(router: Router, conn: Connection, request: LineRequest) -> Refusal | None:
    return router.admission.on_accept(
        request,
        authenticated=conn.authenticated,
        stopping=router.stopping,
        replies_here=len(conn.ledger.replies),
        queued_generations=router.queued,
        id_taken=conn.ledger.in_flight(request.id),
    )


# -- say and greet -----------------------------------------------------------------------


@handles(Say, capabilities=("stream", "actions"))
async def say(router: Router, conn: Connection, request: Say) -> None:
    if request.scene_id is not None:
        await scene_say(router, conn, request)
    else:
        await _one_to_one(router, conn, request)


@handles(Greet, capabilities=("greet",))
async def greet(router: Router, conn: Connection, request: Greet) -> None:
    await _one_to_one(router, conn, request)


async def _one_to_one(router: Router, conn: Connection, request: Say | Greet) -> None:
    cancelled = conn.ledger.take(request)
    router.engine.persona(request.npc_id)  # unknown_npc before anything is accepted
    refusal = _refused(router, conn, request)
    if refusal is not None:
        await router.refuse(conn, request, refusal, conn.frame_encoding)
        return
    reply = Reply()
    if cancelled:
        reply.cancel.set()  # it ends at once with reason cancelled
    conn.ledger.accept(request.id, reply)
    turn_id = uuid.uuid4().hex
    await conn.send(ReplyStart(re=request.id, npc_id=request.npc_id, turn_id=turn_id))
    reply.task = asyncio.create_task(_run_one_to_one(router, conn, request, reply))


async def _run_one_to_one(
    router: Router, conn: Connection, request: Say | Greet, reply: Reply
) -> None:
    engine = router.engine
    stream = ReplyStream(
        request.id,
        fallback_line=lambda: engine.fallback_line(engine.persona(request.npc_id)),
        delta_interval=router.limits.delta_interval_ms / 1000,
    )

    def work(on_delta: Callable[[str], None]) -> TurnResult | None:
        if reply.cancel.is_set():
            # Cancelled (or its client gone) while queued: the NPC heard the line and
            # never answered, exactly what a cancel during the reply stores.
            if isinstance(request, Say):
                engine.hear(request.npc_id, request.text, player_id=request.player_id)
            return None
        turn = (
            partial(engine.greet, request.npc_id)
            if isinstance(request, Greet)
            else partial(engine.say, request.npc_id, request.text)
        )
        return turn(
            player_id=request.player_id,
            context=request.context,
            max_tokens=request.max_tokens,
            on_delta=on_delta,
            cancel=reply.cancel,
            game_time=request.game_time,
        )

    background = request.priority == "background"
    try:
        await _pump(
            router,
            conn,
            stream,
            reply,
            lambda: _submit(router, reply, request.npc_id, request.player_id, work, background),
            lambda job: _line_over(router, stream, request.id, request.inspect, job),
            request.deadline_ms,
        )
    finally:
        conn.ledger.finish(request.id)


# -- scenes ------------------------------------------------------------------------------


@handles(SceneStart, capabilities=("scenes",))
async def scene_start(router: Router, conn: Connection, request: SceneStart) -> None:
    cancelled = conn.ledger.take(request)
    for npc_id in request.npc_ids:
        router.engine.persona(npc_id)  # unknown_npc before anything is accepted
    if request.scene_id in conn.scenes:
        raise FieldError("scene_id", f"scene {request.scene_id!r} is already running")
    scene = router.engine.scenes.start(
        request.scene_id,
        request.npc_ids,
        player_id=request.player_id,
        topic=request.topic,
        max_turns=request.max_turns,
    )
    refusal = _refused(router, conn, request)
    if refusal is not None:
        await router.refuse(conn, request, refusal, conn.frame_encoding)
        return
    run = SceneRun(scene, request, Reply())
    if cancelled:
        run.reply.cancel.set()
    conn.ledger.accept(request.id, run.reply)
    conn.scenes[request.scene_id] = run
    run.reply.task = asyncio.create_task(_run_scene(router, conn, run))


async def scene_say(router: Router, conn: Connection, request: Say) -> None:
    """A player line into a running scene: queued for the scene's next line."""
    conn.ledger.take(request)
    assert request.scene_id is not None
    run = conn.scenes.get(request.scene_id)
    if run is None:
        raise FieldError("scene_id", f"no scene {request.scene_id!r} is running here")
    if run.scene.player_id != request.player_id:
        raise FieldError("player_id", "the player must be the scene's player_id")
    if request.npc_id not in run.scene.npc_ids:
        raise FieldError("npc_id", "the say must face one of the scene's NPCs")
    if conn.ledger.in_flight(request.id):
        raise FieldError("id", f"Request id {request.id!r} is still in flight.")
    refusal = router.admission.scene_line_waiting(len(run.says))
    if refusal is not None:
        await router.refuse(conn, request, refusal, conn.frame_encoding)
        return
    conn.ledger.accept(request.id, run.reply)  # its cancel ends the scene
    run.says.append(request)
    run.reply.inbox.put_nowait(("player", None))  # wakes a scene between lines


async def _run_scene(router: Router, conn: Connection, run: SceneRun) -> None:
    scene, request = run.scene, run.request
    reason = "error"
    try:
        while True:
            if run.reply.cancel.is_set():
                reason = "cancelled"
                break
            said = run.says.popleft() if run.says else None
            if said is not None:
                conn.track(router.engine.scenes.hear_player(scene, said.text, said.game_time))
            else:
                over = scene.over()
                if over is not None:
                    reason = over
                    break
            speaker = said.npc_id if said is not None else None
            ok = await _scene_line(router, conn, run, said, speaker)
            if said is not None:
                conn.ledger.finish(said.id)
            if not ok:
                reason = "cancelled" if run.reply.cancel.is_set() else "error"
                break
    except Exception:
        log.exception("scene %s failed", scene.scene_id)
        reason = "error"
    finally:
        for unanswered in run.says:  # lines the scene ended before answering
            conn.ledger.finish(unanswered.id)
            ended = Refusal("invalid_request", "The scene ended.", {"field": "scene_id"})
            await router.refuse(conn, unanswered, ended, conn.encoding)
        conn.scenes.pop(scene.scene_id, None)
        conn.ledger.finish(request.id)
        await conn.send(
            SceneEnd(re=request.id, scene_id=scene.scene_id, reason=reason, turns=scene.spoken)
        )


async def _scene_line(
    router: Router, conn: Connection, run: SceneRun, said: Say | None, facing: str | None
) -> bool:
    """The next NPC's line, streamed as the reply to ``said`` (a player line) or to the
    scene request. False: it did not end normally (cancelled, failed, shutdown)."""
    engine, scene, request = router.engine, run.scene, run.request
    reply_to = said.id if said is not None else request.id
    speaker = await router.in_io(lambda f: engine.scenes.next_speaker(scene, f), facing)
    while not run.reply.inbox.empty():  # wake-ups for player lines already taken in
        run.reply.inbox.get_nowait()
    stream = ReplyStream(
        reply_to,
        fallback_line=lambda: engine.fallback_line(engine.persona(speaker)),
        delta_interval=router.limits.delta_interval_ms / 1000,
        scene_id=scene.scene_id,
    )
    await conn.send(
        ReplyStart(re=reply_to, npc_id=speaker, turn_id=uuid.uuid4().hex, scene_id=scene.scene_id)
    )
    inspect = request.inspect or (said is not None and said.inspect)
    player = scene.player_id or ""
    loop = asyncio.get_running_loop()
    waiting = engine.scenes.likely_next(scene, speaker, PREPARED_SPEAKERS)

    def prepare(npc_id: str) -> None:
        if not run.reply.cancel.is_set():  # the scene ended: nothing to prepare for
            engine.scenes.prepare_line(scene, npc_id)

    def prepare_next() -> None:
        # The NPCs likely to speak next read what they heard so far, in spare batch
        # slots, while this line decodes (from its first token: never delaying it).
        # Counted as queued generations, like replies, until they have run.
        while waiting:
            npc_id = waiting.pop()
            router.queued += 1
            job = router.generation.submit(
                npc_id,
                partial(prepare, npc_id),
                player_id=f"scene:{scene.scene_id}",
                background=True,
            )
            job.add_done_callback(lambda _job: loop.call_soon_threadsafe(router.one_less))

    def work(on_delta: Callable[[str], None]) -> TurnResult | None:
        if run.reply.cancel.is_set():
            return None

        def first_then_prepare(piece: str) -> None:
            if waiting:
                loop.call_soon_threadsafe(prepare_next)
            on_delta(piece)

        return engine.scenes.line(
            scene,
            speaker,
            max_tokens=request.max_tokens,
            on_delta=first_then_prepare,
            cancel=run.reply.cancel,
            game_time=(said.game_time if said is not None else None) or request.game_time,
        )

    result = await _pump(
        router,
        conn,
        stream,
        run.reply,
        lambda: _submit(router, run.reply, speaker, player, work),
        lambda job: _line_over(router, stream, reply_to, inspect, job),
    )
    return result is not None and result.reason in ("stop", "length")


# -- one line's frames -------------------------------------------------------------------


def _submit(
    router: Router,
    reply: Reply,
    npc_id: str,
    player_id: str,
    work: LineWork,
    background: bool = False,
) -> Future[TurnResult | None]:
    """Queue one NPC line on the generation scheduler; its text and its end arrive in
    ``reply.inbox``."""
    loop = asyncio.get_running_loop()

    def on_delta(piece: str) -> None:
        loop.call_soon_threadsafe(reply.inbox.put_nowait, ("text", piece))

    router.queued += 1
    job: Future[TurnResult | None] = router.generation.submit(
        npc_id, partial(work, on_delta), player_id=player_id, background=background
    )

    def report(done: Future[TurnResult | None]) -> None:
        router.one_less()  # when the work is really over, not when the reply ended
        reply.inbox.put_nowait(("done", done))

    job.add_done_callback(lambda f: loop.call_soon_threadsafe(report, f))
    return job


async def _pump(
    router: Router,
    conn: Connection,
    stream: ReplyStream,
    reply: Reply,
    submit: Callable[[], Future[TurnResult | None]],
    finish: Callable[[Future[TurnResult | None]], list[ReplyMessage]],
    deadline_ms: int | None = None,
) -> TurnResult | None:
    """Run one line: submit its work, send its frames as they come, until its
    ``reply.end``. Returns what the engine reported (None: it did not run)."""
    loop = asyncio.get_running_loop()
    deadline = None
    outcome: TurnResult | None = None
    try:
        if router.stopping:
            await _send_all(conn, stream.shutdown())
            return None
        submit()
        if deadline_ms:
            deadline = loop.call_later(
                deadline_ms / 1000, reply.inbox.put_nowait, ("deadline", None)
            )
        while not stream.ended:
            due = stream.due()
            timeout = None if due is None else max(due - loop.time(), 0.0)
            try:
                kind, value = await asyncio.wait_for(reply.inbox.get(), timeout)
            except TimeoutError:
                await _send_all(conn, stream.tick(loop.time()))
                continue
            if kind == "player":  # a scene's wake-up for a player line: not this line's
                continue
            if kind == "text":
                out = stream.text(value, loop.time())
            elif kind == "deadline":
                out = stream.deadline_passed(deadline_ms or 0)
            elif kind == "shutdown":
                out = stream.shutdown()
            else:
                out = finish(value)
                if not value.exception() and value.result() is not None:
                    outcome = value.result()
                    conn.track(outcome.memory_write)
                    if router.engine.shared_store and outcome.memory_write is not None:
                        # Replicas share the store: reply.end promises the turn is
                        # stored, so the next turn may go to any replica.
                        await router.own_writes(conn)
            if stream.ended and kind in ("deadline", "shutdown"):
                reply.cancel.set()  # ended early: stop the work (a scene's too)
            await _send_all(conn, out)
    finally:
        if deadline is not None:
            deadline.cancel()
    return outcome


def _line_over(
    router: Router,
    stream: ReplyStream,
    request_id: str,
    inspect: bool,
    job: Future[TurnResult | None],
) -> list[ReplyMessage]:
    try:
        result = job.result()
    except Exception as exc:
        if is_unavailable(exc):
            return stream.failed("unavailable", UNAVAILABLE)
        log.error("turn %s failed", request_id, exc_info=exc)
        # The engine's own errors are written for clients; anything else may carry
        # paths, hosts or prompt text: the log has it, the client gets its kind.
        if isinstance(exc, NpcEngineError):
            return stream.failed("internal", str(exc))
        return stream.failed("internal", f"Internal error: {type(exc).__name__}")
    if result is None:  # dropped while queued
        return stream.finished(FinishedTurn("cancelled"), stopping=router.stopping)
    return stream.finished(finished_turn(result, inspect), stopping=router.stopping)


async def _send_all(conn: Connection, messages: list[ReplyMessage]) -> None:
    for message in messages:
        await conn.send(message)
