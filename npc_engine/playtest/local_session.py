"""The playtest's in-process session: the engine in this process, on one worker thread (one
``Llama``, one generation at a time)."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from npc_engine.config import EngineConfig
from npc_engine.persona.loader import load_personas
from npc_engine.playtest.session import (
    DeltaCallback,
    MemoryView,
    NpcCard,
    Progress,
    TurnView,
    persona_files_signature,
    turn_view,
)
from npc_engine.runtime import EngineRuntime, open_engine
from npc_engine.turns import TurnResult


class LocalSession:
    """The engine in this process, on the embedded default model or any GGUF."""

    def __init__(self, runtime: EngineRuntime, config: EngineConfig) -> None:
        self.runtime = runtime
        self.config = config
        self.description = f"in-process · model {config.model}"
        # One worker: one Llama serves one generation at a time; memory calls share it so
        # the tool never runs two engine calls at once.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="playtest")
        self._cancel: threading.Event | None = None
        self._signature = persona_files_signature(config.personas_dir)

    @classmethod
    async def open(cls, config: EngineConfig, progress: Progress) -> LocalSession:
        runtime = await asyncio.to_thread(open_engine, config, progress)
        return cls(runtime, config)

    @property
    def engine(self) -> Any:
        return self.runtime.engine

    async def _run(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._worker, lambda: function(*args, **kwargs))

    async def npcs(self) -> list[NpcCard]:
        return [
            NpcCard(npc_id, p.persona.name, p.persona.role, p.persona.mood)
            for npc_id, p in sorted(self.engine.registry.personas.items())
        ]

    async def say(
        self,
        npc_id: str,
        player_id: str,
        text: str,
        *,
        context: dict[str, Any] | None = None,
        max_tokens: int | None = None,
        on_delta: DeltaCallback | None = None,
    ) -> TurnView:
        self.engine.persona(npc_id)  # unknown NPC: a clear error before anything runs
        loop = asyncio.get_running_loop()
        cancel = self._cancel = threading.Event()

        def deliver(piece: str) -> None:
            if on_delta is not None:
                loop.call_soon_threadsafe(on_delta, piece)

        result: TurnResult = await self._run(
            self.engine.say,
            npc_id,
            text,
            player_id=player_id,
            context=context,
            max_tokens=max_tokens,
            on_delta=deliver,
            cancel=cancel,
        )
        if result.memory_write is not None:
            # The tool shows memories right after a turn: wait for this turn's write.
            await asyncio.wrap_future(result.memory_write)
        await asyncio.sleep(0)  # let queued deltas reach the UI before the turn ends
        return turn_view(result, text)

    async def cancel(self) -> None:
        if self._cancel is not None:
            self._cancel.set()

    async def scene(
        self,
        npc_ids: list[str],
        *,
        player_id: str | None,
        topic: str,
        max_turns: int,
        max_tokens: int | None,
        on_line: Callable[[TurnView], None],
    ) -> str:
        engine = self.engine
        scene = engine.scenes.start(
            f"playtest-{uuid.uuid4().hex[:8]}",
            npc_ids,
            player_id=player_id,
            topic=topic,
            max_turns=max_turns,
        )
        cancel = self._cancel = threading.Event()
        while (reason := scene.over()) is None:
            speaker = await self._run(engine.scenes.next_speaker, scene)
            result: TurnResult = await self._run(
                engine.scenes.line, scene, speaker, max_tokens=max_tokens, cancel=cancel
            )
            if result.memory_write is not None:
                await asyncio.wrap_future(result.memory_write)
            on_line(turn_view(result, ""))
            if cancel.is_set():
                return "cancelled"
            if result.reason not in ("stop", "length"):
                return "error"
        return reason

    async def world_tick(self) -> int:
        return int(await self._run(self.engine.world_tick))

    async def event(
        self, npc_ids: list[str], text: str, player_id: str | None, importance: int | None
    ) -> list[str]:
        done = self.engine.add_event(npc_ids, text, player_id=player_id, importance=importance)
        return list(await asyncio.wrap_future(done))

    async def memories(
        self, npc_id: str, player_id: str | None, query: str | None, limit: int = 10
    ) -> list[MemoryView]:
        self.engine.persona(npc_id)
        await self._run(self.engine.writer.flush, 60.0)
        if query:
            scored = await self._run(self.engine.recall, npc_id, player_id, query, limit)
            return [MemoryView(**s.summary()) for s in scored]
        recent = await self._run(self.engine.recent_memories, npc_id, player_id, limit)
        return [
            MemoryView(m.text, m.kind, importance=m.importance, id=m.id, source=m.source)
            for m in recent
        ]

    async def forget(self, npc_id: str, player_id: str) -> int:
        return int(await self._run(self.engine.forget, npc_id, player_id=player_id))

    async def reset(self, npc_id: str, player_id: str) -> None:
        self.engine.reset_conversation(npc_id, player_id)

    async def tells_secret(self, npc_id: str, entry: str, text: str) -> str | None:
        loaded = self.engine.persona(npc_id)
        return await self._run(self.engine.secrets.tells_secret, loaded, entry, text)

    async def set_state(
        self,
        npc_id: str,
        player_id: str,
        *,
        trust: int | None = None,
        trust_delta: int | None = None,
        flags: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        view = await self._run(
            self.engine.set_state,
            player_id,
            npc_id=npc_id,
            trust=trust,
            trust_delta=trust_delta,
            flags=flags,
        )
        return {"trust": view.trust, "flags": view.flags, "unlocked": list(view.unlocked or [])}

    async def retry_text(self, npc_id: str, player_id: str) -> str | None:
        turn = self.engine.drop_last_turn(npc_id, player_id)
        return turn.player_text if turn is not None else None

    def reload_personas(self) -> list[str] | None:
        signature = persona_files_signature(self.config.personas_dir)
        if signature == self._signature:
            return None
        self._signature = signature
        registry = load_personas(self.config.personas_dir)
        if registry.problems:
            return [str(problem) for problem in registry.problems]  # last good stays in use
        self.engine.registry = registry
        self.runtime.registry = registry
        return []

    async def close(self) -> None:
        if self._cancel is not None:
            self._cancel.set()
        self._worker.shutdown(wait=True)
        await asyncio.to_thread(self.runtime.close)
