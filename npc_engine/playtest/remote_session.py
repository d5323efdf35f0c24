"""The playtest's session with a running ``npc-engine serve``, over protocol v1 (the turn's
prompt and recalled memories come with ``say.inspect``)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from npc_engine.errors import NpcEngineError
from npc_engine.playtest.session import (
    DeltaCallback,
    MemoryView,
    NpcCard,
    TurnView,
    turn_from_end,
)


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
