"""Batched, background memory writes.

Writes never sit on the reply path: the dialogue hands memories to this writer after the
reply is done and goes on. A single thread drains everything queued so far into one store
call (one fsync-bound Chroma transaction instead of many). The future returned by
``submit`` resolves only after the store call returned, i.e. after the data is on disk:
that is the acknowledgement a client may rely on.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime

from npc_engine.memory.types import Memory, MemoryStore

log = logging.getLogger(__name__)

MAX_BATCH = 256


@dataclass
class _Write:
    memories: Sequence[Memory]
    done: Future[list[str]]


@dataclass
class _Touch:
    npc_id: str
    memory_ids: Sequence[str]
    when: datetime


_STOP = object()


class MemoryWriter:
    def __init__(self, store: MemoryStore) -> None:
        self._store = store
        self._queue: queue.Queue[object] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="npc-memory-writer", daemon=True)
        self._closed = False
        self._thread.start()

    def submit(self, memories: Sequence[Memory]) -> Future[list[str]]:
        """Queue memories; the future gives their ids once they are stored."""
        done: Future[list[str]] = Future()
        if self._closed:
            done.set_exception(RuntimeError("memory writer is closed"))
            return done
        self._queue.put(_Write(list(memories), done))
        return done

    def touch(self, npc_id: str, memory_ids: Sequence[str], when: datetime) -> None:
        """Refresh recency of retrieved memories (best effort, batched like writes)."""
        if memory_ids and not self._closed:
            self._queue.put(_Touch(npc_id, list(memory_ids), when))

    def flush(self, timeout: float | None = None) -> None:
        """Wait until everything queued before this call is stored."""
        self.submit([]).result(timeout)

    def close(self, timeout: float | None = 30.0) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _write_alone(self, write: _Write) -> None:
        try:
            if write.memories:
                self._store.add(write.memories)
        except Exception as exc:  # the failure goes to its waiter, the thread lives on
            log.exception("memory write failed")
            write.done.set_exception(exc)
        else:
            write.done.set_result([m.id for m in write.memories])

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
            self._write_batch(batch)
            if stop_after:
                return

    def _write_batch(self, batch: list[object]) -> None:
        writes = [item for item in batch if isinstance(item, _Write)]
        memories = [memory for write in writes for memory in write.memories]
        try:
            if memories:
                self._store.add(memories)
        except Exception:
            # One bad write must not fail the others merged into its batch: store each
            # on its own, so only the one that fails again reports failure.
            log.warning("batched memory write failed; writing one request at a time")
            for write in writes:
                self._write_alone(write)
        else:
            for write in writes:
                write.done.set_result([m.id for m in write.memories])
        for item in batch:
            if isinstance(item, _Touch):
                try:
                    self._store.touch(item.npc_id, item.memory_ids, item.when)
                except Exception:  # recency refresh is best effort
                    log.warning("memory touch failed", exc_info=True)
