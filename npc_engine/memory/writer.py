"""Batched, background memory writes.

Writes never sit on the reply path: the dialogue hands memories to this writer after the
reply is done and goes on. A single thread drains everything queued so far into one store
call (one fsync-bound Chroma transaction instead of many). The future returned by
``submit`` resolves only after the store call returned, i.e. after the data is on disk:
that is the acknowledgement a client may rely on.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from npc_engine.memory.types import Memory, MemoryStore

log = logging.getLogger(__name__)

MAX_BATCH = 256


# A game-state record to write with a batch: (key, value or None to delete it, labels).
StateWrite = tuple[str, dict[str, Any] | None, dict[str, str] | None]


@dataclass
class _Write:
    memories: Sequence[Memory]
    done: Future[list[str]]
    states: Sequence[StateWrite] = ()


@dataclass
class _Touch:
    npc_id: str
    memory_ids: Sequence[str]
    when: datetime
    game_time: float | None = None


_STOP = object()


class MemoryWriter:
    def __init__(
        self,
        store: MemoryStore,
        after_write: Callable[[Sequence[Memory]], None] | None = None,
        pause: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
    ) -> None:
        """``after_write``: runs on this thread with each batch of memories once they are
        stored and acknowledged (facts, consolidation: ``npc_engine.memory.upkeep``).
        ``pause``: held around each batch (a save being loaded holds it: writes wait)."""
        self._store = store
        self._after_write = after_write
        self._pause = pause
        self._queue: queue.Queue[object] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="npc-memory-writer", daemon=True)
        self._closed = False
        self._thread.start()

    def submit(
        self, memories: Sequence[Memory], states: Sequence[StateWrite] = ()
    ) -> Future[list[str]]:
        """Queue memories (and state records, such as a conversation's history); the
        future gives the memories' ids once all of it is stored."""
        done: Future[list[str]] = Future()
        if self._closed:
            done.set_exception(RuntimeError("memory writer is closed"))
            return done
        self._queue.put(_Write(list(memories), done, list(states)))
        return done

    def touch(
        self,
        npc_id: str,
        memory_ids: Sequence[str],
        when: datetime,
        game_time: float | None = None,
    ) -> None:
        """Refresh recency of retrieved memories (best effort, batched like writes)."""
        if memory_ids and not self._closed:
            self._queue.put(_Touch(npc_id, list(memory_ids), when, game_time))

    def flush(self, timeout: float | None = None) -> None:
        """Wait until everything queued before this call is stored, and its upkeep done:
        the second round starts only after the batch of the first ran ``after_write``."""
        self.submit([]).result(timeout)
        self.submit([]).result(timeout)

    def close(self, timeout: float | None = 30.0) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _write_states(self, states: Sequence[StateWrite]) -> None:
        for key, value, labels in states:
            if value is None:
                self._store.state.delete_state([key])
            else:
                self._store.state.save_state(key, value, labels)

    def _write_alone(self, write: _Write) -> bool:
        try:
            if write.memories:
                self._store.add(write.memories)
            self._write_states(write.states)
        except Exception as exc:  # the failure goes to its waiter, the thread lives on
            log.exception("memory write failed")
            write.done.set_exception(exc)
            return False
        write.done.set_result([m.id for m in write.memories])
        return True

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            stop_after = False
            while len(batch) < MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop_after = True
                    break
                batch.append(item)
            with self._pause():
                self._write_batch(batch)
            if stop_after:
                return

    def _write_batch(self, batch: list[object]) -> None:
        writes = [item for item in batch if isinstance(item, _Write)]
        memories = [memory for write in writes for memory in write.memories]
        try:
            if memories:
                self._store.add(memories)
            # The last write of a record wins: a conversation's history is written once
            # per batch however many turns it took.
            latest = {state[0]: state for write in writes for state in write.states}
            self._write_states(list(latest.values()))
        except Exception:
            # One bad write must not fail the others merged into its batch: store each
            # on its own, so only the one that fails again reports failure.
            log.warning("batched memory write failed; writing one request at a time")
            stored = [w for w in writes if self._write_alone(w)]
            memories = [memory for write in stored for memory in write.memories]
            writes = []  # each was answered by _write_alone
        if memories and self._after_write is not None:
            try:
                self._after_write(memories)
            except Exception:  # upkeep is best effort: the next write tries again
                log.warning("memory upkeep failed", exc_info=True)
        # Answered after the upkeep: a reader who waited for its write sees what the write
        # superseded as superseded (read-your-writes, facts included).
        for write in writes:
            write.done.set_result([m.id for m in write.memories])
        for touch in _merged_touches(batch):
            try:
                self._store.touch(touch.npc_id, touch.memory_ids, touch.when, touch.game_time)
            except Exception:  # recency refresh is best effort
                log.warning("memory touch failed", exc_info=True)


def _merged_touches(batch: Sequence[object]) -> list[_Touch]:
    """One touch per NPC for a batch (each costs a Chroma read and write): its memories
    all take the latest access, as a later turn's recall would give them."""
    merged: dict[str, _Touch] = {}
    for item in batch:
        if not isinstance(item, _Touch):
            continue
        earlier = merged.get(item.npc_id)
        if earlier is None:
            merged[item.npc_id] = item
            continue
        ids = list(dict.fromkeys([*earlier.memory_ids, *item.memory_ids]))
        game_time = item.game_time if item.game_time is not None else earlier.game_time
        merged[item.npc_id] = _Touch(item.npc_id, ids, max(earlier.when, item.when), game_time)
    return list(merged.values())
