"""One NPC line, start to end: recall -> notes -> prompt -> stream (clean -> guard ->
trim) -> game action -> write back. ``DialogueEngine.say``, ``greet`` and scene lines all
run through ``TurnPipeline.run``; the rooms it reads (conversations, secrets, lore,
actions, state) are the engine's."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from npc_engine.cleaning import StreamCleaner
from npc_engine.errors import is_unavailable
from npc_engine.expression import infer_action, infer_emotion
from npc_engine.game_state import Standing, standing_notes, unlocked_entries
from npc_engine.generation.base import GenerationParams
from npc_engine.guard import ReplyGuard
from npc_engine.ids import check_id
from npc_engine.model_registry import MODELS
from npc_engine.persona.loader import LoadedPersona
from npc_engine.prompt import BuiltPrompt, Turn
from npc_engine.scenes import Scene
from npc_engine.sentences import SentenceTrim
from npc_engine.turns import (
    ROLE_STOPS,
    SCENE_MEMORIES,
    Halt,
    TurnResult,
    conversation_key,
    first_line_for,
    player_line_memory,
    reply_memory,
    scene_key,
    scene_stops,
    turn_of,
)

if TYPE_CHECKING:
    from npc_engine.dialogue import DialogueEngine

log = logging.getLogger(__name__)


class TurnPipeline:
    def __init__(self, engine: DialogueEngine) -> None:
        self._engine = engine
        config = engine.config
        known = MODELS.get(config.model)
        self._dry_multiplier = (
            config.dry_multiplier
            if config.dry_multiplier is not None
            else (known.dry_multiplier if known is not None else 0.0)
        )

    def params(self, loaded: LoadedPersona, max_tokens: int | None) -> GenerationParams:
        overrides = loaded.persona.generation
        config = self._engine.config
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

    def first_meeting(self, npc_id: str, player_id: str) -> bool:
        if self._engine.conversations.history(npc_id, player_id):
            return False
        return not self._engine.store.recent(npc_id, player_id, 1, player_only=True)

    def written_greeting(
        self,
        loaded: LoadedPersona,
        npc_id: str,
        player_id: str,
        on_delta: Callable[[str], None] | None,
        game_time: float | None,
    ) -> TurnResult:
        engine = self._engine
        started = time.perf_counter()
        text = first_line_for(loaded.persona, player_id)
        if on_delta is not None:
            on_delta(text)
        result = TurnResult(npc_id=npc_id, player_id=player_id, text=text, reason="stop")
        result.timings.ttft_ms = (time.perf_counter() - started) * 1000
        game_now = self.note_game_time(player_id, game_time)
        memory = reply_memory(npc_id, player_id, text, engine.clock(), game_now, greeting=True)
        turn = Turn("", text, memory_ids=frozenset({memory.id}), greeting=True)
        result.emotion = infer_emotion(text, loaded.persona.mood)
        result.action = infer_action(text)
        with engine.conversations.lock:
            turns = engine.conversations.remember(npc_id, player_id, turn)
            result.memory_write = engine.conversations.store(npc_id, player_id, turns, [memory])
        result.timings.total_ms = (time.perf_counter() - started) * 1000
        return result

    def note_game_time(self, player_id: str, game_time: float | None) -> float | None:
        """The game time of this turn: the one sent (kept for the next turns), else the
        last one the game sent, else None (the wall clock)."""
        engine = self._engine
        if game_time is None:
            return engine.game_time_of(player_id)
        try:
            if engine.state.game_time(player_id) != game_time:
                engine.state.update(player_id, game_time=game_time)
        except Exception as exc:
            log.warning("game time of %s not kept: %s", player_id, exc)
        return game_time

    def run(
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
        """One line of an NPC. In a ``scene`` (``SceneLines.line``): its history is its own part
        of the scene, ``text`` is only what memories and lore are looked up by, the player
        (if present) is ``scene.player_id``, and the caller stores what was said."""
        engine = self._engine
        loaded = engine.persona(npc_id)
        # ``player`` is the player this line is said to or before: None in a scene without one.
        player: str | None = player_id if scene is None else scene.player_id
        if player is not None:
            check_id(player, "player_id")
        with engine.conversations.lock:
            forget_serial = engine.conversations.serial
        started = time.perf_counter()
        now = engine.clock()
        game_now = self.note_game_time(player, game_time) if player is not None else game_time
        result = TurnResult(npc_id=npc_id, player_id=player_id, text="", reason="stop")
        emit = on_delta or (lambda _piece: None)

        def deliver(piece: str) -> None:
            if piece:
                if result.timings.ttft_ms is None:
                    result.timings.ttft_ms = (time.perf_counter() - started) * 1000
                result.text += piece
                emit(piece)

        history = (
            engine.conversations.history(npc_id, player_id)
            if scene is None
            else scene.turns.get(npc_id, [])
        )
        top_k = engine.config.retrieval.top_k
        if scene is not None:  # a scene line: fewer, so each line's notes stay short
            top_k = min(top_k, SCENE_MEMORIES)
        # Memories already in the history window are not repeated: fetch enough others.
        in_window = sum(len(turn.memory_ids) for turn in history)
        in_window += len(scene.remembered) if scene is not None else 0
        wanted = top_k + in_window if top_k else 0
        try:
            if greeting:
                memories = engine.remembered_of(npc_id, player_id, wanted)
            else:
                memories = engine.recall(npc_id, player, text, wanted, game_now)
        except Exception as exc:  # memory trouble must not silence the NPC
            log.warning("memory recall failed for %s: %s", npc_id, exc)
            memories = []
        try:
            known_facts = engine.upkeep.known_facts(npc_id, player) if player is not None else []
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
                engine.state.standing(npc_id, player)
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
            result.lore = engine.lore.choose(loaded, standing, history, text, greeting)
        except Exception as exc:  # a lorebook fault must not silence the NPC
            log.warning("lore lookup failed for %s: %s", npc_id, exc)
        result.timings.retrieval_ms += (time.perf_counter() - mark) * 1000
        rules = engine.secrets.guard_rules(loaded, standing)
        guard = (
            ReplyGuard(rules, *engine.secrets.deflection(loaded, player_id, text))
            if rules.active
            else None
        )
        halt = Halt(cancel)

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

        params = self.params(loaded, max_tokens)
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
            built = engine.prompts.build(
                persona=loaded.persona,
                world=loaded.world,
                names=engine.npc_names(),
                history=history if engine.config.history_turns else [],
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
            stats = engine.generator.generate(built.rendered, params, on_text, halt)
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
                result.game_action, result.action_by = engine.actions.choose(
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
            deliver(engine.fallback_line(loaded))

        result.emotion = infer_emotion(result.text, loaded.persona.mood)
        result.action = infer_action(result.text)
        if scene is not None:  # the scene keeps its own turns; SceneLines.line stores the line
            if built is not None and result.reason != "cancelled":
                result.scene_turn = turn_of(
                    text, result, built, set(), heard=scene.heard_text(npc_id)
                )
            if result.memories:
                engine.writer.touch(npc_id, [m.memory.id for m in result.memories], now, game_now)
            result.timings.total_ms = (time.perf_counter() - started) * 1000
            return result
        to_write = []
        if not greeting:
            line = player_line_memory(npc_id, player_id, text, now, game_now)
            to_write = [line, *engine.upkeep.facts_in(line)]
        if result.reason in ("stop", "length") and not result.used_fallback:
            to_write.append(
                reply_memory(
                    npc_id,
                    player_id,
                    result.text,
                    engine.clock(),
                    game_now,
                    greeting=greeting,
                )
            )
        turn: Turn | None = None
        if result.reason in ("stop", "length") and built is not None:
            turn = turn_of(text, result, built, {m.id for m in to_write}, greeting=greeting)
        with engine.conversations.lock:
            wiped, forgotten = engine.conversations.forgotten_since(
                forget_serial, npc_id, player_id
            )
            if wiped:  # forgotten while this turn ran: it must not write it back
                engine.upkeep.discard(to_write)
                to_write, turn = [], None
            if turn is not None:
                turns = engine.conversations.remember(npc_id, player_id, turn.without(forgotten))
                result.memory_write = engine.conversations.store(npc_id, player_id, turns, to_write)
            else:
                result.memory_write = engine.submit_memories(to_write)
        if result.memories:
            engine.writer.touch(npc_id, [m.memory.id for m in result.memories], now, game_now)
        result.timings.total_ms = (time.perf_counter() - started) * 1000
        return result
