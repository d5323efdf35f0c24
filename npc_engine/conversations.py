"""Conversations: each (NPC, player) pair's recent turns, and the forgets that overlap turns.

RAM holds the turns of up to ``max_conversations`` conversations, least recently used out
(player ids are the client's choice: RAM must not grow with them); the store holds each
one's history record (``history_key``), so a restarted engine continues where the last one
stopped. A turn notes the forget serial when it starts; a forget that lands while it runs
is found by ``forgotten_since`` when the turn stores, so nothing forgotten is written back.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

from npc_engine.config import EngineConfig
from npc_engine.errors import StoreUnavailableError, is_unavailable
from npc_engine.memory.types import Memory, MemoryStore
from npc_engine.memory.writer import StateWrite
from npc_engine.prompt import Turn
from npc_engine.turns import history_key, history_write

log = logging.getLogger(__name__)

# Forgets remembered for turns still running; a turn older than all of them is treated as
# overlapping a forget (it stores nothing), which takes this many forgets during one turn.
FORGET_LOG = 1024
EVERY_NPC = "*"  # a forget of everything (a save being loaded)
Submit = Callable[[list[Memory], Sequence[StateWrite]], Future[list[str]]]


@dataclass(frozen=True)
class _Forget:
    serial: int
    npc_id: str
    player_id: str | None  # None with memory_ids None: everything the NPC knew
    memory_ids: frozenset[str] | None


class Conversations:
    def __init__(
        self,
        store: MemoryStore,
        submit: Submit,
        flush: Callable[[], None],
        config: EngineConfig,
        *,
        shared_store: bool,
    ) -> None:
        self._store = store
        self._submit = submit
        self._flush = flush
        self._config = config  # history_turns, max_conversations
        self._shared_store = shared_store
        self._history: OrderedDict[tuple[str, str], list[Turn]] = OrderedDict()
        # Also orders forgets with turns' writes. Reentrant: a write's done-callback takes it,
        # and runs at once in the caller's thread when the write is already done.
        self.lock = threading.RLock()
        # Histories queued for the store and not written yet: a conversation that left RAM
        # meanwhile is read back from here, never from the older copy in the store.
        self._unsaved: dict[tuple[str, str], list[Turn]] = {}
        self._forgets: deque[_Forget] = deque(maxlen=FORGET_LOG)
        self.serial = 0  # of the last forget

    def history(self, npc_id: str, player_id: str) -> list[Turn]:
        with self.lock:
            return list(self._conversation(npc_id, player_id))

    def _conversation(self, npc_id: str, player_id: str) -> list[Turn]:
        """A conversation's turns (lock held): in RAM, or read back from the store."""
        key = (npc_id, player_id)
        turns = self._history.get(key)
        # On a shared store another replica may have served this conversation since:
        # RAM holds only what this replica has not stored yet, the store the rest.
        if turns is not None and not (self._shared_store and key not in self._unsaved):
            self._history.move_to_end(key)
            return turns
        try:
            if key in self._unsaved:
                turns = list(self._unsaved[key])
            else:
                record = self._store.state.load_state(history_key(npc_id, player_id)) or {}
                turns = [Turn.from_record(r) for r in record.get("turns", [])]
        except Exception as exc:  # a damaged record must not silence the NPC
            if is_unavailable(exc):  # a store that is down is not an empty history
                raise StoreUnavailableError(
                    "the memory store is unavailable; try again shortly"
                ) from exc
            log.warning("history of %s with %s unreadable: %s", npc_id, player_id, exc)
            turns = []
        self._history[key] = turns
        self._bound()
        return turns

    def _bound(self) -> None:
        while len(self._history) > self._config.max_conversations:
            self._history.popitem(last=False)

    def __len__(self) -> int:
        with self.lock:
            return len(self._history)

    def drop_last(self, npc_id: str, player_id: str) -> Turn | None:
        """Take the last exchange out of the conversation (to ask again: "retry")."""
        with self.lock:
            turns = self._conversation(npc_id, player_id)
            dropped = turns.pop() if turns else None
            if dropped is not None:
                self.store(npc_id, player_id, turns)
            return dropped

    def reset(self, npc_id: str, player_id: str) -> None:
        with self.lock:
            self._history.pop((npc_id, player_id), None)
            self.store(npc_id, player_id, None)

    def remember(self, npc_id: str, player_id: str, turn: Turn) -> list[Turn]:
        """Append a turn (lock held); returns the turns now."""
        window = self._config.history_turns
        key = (npc_id, player_id)
        turns = self._conversation(npc_id, player_id)
        self._history.move_to_end(key)
        turns.append(turn)
        if len(turns) > window:
            # Drop half the window at once, not one turn per turn: every drop changes
            # the prompt right after the persona and costs a re-read of the history,
            # so this pays it once every window/2 turns.
            del turns[: len(turns) - max(window // 2, 1)]
        self._bound()
        return turns

    def store(
        self,
        npc_id: str,
        player_id: str,
        turns: Sequence[Turn] | None,
        memories: Sequence[Memory] = (),
    ) -> Future[list[str]]:
        """Queue a conversation's turns (None: delete them) with the turn's memories, one
        write; until it is stored, the turns are read back from here."""
        key = (npc_id, player_id)
        snapshot = list(turns) if turns is not None else []
        with self.lock:
            self._unsaved[key] = snapshot
            done = self._submit(list(memories), [history_write(npc_id, player_id, turns)])

        def stored(_done: Future[list[str]]) -> None:
            with self.lock:
                if self._unsaved.get(key) is snapshot:
                    del self._unsaved[key]

        done.add_done_callback(stored)
        return done

    # -- forgets -------------------------------------------------------------------------

    def note_forget(
        self, npc_id: str, player_id: str | None, ids: frozenset[str] | None, everything: bool
    ) -> None:
        """A forget begins: turns running now will not store what it forgets, and the
        conversations in RAM lose it at once."""
        with self.lock:
            self.serial += 1
            scope = None if everything or ids is not None else player_id
            self._forgets.append(_Forget(self.serial, npc_id, scope, ids))
            for key in [k for k in self._history if k[0] == npc_id]:
                if ids is not None:
                    self._history[key] = [turn.without(ids) for turn in self._history[key]]
                elif everything or key[1] == player_id:
                    del self._history[key]

    def note_load(self) -> None:
        """A save is being loaded: every turn running now stores nothing."""
        with self.lock:
            self.serial += 1
            self._forgets.append(_Forget(self.serial, EVERY_NPC, None, None))

    def clear(self) -> None:
        """The store changed under every conversation (a save was loaded)."""
        with self.lock:
            self._history.clear()
            self._unsaved.clear()

    def forget_stored(
        self, npc_id: str, player_id: str | None, ids: frozenset[str] | None, everything: bool
    ) -> None:
        """Apply a forget to the histories in the store, not only those in RAM."""
        prefix = history_key(npc_id, "")
        for key in self._store.state.state_keys({"kind": "history", "npc_id": npc_id}):
            player = key[len(prefix) :]
            if ids is None and not everything and player != player_id:
                continue
            if ids is None:
                self._store.state.delete_state([key])
                continue
            with self.lock:
                turns = [turn.without(ids) for turn in self._conversation(npc_id, player)]
                self._history[(npc_id, player)] = turns
                self.store(npc_id, player, turns)
        self._flush()

    def forgotten_since(
        self, serial: int, npc_id: str, player_id: str
    ) -> tuple[bool, frozenset[str]]:
        """(whether this conversation was forgotten, memory ids forgotten) since ``serial``
        (lock held)."""
        if self.serial == serial:
            return False, frozenset()
        if not self._forgets or self._forgets[0].serial > serial + 1:
            return True, frozenset()  # too many forgets to tell: assume the worst
        ids: set[str] = set()
        for forget in self._forgets:
            if forget.serial > serial and forget.npc_id == EVERY_NPC:
                return True, frozenset()
            if forget.serial <= serial or forget.npc_id != npc_id:
                continue
            if forget.memory_ids is not None:
                ids |= forget.memory_ids
            elif forget.player_id is None or forget.player_id == player_id:
                return True, frozenset()
        return False, frozenset(ids)
