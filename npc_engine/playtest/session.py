"""What the playtest tool talks to: the engine in this process, or a server over protocol v1.

Both sessions give the UI and script mode the same view of a turn (``TurnView``): the
reply, the exact prompt, the recalled memories with their score parts, token counts and
timings. In-process the engine runs on one worker thread (one ``Llama``, one generation at
a time); over ``--url`` the server sends the same data because the tool asks for it with
``say.inspect``.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from npc_engine.config import EngineConfig
from npc_engine.errors import NpcEngineError
from npc_engine.persona.loader import load_personas
from npc_engine.runtime import EngineRuntime, open_engine
from npc_engine.serving.wire import reply_end
from npc_engine.turns import TurnResult

DeltaCallback = Callable[[str], None]
Progress = Callable[[str], None]


@dataclass
class NpcCard:
    id: str
    name: str
    role: str
    mood: str | None = None


@dataclass
class MemoryView:
    text: str
    kind: str
    score: float | None = None
    relevance: float | None = None
    recency: float | None = None
    importance: float | None = None
    id: str = ""
    source: str | None = None  # a rumour: the NPC it was heard from


@dataclass
class TurnView:
    npc_id: str
    player_id: str
    player_text: str
    text: str
    reason: str
    prompt: str = ""
    memories: list[MemoryView] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    ttft_ms: float | None = None
    total_ms: float = 0.0
    emotion: str | None = None
    action: dict[str, Any] | None = None
    error: str | None = None
    dropped: dict[str, int] = field(default_factory=dict)
    trust: int | None = None
    flags: dict[str, Any] = field(default_factory=dict)
    unlocked: list[str] = field(default_factory=list)
    guard: str | None = None  # secret | out_of_world: the reply was cut
    guard_entry: str | None = None
    guard_reason: str | None = None
    game_action: dict[str, Any] | None = None  # {"name", "args"}: what the NPC does
    lore: list[dict[str, Any]] = field(default_factory=list)  # {id, why, similarity, tokens}

    @property
    def tokens_per_second(self) -> float | None:
        """Decode speed: tokens after the first, over the time after the first token."""
        if self.ttft_ms is None or self.completion_tokens < 2:
            return None
        decode_ms = self.total_ms - self.ttft_ms
        return (self.completion_tokens - 1) / (decode_ms / 1000) if decode_ms > 0 else None


class PlaytestSession(Protocol):
    description: str

    async def npcs(self) -> list[NpcCard]: ...

    async def say(
        self,
        npc_id: str,
        player_id: str,
        text: str,
        *,
        context: dict[str, Any] | None = None,
        max_tokens: int | None = None,
        on_delta: DeltaCallback | None = None,
    ) -> TurnView: ...

    async def cancel(self) -> None: ...

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
        """Run a scene; each finished line (with its speaker's prompt and memories) goes to
        ``on_line``; returns why it ended."""
        ...

    async def world_tick(self) -> int: ...

    async def event(
        self, npc_ids: list[str], text: str, player_id: str | None, importance: int | None
    ) -> list[str]: ...

    async def memories(
        self, npc_id: str, player_id: str | None, query: str | None, limit: int = 10
    ) -> list[MemoryView]: ...

    async def forget(self, npc_id: str, player_id: str) -> int: ...

    async def reset(self, npc_id: str, player_id: str) -> None: ...

    async def set_state(
        self,
        npc_id: str,
        player_id: str,
        *,
        trust: int | None = None,
        trust_delta: int | None = None,
        flags: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Change trust and flags; returns trust, flags and the unlocked entries."""
        ...

    async def tells_secret(self, npc_id: str, entry: str, text: str) -> str | None:
        """Why ``text`` tells the secret ``entry`` (None: it does not); needs the persona,
        so only the in-process session answers."""
        ...

    async def retry_text(self, npc_id: str, player_id: str) -> str | None:
        """Take the last exchange back and return the player's line to send again."""
        ...

    def reload_personas(self) -> list[str] | None:
        """Reload persona files if they changed: None when nothing changed, else problems."""
        ...

    async def close(self) -> None: ...


def turn_view(result: TurnResult, player_text: str) -> TurnView:
    """A turn run in process, read through the same ``reply.end`` a server would send."""
    end = reply_end(result).model_dump(mode="json")
    return turn_from_end(result.npc_id, result.player_id, player_text, end)


def persona_files_signature(folder: Path) -> tuple[tuple[str, int, int], ...]:
    """Names, sizes and modification times of the persona files: a change means reload."""
    entries = []
    for path in sorted(folder.rglob("*.y*ml")):
        try:
            stat = path.stat()
        except OSError:
            continue
        entries.append((str(path), stat.st_mtime_ns, stat.st_size))
    return tuple(entries)


def turn_from_end(npc_id: str, player_id: str, text: str, end: dict[str, Any]) -> TurnView:
    """A turn as the server reported it (``reply.end`` with ``inspect``)."""
    usage = end.get("usage") or {}
    inspect = end.get("inspect") or {}
    error = end.get("error") or {}
    return TurnView(
        npc_id=npc_id,
        player_id=player_id,
        player_text=text,
        text=end["text"],
        reason=end["reason"],
        prompt=inspect.get("prompt", ""),
        memories=[MemoryView(**m) for m in inspect.get("memories", [])],
        prompt_tokens=usage.get("prompt_tokens", 0),
        cached_tokens=usage.get("cached_tokens", 0),
        completion_tokens=usage.get("completion_tokens", 0),
        ttft_ms=usage.get("ttft_ms"),
        total_ms=usage.get("total_ms", 0),
        emotion=end.get("emotion"),
        action=end.get("action"),
        error=error.get("message"),
        dropped=inspect.get("dropped", {}),
        trust=inspect.get("trust"),
        flags=inspect.get("flags") or {},
        unlocked=inspect.get("unlocked") or [],
        lore=list(inspect.get("lore") or []),
        guard=end.get("guard"),
        guard_entry=inspect.get("guard_entry"),
        guard_reason=inspect.get("guard_reason"),
        game_action=end.get("game_action"),
    )


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


class RemoteSession:
    """A running ``npc-engine serve``, through the same client the tests use."""

    def __init__(self, client: Any, url: str) -> None:
        self.client = client
        self.description = f"server {url}"
        self._current: str | None = None

    @classmethod
    async def open(cls, url: str, token: str | None) -> RemoteSession:
        from npc_engine.client import NpcClient

        return cls(await NpcClient.connect(url, token=token), url)

    async def npcs(self) -> list[NpcCard]:
        return [
            NpcCard(n["id"], n["name"], n["role"], n.get("mood")) for n in await self.client.npcs()
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
        from npc_engine.client import ProtocolError

        try:
            stream = await self.client.say(
                npc_id,
                text,
                player_id=player_id,
                context=context,
                max_tokens=max_tokens,
                inspect=True,
            )
            self._current = stream.request_id
            async for piece in stream:
                if on_delta is not None:
                    on_delta(piece)
            end = await stream.result()
        except ProtocolError as exc:
            raise NpcEngineError(str(exc)) from exc
        finally:
            self._current = None
        return turn_from_end(npc_id, player_id, text, end)

    async def cancel(self) -> None:
        if self._current is not None:
            await self.client.cancel(self._current)

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
        from npc_engine.client import ProtocolError

        try:
            stream = await self.client.scene(
                f"playtest-{uuid.uuid4().hex[:8]}",
                npc_ids,
                player_id=player_id,
                topic=topic or None,
                max_turns=max_turns,
                max_tokens=max_tokens,
                inspect=True,
            )
            self._current = stream.request_id
            async for line in stream:
                on_line(turn_from_end(line["npc_id"], player_id or "", "", line["end"]))
            end = await stream.result()
        except ProtocolError as exc:
            raise NpcEngineError(str(exc)) from exc
        finally:
            self._current = None
        return str(end["reason"])

    async def world_tick(self) -> int:
        return await self.client.world_tick()

    async def event(
        self, npc_ids: list[str], text: str, player_id: str | None, importance: int | None
    ) -> list[str]:
        return list(
            await self.client.event(npc_ids, text, player_id=player_id, importance=importance)
        )

    async def memories(
        self, npc_id: str, player_id: str | None, query: str | None, limit: int = 10
    ) -> list[MemoryView]:
        items = await self.client.memory_list(npc_id, player_id=player_id, query=query, limit=limit)
        return [
            MemoryView(
                i["text"],
                i["kind"],
                i.get("score"),
                importance=i["importance"],
                id=i["id"],
                source=i.get("source"),
            )
            for i in items
        ]

    async def forget(self, npc_id: str, player_id: str) -> int:
        return int(await self.client.memory_forget(npc_id, player_id=player_id))

    async def reset(self, npc_id: str, player_id: str) -> None:
        raise NpcEngineError(
            "/reset works in-process only: protocol v1 has no message to clear a conversation "
            "(use /forget to forget this player)."
        )

    async def tells_secret(self, npc_id: str, entry: str, text: str) -> str | None:
        raise NpcEngineError("must_not_leak needs the persona files: run the script in-process")

    async def set_state(
        self,
        npc_id: str,
        player_id: str,
        *,
        trust: int | None = None,
        trust_delta: int | None = None,
        flags: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        from npc_engine.client import ProtocolError

        try:
            return await self.client.set_state(
                player_id, npc_id=npc_id, trust=trust, trust_delta=trust_delta, flags=flags
            )
        except ProtocolError as exc:
            raise NpcEngineError(str(exc)) from exc

    async def retry_text(self, npc_id: str, player_id: str) -> str | None:
        return None  # the server keeps the history; /retry sends the last line again

    def reload_personas(self) -> list[str] | None:
        return None  # the server owns its persona files

    async def close(self) -> None:
        await self.client.close()
