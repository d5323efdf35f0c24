"""The dialogue core: persona + memory + prompt + generation, with no I/O framework in it.

``DialogueEngine.say`` runs one turn synchronously and reports text through a callback as
it streams; the server and the CLI run it on a worker thread. Memory writes leave through
the background ``MemoryWriter`` after the reply, so they never delay a first token.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import re
import threading
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from npc_engine.actions import (
    ACTION_MAX_TOKENS,
    ChosenAction,
    action_grammar,
    action_question,
    choose_by_meaning,
    labelled_lines,
    offered_actions,
    parse_action,
)
from npc_engine.cleaning import StreamCleaner, strip_special_tokens
from npc_engine.config import EngineConfig
from npc_engine.errors import (
    FieldError,
    NpcEngineError,
    StoreUnavailableError,
    UnknownNpcError,
    is_unavailable,
)
from npc_engine.expression import infer_action, infer_emotion
from npc_engine.game_state import (
    GameState,
    Standing,
    WorldGate,
    standing_notes,
    unlocked_entries,
)
from npc_engine.generation.base import GenerationParams, Generator, RenderedPrompt
from npc_engine.guard import (
    DEFAULT_DEFLECTIONS,
    PUZZLED_LINES,
    Embed,
    GuardCut,
    GuardedSecret,
    GuardRules,
    ReplyGuard,
    distinctive_words,
    person_rewrites,
    tells_secret,
)
from npc_engine.guard import preload as preload_guard
from npc_engine.ids import check_id
from npc_engine.lore import ChosenLore, Lorebook, LoreSettings, LoreVectors, recent_talk
from npc_engine.memory.importance import rate_importance, rate_player_line
from npc_engine.memory.saves import SaveInfo
from npc_engine.memory.scoring import score_candidates
from npc_engine.memory.types import (
    PLAYER_LINE_PREFIX,
    Memory,
    MemoryKind,
    MemoryStore,
    ScoredMemory,
    utc_now,
)
from npc_engine.memory.upkeep import MemoryUpkeep
from npc_engine.memory.voice import player_voice
from npc_engine.memory.writer import MemoryWriter, StateWrite
from npc_engine.model_registry import MODELS
from npc_engine.multilingual import PairedEmbedder
from npc_engine.multilingual import preload as preload_multilingual
from npc_engine.persona.loader import LoadedPersona, PersonaRegistry
from npc_engine.persona.model import Persona, World
from npc_engine.prompt import BuiltPrompt, PromptBuilder, Turn, render_persona, render_world
from npc_engine.rumours import WorldTicker
from npc_engine.scenes import (
    MAX_NPCS,
    MAX_TURNS,
    MIN_NPCS,
    Scene,
    SceneLine,
    clean_line,
    line_memories,
    next_speaker,
)
from npc_engine.sentences import SentenceTrim

log = logging.getLogger(__name__)

ReplyReason = Literal["stop", "length", "cancelled", "error"]
DEFAULT_PLAYER = "player"
MAX_MEMORY_CHARS = 600
# Lines the model writes when it starts to play the player too: cut the reply there.
ROLE_STOPS = ["The player (", "\nPlayer:", "\nUser:"]
# Forgets remembered for turns still running; a turn older than all of them is treated as
# overlapping a forget (it stores nothing), which takes this many forgets during one turn.
FORGET_LOG = 1024
EVERY_NPC = "*"  # a forget of everything (a save being loaded)
GREETING_MAX_TOKENS = 48


@dataclass(frozen=True)
class _Forget:
    serial: int
    npc_id: str
    player_id: str | None  # None with memory_ids None: everything the NPC knew
    memory_ids: frozenset[str] | None


@dataclass
class TurnTimings:
    retrieval_ms: float = 0.0
    prompt_ms: float = 0.0
    ttft_ms: float | None = None
    generation_ms: float = 0.0
    total_ms: float = 0.0
    model_ttft_ms: float | None = None  # the model's first text, before the guard held any
    guard_ms: float = 0.0  # time spent checking the reply (key terms, meaning)
    action_ms: float = 0.0  # choosing a game action after the spoken line


@dataclass
class TurnResult:
    npc_id: str
    player_id: str
    text: str
    reason: ReplyReason
    prompt: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    memories: list[ScoredMemory] = field(default_factory=list)
    timings: TurnTimings = field(default_factory=TurnTimings)
    error: str | None = None
    used_fallback: bool = False
    # With reason "error": "unavailable" when a server the engine needs is down, else a bug.
    error_code: Literal["internal", "unavailable"] = "internal"
    dropped: dict[str, int] = field(default_factory=dict)
    memory_write: Future[list[str]] | None = None
    emotion: str | None = None
    action: dict[str, Any] | None = None
    guard: GuardCut | None = None  # why the reply was cut, if it was
    standing: Standing | None = None
    unlocked: tuple[str, ...] = ()
    game_action: ChosenAction | None = None
    # Who chose it (or chose none): the embedder by meaning, or the model on a close call.
    action_by: Literal["meaning", "model"] | None = None
    trimmed: str = ""  # what a max_tokens cut left out (an unfinished sentence)
    lore: list[ChosenLore] = field(default_factory=list)  # lorebook entries noted
    scene_turn: Turn | None = None  # in a scene: the line as a turn of the NPC's part


@dataclass(frozen=True)
class StateView:
    """A ``state`` answer: trust (when an NPC was named), flags, unlocked entries."""

    player_id: str
    flags: dict[str, Any]
    npc_id: str | None = None
    trust: int | None = None
    unlocked: tuple[str, ...] | None = None
    facts: tuple[Memory, ...] | None = None  # what the NPC knows about the player now


class _Halt(threading.Event):
    """Stops a generation when the caller cancels it or the guard cut the reply."""

    def __init__(self, cancel: threading.Event | None) -> None:
        super().__init__()
        self._cancel = cancel

    def is_set(self) -> bool:
        return super().is_set() or (self._cancel is not None and self._cancel.is_set())


KEY_SEPARATOR = "\x1f"  # never in an id (ids are checked against ID_PATTERN)


def conversation_key(npc_id: str, player_id: str) -> str:
    """Names a conversation for the generator's caches (KV slots and snapshots)."""
    return f"{npc_id}{KEY_SEPARATOR}{player_id}"


def npc_of(key: str) -> str:
    return key.split(KEY_SEPARATOR, 1)[0]


def sanitize_for_memory(text: str) -> str:
    """Memories are quoted observations: no role tokens, no line breaks, bounded length."""
    clean = re.sub(r"\s+", " ", strip_special_tokens(text)).strip().replace('"', "'")
    return clean[:MAX_MEMORY_CHARS]


def player_line_memory(
    npc_id: str, player_id: str, text: str, when: datetime, game_time: float | None = None
) -> Memory:
    quoted = sanitize_for_memory(text)
    return Memory(
        npc_id=npc_id,
        player_id=player_id,
        kind="dialogue",
        text=f'{PLAYER_LINE_PREFIX}{player_id} told me: "{quoted}"',
        importance=rate_player_line(quoted),
        created_at=when,
        game_time=game_time,
        content=quoted,
    )


def reply_memory(
    npc_id: str,
    player_id: str,
    text: str,
    when: datetime,
    game_time: float | None = None,
    *,
    greeting: bool = False,
) -> Memory:
    quoted = sanitize_for_memory(text)
    said = "I greeted" if greeting else "I answered"
    return Memory(
        npc_id=npc_id,
        player_id=player_id,
        kind="dialogue",
        text=f'{said} the player {player_id}: "{quoted}"',
        importance=max(1, rate_importance(quoted) - 1),
        created_at=when,
        game_time=game_time,
        content=quoted,
    )


# Memories noted with one line of a scene: each line's notes are read anew (uncached), and
# a line answers the others more than it recalls (measured by tools/bench.py --only scene).
SCENE_MEMORIES = 2


def _turn_of(
    text: str,
    result: TurnResult,
    built: BuiltPrompt,
    made: set[str],
    *,
    greeting: bool = False,
    heard: str = "",
) -> Turn:
    """The turn as the conversation window keeps it: shown exactly as it was, with the ids
    of what it showed (memories, lore) and made (``made``: its own memories)."""
    shown = {m.memory.id for m in built.memories} | made | {c.note_id for c in result.lore}
    return Turn(
        text,
        result.text,
        built.notes,
        frozenset(shown),
        built.scene,
        noted=built.noted,
        scene_shown=built.scene_shown,
        standing_shown=built.standing_shown,
        greeting=greeting,
        heard=heard,
    )


def scene_key(scene_id: str, npc_id: str) -> str:
    """The cache key of one NPC's part of a scene (its KV state between its lines)."""
    return f"scene{KEY_SEPARATOR}{scene_id}{KEY_SEPARATOR}{npc_id}"


def scene_stops(scene: Scene, npc_id: str) -> list[str]:
    """Where a model starts to speak for someone else of the scene: cut the line there."""
    stops = []
    for other in scene.npc_ids:
        if other != npc_id:
            name = scene.names[other]
            stops += [f"\n{name}:", f"{name} says:", f"\n{name.split()[0]}:"]
    return stops


def first_line_for(persona: Persona, player_id: str) -> str:
    """The written greeting a player meets the NPC with: one of ``greeting`` and the
    ``alternate_greetings``, always the same one for the same player (a stable hash, not
    Python's salted one, so it holds across restarts)."""
    lines = [line for line in [persona.greeting.strip(), *persona.alternate_greetings] if line]
    if len(lines) <= 1:
        return lines[0] if lines else ""
    digest = hashlib.sha1(f"{persona.id}\n{player_id}".encode()).digest()
    return lines[int.from_bytes(digest[:4], "big") % len(lines)]


def history_key(npc_id: str, player_id: str) -> str:
    """The store record of a conversation's history."""
    return f"history:{conversation_key(npc_id, player_id)}"


def history_write(npc_id: str, player_id: str, turns: Sequence[Turn] | None) -> StateWrite:
    """A conversation's history as a state write (None deletes it)."""
    labels = {"kind": "history", "npc_id": npc_id, "player_id": player_id}
    value = {"turns": [turn.to_record() for turn in turns]} if turns is not None else None
    return history_key(npc_id, player_id), value, labels


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
        self.lore_vectors = lore_vectors  # None: lore is looked up by keys only
        self.embed = embed  # sentence vectors (None: key terms only)
        # The guard's meaning checks: MiniLM, or MiniLM and the multilingual USE together.
        self.guard_embed: Embed | None = embed
        self._paired: PairedEmbedder | None = None
        if embed is not None and config.guard.meaning == "minilm+use":
            self.guard_embed = self._paired = PairedEmbedder(embed)
        self.generator = generator
        self.store = store
        self.config = config
        self.clock = clock
        known = MODELS.get(config.model)
        self._dry_multiplier = (
            config.dry_multiplier
            if config.dry_multiplier is not None
            else (known.dry_multiplier if known is not None else 0.0)
        )
        # Facts and consolidation, on the writer's thread after each stored batch.
        self.upkeep = MemoryUpkeep(store, config.memory)
        # A save.load rewinds the world: while it applies, no memory, state or forget from
        # another request writes (they wait, then land after it); reads never wait.
        self._world = WorldGate()
        self.writer = MemoryWriter(store, self.upkeep.after_write, pause=self._world.writing)
        self.prompts = PromptBuilder(generator)
        # Recent turns per conversation, least recently used out beyond max_conversations
        # (player ids are the client's choice: RAM must not grow with them).
        self._history: OrderedDict[tuple[str, str], list[Turn]] = OrderedDict()
        # Also orders forgets with turns' writes. Reentrant: a write's done-callback takes it,
        # and runs at once in the caller's thread when the write is already done.
        self._history_lock = threading.RLock()
        # Histories queued for the store and not written yet: a conversation that left RAM
        # meanwhile is read back from here, never from the older copy in the store.
        self._unsaved: dict[tuple[str, str], list[Turn]] = {}
        self._forgets: deque[_Forget] = deque(maxlen=FORGET_LOG)
        self._forget_serial = 0
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
        # Per persona object (a reload makes new ones): its secrets' keys and vectors.
        self._secret_cache: dict[int, tuple[Any, list[GuardedSecret], list[Any] | None]] = {}
        self._secret_lock = threading.Lock()
        self._world_vector_cache: dict[int, tuple[World, Any]] = {}  # per world object
        self._saves_lock = threading.Lock()  # one save operation at a time
        self._action_vector_cache: dict[str, Any] = {}  # bounded by the declared actions
        # Per world object (a reload makes new ones): its lorebook, built once.
        self._lorebooks: dict[int, tuple[World, Lorebook]] = {}
        self._lorebooks_lock = threading.Lock()
        self.ticker = WorldTicker(
            personas=lambda: self.registry.personas,
            store=store,
            settings=config.rumours,
            clock=lambda: self.clock(),
            world_secrets=self._world_secrets,
            forget=lambda npc_id, ids: self.forget(npc_id, memory_ids=ids),
            write=self._submit_memories,
        )
        self._profile_vectors: dict[str, tuple[Persona, Any]] = {}  # who speaks next
        if config.guard.enabled:
            preload_guard()
            if self._paired is not None:
                preload_multilingual()

    def _start_trust(self, npc_id: str) -> int:
        loaded = self.registry.get(npc_id)
        return loaded.persona.trust if loaded is not None else 0

    # -- game state and guards -----------------------------------------------------------

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

    def _secrets_of(self, loaded: LoadedPersona) -> tuple[list[GuardedSecret], list[Any] | None]:
        """Every secret of the persona as the guard reads it (key terms: declared, or its
        distinctive words; its first- and second-person rewrites) and, per secret, the
        vectors of its text and rewrites: computed once per persona."""
        persona = loaded.persona
        with self._secret_lock:
            cached = self._secret_cache.get(id(persona))
            if cached is not None and cached[0] is persona:
                return cached[1], cached[2]
        public = self._public_words(loaded)
        secrets = [
            GuardedSecret(
                f"secrets.{index}",
                secret.text,
                tuple(secret.keys) or distinctive_words(secret.text, public),
                derived=not secret.keys,
                rewrites=person_rewrites(secret.text, persona.name),
            )
            for index, secret in enumerate(persona.secrets)
        ]
        blocks = None
        if self.guard_embed is not None and secrets:
            import numpy as np

            texts = [[s.text, *s.rewrites] for s in secrets]
            flat = np.asarray(
                self.guard_embed([t for group in texts for t in group]), dtype=np.float32
            )
            bounds = np.cumsum([len(group) for group in texts])[:-1]
            blocks = list(np.split(flat, bounds))
        with self._secret_lock:
            if len(self._secret_cache) > 4 * max(len(self.registry.personas), 16):
                self._secret_cache.clear()  # personas reloaded many times: start over
            self._secret_cache[id(persona)] = (persona, secrets, blocks)
        return secrets, blocks

    def _public_words(self, loaded: LoadedPersona) -> str:
        """What the world says outside this NPC's secrets: its own persona, every other
        persona's public side, the whole lorebook. A word found here is no giveaway."""
        persona = loaded.persona
        public = [
            render_world(loaded.world),
            render_persona(persona.model_copy(update={"secrets": []}), self.npc_names()),
            *(f.text for f in persona.knowledge),
            *(f"{e.player}\n{e.npc}" for e in persona.example_dialogue),
        ]
        if loaded.world is not None:
            public += [entry.text for entry in loaded.world.lore if entry.reveal_when is None]
        for other in self.registry.personas.values():
            if other.persona is not persona:
                public += [other.persona.description, *(f.text for f in other.persona.knowledge)]
        return "\n".join(public)

    def guard_rules(self, loaded: LoadedPersona, standing: Standing) -> GuardRules:
        """What this NPC's reply to this player is checked for (nothing with the guard off)."""
        if not self.config.guard.enabled:
            return GuardRules()
        return self.protected(loaded, standing)

    def protected(self, loaded: LoadedPersona, standing: Standing) -> GuardRules:
        """Every guarded secret whose reveal condition does not hold for this player, and
        the world's out-of-world terms (whether or not the guard is on: tests judge by it)."""
        guard = self.config.guard
        facts = standing.facts()
        secrets, blocks = self._secrets_of(loaded)
        chosen = [
            index
            for index, secret in enumerate(loaded.persona.secrets)
            if secret.guard and not (secret.reveal_when is not None and secret.known(facts))
        ]
        world = loaded.world
        rules = GuardRules(
            [secrets[i] for i in chosen],
            tuple(world.out_of_world) if world is not None else (),
            self.guard_embed if blocks is not None else None,
            guard.secret_threshold,
            guard.out_of_world_threshold,
        )
        if blocks is not None and chosen:
            import numpy as np

            rules.preset_vectors(np.concatenate([blocks[i] for i in chosen]))
        if world is not None and rules.embed is not None and rules.out_of_world:
            rules.preset_world_vectors(self._world_vectors(world, rules))
        return self._read_in_any_language(rules)

    def _world_vectors(self, world: World, rules: GuardRules) -> Any:
        """The out-of-world meaning check's vectors, once per world object."""
        with self._secret_lock:
            cached = self._world_vector_cache.get(id(world))
            if cached is not None and cached[0] is world:
                return cached[1]
        assert rules.embed is not None
        vectors = rules.embed(rules.world_texts())
        with self._secret_lock:
            if len(self._world_vector_cache) > 16:
                self._world_vector_cache.clear()  # worlds reloaded many times: start over
            self._world_vector_cache[id(world)] = (world, vectors)
        return vectors

    def _read_in_any_language(self, rules: GuardRules) -> GuardRules:
        """With the paired embedder, a sentence in another language is judged by its
        multilingual half alone (``guard.py``)."""
        if self._paired is not None:
            rules.multilingual_from = self._paired.second_from
        return rules

    def tells_secret(self, npc_id: str, entry: str, text: str) -> str | None:
        """Why ``text`` tells the persona's secret ``entry`` ("secrets.0"): one of its key
        terms in any form, or a sentence as close in meaning as the guard's threshold; None
        if it does not. For scripted checks (``must_not_leak``), whatever the guard did."""
        loaded = self.persona(npc_id)
        secrets, blocks = self._secrets_of(loaded)
        kind, _, number = entry.partition(".")
        if kind != "secrets" or not number.isdigit() or int(number) >= len(secrets):
            raise NpcEngineError(f"{npc_id} has no entry {entry!r} (secrets.0, secrets.1, …)")
        index = int(number)
        threshold = self.config.guard.secret_threshold
        rules = GuardRules([secrets[index]], (), self.guard_embed, threshold)
        if blocks is not None:
            rules.preset_vectors(blocks[index])
        else:
            rules.embed = None
        sentences = [p for p in re.split(r"(?<=[.!?])\s+", text) if p.strip()]
        cut = tells_secret(self._read_in_any_language(rules), sentences or [text])
        return cut.reason if cut is not None else None

    def deflection(self, loaded: LoadedPersona, player_id: str, text: str) -> tuple[str, str]:
        """The lines that end a cut reply: after a secret (the persona's deflections), and
        after an out-of-world sentence (puzzlement); the same for the same turn."""
        pick = zlib.crc32(f"{loaded.id}|{player_id}|{text}".encode())
        lines = loaded.persona.deflections or list(DEFAULT_DEFLECTIONS)
        return lines[pick % len(lines)], PUZZLED_LINES[pick % len(PUZZLED_LINES)]

    # -- lookups -------------------------------------------------------------------------

    def persona(self, npc_id: str) -> LoadedPersona:
        loaded = self.registry.get(npc_id)
        if loaded is None:
            raise UnknownNpcError(npc_id, self.registry.ids())
        return loaded

    def npc_names(self) -> dict[str, str]:
        return {npc_id: p.persona.name for npc_id, p in self.registry.personas.items()}

    def history(self, npc_id: str, player_id: str) -> list[Turn]:
        with self._history_lock:
            return list(self._conversation(npc_id, player_id))

    def _conversation(self, npc_id: str, player_id: str) -> list[Turn]:
        """A conversation's turns (history lock held): in RAM, or read back from the store
        the first time (so a restarted engine continues where the last one stopped)."""
        key = (npc_id, player_id)
        turns = self._history.get(key)
        # On a shared store another replica may have served this conversation since:
        # RAM holds only what this replica has not stored yet, the store the rest.
        if turns is not None and not (self.shared_store and key not in self._unsaved):
            self._history.move_to_end(key)
            return turns
        try:
            if key in self._unsaved:
                turns = list(self._unsaved[key])
            else:
                record = self.store.load_state(history_key(npc_id, player_id)) or {}
                turns = [Turn.from_record(r) for r in record.get("turns", [])]
        except Exception as exc:  # a damaged record must not silence the NPC
            if is_unavailable(exc):  # a store that is down is not an empty history
                raise StoreUnavailableError(
                    "the memory store is unavailable; try again shortly"
                ) from exc
            log.warning("history of %s with %s unreadable: %s", npc_id, player_id, exc)
            turns = []
        self._history[key] = turns
        while len(self._history) > self.config.max_conversations:
            self._history.popitem(last=False)
        return turns

    def conversation_count(self) -> int:
        with self._history_lock:
            return len(self._history)

    def drop_last_turn(self, npc_id: str, player_id: str) -> Turn | None:
        """Take the last exchange out of the conversation (to ask again: "retry")."""
        with self._history_lock:
            turns = self._conversation(npc_id, player_id)
            dropped = turns.pop() if turns else None
            if dropped is not None:
                self._store_history(npc_id, player_id, turns)
            return dropped

    def reset_conversation(self, npc_id: str, player_id: str) -> None:
        with self._history_lock:
            self._history.pop((npc_id, player_id), None)
            self._store_history(npc_id, player_id, None)

    # -- saves ---------------------------------------------------------------------------

    def create_save(self, save_id: str) -> SaveInfo:
        """Save every NPC's memories, histories, trust and flags under ``save_id``."""
        with self._saves_lock:
            self.writer.flush()  # everything acknowledged so far is in the save
            return self.store.create_save(save_id)

    def load_save(self, save_id: str) -> SaveInfo:
        """Make the world what it was at the save. A turn still running meanwhile stores
        nothing (as if its conversation were forgotten); callers end replies first."""
        # Lock order: saves, then a running world tick ends, then the world (the tick's
        # writes go through the writer, which waits for the world lock).
        with self._saves_lock, self.ticker.lock:
            with self._history_lock:
                self._forget_serial += 1
                self._forgets.append(_Forget(self._forget_serial, EVERY_NPC, None, None))
            self.writer.flush()
            with self._world.loading():
                info = self.store.load_save(save_id)
                with self._history_lock:
                    self._history.clear()
                    self._unsaved.clear()
                self.state.clear()
                self.upkeep.forgotten()
            return info

    def list_saves(self) -> list[SaveInfo]:
        return self.store.list_saves()

    def delete_save(self, save_id: str) -> bool:
        with self._saves_lock:
            return self.store.delete_save(save_id)

    def export_save(self, save_id: str) -> bytes:
        with self._saves_lock:
            return self.store.export_save(save_id)

    def import_save(self, save_id: str, data: bytes) -> SaveInfo:
        with self._saves_lock:
            return self.store.import_save(save_id, data)

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
            game_now = self._game_time_of(player_id)
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

    def _game_time_of(self, player_id: str) -> float | None:
        try:
            return self.state.game_time(player_id)
        except Exception as exc:  # state trouble: recency falls back to the wall clock
            log.warning("game time of %s unavailable: %s", player_id, exc)
            return None

    def _remembered_of(self, npc_id: str, player_id: str, limit: int) -> list[ScoredMemory]:
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
                game_time = self._game_time_of(player_id)
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
        with self._history_lock:
            self._forget_serial += 1
            scope = None if everything or ids is not None else player_id
            self._forgets.append(_Forget(self._forget_serial, npc_id, scope, ids))
            for key in [k for k in self._history if k[0] == npc_id]:
                if ids is not None:
                    self._history[key] = [turn.without(ids) for turn in self._history[key]]
                elif everything or key[1] == player_id:
                    del self._history[key]
        self.writer.flush()  # writes queued before the forget are stored, then deleted
        self._forget_in_stored_histories(npc_id, player_id, ids, everything)
        try:
            with self._world.writing():  # never inside a save being loaded
                return self.store.forget(
                    npc_id, player_id=player_id, memory_ids=memory_ids, everything=everything
                )
        finally:
            self.upkeep.forgotten(npc_id)

    def _forget_in_stored_histories(
        self, npc_id: str, player_id: str | None, ids: frozenset[str] | None, everything: bool
    ) -> None:
        """Apply a forget to the histories in the store, not only those in RAM."""
        prefix = history_key(npc_id, "")
        for key in self.store.state_keys({"kind": "history", "npc_id": npc_id}):
            player = key[len(prefix) :]
            if ids is None and not everything and player != player_id:
                continue
            if ids is None:
                self.store.delete_state([key])
                continue
            with self._history_lock:
                turns = [turn.without(ids) for turn in self._conversation(npc_id, player)]
                self._history[(npc_id, player)] = turns
                self._store_history(npc_id, player, turns)
        self.writer.flush()

    def _forgotten_since(
        self, serial: int, npc_id: str, player_id: str
    ) -> tuple[bool, frozenset[str]]:
        """(whether this conversation was forgotten, memory ids forgotten) since ``serial``
        (called with the history lock held)."""
        if self._forget_serial == serial:
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

    def hear(self, npc_id: str, text: str, *, player_id: str = DEFAULT_PLAYER) -> None:
        """The NPC heard a line it never answered (a say cancelled while queued): stored as
        a cancelled turn stores it, the player's line and no reply."""
        self.persona(npc_id)
        check_id(player_id, "player_id")
        game_now = self._game_time_of(player_id)
        with self._history_lock:
            line = player_line_memory(npc_id, player_id, text, self.clock(), game_now)
            self._submit_memories([line, *self.upkeep.facts_in(line)])

    def _store_history(
        self,
        npc_id: str,
        player_id: str,
        turns: Sequence[Turn] | None,
        memories: Sequence[Memory] = (),
    ) -> Future[list[str]]:
        """Queue a conversation's turns (None: delete them) with the turn's memories, one
        write; until it is stored, ``_conversation`` reads the turns from here."""
        key = (npc_id, player_id)
        snapshot = list(turns) if turns is not None else []
        with self._history_lock:
            self._unsaved[key] = snapshot
            done = self._submit_memories(list(memories), [history_write(npc_id, player_id, turns)])

        def stored(_done: Future[list[str]]) -> None:
            with self._history_lock:
                if self._unsaved.get(key) is snapshot:
                    del self._unsaved[key]

        done.add_done_callback(stored)
        return done

    def _submit_memories(
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

    def _params(self, loaded: LoadedPersona, max_tokens: int | None) -> GenerationParams:
        overrides = loaded.persona.generation
        config = self.config
        cap = max_tokens or overrides.max_tokens or config.max_tokens
        return GenerationParams(
            max_tokens=cap,
            temperature=overrides.temperature
            if overrides.temperature is not None
            else config.temperature,
            top_p=overrides.top_p if overrides.top_p is not None else config.top_p,
            repeat_penalty=overrides.repeat_penalty
            if overrides.repeat_penalty is not None
            else config.repeat_penalty,
            dry_multiplier=self._dry_multiplier,
            dry_allowed_length=config.dry_allowed_length,
            stop=[*config.stop, *(overrides.stop or []), *ROLE_STOPS],
            seed=config.seed,
            model=loaded.persona.model,
            lora=loaded.persona.adapters(),
        )

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
        return self._turn(
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
        if loaded.persona.greeting.strip() and self._first_meeting(npc_id, player_id):
            return self._written_greeting(loaded, npc_id, player_id, on_delta, game_time)
        cap = min(max_tokens or GREETING_MAX_TOKENS, GREETING_MAX_TOKENS)
        return self._turn(
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

    def _first_meeting(self, npc_id: str, player_id: str) -> bool:
        if self.history(npc_id, player_id):
            return False
        return not self.store.recent(npc_id, player_id, 1, player_only=True)

    def _written_greeting(
        self,
        loaded: LoadedPersona,
        npc_id: str,
        player_id: str,
        on_delta: Callable[[str], None] | None,
        game_time: float | None,
    ) -> TurnResult:
        started = time.perf_counter()
        text = first_line_for(loaded.persona, player_id)
        if on_delta is not None:
            on_delta(text)
        result = TurnResult(npc_id=npc_id, player_id=player_id, text=text, reason="stop")
        result.timings.ttft_ms = (time.perf_counter() - started) * 1000
        game_now = self._note_game_time(player_id, game_time)
        memory = reply_memory(npc_id, player_id, text, self.clock(), game_now, greeting=True)
        turn = Turn("", text, memory_ids=frozenset({memory.id}), greeting=True)
        result.emotion = infer_emotion(text, loaded.persona.mood)
        result.action = infer_action(text)
        with self._history_lock:
            turns = self._remember_turn(npc_id, player_id, turn)
            result.memory_write = self._store_history(npc_id, player_id, turns, [memory])
        result.timings.total_ms = (time.perf_counter() - started) * 1000
        return result

    def _note_game_time(self, player_id: str, game_time: float | None) -> float | None:
        """The game time of this turn: the one sent (kept for the next turns), else the
        last one the game sent, else None (the wall clock)."""
        if game_time is None:
            return self._game_time_of(player_id)
        try:
            if self.state.game_time(player_id) != game_time:
                self.state.update(player_id, game_time=game_time)
        except Exception as exc:
            log.warning("game time of %s not kept: %s", player_id, exc)
        return game_time

    def _turn(
        self,
        npc_id: str,
        text: str,
        *,
        player_id: str,
        context: Mapping[str, Any] | None,
        max_tokens: int | None,
        on_delta: Callable[[str], None] | None,
        cancel: threading.Event | None,
        game_time: float | None,
        greeting: bool = False,
        scene: Scene | None = None,
    ) -> TurnResult:
        """One line of an NPC. In a ``scene`` (``scene_line``): its history is its own part
        of the scene, ``text`` is only what memories and lore are looked up by, the player
        (if present) is ``scene.player_id``, and the caller stores what was said."""
        loaded = self.persona(npc_id)
        # ``player`` is the player this line is said to or before: None in a scene without one.
        player: str | None = player_id if scene is None else scene.player_id
        if player is not None:
            check_id(player, "player_id")
        with self._history_lock:
            forget_serial = self._forget_serial
        started = time.perf_counter()
        now = self.clock()
        game_now = self._note_game_time(player, game_time) if player is not None else game_time
        result = TurnResult(npc_id=npc_id, player_id=player_id, text="", reason="stop")
        emit = on_delta or (lambda _piece: None)

        def deliver(piece: str) -> None:
            if piece:
                if result.timings.ttft_ms is None:
                    result.timings.ttft_ms = (time.perf_counter() - started) * 1000
                result.text += piece
                emit(piece)

        history = self.history(npc_id, player_id) if scene is None else scene.turns.get(npc_id, [])
        top_k = self.config.retrieval.top_k
        if scene is not None:  # a scene line: fewer, so each line's notes stay short
            top_k = min(top_k, SCENE_MEMORIES)
        # Memories already in the history window are not repeated: fetch enough others.
        in_window = sum(len(turn.memory_ids) for turn in history)
        in_window += len(scene.remembered) if scene is not None else 0
        wanted = top_k + in_window if top_k else 0
        try:
            if greeting:
                memories = self._remembered_of(npc_id, player_id, wanted)
            else:
                memories = self.recall(npc_id, player, text, wanted, game_now)
        except Exception as exc:  # memory trouble must not silence the NPC
            log.warning("memory recall failed for %s: %s", npc_id, exc)
            memories = []
        try:
            known_facts = self.upkeep.known_facts(npc_id, player) if player is not None else []
        except Exception as exc:
            log.warning("facts unavailable for %s: %s", npc_id, exc)
            known_facts = []
        # Facts have their own place in the notes: not repeated among recalled memories;
        # neither are a scene's own lines.
        fact_ids = {fact.id for fact in known_facts} | (scene.remembered if scene else set())
        relevant_facts = frozenset(m.memory.id for m in memories if m.memory.id in fact_ids)
        memories = [m for m in memories if m.memory.id not in fact_ids]
        result.timings.retrieval_ms = (time.perf_counter() - started) * 1000

        try:
            standing = (
                self.state.standing(npc_id, player)
                if player is not None
                else Standing(loaded.persona.trust)
            )
        except Exception as exc:  # state trouble must not silence the NPC either
            log.warning("game state unavailable for %s: %s", npc_id, exc)
            standing = Standing(loaded.persona.trust)
        if game_now is not None:
            standing = Standing(standing.trust, standing.flags, game_now)
        unlocked = unlocked_entries(loaded.persona, loaded.world, standing.facts())
        result.standing, result.unlocked = standing, unlocked.ids
        mark = time.perf_counter()
        try:
            result.lore = self._choose_lore(loaded, standing, history, text, greeting)
        except Exception as exc:  # a lorebook fault must not silence the NPC
            log.warning("lore lookup failed for %s: %s", npc_id, exc)
        result.timings.retrieval_ms += (time.perf_counter() - mark) * 1000
        rules = self.guard_rules(loaded, standing)
        guard = (
            ReplyGuard(rules, *self.deflection(loaded, player_id, text)) if rules.active else None
        )
        halt = _Halt(cancel)

        def guarded(piece: str) -> str:
            if piece and result.timings.model_ttft_ms is None:
                result.timings.model_ttft_ms = (time.perf_counter() - started) * 1000
            if guard is None:
                return piece
            checking = time.perf_counter()
            safe = guard.feed(piece)
            if guard.cut is not None:
                halt.set()  # the rest of the reply is not wanted: stop generating it
            result.timings.guard_ms += (time.perf_counter() - checking) * 1000
            return safe

        params = self._params(loaded, max_tokens)
        if scene is None:
            params.cache_key = conversation_key(npc_id, player_id)
        else:  # its part of the scene is a conversation of its own, kept warm between lines
            params.cache_key = scene_key(scene.scene_id, npc_id)
            params.stop += scene_stops(scene, npc_id)
        trim = SentenceTrim(params.max_tokens)
        produced = 0

        def on_text(piece: str) -> None:
            nonlocal produced
            produced += 1
            deliver(trim.feed(guarded(cleaner.feed(piece)), produced))

        built: BuiltPrompt | None = None
        try:
            mark = time.perf_counter()
            built = self.prompts.build(
                persona=loaded.persona,
                world=loaded.world,
                names=self.npc_names(),
                history=history if self.config.history_turns else [],
                memories=memories,
                memory_limit=top_k,
                context=context or {},
                player_id=player_id,
                player_text=text,
                greeting=greeting,
                heard=scene.heard_text(npc_id) if scene is not None else "",
                max_tokens=params.max_tokens,
                now=now,
                game_now=game_now,
                standing=standing_notes(standing.trust, unlocked),
                standing_is_default=standing.trust == loaded.persona.trust and not unlocked.ids,
                known_facts=known_facts,
                relevant_facts=relevant_facts,
                lore=[(chosen.note_id, chosen.text) for chosen in result.lore],
            )
            noted_lore = {note_id for note_id, _ in built.noted}
            result.lore = [chosen for chosen in result.lore if chosen.note_id in noted_lore]
            result.timings.prompt_ms = (time.perf_counter() - mark) * 1000
            result.prompt = built.rendered.text
            result.prompt_tokens = built.token_count
            # What the NPC recalled for this line: the best matches (some already in the
            # conversation window, so not repeated as notes) and every note shown.
            noted = {m.memory.id for m in built.memories}
            best = [m for m in memories[:top_k] if m.memory.id not in noted]
            result.memories = sorted([*built.memories, *best], key=lambda m: -m.score)
            result.dropped = {k: v for k, v in built.dropped.items() if v}

            cleaner = StreamCleaner(loaded.persona.name)
            mark = time.perf_counter()
            stats = self.generator.generate(built.rendered, params, on_text, halt)
            deliver(trim.feed(guarded(cleaner.finish()), produced))
            if guard is not None:
                checking = time.perf_counter()
                tail = guard.finish()
                result.timings.guard_ms += (time.perf_counter() - checking) * 1000
                deliver(trim.feed(tail, produced))
            result.cached_tokens = stats.cached_tokens
            result.completion_tokens = stats.completion_tokens
            result.reason = stats.finish_reason
            if guard is not None and guard.cut is not None:
                result.guard = guard.cut
                if not (cancel is not None and cancel.is_set()):
                    result.reason = "stop"  # ended by the guard, not by the caller
            # A reply cut by max_tokens ends at its last complete sentence.
            deliver(trim.finish(cut_by_length=result.reason == "length"))
            result.trimmed = trim.trimmed
            result.timings.generation_ms = (time.perf_counter() - mark) * 1000
            spoken = result.reason in ("stop", "length") and result.text.strip()
            if spoken and not greeting and scene is None:
                mark = time.perf_counter()
                result.game_action, result.action_by = self._choose_action(
                    loaded, built, text, result.text, standing, params.cache_key, cancel
                )
                result.timings.action_ms = (time.perf_counter() - mark) * 1000
        except Exception as exc:
            log.warning("generation failed for %s: %s", npc_id, exc, exc_info=True)
            result.reason = "error"
            result.error = str(exc)
            result.error_code = "unavailable" if is_unavailable(exc) else "internal"

        if result.reason in ("stop", "length", "error") and not result.text.strip():
            result.used_fallback = True
            deliver(self.fallback_line(loaded))

        result.emotion = infer_emotion(result.text, loaded.persona.mood)
        result.action = infer_action(result.text)
        if scene is not None:  # the scene keeps its own turns; scene_line stores the line
            if built is not None and result.reason != "cancelled":
                result.scene_turn = _turn_of(
                    text, result, built, set(), heard=scene.heard_text(npc_id)
                )
            if result.memories:
                self.writer.touch(npc_id, [m.memory.id for m in result.memories], now, game_now)
            result.timings.total_ms = (time.perf_counter() - started) * 1000
            return result
        to_write = []
        if not greeting:
            line = player_line_memory(npc_id, player_id, text, now, game_now)
            to_write = [line, *self.upkeep.facts_in(line)]
        if result.reason in ("stop", "length") and not result.used_fallback:
            to_write.append(
                reply_memory(
                    npc_id, player_id, result.text, self.clock(), game_now, greeting=greeting
                )
            )
        turn: Turn | None = None
        if result.reason in ("stop", "length") and built is not None:
            turn = _turn_of(text, result, built, {m.id for m in to_write}, greeting=greeting)
        with self._history_lock:
            wiped, forgotten = self._forgotten_since(forget_serial, npc_id, player_id)
            if wiped:  # forgotten while this turn ran: it must not write it back
                self.upkeep.discard(to_write)
                to_write, turn = [], None
            if turn is not None:
                turns = self._remember_turn(npc_id, player_id, turn.without(forgotten))
                result.memory_write = self._store_history(npc_id, player_id, turns, to_write)
            else:
                result.memory_write = self._submit_memories(to_write)
        if result.memories:
            self.writer.touch(npc_id, [m.memory.id for m in result.memories], now, game_now)
        result.timings.total_ms = (time.perf_counter() - started) * 1000
        return result

    def _choose_action(
        self,
        loaded: LoadedPersona,
        built: BuiltPrompt,
        player_text: str,
        reply: str,
        standing: Standing,
        cache_key: str | None,
        cancel: threading.Event | None,
    ) -> tuple[ChosenAction | None, Literal["meaning", "model"] | None]:
        """After the spoken line: one of the declared actions, or None, and who chose. The
        player's line is compared by meaning with the actions' examples
        (``actions.choose_by_meaning``, ~10 ms): a clear match, or no match, decides. Only
        on a close call is the model asked, under a grammar of the close actions only,
        continuing the conversation it just had (its KV cache holds it): the question and
        a few tokens."""
        if not self.config.actions.enabled:
            return None, None
        settings = self.config.actions
        choice = None
        offered = offered_actions(loaded.persona, loaded.world, standing.facts())
        if offered and self.embed is not None and settings.gate > -1:
            # The player's line alone: what was asked for is the clearest sign of an
            # action (measured on the labelled set; a small model's reply adds noise).
            lines = labelled_lines(offered)
            choice = choose_by_meaning(
                player_text,
                self.embed([player_text])[0],
                lines,
                self._vectors_of([line.text for line in lines]),
                near=settings.gate,
                accept=settings.accept,
                margin=settings.margin,
            )
            if choice.decided:
                return choice.action, "meaning"
            offered = choice.ask
        if not offered:
            return None, None
        messages = [
            *built.messages,
            {"role": "assistant", "content": reply},
            {"role": "user", "content": action_question(loaded.persona.name, offered)},
        ]
        answer: list[str] = []
        params = GenerationParams(
            max_tokens=ACTION_MAX_TOKENS,
            temperature=0.0,
            grammar=action_grammar(offered),
            cache_key=cache_key,
            model=loaded.persona.model,  # the same server model (or adapter) as the line
            lora=loaded.persona.adapters(),
        )
        try:
            rendered = self.generator.render(messages)
            stats = self.generator.generate(rendered, params, answer.append, cancel)
        except Exception as exc:  # no action is always a safe answer
            log.warning("choosing a game action failed for %s: %s", loaded.persona.name, exc)
            return None, "model"
        if stats.finish_reason != "stop":
            return None, "model"
        chosen = parse_action("".join(answer), offered)
        if choice is not None and not choice.agrees(chosen):
            # Never act on a guess the meaning does not back: a small model on a close call
            # picked give_item(room_key) for "Is the stew any good tonight?".
            return None, "model"
        return chosen, "model"

    def _vectors_of(self, texts: Sequence[str]) -> list[Any]:
        """Sentence vectors of actions' meanings and examples, computed once per text."""
        assert self.embed is not None
        missing = [t for t in texts if t not in self._action_vector_cache]
        if missing:
            for text, vector in zip(missing, self.embed(missing), strict=True):
                self._action_vector_cache[text] = vector
        return [self._action_vector_cache[t] for t in texts]

    # -- scenes --------------------------------------------------------------------------

    def start_scene(
        self,
        scene_id: str,
        npc_ids: Sequence[str],
        *,
        player_id: str | None = None,
        topic: str = "",
        max_turns: int = 8,
    ) -> Scene:
        """A scene of 2–6 different known NPCs (``scenes.py``); nothing is said yet."""
        check_id(scene_id, "scene_id")
        if player_id is not None:
            check_id(player_id, "player_id")
        if len(set(npc_ids)) != len(npc_ids) or not MIN_NPCS <= len(npc_ids) <= MAX_NPCS:
            raise FieldError("npc_ids", f"a scene has {MIN_NPCS} to {MAX_NPCS} different NPCs")
        names = {npc_id: self.persona(npc_id).persona.name for npc_id in npc_ids}
        return Scene(
            scene_id,
            list(npc_ids),
            names,
            player_id=player_id,
            topic=clean_line(topic)[:200],
            max_turns=max(1, min(max_turns, MAX_TURNS)),
        )

    def scene_hears_player(
        self, scene: Scene, text: str, game_time: float | None = None
    ) -> Future[list[str]] | None:
        """The present player says something in the scene: every NPC of it remembers the
        line (tied to the player, facts taken from it as from one-to-one talk), and the
        next line answers it."""
        if scene.player_id is None:
            raise FieldError("scene_id", "this scene has no player present (player_id)")
        text = clean_line(text)[:MAX_MEMORY_CHARS]
        if not text:
            return None
        line = SceneLine(scene.player_id, f"the player ({scene.player_id})", text, True)
        scene.add(line)
        heard = line_memories(scene, line, when=self.clock(), game_time=game_time)
        scene.remembered.update(m.id for m in heard)
        facts = [fact for memory in heard for fact in self.upkeep.facts_in(memory)]
        return self._submit_memories([*heard, *facts])

    def next_in_scene(self, scene: Scene, facing: str | None = None) -> str:
        """Who speaks next (``scenes.next_speaker``). ``facing``: the NPC the player spoke
        to, which answers a player line that names nobody."""
        return next_speaker(scene, self._scene_relevance(scene), facing=facing)

    def _scene_relevance(self, scene: Scene) -> Callable[[str, str], float] | None:
        """How near a line is to each NPC of the scene in meaning (its name, role and
        what it knows), by the embedding model; None without one."""
        if self.embed is None:
            return None
        import numpy as np

        order = list(scene.npc_ids)
        vectors = np.stack([self._profile_vector(npc_id) for npc_id in order])
        cache: dict[str, Any] = {}

        def relevance(npc_id: str, text: str) -> float:
            if text not in cache:
                assert self.embed is not None
                cache[text] = np.asarray(self.embed([text])[0], dtype=np.float32)
            return float(vectors[order.index(npc_id)] @ cache[text])

        return relevance

    def _profile_vector(self, npc_id: str) -> Any:
        """An NPC's name, role, goals and knowledge as one vector, embedded once per
        persona object (a reload makes new ones), not before every line of a scene."""
        import numpy as np

        persona = self.persona(npc_id).persona
        cached = self._profile_vectors.get(npc_id)
        if cached is not None and cached[0] is persona:
            return cached[1]
        profile = " ".join(
            [persona.name, persona.role, *persona.goals, *(k.text for k in persona.knowledge)]
        )
        assert self.embed is not None
        vector = np.asarray(self.embed([profile[:1000]])[0], dtype=np.float32)
        self._profile_vectors[npc_id] = (persona, vector)  # bounded by the loaded NPCs
        return vector

    def likely_next(self, scene: Scene, speaking: str, count: int) -> list[str]:
        """Who may speak after ``speaking`` (its line not known yet): the NPCs who have
        waited longest, to prepare while it speaks."""
        last_spoke = {line.speaker: index for index, line in enumerate(scene.lines)}
        others = [npc for npc in scene.npc_ids if npc != speaking]
        others.sort(key=lambda npc: (last_spoke.get(npc, -1), scene.npc_ids.index(npc)))
        return others[:count]

    def prepare_scene_line(self, scene: Scene, npc_id: str) -> None:
        """Read this NPC's part of the scene up to the lines it has heard so far, so that
        its next line reads only what is said after now (and its notes). Run in a spare
        batch slot while another NPC speaks; a generator without a KV cache gains nothing."""
        loaded = self.persona(npc_id)
        heard = scene.heard_text(npc_id)
        built = self.prompts.build(
            persona=loaded.persona,
            world=loaded.world,
            names=self.npc_names(),
            history=scene.turns.get(npc_id, []),
            memories=[],
            context={},
            player_id=scene.player_id or DEFAULT_PLAYER,
            player_text="",
            heard=heard,
            max_tokens=self._params(loaded, None).max_tokens,
            now=self.clock(),
        )
        params = GenerationParams(
            max_tokens=1, temperature=0.0, cache_key=scene_key(scene.scene_id, npc_id)
        )
        self.generator.generate(built.rendered, params, lambda _piece: None)

    def scene_line(
        self,
        scene: Scene,
        npc_id: str,
        *,
        max_tokens: int | None = None,
        on_delta: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
        game_time: float | None = None,
    ) -> TurnResult:
        """One NPC's line in the scene, streamed; the scene and every participant's memory
        take it in (``result.memory_write``). A cancelled line is not part of the scene."""
        result = self._turn(
            npc_id,
            scene.query(npc_id),
            player_id=scene.player_id or DEFAULT_PLAYER,
            context=scene.context(npc_id),
            max_tokens=max_tokens,
            on_delta=on_delta,
            cancel=cancel,
            game_time=game_time,
            scene=scene,
        )
        if result.scene_turn is None or not result.text.strip():
            return result
        line = SceneLine(npc_id, scene.names[npc_id], clean_line(result.text))
        scene.add(line)
        scene.spoke(npc_id, result.scene_turn)
        memories = line_memories(scene, line, when=self.clock(), game_time=game_time)
        scene.remembered.update(m.id for m in memories)
        result.memory_write = self._submit_memories(memories)
        return result

    # -- world tick: rumours -------------------------------------------------------------

    def world_tick(
        self,
        game_time: float | None = None,
        busy: Callable[[], bool] = lambda: False,
        stop: threading.Event | None = None,
    ) -> int:
        """Pass on what NPCs heard since the last tick (``rumours.WorldTicker``)."""
        return self.ticker.tick(game_time, busy, stop)

    def _world_secrets(self) -> GuardRules:
        """Every loaded NPC's secrets, as one set of guard rules: no NPC gossips any NPC's
        secret, whoever repeated it to it."""
        secrets: list[GuardedSecret] = []
        blocks: list[Any] = []
        for loaded in self.registry.personas.values():
            its_secrets, its_blocks = self._secrets_of(loaded)
            secrets += its_secrets
            blocks += its_blocks or []
        rules = GuardRules(secrets, (), self.guard_embed, self.config.guard.secret_threshold)
        if blocks and len(blocks) == len(secrets):
            import numpy as np

            rules.preset_vectors(np.concatenate(blocks))
        else:
            rules.embed = None
        return self._read_in_any_language(rules)

    # -- lorebook ------------------------------------------------------------------------

    def _count_tokens(self, text: str) -> int:
        tokenize = getattr(self.generator, "tokenize", None)
        return len(tokenize(text)) if tokenize is not None else len(text.split())

    def lorebook(self, world: World) -> Lorebook:
        """The world's lorebook (its vectors embedded once, at first use or at start)."""
        with self._lorebooks_lock:
            cached = self._lorebooks.get(id(world))
            if cached is not None and cached[0] is world:
                return cached[1]
            # Worlds no longer loaded (a reload replaced them) leave with their books.
            current = {id(w) for w in self.registry.worlds.values()}
            for key in [k for k in self._lorebooks if k not in current]:
                del self._lorebooks[key]
            looked_up = [entry.text for entry in world.lore if not entry.constant]
            vectors = (
                self.lore_vectors.index(looked_up)
                if self.lore_vectors is not None and looked_up
                else None
            )
            book = Lorebook(world, vectors, self._count_tokens)
            self._lorebooks[id(world)] = (world, book)
            return book

    def prepare_lore(self) -> dict[str, int]:
        """Build every loaded world's lorebook now (not at its first turn), and drop stored
        vectors no world uses any more. Returns entries and texts embedded, for the log."""
        entries = embedded = 0
        texts: list[str] = []
        for world in self.registry.worlds.values():
            book = self.lorebook(world)
            entries += len(book)
            embedded += book.vectors.embedded if book.vectors is not None else 0
            texts += [entry.text for entry in book.entries]
        if self.lore_vectors is not None:
            self.lore_vectors.prune(texts)
        return {"entries": entries, "embedded": embedded}

    def _choose_lore(
        self,
        loaded: LoadedPersona,
        standing: Standing,
        history: Sequence[Turn],
        text: str,
        greeting: bool,
    ) -> list[ChosenLore]:
        if loaded.world is None or not self.config.lore.max_entries:
            return []
        settings = self.config.lore
        shown = set().union(*(t.memory_ids for t in history)) if history else set()
        return self.lorebook(loaded.world).choose(
            loaded.persona,
            standing.facts(),
            query="" if greeting else text,
            recent=recent_talk(history, settings.scan_turns),
            shown=shown,
            settings=LoreSettings(
                budget_tokens=settings.budget_tokens,
                max_entries=settings.max_entries,
                min_similarity=settings.min_similarity,
                scan_turns=settings.scan_turns,
            ),
        )

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
            max_tokens=self._params(loaded, None).max_tokens,
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

    def _remember_turn(self, npc_id: str, player_id: str, turn: Turn) -> list[Turn]:
        """Append a turn (called with the history lock held); returns the turns now."""
        window = self.config.history_turns
        key = (npc_id, player_id)
        turns = self._conversation(npc_id, player_id)
        self._history.move_to_end(key)
        turns.append(turn)
        if len(turns) > window:
            # Drop half the window at once, not one turn per turn: every drop changes
            # the prompt right after the persona and costs a re-read of the history,
            # so this pays it once every window/2 turns.
            del turns[: len(turns) - max(window // 2, 1)]
        while len(self._history) > self.config.max_conversations:
            self._history.popitem(last=False)
        return turns

    def close(self) -> None:
        self.writer.close()
        self.store.close()
        self.generator.close()
