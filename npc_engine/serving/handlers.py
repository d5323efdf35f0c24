"""Handlers of the requests answered by one message: state, memory, events, saves, the
world clock, warm-up, listings. Say, greet and scenes stream lines: ``lines.py``."""

from __future__ import annotations

import asyncio
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from npc_engine.memory.saves import SaveError, read_save_file
from npc_engine.memory.types import Memory
from npc_engine.protocol import (
    Event,
    EventWritten,
    MemoryForget,
    MemoryForgotten,
    MemoryItem,
    MemoryItems,
    MemoryList,
    NpcItems,
    NpcList,
    NpcsWarmed,
    NpcWarm,
    SaveCreate,
    SaveDelete,
    SaveDeleted,
    SaveExport,
    SaveExported,
    SaveImport,
    SaveItem,
    SaveItems,
    SaveList,
    SaveLoad,
    SaveWritten,
    StateGet,
    StateSet,
    Stats,
    StatsReport,
    WorldTick,
    WorldTicked,
)
from npc_engine.serving.routes import handles
from npc_engine.serving.wire import memory_item, npc_infos, state_message
from npc_engine.turns import StateView

if TYPE_CHECKING:
    from npc_engine.serving.connection import Connection
    from npc_engine.serving.router import Router


@handles(Event, capabilities=("memory",))
async def event(router: Router, conn: Connection, request: Event) -> None:
    # Off the loop: it reads the player's game time (the store, or a save loading).
    done = await router.in_io(
        lambda r: router.engine.add_event(
            r.npc_ids,
            r.text,
            player_id=r.player_id,
            importance=r.importance,
            game_time=r.game_time,
        ),
        request,
    )
    conn.track(done)
    ids = await router.acknowledged(done)
    await conn.send(EventWritten(re=request.id, memory_ids=ids))


@handles(MemoryList, capabilities=("memory",))
async def memory_list(router: Router, conn: Connection, request: MemoryList) -> None:
    router.engine.persona(request.npc_id)
    await router.own_writes(conn)  # a connection reads what it wrote
    engine = router.engine

    def listed(r: MemoryList) -> list[MemoryItem]:
        pairs: list[tuple[Memory, float | None]]
        if r.query:
            scored = engine.find(r.npc_id, r.player_id, r.query, r.limit)
            pairs = [(s.memory, s.score) for s in scored]
        else:
            pairs = [(m, None) for m in engine.recent_memories(r.npc_id, r.player_id, r.limit)]
        return [memory_item(m, score) for m, score in pairs]

    items = await router.in_io(listed, request)
    await conn.send(MemoryItems(re=request.id, items=items))


@handles(MemoryForget, capabilities=("memory",))
async def memory_forget(router: Router, conn: Connection, request: MemoryForget) -> None:
    router.engine.persona(request.npc_id)
    await router.own_writes(conn)
    count = await router.in_io(
        lambda r: router.engine.forget(
            r.npc_id, player_id=r.player_id, memory_ids=r.memory_ids, everything=r.all
        ),
        request,
    )
    await conn.send(MemoryForgotten(re=request.id, count=count))


@handles(StateSet, StateGet, capabilities=("state",))
async def state(router: Router, conn: Connection, request: StateSet | StateGet) -> None:
    await router.own_writes(conn)
    engine = router.engine

    def answer(r: StateSet | StateGet) -> StateView:
        if isinstance(r, StateGet):
            return engine.get_state(r.player_id, r.npc_id)
        return engine.set_state(
            r.player_id,
            npc_id=r.npc_id,
            trust=r.trust,
            trust_delta=r.trust_delta,
            flags=r.flags,
            game_time=r.game_time,
        )

    view = await router.in_io(answer, request)
    await conn.send(state_message(request.id, view))


@handles(SaveCreate, SaveLoad, SaveList, SaveDelete, capabilities=("saves",))
async def saves(
    router: Router, conn: Connection, request: SaveCreate | SaveLoad | SaveList | SaveDelete
) -> None:
    await router.own_writes(conn)
    engine = router.engine
    if isinstance(request, SaveList):
        infos = await router.in_io(lambda _r: engine.list_saves(), request)
        items = [
            SaveItem(save_id=i.save_id, created_at=i.iso_created_at(), memories=i.memories)
            for i in infos
        ]
        await conn.send(SaveItems(re=request.id, saves=items))
    elif isinstance(request, SaveCreate):
        info = await router.in_io(lambda r: engine.create_save(r.save_id), request)
        await conn.send(SaveWritten(re=request.id, save_id=info.save_id, memories=info.memories))
    elif isinstance(request, SaveLoad):
        known = await router.in_io(lambda _r: engine.list_saves(), request)
        if request.save_id not in {i.save_id for i in known}:
            raise SaveError("save_id", f"No save with id {request.save_id!r}.")
        await router.end_all_replies()  # a world has one timeline: every reply ends
        info = await router.in_io(lambda r: engine.load_save(r.save_id), request)
        await conn.send(SaveWritten(re=request.id, save_id=info.save_id, memories=info.memories))
    else:
        if not await router.in_io(lambda r: engine.delete_save(r.save_id), request):
            raise SaveError("save_id", f"No save with id {request.save_id!r}.")
        await conn.send(SaveDeleted(re=request.id, save_id=request.save_id))


@handles(SaveExport, SaveImport, capabilities=("saves",))
async def save_file(router: Router, conn: Connection, request: SaveExport | SaveImport) -> None:
    """Exports live in one folder of the data directory; a request names a file in it,
    never a path (a client must not read or write elsewhere)."""
    await router.own_writes(conn)
    folder = router.exports_dir
    if isinstance(request, SaveExport):

        def export(r: SaveExport) -> Path:
            data = router.engine.export_save(r.save_id)
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / f"{r.save_id}.npcsave"
            unfinished = target.with_suffix(".partial")
            unfinished.write_bytes(data)
            unfinished.replace(target)
            return target

        path = await router.in_io(export, request)
        # The file's name in the exports folder (what save.import takes), never the
        # data directory's absolute path: the client has no business knowing it.
        await conn.send(SaveExported(re=request.id, save_id=request.save_id, path=path.name))
        return
    source = folder / request.file
    if not source.is_file():
        raise SaveError("file", f"No file {request.file!r} among the exports.")
    info = await router.in_io(
        lambda r: router.engine.import_save(r.save_id, read_save_file(source)), request
    )
    await conn.send(SaveWritten(re=request.id, save_id=info.save_id, memories=info.memories))


@handles(NpcWarm, capabilities=("warm",))
async def warm(router: Router, conn: Connection, request: NpcWarm) -> None:
    """Warm each NPC as a background generation job (a say waiting goes first)."""
    engine = router.engine
    ids = engine.registry.ids() if "*" in request.npc_ids else request.npc_ids
    for npc_id in ids:
        engine.persona(npc_id)  # unknown_npc before any work
    started = time.perf_counter()
    warmed = []
    for npc_id in dict.fromkeys(ids):
        job = router.generation.submit(npc_id, partial(engine.warm, npc_id), background=True)
        if await asyncio.wrap_future(job):
            warmed.append(npc_id)
    ms = round((time.perf_counter() - started) * 1000)
    await conn.send(NpcsWarmed(re=request.id, warmed=warmed, ms=ms))


@handles(WorldTick, capabilities=("rumours",))
async def world_tick(router: Router, conn: Connection, request: WorldTick) -> None:
    spread = await router.world_ticks.tick(request.game_time)
    await conn.send(WorldTicked(re=request.id, spread=spread))


@handles(NpcList)
async def npc_list(router: Router, conn: Connection, request: NpcList) -> None:
    await conn.send(NpcItems(re=request.id, npcs=npc_infos(router.engine.registry)))


@handles(Stats)
async def stats(router: Router, conn: Connection, request: Stats) -> None:
    await conn.send(
        StatsReport(
            re=request.id,
            connections=len(router.connections),
            replies=len(router.replies()),  # connections gone: until their replies end
            queued_generations=router.queued,
            conversations=router.engine.conversation_count(),
            memory_write_failures=router.engine.memory_write_failures,
        )
    )
