"""Secrets: what each NPC's replies are checked for, built once per persona.

The guard itself (``guard.py``, ``leak_forms.py``) reads a reply against ``GuardRules``;
this room makes those rules: a persona's guarded secrets (key terms, person rewrites and
their vectors, computed once per persona object), the world's out-of-world terms, every
NPC's secrets for rumours, and the scripted ``must_not_leak`` check. One similarity
implementation serves all of them: ``guard_rules.tells_secret`` on these rules.
"""

from __future__ import annotations

import re
import threading
import zlib
from collections.abc import Callable
from typing import Any

from npc_engine.config import EngineConfig, GuardConfig
from npc_engine.errors import NpcEngineError
from npc_engine.game_state import Standing
from npc_engine.guard import (
    DEFAULT_DEFLECTIONS,
    PUZZLED_LINES,
    Embed,
    GuardedSecret,
    GuardRules,
    distinctive_words,
    person_rewrites,
    tells_secret,
)
from npc_engine.multilingual import PairedEmbedder
from npc_engine.persona.loader import LoadedPersona, PersonaRegistry
from npc_engine.persona.model import World
from npc_engine.prompt import render_persona, render_world


class SecretKeeper:
    def __init__(
        self,
        registry: Callable[[], PersonaRegistry],
        config: EngineConfig,
        embed: Embed | None,
    ) -> None:
        self._registry = registry  # a call: a persona reload replaces the registry
        self._config = config
        # The meaning checks: MiniLM, or MiniLM and the multilingual USE together.
        self.embed: Embed | None = embed
        self.paired: PairedEmbedder | None = None
        if embed is not None and config.guard.meaning == "minilm+use":
            self.embed = self.paired = PairedEmbedder(embed)
        # Per persona object (a reload makes new ones): its secrets' keys and vectors.
        self._secret_cache: dict[int, tuple[Any, list[GuardedSecret], list[Any] | None]] = {}
        self._lock = threading.Lock()
        self._world_vector_cache: dict[int, tuple[World, Any]] = {}  # per world object

    def secrets_of(self, loaded: LoadedPersona) -> tuple[list[GuardedSecret], list[Any] | None]:
        """Every secret of the persona as the guard reads it (key terms: declared, or its
        distinctive words; its first- and second-person rewrites) and, per secret, the
        vectors of its text and rewrites: computed once per persona."""
        persona = loaded.persona
        with self._lock:
            cached = self._secret_cache.get(id(persona))
            if cached is not None and cached[0] is persona:
                return cached[1], cached[2]
        # The whole world's public words, read only for an NPC with secrets (reading them
        # for each of 100 villagers took seconds of a town's first tick).
        public = self._public_words(loaded) if any(not s.keys for s in persona.secrets) else ""
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
        if self.embed is not None and secrets:
            import numpy as np

            texts = [[s.text, *s.rewrites] for s in secrets]
            flat = np.asarray(self.embed([t for group in texts for t in group]), dtype=np.float32)
            bounds = np.cumsum([len(group) for group in texts])[:-1]
            blocks = list(np.split(flat, bounds))
        with self._lock:
            if len(self._secret_cache) > 4 * max(len(self._registry().personas), 16):
                self._secret_cache.clear()  # personas reloaded many times: start over
            self._secret_cache[id(persona)] = (persona, secrets, blocks)
        return secrets, blocks

    def _public_words(self, loaded: LoadedPersona) -> str:
        """What the world says outside this NPC's secrets: its own persona, every other
        persona's public side, the whole lorebook. A word found here is no giveaway."""
        persona = loaded.persona
        registry = self._registry()
        names = {npc_id: p.persona.name for npc_id, p in registry.personas.items()}
        public = [
            render_world(loaded.world),
            render_persona(persona.model_copy(update={"secrets": []}), names),
            *(f.text for f in persona.knowledge),
            *(f"{e.player}\n{e.npc}" for e in persona.example_dialogue),
        ]
        if loaded.world is not None:
            public += [entry.text for entry in loaded.world.lore if entry.reveal_when is None]
        for other in registry.personas.values():
            if other.persona is not persona:
                public += [other.persona.description, *(f.text for f in other.persona.knowledge)]
        return "\n".join(public)

    @property
    def settings(self) -> GuardConfig:
        return self._config.guard

    def guard_rules(self, loaded: LoadedPersona, standing: Standing) -> GuardRules:
        """What this NPC's reply to this player is checked for (nothing with the guard off)."""
        if not self.settings.enabled:
            return GuardRules()
        return self.protected(loaded, standing)

    def protected(self, loaded: LoadedPersona, standing: Standing) -> GuardRules:
        """Every guarded secret whose reveal condition does not hold for this player, and
        the world's out-of-world terms (whether or not the guard is on: tests judge by it)."""
        facts = standing.facts()
        secrets, blocks = self.secrets_of(loaded)
        chosen = [
            index
            for index, secret in enumerate(loaded.persona.secrets)
            if secret.guard and not (secret.reveal_when is not None and secret.known(facts))
        ]
        world = loaded.world
        rules = GuardRules(
            [secrets[i] for i in chosen],
            tuple(world.out_of_world) if world is not None else (),
            self.embed if blocks is not None else None,
            self.settings.secret_threshold,
            self.settings.out_of_world_threshold,
        )
        if blocks is not None and chosen:
            import numpy as np

            rules.preset_vectors(np.concatenate([blocks[i] for i in chosen]))
        if world is not None and rules.embed is not None and rules.out_of_world:
            rules.preset_world_vectors(self._world_vectors(world, rules))
        return self._read_in_any_language(rules)

    def _world_vectors(self, world: World, rules: GuardRules) -> Any:
        """The out-of-world meaning check's vectors, once per world object."""
        with self._lock:
            cached = self._world_vector_cache.get(id(world))
            if cached is not None and cached[0] is world:
                return cached[1]
        assert rules.embed is not None
        vectors = rules.embed(rules.world_texts())
        with self._lock:
            if len(self._world_vector_cache) > 16:
                self._world_vector_cache.clear()  # worlds reloaded many times: start over
            self._world_vector_cache[id(world)] = (world, vectors)
        return vectors

    def _read_in_any_language(self, rules: GuardRules) -> GuardRules:
        """With the paired embedder, a sentence in another language is judged by its
        multilingual half alone (``guard.py``)."""
        if self.paired is not None:
            rules.multilingual_from = self.paired.second_from
        return rules

    def tells_secret(self, loaded: LoadedPersona, entry: str, text: str) -> str | None:
        """Why ``text`` tells the persona's secret ``entry`` ("secrets.0"): one of its key
        terms in any form, or a sentence as close in meaning as the guard's threshold; None
        if it does not. For scripted checks (``must_not_leak``), whatever the guard did."""
        secrets, blocks = self.secrets_of(loaded)
        kind, _, number = entry.partition(".")
        if kind != "secrets" or not number.isdigit() or int(number) >= len(secrets):
            raise NpcEngineError(f"{loaded.id} has no entry {entry!r} (secrets.0, secrets.1, …)")
        index = int(number)
        rules = GuardRules([secrets[index]], (), self.embed, self.settings.secret_threshold)
        if blocks is not None:
            rules.preset_vectors(blocks[index])
        else:
            rules.embed = None
        sentences = [p for p in re.split(r"(?<=[.!?])\s+", text) if p.strip()]
        cut = tells_secret(self._read_in_any_language(rules), sentences or [text])
        return cut.reason if cut is not None else None

    @staticmethod
    def deflection(loaded: LoadedPersona, player_id: str, text: str) -> tuple[str, str]:
        """The lines that end a cut reply: after a secret (the persona's deflections), and
        after an out-of-world sentence (puzzlement); the same for the same turn."""
        pick = zlib.crc32(f"{loaded.id}|{player_id}|{text}".encode())
        lines = loaded.persona.deflections or list(DEFAULT_DEFLECTIONS)
        return lines[pick % len(lines)], PUZZLED_LINES[pick % len(PUZZLED_LINES)]

    def world_secrets(self) -> GuardRules:
        """Every loaded NPC's secrets, as one set of guard rules: no NPC gossips any NPC's
        secret, whoever repeated it to it."""
        secrets: list[GuardedSecret] = []
        blocks: list[Any] = []
        for loaded in self._registry().personas.values():
            its_secrets, its_blocks = self.secrets_of(loaded)
            secrets += its_secrets
            blocks += its_blocks or []
        rules = GuardRules(secrets, (), self.embed, self.settings.secret_threshold)
        if blocks and len(blocks) == len(secrets):
            import numpy as np

            rules.preset_vectors(np.concatenate(blocks))
        else:
            rules.embed = None
        return self._read_in_any_language(rules)
