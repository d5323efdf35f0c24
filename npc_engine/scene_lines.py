"""Scenes: several NPCs talking, the player present or not (``scenes.py`` holds the scene
itself and who speaks next); each line runs through the turn pipeline."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from npc_engine.errors import FieldError
from npc_engine.generation.base import GenerationParams
from npc_engine.ids import check_id
from npc_engine.persona.model import Persona
from npc_engine.scenes import (
    MAX_NPCS,
    MAX_TURNS,
    MIN_NPCS,
    Scene,
    SceneLine,
    clean_line,
    line_memories,
)
from npc_engine.scenes import next_speaker as choose_speaker
from npc_engine.turns import DEFAULT_PLAYER, MAX_MEMORY_CHARS, TurnResult, scene_key

if TYPE_CHECKING:
    from npc_engine.dialogue import DialogueEngine


class SceneLines:
    def __init__(self, engine: DialogueEngine) -> None:
        self._engine = engine
        self._profile_vectors: dict[str, tuple[Persona, Any]] = {}  # who speaks next

    def start(
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
        names = {npc_id: self._engine.persona(npc_id).persona.name for npc_id in npc_ids}
        return Scene(
            scene_id,
            list(npc_ids),
            names,
            player_id=player_id,
            topic=clean_line(topic)[:200],
            max_turns=max(1, min(max_turns, MAX_TURNS)),
        )

    def hear_player(
        self, scene: Scene, text: str, game_time: float | None = None
    ) -> Future[list[str]] | None:
        """The present player says something in the scene: every NPC of it remembers the
        line (tied to the player, facts taken from it as from one-to-one talk), and the
        next line answers it."""
        engine = self._engine
        if scene.player_id is None:
            raise FieldError("scene_id", "this scene has no player present (player_id)")
        text = clean_line(text)[:MAX_MEMORY_CHARS]
        if not text:
            return None
        line = SceneLine(scene.player_id, f"the player ({scene.player_id})", text, True)
        scene.add(line)
        heard = line_memories(scene, line, when=engine.clock(), game_time=game_time)
        scene.remembered.update(m.id for m in heard)
        facts = [fact for memory in heard for fact in engine.upkeep.facts_in(memory)]
        return engine.submit_memories([*heard, *facts])

    def next_speaker(self, scene: Scene, facing: str | None = None) -> str:
        """Who speaks next (``scenes.next_speaker``). ``facing``: the NPC the player spoke
        to, which answers a player line that names nobody."""
        return choose_speaker(scene, self._scene_relevance(scene), facing=facing)

    def _scene_relevance(self, scene: Scene) -> Callable[[str, str], float] | None:
        """How near a line is to each NPC of the scene in meaning (its name, role and
        what it knows), by the embedding model; None without one."""
        engine = self._engine
        if engine.embed is None:
            return None
        import numpy as np

        order = list(scene.npc_ids)
        vectors = np.stack([self._profile_vector(npc_id) for npc_id in order])
        cache: dict[str, Any] = {}

        def relevance(npc_id: str, text: str) -> float:
            if text not in cache:
                assert engine.embed is not None
                cache[text] = np.asarray(engine.embed([text])[0], dtype=np.float32)
            return float(vectors[order.index(npc_id)] @ cache[text])

        return relevance

    def _profile_vector(self, npc_id: str) -> Any:
        """An NPC's name, role, goals and knowledge as one vector, embedded once per
        persona object (a reload makes new ones), not before every line of a scene."""
        engine = self._engine
        import numpy as np

        persona = engine.persona(npc_id).persona
        cached = self._profile_vectors.get(npc_id)
        if cached is not None and cached[0] is persona:
            return cached[1]
        profile = " ".join(
            [persona.name, persona.role, *persona.goals, *(k.text for k in persona.knowledge)]
        )
        assert engine.embed is not None
        vector = np.asarray(engine.embed([profile[:1000]])[0], dtype=np.float32)
        self._profile_vectors[npc_id] = (persona, vector)  # bounded by the loaded NPCs
        return vector

    def likely_next(self, scene: Scene, speaking: str, count: int) -> list[str]:
        """Who may speak after ``speaking`` (its line not known yet): the NPCs who have
        waited longest, to prepare while it speaks."""
        last_spoke = {line.speaker: index for index, line in enumerate(scene.lines)}
        others = [npc for npc in scene.npc_ids if npc != speaking]
        others.sort(key=lambda npc: (last_spoke.get(npc, -1), scene.npc_ids.index(npc)))
        return others[:count]

    def prepare_line(self, scene: Scene, npc_id: str) -> None:
        """Read this NPC's part of the scene up to the lines it has heard so far, so that
        its next line reads only what is said after now (and its notes). Run in a spare
        batch slot while another NPC speaks; a generator without a KV cache gains nothing."""
        engine = self._engine
        loaded = engine.persona(npc_id)
        heard = scene.heard_text(npc_id)
        built = engine.prompts.build(
            persona=loaded.persona,
            world=loaded.world,
            names=engine.npc_names(),
            history=scene.turns.get(npc_id, []),
            memories=[],
            context={},
            player_id=scene.player_id or DEFAULT_PLAYER,
            player_text="",
            heard=heard,
            max_tokens=engine.pipeline.params(loaded, None).max_tokens,
            now=engine.clock(),
        )
        params = GenerationParams(
            max_tokens=1, temperature=0.0, cache_key=scene_key(scene.scene_id, npc_id)
        )
        engine.generator.generate(built.rendered, params, lambda _piece: None)

    def line(
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
        engine = self._engine
        result = engine.pipeline.run(
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
        memories = line_memories(scene, line, when=engine.clock(), game_time=game_time)
        scene.remembered.update(m.id for m in memories)
        result.memory_write = engine.submit_memories(memories)
        return result
