"""Rumours: what NPCs heard, passed on along their relationships at each world tick.

The design, chosen so a designer can predict it (no model call):

- **Who tells whom.** An NPC talks to the NPCs its persona names under ``relationships``,
  unless its attitude to one is hostile ("does not trust", "afraid of", "hates"...):
  nobody confides in those.
- **What is worth telling.** A memory made since the last tick (the first tick ever: the
  last day's) with importance at least
  ``rumours.min_importance``: something a player said (not a question), an event, or a
  rumour that has passed through fewer than ``rumours.max_hops`` tellers; never one that
  tells a guarded secret of any NPC of the world (its key terms or meaning, as the reply
  guard judges: a player repeating Mara's secret to Tom does not make Tom spread it).
  Each NPC passes on at most ``rumours.per_npc`` per tick, the most important.
- **A player's words are untrusted** (docs/security.md). The player does not decide what
  spreads: a line that reads as instructions to the engine or asks the NPC to spread it
  ("tell everyone", "ignore your instructions", "system:") is never passed on, whatever
  importance it was rated. What is passed on is at most ``MAX_REPORTED_CHARS`` of it, on
  one line. And a rumour that carries a player's words stays with that player: it is tied
  to the player who said them (``player_id``), so a listener recalls it only when talking
  to that player, never in another player's conversation.
- **How it is remembered.** As heard from the teller, in the teller's words, attributed:
  ``Mara Saltwhistle said the player p1 claims: "…"``, kind ``rumour``, importance two
  lower than the teller's memory. News from the game (events) and from NPCs is tied to no
  player: gossip is known to everyone the listener talks to.
- **Once.** A listener hears one story once, whoever tells it (``origin``: the first
  memory it came from).
- **Fading.** A rumour older than ``rumours.fade_minutes`` of game time (wall-clock
  minutes when the game sends no game time) is forgotten at a tick.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from datetime import UTC, datetime, timedelta
from itertools import chain, islice
from typing import TYPE_CHECKING, Any

from npc_engine.errors import FieldError
from npc_engine.guard_rules import GuardRules, read_ahead, tells_secret
from npc_engine.memory.types import Memory, MemoryStore
from npc_engine.persona.model import Persona

if TYPE_CHECKING:
    from npc_engine.config import RumourConfig
    from npc_engine.persona.loader import LoadedPersona

TICK_STATE = "world-tick"  # the state record holding when the last world tick ran
TICK_WRITE_BATCH = 16  # rumours written at a time (the tick yields to lines between)
FIRST_TICK_WINDOW_MINUTES = 1440  # wall-clock minutes of memories the first tick considers
# Candidates per NPC beyond ``per_npc`` whose words are read for secrets in the batch
# before any is chosen (a candidate that tells a secret is replaced by the next, read on
# its own: 5.3 ms against 2.3 ms in a batch). Few memories tell a secret; with 2 ahead a
# 100-NPC town's first tick embedded 500 candidates for 300 passed on, half its time.
CHECKED_AHEAD = 1
# NPCs whose candidates are read for secrets in one batch: ~20 texts, where the
# multilingual embedder already runs 2.3x faster per text than one at a time (measured:
# 5.3 ms a text alone, 2.3 ms in batches of 8 to 64), and a block short enough (~50 ms)
# that a line waiting for the CPU is not held up (wait_idle runs between NPCs).
READ_AHEAD_NPCS = 2

_HOSTILE = re.compile(
    r"\b(hates?|hated|despises?|distrusts?|(does not|doesn't|do not|never) trusts?|"
    r"not trust|afraid|fears?|enem(y|ies)|avoids?|suspects?|rivals?|loathes?)\b",
    re.IGNORECASE,
)


def confidants(persona: Persona) -> list[str]:
    """The NPCs this one passes news to: those it names, less those it is hostile to."""
    return [
        other
        for other, relation in persona.relationships.items()
        if not _HOSTILE.search(relation.attitude)
    ]


MAX_REPORTED_CHARS = 200  # of a player's words, passed on
# Words a player uses to steer the engine or the gossip itself, not news about the world.
# English only, like the importance rules (memory/importance.py).
_INSTRUCTIONS = re.compile(
    r"\b(ignore|disregard|forget|override)\b[^.!?]{0,40}\b(instructions?|rules|prompts?|"
    r"previous|above|everything|orders)\b|"
    r"\b(system|assistant|developer|admin)\s*(notice|message|prompt|override|:)|"
    r"\b(tell|warn|inform) (every(one|body)|all|the (others|whole|entire)|the town)\b|"
    r"\b(spread|pass) (the word|this|it|that)\b|\bnew instructions?\b|"
    r"\byou (must|will) (now )?(say|tell|repeat|obey)\b|<\||\[/?inst\]|^\s*#{2,}",
    re.IGNORECASE | re.MULTILINE,
)


def steers(text: str) -> bool:
    """Whether a player's line reads as instructions or a request to spread it."""
    return bool(_INSTRUCTIONS.search(text))


def worth_telling(memory: Memory, min_importance: int, max_hops: int) -> bool:
    if memory.superseded_by is not None or memory.importance < min_importance:
        return False
    if memory.kind == "rumour":
        return memory.hops < max_hops
    if memory.kind == "event":
        return True
    said = (memory.content or memory.text).rstrip(' "')
    return memory.said_by_player and not said.endswith("?") and not steers(said)


def bounded_words(text: str, limit: int = MAX_REPORTED_CHARS) -> str:
    """A player's words as they travel: one line, double quotes made single (they are
    quoted), cut at a sentence or word end within ``limit`` characters."""
    flat = " ".join(text.replace('"', "'").split())
    if len(flat) <= limit:
        return flat
    cut = flat[:limit]
    end = max(cut.rfind(". "), cut.rfind("! "), cut.rfind("? "))
    if end >= limit // 2:
        return cut[: end + 1]
    return cut.rsplit(" ", 1)[0] + " …"


def reported(memory: Memory) -> str:
    """What the teller says of its memory."""
    if memory.kind == "rumour":
        return memory.text
    said = bounded_words(memory.content or memory.text)
    if memory.said_by_player:
        return f'the player {memory.player_id} claims: "{said}"'
    return f'"{said}"'


def rumour(
    memory: Memory,
    teller_name: str,
    listener: str,
    *,
    when: datetime,
    game_time: float | None,
) -> Memory:
    """The listener's memory of hearing ``memory`` from its teller."""
    # A player's words (and rumours of them) stay with that player; news does not.
    player_id = memory.player_id if memory.said_by_player or memory.kind == "rumour" else None
    return Memory(
        npc_id=listener,
        player_id=player_id,
        kind="rumour",
        text=f"{teller_name} said {reported(memory)}",
        importance=max(1, memory.importance - 2),
        created_at=when,
        game_time=game_time,
        content=bounded_words(memory.content or memory.text),
        source=memory.npc_id,
        origin=memory.origin or memory.id,
        hops=memory.hops + 1,
    )


def origin_of(memory: Memory) -> str:
    """Where a story began: "NPC/memory id" (so it is never told back to that NPC)."""
    return memory.origin or f"{memory.npc_id}/{memory.id}"


def _sentences(memory: Memory) -> list[str]:
    text = memory.content or memory.text
    return [p for p in re.split(r"(?<=[.!?])\s+", text) if p.strip()] or [text]


def tells_no_secret(secrets: GuardRules, memory: Memory) -> bool:
    """Whether the memory's words tell none of these secrets (the guard's own check)."""
    return not secrets.secrets or tells_secret(secrets, _sentences(memory)) is None


# A tick waits at most this long for lines to end before going on: a town that talks
# without pause still gets its rumours passed on.
LONGEST_YIELD_S = 10.0


def _already_idle(_longest: float) -> bool:
    return True


class WorldTicker:
    """One world tick: what each NPC heard since the last, passed on to its confidants,
    and faded rumours forgotten. The engine's ports come in as callables (``forget`` and
    ``write`` are the engine's, so forgets and writes keep its ordering with turns)."""

    def __init__(
        self,
        *,
        personas: Callable[[], Mapping[str, LoadedPersona]],
        store: MemoryStore,
        settings: RumourConfig,
        clock: Callable[[], datetime],
        world_secrets: Callable[[], GuardRules],
        forget: Callable[[str, list[str]], Any],
        write: Callable[[list[Memory]], Future[list[str]]],
    ) -> None:
        self._personas = personas
        self._store = store
        self._settings = settings
        self._clock = clock
        self._world_secrets = world_secrets
        self._forget = forget
        self._write = write
        self.lock = threading.Lock()  # one tick at a time; a save load holds it too

    def tick(
        self,
        game_time: float | None = None,
        wait_idle: Callable[[float], object] | None = None,
        stop: threading.Event | None = None,
    ) -> int:
        """Pass on what NPCs heard since the last tick and forget rumours that faded.
        ``wait_idle(longest)``: returns once no line is being generated (at most
        ``longest`` s); the tick calls it between NPCs (background priority).
        ``stop``: set at shutdown; the tick ends between NPCs, writing nothing more.
        Returns how many rumours were passed on."""
        settings = self._settings
        if not settings.enabled:
            return 0
        wait_idle = wait_idle or _already_idle
        with self.lock:
            now = self._clock()
            record = self._store.state.load_state(TICK_STATE) or {}
            last = record.get("last")
            game_now = self._game_time(game_time, record.get("game_time"))
            # The first tick ever passes on the last day's news, not a whole history.
            since = (
                datetime.fromtimestamp(float(last), tz=UTC)
                if last is not None
                else now - timedelta(minutes=FIRST_TICK_WINDOW_MINUTES)
            )
            secrets = self._world_secrets()
            personas = dict(sorted(self._personas().items()))
            tellers: dict[str, tuple[LoadedPersona, list[str]]] = {}
            for npc_id, loaded in personas.items():
                wait_idle(LONGEST_YIELD_S)
                if stop is not None and stop.is_set():
                    return 0
                self._fade(npc_id, now, game_now)
                listeners = [n for n in confidants(loaded.persona) if n in personas]
                if listeners and settings.per_npc:
                    tellers[npc_id] = (loaded, listeners)
            news = {npc_id: self._news(npc_id, since, now) for npc_id in tellers}
            # The first few candidates of every NPC read for secrets in one batch.
            heads = {
                npc_id: list(islice(found, settings.per_npc + CHECKED_AHEAD))
                for npc_id, found in news.items()
            }
            told: dict[tuple[str, str], Memory] = {}  # (listener, origin) -> its rumour
            order = list(tellers)
            for position, npc_id in enumerate(order):
                wait_idle(LONGEST_YIELD_S)
                if stop is not None and stop.is_set():
                    return 0
                if secrets.secrets and position % READ_AHEAD_NPCS == 0:
                    # The first few candidates of the next NPCs, read for secrets in one
                    # batch: checked one by one they took three quarters of a tick.
                    group = order[position : position + READ_AHEAD_NPCS]
                    read_ahead(secrets, [_sentences(m) for n in group for m in heads[n]])
                loaded, listeners = tellers[npc_id]
                candidates = chain(heads[npc_id], news[npc_id])
                passed = list(
                    islice((m for m in candidates if tells_no_secret(secrets, m)), settings.per_npc)
                )
                for listener in listeners:
                    origins = [origin_of(m) for m in passed]
                    known = self._store.rumours.origins_known(listener, origins)
                    for memory, origin in zip(passed, origins, strict=True):
                        first_teller = origin.split("/", 1)[0]
                        if origin in known or listener in (first_teller, memory.source):
                            continue
                        told.setdefault(
                            (listener, origin),
                            rumour(
                                memory, loaded.persona.name, listener, when=now, game_time=game_now
                            ),
                        )
            # Grouped by listener and player: a batch writes to few collections.
            pending = sorted(told.values(), key=lambda m: (m.npc_id, m.player_id or ""))
            for start in range(0, len(pending), TICK_WRITE_BATCH):
                wait_idle(LONGEST_YIELD_S)
                if stop is not None and stop.is_set():
                    return start
                self._write(pending[start : start + TICK_WRITE_BATCH]).result(120)
            self._store.state.save_state(
                TICK_STATE, {"last": now.timestamp(), "game_time": game_now}
            )
            return len(pending)

    def _news(self, npc_id: str, since: datetime, now: datetime) -> Iterator[Memory]:
        """What the NPC may pass on, most important first (the store reads them lazily, so
        only as many are read as are checked: the first tick of a 100-NPC town read every
        memory of the day, 3,300 of them)."""
        settings = self._settings
        for memory in self._store.rumours.made_between(npc_id, since, now, settings.min_importance):
            if worth_telling(memory, settings.min_importance, settings.max_hops):
                yield memory

    def _game_time(self, asked: float | None, last: Any) -> float | None:
        """The game time a tick runs at. Game time never goes back, and one tick moves it
        at most ``rumours.max_tick_minutes`` past the last tick's: a client cannot fade
        every rumour with one far-future tick (a game that skips a season ticks more)."""
        if asked is None:
            return None
        if not isinstance(last, int | float):
            return asked
        if asked < last:
            raise FieldError(
                "game_time", f"game time goes back: the last world tick was at {last:g}"
            )
        return min(asked, float(last) + self._settings.max_tick_minutes)

    def _fade(self, npc_id: str, now: datetime, game_now: float | None) -> None:
        old = self._store.rumours.faded_rumours(npc_id, now, game_now, self._settings.fade_minutes)
        if old:
            self._forget(npc_id, old)
