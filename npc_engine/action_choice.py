"""Choosing a game action after an NPC's spoken line: by meaning first, the model on a
close call (the rules of actions themselves: ``actions.py``)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
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
from npc_engine.config import EngineConfig
from npc_engine.game_state import Standing
from npc_engine.generation.base import GenerationParams, Generator
from npc_engine.guard import Embed
from npc_engine.persona.loader import LoadedPersona
from npc_engine.prompt import BuiltPrompt

log = logging.getLogger(__name__)
ChosenBy = Literal["meaning", "model"]


class ActionChooser:
    def __init__(self, generator: Generator, embed: Embed | None, config: EngineConfig) -> None:
        self._generator = generator
        self._embed = embed
        self._config = config
        self._vectors: dict[str, Any] = {}  # bounded by the declared actions

    def choose(
        self,
        loaded: LoadedPersona,
        built: BuiltPrompt,
        player_text: str,
        reply: str,
        standing: Standing,
        cache_key: str | None,
        cancel: threading.Event | None,
    ) -> tuple[ChosenAction | None, ChosenBy | None]:
        """After the spoken line: one of the declared actions, or None, and who chose. The
        player's line is compared by meaning with the actions' examples
        (``actions.choose_by_meaning``, ~10 ms): a clear match, or no match, decides. Only
        on a close call is the model asked, under a grammar of the close actions only,
        continuing the conversation it just had (its KV cache holds it): the question and
        a few tokens."""
        settings = self._config.actions
        if not settings.enabled:
            return None, None
        choice = None
        offered = offered_actions(loaded.persona, loaded.world, standing.facts())
        if offered and self._embed is not None and settings.gate > -1:
            # The player's line alone: what was asked for is the clearest sign of an
            # action (measured on the labelled set; a small model's reply adds noise).
            lines = labelled_lines(offered)
            choice = choose_by_meaning(
                player_text,
                self._embed([player_text])[0],
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
            rendered = self._generator.render(messages)
            stats = self._generator.generate(rendered, params, answer.append, cancel)
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
        assert self._embed is not None
        missing = [t for t in texts if t not in self._vectors]
        if missing:
            for text, vector in zip(missing, self._embed(missing), strict=True):
                self._vectors[text] = vector
        return [self._vectors[t] for t in texts]
