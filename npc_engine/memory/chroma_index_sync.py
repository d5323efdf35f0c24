"""The engine's SQLite index beside Chroma (keywords and the fields a tick reads) kept in
step with what Chroma and the held rumours hold: trusted after a clean close, otherwise
compared with them before anything reads it, in the background when the store opens."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from npc_engine.memory.chroma_records import memories_of
from npc_engine.memory.keywords import KeywordIndex

if TYPE_CHECKING:
    from npc_engine.memory.chroma_store import ChromaMemoryStore
    from npc_engine.memory.held_rumours import HeldRumours

log = logging.getLogger(__name__)


class IndexSync:
    def __init__(self, store: ChromaMemoryStore, index: KeywordIndex, held: HeldRumours) -> None:
        self._store = store
        self._index = index
        self._held = held
        # Whether the index holds every live memory; cleared by a failed write or a load.
        self.synced = threading.Event()
        self._lock = threading.RLock()

    def synced_index(self) -> KeywordIndex:
        """The index, compared first if it may be out of step (the background fill may be
        at it: this waits for that one). A tick must not pass on a rumour twice."""
        if not self.synced.is_set():
            with self._lock:
                if not self.synced.is_set():
                    self.sync()
        return self._index

    def sync(self, *, rewrite: bool = False) -> int:
        """Make the index hold exactly the live memories (Chroma and the held rumours are
        the record): adds what is missing, drops what is gone, or with ``rewrite`` remakes
        it all. Returns how many memories were indexed anew."""
        with self._lock:
            return self._sync(rewrite)

    def _sync(self, rewrite: bool) -> int:
        index = self._index
        live = self._store.live_ids(deliver=False)
        indexed = set() if rewrite else index.ids()
        held = self._held.every()
        wanted = {i for ids in live.values() for i in ids} | {m.id for m in held}
        if rewrite:
            index.rebuild([])
        index.delete(sorted(indexed - wanted))
        added = 0
        for name, ids in live.items():
            missing = [i for i in ids if i not in indexed]
            collection = self._store.collection(name, "", create=False, deliver=False)
            for start in range(0, len(missing), 1000):
                if collection is None:
                    break
                found = collection.get(
                    ids=missing[start : start + 1000], include=["documents", "metadatas"]
                )
                index.add(memories_of(found))
                added += len(found["ids"])
        missing_held = [m for m in held if m.id not in indexed]
        index.add(missing_held)
        added += len(missing_held)
        if added:
            log.info("keyword index: %d memories indexed anew", added)
        self.synced.set()
        return added

    def open_in_background(self) -> threading.Thread:
        """Read every memory collection once on a background thread: Chroma loads a
        collection's segments on first use (~25 ms each; 0.8 s for 10 NPCs), which would
        otherwise land on the first save (it lists them all) or an NPC's first recall.
        The index is compared with them on the way when it is out of step."""

        def open_all() -> None:
            try:
                if self.synced.is_set():  # in step since the last clean close
                    for collection in self._store.memory_collections(deliver=False).values():
                        collection.count()
                else:
                    self.sync()
            except Exception:  # only a warm-up: the real call reports its own failure
                log.debug("opening collections ahead failed", exc_info=True)

        thread = threading.Thread(target=open_all, name="npc-chroma-open", daemon=True)
        thread.start()
        return thread
