"""The lorebooks of the loaded worlds, and the entries one turn notes (``lore.py`` holds
how a lorebook chooses)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from npc_engine.config import EngineConfig
from npc_engine.game_state import Standing
from npc_engine.lore import ChosenLore, Lorebook, LoreSettings, LoreVectors, recent_talk
from npc_engine.persona.loader import LoadedPersona, PersonaRegistry
from npc_engine.persona.model import World
from npc_engine.prompt import Turn


class WorldLore:
    def __init__(
        self,
        registry: Callable[[], PersonaRegistry],
        vectors: LoreVectors | None,
        count_tokens: Callable[[str], int],
        config: EngineConfig,
    ) -> None:
        self._registry = registry  # a call: a persona reload replaces the registry
        self.vectors = vectors  # None: lore is looked up by keys only
        self._count_tokens = count_tokens
        self._config = config
        # Per world object (a reload makes new ones): its lorebook, built once.
        self._books: dict[int, tuple[World, Lorebook]] = {}
        self._lock = threading.Lock()

    def lorebook(self, world: World) -> Lorebook:
        """The world's lorebook (its vectors embedded once, at first use or at start)."""
        with self._lock:
            cached = self._books.get(id(world))
            if cached is not None and cached[0] is world:
                return cached[1]
            # Worlds no longer loaded (a reload replaced them) leave with their books.
            current = {id(w) for w in self._registry().worlds.values()}
            for key in [k for k in self._books if k not in current]:
                del self._books[key]
            looked_up = [entry.text for entry in world.lore if not entry.constant]
            vectors = (
                self.vectors.index(looked_up) if self.vectors is not None and looked_up else None
            )
            book = Lorebook(world, vectors, self._count_tokens)
            self._books[id(world)] = (world, book)
            return book

    def prepare(self) -> dict[str, int]:
        """Build every loaded world's lorebook now (not at its first turn), and drop stored
        vectors no world uses any more. Returns entries and texts embedded, for the log."""
        entries = embedded = 0
        texts: list[str] = []
        for world in self._registry().worlds.values():
            book = self.lorebook(world)
            entries += len(book)
            embedded += book.vectors.embedded if book.vectors is not None else 0
            texts += [entry.text for entry in book.entries]
        if self.vectors is not None:
            self.vectors.prune(texts)
        return {"entries": entries, "embedded": embedded}

    def choose(
        self,
        loaded: LoadedPersona,
        standing: Standing,
        history: Sequence[Turn],
        text: str,
        greeting: bool,
    ) -> list[ChosenLore]:
        """The entries this turn notes: by keys and meaning of what is said, within the
        lore budget, none already shown in the conversation window."""
        settings = self._config.lore
        if loaded.world is None or not settings.max_entries:
            return []
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
