"""The playtest's in-process session: the engine in this process, driven through the same
request router as ``npc-engine serve`` (``serving/in_process.py``), with no socket."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from npc_engine.config import EngineConfig
from npc_engine.persona.loader import load_personas
from npc_engine.playtest.remote_session import RemoteSession
from npc_engine.playtest.session import (
    DeltaCallback,
    MemoryView,
    Progress,
    TurnView,
    persona_files_signature,
)
from npc_engine.runtime import EngineRuntime, open_engine
from npc_engine.serving.in_process import InProcessLink
from npc_engine.serving.router import Router


class LocalSession(RemoteSession):
    """The engine in this process, on the embedded default model or any GGUF. Its requests
    go through the same router as a server's (``serving.in_process``): admission, the line
    scheduler and scenes are the ones a game meets. What protocol v1 has no message for
    (``/reset``, ``/retry``, ``must_not_leak`` checks, reloading persona files, memories
    with their score parts) is asked of the engine directly."""

    def __init__(
        self,
        client: Any,
        link: InProcessLink,
        router: Router,
        runtime: EngineRuntime,
        config: EngineConfig,
    ) -> None:
        super().__init__(client, "in-process")
        self.link = link
        self.router = router
        self.runtime = runtime
        self.config = config
        self.description = f"in-process · model {config.model}"
        self._signature = persona_files_signature(config.personas_dir)

    @classmethod
    async def open(cls, config: EngineConfig, progress: Progress) -> LocalSession:  # type: ignore[override]
        from npc_engine.client import NpcClient

        runtime = await asyncio.to_thread(open_engine, config, progress)
        # The designer at the keyboard is no hostile client: the rate limits a server puts
        # on a connection would only slow a script down; inspect is the tool's whole point.
        limits = config.limits.model_copy(update={"rate_per_second": 1000.0, "rate_burst": 1000})
        router = Router(runtime.engine, limits, allow_inspect=True)
        link = InProcessLink(router)
        try:
            client = await NpcClient.attach(link, client_name="npc-engine-playtest")
        except BaseException:
            await asyncio.to_thread(runtime.close)
            raise
        return cls(client, link, router, runtime, config)

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
        turn = await super().say(
            npc_id, player_id, text, context=context, max_tokens=max_tokens, on_delta=on_delta
        )
        # The tool shows memories right after a turn, and the next turn recalls them: wait
        # for this turn's write, as a game's next line (seconds later) finds it done.
        await self.router.own_writes(self.link.connection)
        return turn

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
        reason = await super().scene(
            npc_ids,
            player_id=player_id,
            topic=topic,
            max_turns=max_turns,
            max_tokens=max_tokens,
            on_line=on_line,
        )
        await self.router.own_writes(self.link.connection)
        return reason

    @property
    def engine(self) -> Any:
        return self.runtime.engine

    async def _run(self, function: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, function, *args)

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

    async def reset(self, npc_id: str, player_id: str) -> None:
        self.engine.reset_conversation(npc_id, player_id)

    async def tells_secret(self, npc_id: str, entry: str, text: str) -> str | None:
        loaded = self.engine.persona(npc_id)
        return await self._run(self.engine.secrets.tells_secret, loaded, entry, text)

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
        await self.client.close()
        await self.router.stop_replies()
        await self.router.stop_work()
        await asyncio.to_thread(self.runtime.close)
