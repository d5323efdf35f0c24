"""The dialogue core: persona + memory + prompt + generation, with no I/O framework in it.

``DialogueEngine.say`` runs one turn synchronously and reports text through a callback as
it streams; the server and the CLI run it on a worker thread. Memory writes leave through
the background ``MemoryWriter`` after the reply, so they never delay a first token.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from datetime import datetime
from typing import Any

from npc_engine.action_choice import ActionChooser
from npc_engine.config import EngineConfig
from npc_engine.conversations import Conversations
from npc_engine.errors import (
    NpcEngineError,
    UnknownNpcError,
)
from npc_engine.game_state import (
    GameState,
    WorldGate,
    unlocked_entries,
)
from npc_engine.generation.base import GenerationParams, Generator, RenderedPrompt
from npc_engine.guard import (
    Embed,
)
from npc_engine.guard_rules import preload as preload_guard
from npc_engine.ids import check_id
from npc_engine.lore import LoreVectors
from npc_engine.memory.importance import rate_importance
from npc_engine.memory.saves import SaveInfo
from npc_engine.memory.scoring import score_candidates
from npc_engine.memory.types import (
    Memory,
    MemoryKind,
    MemoryStore,
    ScoredMemory,
    utc_now,
)
from npc_engine.memory.upkeep import MemoryUpkeep
from npc_engine.memory.voice import player_voice
from npc_engine.memory.writer import MemoryWriter, StateWrite
from npc_engine.multilingual import preload as preload_multilingual
from npc_engine.persona.loader import LoadedPersona, PersonaRegistry
from npc_engine.prompt import PromptBuilder, Turn
from npc_engine.rumours import WorldTicker
from npc_engine.scene_lines import SceneLines
from npc_engine.secret_keeping import SecretKeeper
from npc_engine.turn_pipeline import TurnPipeline
from npc_engine.turns import (
    DEFAULT_PLAYER,
    GREETING_MAX_TOKENS,
    KEY_SEPARATOR,
    StateView,
    TurnResult,
    player_line_memory,
    sanitize_for_memory,
)
from npc_engine.world_lore import WorldLore

log = logging.getLogger(__name__)


class DialogueEngine:
    def __init__(
        self,
        registry: PersonaRegistry,
        generator: Generator,
        store: MemoryStore,
        config: EngineConfig,
        *,
        clock: Callable[[], datetime] = utc_now,
        embed: Embed | None = None,
        lore_vectors: LoreVectors | None = None,
    ) -> None:
        self.registry = registry
        self.embed = embed  # sentence vectors (None: key terms only)
        self.generator = generator
        self._tokenize = generator.features().tokenize  # declared (generation/base.py)
        self.store = store
        self.config = config
        self.clock = clock
        # Facts and consolidation, on the writer's thread after each stored batch.
        self.upkeep = MemoryUpkeep(store, config.memory)
        # A save.load rewinds the world: while it applies, no memory, state or forget from
        # another request writes (they wait, then land after it); reads never wait.
        self._world = WorldGate()
        self.writer = MemoryWriter(store, self.upkeep.after_write, pause=self._world.writing)
        self.prompts = PromptBuilder(generator)
        self._fallback_counter = itertools.count()
        self.memory_write_failures = 0
        # A store shared by engine replicas (a Chroma server) is re-read, never cached.
        self.shared_store = bool(getattr(store, "shared", False))
        self.state = GameState(
            store,
            self._start_trust,
            capacity=0 if self.shared_store else config.max_conversations,
            writing=self._world.writing,
        )
        self._saves_lock = threading.Lock()  # one save operation at a time
        # The rooms (docs/architecture.md): each one concern, built on the ports above.
        self.conversations = Conversations(
            store,
            self.submit_memories,
            self.writer.flush,
            config,
            shared_store=self.shared_store,
        )
        self.secrets = SecretKeeper(lambda: self.registry, config, embed)
        self.lore = WorldLore(lambda: self.registry, lore_vectors, self._count_tokens, config)
        self.actions = ActionChooser(generator, embed, config)
        self.pipeline = TurnPipeline(self)
        self.scenes = SceneLines(self)
        self.ticker = WorldTicker(
            personas=lambda: self.registry.personas,
            store=store,
            settings=config.rumours,
            clock=lambda: self.clock(),
            world_secrets=self.secrets.world_secrets,
            forget=lambda npc_id, ids: self.forget(npc_id, memory_ids=ids),
            write=self.submit_memories,
        )
        if config.guard.enabled:
            preload_guard()
            if self.secrets.paired is not None:
                preload_multilingual()

    def _start_trust(self, npc_id: str) -> int:
        loaded = self.registry.get(npc_id)
        return loaded.persona.trust if loaded is not None else 0

    def _count_tokens(self, text: str) -> int:
        tokenize = self._tokenize
        return len(tokenize(text)) if tokenize is not None else len(text.split())

    # -- game state -----------------------------------------------------------

    def get_state(self, player_id: str, npc_id: str | None = None) -> StateView:
        check_id(player_id, "player_id")
        if npc_id is None:
            return StateView(player_id, self.state.flags(player_id))
        loaded = self.persona(npc_id)
        standing = self.state.standing(npc_id, player_id)
        unlocked = unlocked_entries(loaded.persona, loaded.world, standing.facts())
        facts = tuple(self.upkeep.known_facts(npc_id, player_id))
        return StateView(
            player_id, dict(standing.flags), npc_id, standing.trust, unlocked.ids, facts
        )

    def set_state(
        self,
        player_id: str,
        *,
        npc_id: str | None = None,
        trust: int | None = None,
        trust_delta: int | None = None,
        flags: Mapping[str, Any] | None = None,
        game_time: float | None = None,
    ) -> StateView:
        check_id(player_id, "player_id")
        if npc_id is not None:
            self.persona(npc_id)
        self.state.update(
            player_id,
            npc_id=npc_id,
            trust=trust,
            trust_delta=trust_delta,
            flags=flags,
            game_time=game_time,
        )
        return self.get_state(player_id, npc_id)

    # -- lookups -------------------------------------------------------------------------

    def persona(self, npc_id: str) -> LoadedPersona:
        loaded = self.registry.get(npc_id)
        if loaded is None:
            raise UnknownNpcError(npc_id, self.registry.ids())
        return loaded

    def npc_names(self) -> dict[str, str]:
        return {npc_id: p.persona.name for npc_id, p in self.registry.personas.items()}

    def history(self, npc_id: str, player_id: str) -> list[Turn]:
        return self.conversations.history(npc_id, player_id)

    def conversation_count(self) -> int:
        return len(self.conversations)

    def drop_last_turn(self, npc_id: str, player_id: str) -> Turn | None:
        """Take the last exchange out of the conversation (to ask again: "retry")."""
        return self.conversations.drop_last(npc_id, player_id)

    def reset_conversation(self, npc_id: str, player_id: str) -> None:
        self.conversations.reset(npc_id, player_id)

    # -- saves ---------------------------------------------------------------------------

    def create_save(self, save_id: str) -> SaveInfo:
        """Save every NPC's memories, histories, trust and flags under ``save_id``."""
        with self._saves_lock:
            self.writer.flush()  # everything acknowledged so far is in the save
            return self.store.saves.create_save(save_id)

    def load_save(self, save_id: str) -> SaveInfo:
        """Make the world what it was at the save. A turn still running meanwhile stores
        nothing (as if its conversation were forgotten); callers end replies first."""
        # Lock order: saves, then a running world tick ends, then the world (the tick's
        # writes go through the writer, which waits for the world lock).
        with self._saves_lock, self.ticker.lock:
            self.conversations.note_load()
            self.writer.flush()
            with self._world.loading():
                info = self.store.saves.load_save(save_id)
                self.conversations.clear()
                self.state.clear()
                self.upkeep.forgotten()
            return info

    def list_saves(self) -> list[SaveInfo]:
        return self.store.saves.list_saves()

    def delete_save(self, save_id: str) -> bool:
        with self._saves_lock:
            return self.store.saves.delete_save(save_id)

    def export_save(self, save_id: str) -> bytes:
        with self._saves_lock:
            return self.store.saves.export_save(save_id)

    def import_save(self, save_id: str, data: bytes) -> SaveInfo:
        with self._saves_lock:
            return self.store.saves.import_save(save_id, data)

    # -- memory --------------------------------------------------------------------------

    def recall(
        self,
        npc_id: str,
        player_id: str | None,
        query: str,
        limit: int,
        game_now: float | None = None,
    ) -> list[ScoredMemory]:
        """The best memories for ``query``; recency on the game's clock with ``game_now``
        (default: the last game time this player's game sent, else the wall clock)."""
        if game_now is None and player_id is not None:
            game_now = self.game_time_of(player_id)
        retrieval = self.config.retrieval
        candidates = self.store.search(
            npc_id, player_id, query, max(retrieval.candidates, limit), keywords=retrieval.hybrid
        )
        return score_candidates(candidates, self.clock(), retrieval, game_now)[:limit]

    def find(
        self, npc_id: str, player_id: str | None, query: str, limit: int
    ) -> list[ScoredMemory]:
        """Memories for a designer's or a tool's query (``memory.list``): one that speaks of
        "the player" is ranked as the player would ask it ("What is my name?"), since
        memories are embedded from what was said; matches of the query as written follow."""
        voiced = player_voice(query)
        found = self.recall(npc_id, player_id, voiced, limit)
        if voiced != query:
            seen = {scored.memory.id for scored in found}
            found += [
                scored
                for scored in self.recall(npc_id, player_id, query, limit)
                if scored.memory.id not in seen
            ]
        return found[:limit]

    def game_time_of(self, player_id: str) -> float | None:
        try:
            return self.state.game_time(player_id)
        except Exception as exc:  # state trouble: recency falls back to the wall clock
            log.warning("game time of %s unavailable: %s", player_id, exc)
            return None

    def remembered_of(self, npc_id: str, player_id: str, limit: int) -> list[ScoredMemory]:
        """What an NPC remembers of a player, newest first (for a greeting: there is no
        line to match memories against)."""
        mine = self.store.recent(npc_id, player_id, limit, player_only=True)
        return [
            ScoredMemory(m, 1.0 - i / 100, 0.0, 1.0, m.importance / 10) for i, m in enumerate(mine)
        ]

    def recent_memories(self, npc_id: str, player_id: str | None, limit: int) -> list[Memory]:
        self.persona(npc_id)
        return self.store.recent(npc_id, player_id, limit)

    def add_event(
        self,
        npc_ids: Sequence[str],
        text: str,
        *,
        player_id: str | None = None,
        importance: int | None = None,
        kind: MemoryKind = "event",
        game_time: float | None = None,
    ) -> Future[list[str]]:
        """Record something the NPCs witnessed; ``["*"]`` means every NPC."""
        if player_id is not None:
            check_id(player_id, "player_id")
            if game_time is not None:
                self.state.update(player_id, game_time=game_time)
            else:
                game_time = self.game_time_of(player_id)
        targets = self.registry.ids() if list(npc_ids) == ["*"] else list(npc_ids)
        for npc_id in targets:
            self.persona(npc_id)
        clean = sanitize_for_memory(text)
        if not clean:
            raise NpcEngineError("An event needs some text.")
        when = self.clock()
        rating = importance if importance is not None else rate_importance(clean, base=4)
        memories = [
            Memory(
                npc_id=n,
                player_id=player_id,
                kind=kind,
                text=clean,
                importance=rating,
                created_at=when,
                game_time=game_time,
            )
            for n in targets
        ]
        return self.writer.submit(memories)

    def forget(
        self,
        npc_id: str,
        *,
        player_id: str | None = None,
        memory_ids: Sequence[str] | None = None,
        everything: bool = False,
    ) -> int:
        """Forget memories; ordered with turns: a turn running meanwhile stores nothing it
        would have forgotten, and forgotten memories leave the notes of earlier turns."""
        self.persona(npc_id)
        if player_id is not None:
            check_id(player_id, "player_id")
        ids = frozenset(memory_ids) if memory_ids is not None and not everything else None
        self.conversations.note_forget(npc_id, player_id, ids, everything)
        self.writer.flush()  # writes queued before the forget are stored, then deleted
        self.conversations.forget_stored(npc_id, player_id, ids, everything)
        try:
            with self._world.writing():  # never inside a save being loaded
                return self.store.forget(
                    npc_id, player_id=player_id, memory_ids=memory_ids, everything=everything
                )
        finally:
            self.upkeep.forgotten(npc_id)

    def hear(self, npc_id: str, text: str, *, player_id: str = DEFAULT_PLAYER) -> None:
        """The NPC heard a line it never answered (a say cancelled while queued): stored as
        a cancelled turn stores it, the player's line and no reply."""
        self.persona(npc_id)
        check_id(player_id, "player_id")
        game_now = self.game_time_of(player_id)
        with self.conversations.lock:
            line = player_line_memory(npc_id, player_id, text, self.clock(), game_now)
            self.submit_memories([line, *self.upkeep.facts_in(line)])

    def submit_memories(
        self, memories: list[Memory], states: Sequence[StateWrite] = ()
    ) -> Future[list[str]]:
        done = self.writer.submit(memories, states)
        done.add_done_callback(self._count_failed_write)
        return done

    def _count_failed_write(self, done: Future[list[str]]) -> None:
        if done.exception() is not None:
            self.memory_write_failures += 1
            log.error("memories of a turn could not be stored: %s", done.exception())

    # -- one turn ------------------------------------------------------------------------

    def fallback_line(self, loaded: LoadedPersona) -> str:
        lines = loaded.persona.fallback_lines
        return lines[next(self._fallback_counter) % len(lines)]

    def say(
        self,
        npc_id: str,
        text: str,
        *,
        player_id: str = DEFAULT_PLAYER,
        context: Mapping[str, Any] | None = None,
        max_tokens: int | None = None,
        on_delta: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
        game_time: float | None = None,
    ) -> TurnResult:
        """One turn: recall, build the prompt, stream the reply, queue the memory writes.

        The reply streams through the guard (``guard_rules``): a sentence that would tell a
        guarded secret or leave the world is never delivered; an in-voice deflection ends
        the reply instead (``result.guard`` says why). A cancelled turn stores the player's
        line and no reply (as one cancelled while queued: ``hear``)."""
        return self.pipeline.run(
            npc_id,
            text,
            player_id=player_id,
            context=context,
            max_tokens=max_tokens,
            on_delta=on_delta,
            cancel=cancel,
            game_time=game_time,
        )

    def greet(
        self,
        npc_id: str,
        *,
        player_id: str = DEFAULT_PLAYER,
        context: Mapping[str, Any] | None = None,
        max_tokens: int | None = None,
        on_delta: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
        game_time: float | None = None,
    ) -> TurnResult:
        """The player walks up to the NPC. At a first meeting the persona's ``greeting`` is
        the reply, at once (no model time); later the NPC greets from what it remembers."""
        loaded = self.persona(npc_id)
        check_id(player_id, "player_id")
        if loaded.persona.greeting.strip() and self.pipeline.first_meeting(npc_id, player_id):
            return self.pipeline.written_greeting(loaded, npc_id, player_id, on_delta, game_time)
        cap = min(max_tokens or GREETING_MAX_TOKENS, GREETING_MAX_TOKENS)
        return self.pipeline.run(
            npc_id,
            "",
            player_id=player_id,
            context=context,
            max_tokens=cap,
            on_delta=on_delta,
            cancel=cancel,
            game_time=game_time,
            greeting=True,
        )

    # -- world tick: rumours -------------------------------------------------------------

    def world_tick(
        self,
        game_time: float | None = None,
        wait_idle: Callable[[float], object] | None = None,
        stop: threading.Event | None = None,
    ) -> int:
        """Pass on what NPCs heard since the last tick (``rumours.WorldTicker``);
        ``wait_idle`` is the line scheduler's (the tick yields to lines)."""
        return self.ticker.tick(game_time, wait_idle, stop)

    # -- warm-up -------------------------------------------------------------------------

    def warm(self, npc_id: str) -> bool:
        """Prepare an NPC's stable prompt prefix (world, persona, examples): its KV cells
        are computed once and kept (RAM, and on disk where the generator keeps heads), so
        the first turn with it starts like a warm one. False: nothing to prepare here
        (a generator without a KV cache)."""
        loaded = self.persona(npc_id)
        built = self.prompts.build(
            persona=loaded.persona,
            world=loaded.world,
            names=self.npc_names(),
            history=[],
            memories=[],
            context={},
            player_id=DEFAULT_PLAYER,
            player_text="Hello.",
            max_tokens=self.pipeline.params(loaded, None).max_tokens,
            now=self.clock(),
        )
        rendered = built.rendered
        head = rendered.head_tokens
        if rendered.tokens is None or not head or len(rendered.tokens) < head + 2:
            return False
        # The head and two tokens past it: the generator stores a head only when it reads
        # on beyond it; one token is sampled and ignored.
        prefix = RenderedPrompt(rendered.text, tokens=rendered.tokens[: head + 2], head_tokens=head)
        params = GenerationParams(
            max_tokens=1, temperature=0.0, cache_key=f"warm{KEY_SEPARATOR}{npc_id}"
        )
        self.generator.generate(prefix, params, lambda _piece: None)
        return True

    def close(self) -> None:
        self.writer.close()
        self.store.close()
        self.generator.close()
