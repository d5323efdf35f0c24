"""What happens to memories after they are written (issue 16): facts and consolidation.

* Facts: a player's line may state durable facts (``facts.py``). The newest fact on a
  subject is what the NPC knows; older ones (and the lines they came from) are marked
  superseded in the store: kept as history, never recalled as current.
* Consolidation: per (NPC, player), old low-importance small talk is folded into summaries,
  and caps per player and per NPC bound what a client can make the store grow to.

Both run on the memory writer's thread after a write is stored: at background priority,
never on the reply path. What the NPC knows about a player is cached here so a turn does
not read the store for it, and facts queued but not yet written already count.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import Counter, OrderedDict
from collections.abc import Sequence

from npc_engine.config_sections import ConsolidationConfig, MemoryConfig
from npc_engine.memory.facts import fact_memories, source_line_id, superseding
from npc_engine.memory.types import Memory, MemoryKind, MemoryStore

log = logging.getLogger(__name__)

MAX_KNOWN_PAIRS = 4096  # (NPC, player) pairs whose facts stay cached; ids are the client's
MAX_SUMMARY_CHARS = 700
MAX_QUOTE_CHARS = 90
NPC_TOPIC_WORDS = 6
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]{3,}")
# Summaries and small talk go first when an NPC is over its cap; facts only after them.
TRIM_ORDER: tuple[tuple[MemoryKind, ...], ...] = (("summary", "dialogue", "event"), ("fact",))

Pair = tuple[str, str]


def _npc_topics(replies: Sequence[str]) -> list[str]:
    """The telling words of the NPC's side: the rarer words it used most."""
    from wordfreq import zipf_frequency

    counts = Counter(
        word.lower()
        for reply in replies
        for word in _WORD.findall(reply)
        if zipf_frequency(word.lower(), "en") < 4.5
    )
    return [word for word, _ in counts.most_common(NPC_TOPIC_WORDS)]


def summarize(npc_id: str, player_id: str, chunk: Sequence[Memory]) -> Memory:
    """One summary memory for a run of dialogue memories, oldest first. Extractive, not
    written by the model: what the player said is kept in their words (bounded), the
    NPC's side by its telling words, so search still finds what was talked about."""
    quotes: list[str] = []
    seen: set[str] = set()
    for memory in chunk:
        said = (memory.content or memory.text).strip()
        if memory.said_by_player and said.lower() not in seen:
            seen.add(said.lower())
            quotes.append(said if len(said) <= MAX_QUOTE_CHARS else said[:MAX_QUOTE_CHARS] + "…")
    topics = _npc_topics([m.content or m.text for m in chunk if not m.said_by_player])
    body = ""
    for number, quote in enumerate(quotes):
        piece = f'{"; " if body else ""}"{quote}"'
        if len(body) + len(piece) > MAX_SUMMARY_CHARS - 80:
            body += f"; and {len(quotes) - number} more"
            break
        body += piece
    told = f"they said {body}" if body else "they said little"
    spoke = f" I spoke of {', '.join(topics)}." if topics else ""
    content = f"Earlier talk ({len(chunk)} lines): {told}.{spoke}"
    accessed = [m.last_accessed_at for m in chunk if m.last_accessed_at is not None]
    game_times = [m.game_time for m in chunk if m.game_time is not None]
    return Memory(
        npc_id=npc_id,
        player_id=player_id,
        kind="summary",
        text=f"Earlier talk with the player {player_id} ({len(chunk)} lines): {told}.{spoke}",
        importance=max(m.importance for m in chunk),
        created_at=chunk[-1].created_at,
        last_accessed_at=max(accessed) if accessed else None,
        game_time=game_times[-1] if game_times else None,
        content=content,
    )


class MemoryUpkeep:
    def __init__(self, store: MemoryStore, config: MemoryConfig) -> None:
        self.store = store
        self.config = config
        self._lock = threading.Lock()
        self._known: OrderedDict[Pair, list[Memory]] = OrderedDict()  # current facts, oldest first
        self._pending: dict[Pair, list[Memory]] = {}  # facts queued, not yet written
        self._written: OrderedDict[Pair, int] = OrderedDict()  # memories since last look
        self._npc_written: dict[str, int] = {}  # keyed by persona ids: bounded by personas

    @property
    def consolidation(self) -> ConsolidationConfig:
        return self.config.consolidation

    # -- facts -------------------------------------------------------------------------

    def facts_in(self, line: Memory) -> list[Memory]:
        """The facts a player's line states (``line``: its dialogue memory); from now on
        they are what the NPC knows, though the writer has not stored them yet."""
        if not self.config.facts or line.player_id is None:
            return []
        facts = fact_memories(line)
        if facts:
            key = (line.npc_id, line.player_id)
            with self._lock:
                self._pending.setdefault(key, []).extend(facts)
                while len(self._pending) > MAX_KNOWN_PAIRS:  # only while writes fail
                    del self._pending[next(iter(self._pending))]
                if key in self._known:
                    self._known[key] = self._apply(self._known[key], facts)
        return facts

    @staticmethod
    def _apply(current: list[Memory], newer: Sequence[Memory]) -> list[Memory]:
        replaced = superseding(current, newer)
        kept = [fact for fact in current if fact.id not in replaced]
        known = {fact.id for fact in kept}
        return kept + [fact for fact in newer if fact.id not in known]

    def known_facts(self, npc_id: str, player_id: str) -> list[Memory]:
        """What the NPC knows about this player now: current facts, oldest first."""
        if not self.config.facts:
            return []
        key = (npc_id, player_id)
        with self._lock:
            if key in self._known:
                self._known.move_to_end(key)
                return list(self._known[key])
        stored = [
            m
            for m in self.store.of_player(npc_id, player_id)
            if m.kind == "fact" and m.superseded_by is None
        ]
        known = sorted(stored, key=lambda m: m.created_at)
        with self._lock:
            stored_ids = {m.id for m in known}
            pending = [f for f in self._pending.get(key, []) if f.id not in stored_ids]
            known = self._apply(known, pending)
            self._known[key] = known
            while len(self._known) > MAX_KNOWN_PAIRS:
                self._known.popitem(last=False)
        return list(known)

    def forgotten(self, npc_id: str | None = None) -> None:
        """Memories were forgotten or a save loaded: cached knowledge is read again."""
        with self._lock:
            for key in [k for k in self._known if npc_id is None or k[0] == npc_id]:
                del self._known[key]

    def discard(self, memories: Sequence[Memory]) -> None:
        """Facts found in a turn that will not be written after all."""
        dropped = {m.id for m in memories if m.kind == "fact"}
        if not dropped:
            return
        with self._lock:
            for table in (self._pending, self._known):
                for key in list(table):
                    table[key] = [f for f in table[key] if f.id not in dropped]

    # -- after a write (the writer's thread) -------------------------------------------

    def after_write(self, memories: Sequence[Memory]) -> None:
        by_pair: dict[Pair, list[Memory]] = {}
        for memory in memories:
            if memory.player_id is not None:
                by_pair.setdefault((memory.npc_id, memory.player_id), []).append(memory)
        for pair, written in by_pair.items():
            facts = [m for m in written if m.kind == "fact"]
            if facts:
                self._supersede(pair, facts)
            if self.consolidation.enabled and self._due(pair, len(written)):
                self.consolidate(*pair)
        if self.consolidation.enabled:
            for npc_id in {m.npc_id for m in memories}:
                self._check_npc_cap(npc_id, sum(1 for m in memories if m.npc_id == npc_id))

    def _supersede(self, pair: Pair, facts: list[Memory]) -> None:
        npc_id, player_id = pair
        new_ids = {f.id for f in facts}
        current = [
            m
            for m in self.store.of_player(npc_id, player_id)
            if m.kind == "fact" and m.superseded_by is None and m.id not in new_ids
        ]
        replaced: dict[str, str] = {}
        # In the order they were said: a batch may hold several turns of one player.
        for fact in sorted(facts, key=lambda f: f.created_at):
            replaced.update(superseding(current, [fact]))
            current = [m for m in current if m.id not in replaced] + [fact]
        by_new: dict[str, list[str]] = {}
        for old_id, new_id in replaced.items():
            by_new.setdefault(new_id, []).append(old_id)
        for new_id, old_ids in by_new.items():
            self.store.mark_superseded(npc_id, player_id, old_ids, new_id)
        with self._lock:
            left = [f for f in self._pending.get(pair, []) if f.id not in new_ids]
            if left:
                self._pending[pair] = left
            else:
                self._pending.pop(pair, None)

    def _due(self, pair: Pair, written: int) -> bool:
        with self._lock:
            count = self._written.pop(pair, 0) + written
            if count >= self.consolidation.every:
                return True
            self._written[pair] = count
            while len(self._written) > MAX_KNOWN_PAIRS:  # a lost count only delays a fold
                self._written.popitem(last=False)
            return False

    def consolidate(self, npc_id: str, player_id: str) -> tuple[int, int]:
        """Fold this pair's old small talk into summaries and apply the per-player caps.
        Returns (memories folded or trimmed, summaries written)."""
        rules = self.consolidation
        memories = self.store.of_player(npc_id, player_id)
        fact_sources = {source_line_id(m.id) for m in memories if m.kind == "fact"}
        dialogue = sorted(
            (m for m in memories if m.kind == "dialogue" and m.superseded_by is None),
            key=lambda m: m.created_at,
        )
        old = dialogue[: max(0, len(dialogue) - rules.keep_recent)]
        foldable = [m for m in old if m.importance <= rules.max_importance]
        foldable = [m for m in foldable if m.id not in fact_sources]
        chunks = [
            foldable[start : start + rules.fold_size]
            for start in range(0, len(foldable) - rules.fold_size + 1, rules.fold_size)
        ]
        summaries = [summarize(npc_id, player_id, chunk) for chunk in chunks]
        folded = [m.id for chunk in chunks for m in chunk]
        if summaries:
            self.store.add(summaries)  # first: a crash between the two loses nothing
            self._forget(npc_id, folded)
        gone = set(folded)
        left = [m for m in memories if m.id not in gone] + summaries
        trimmed = self._over_player_caps(left)
        if trimmed:
            self._forget(npc_id, trimmed)
        if summaries or trimmed:
            log.info(
                "memory upkeep %s/%s: %d folded into %d summaries, %d trimmed",
                npc_id,
                player_id,
                len(folded),
                len(summaries),
                len(trimmed),
            )
        return len(folded) + len(trimmed), len(summaries)

    def _over_player_caps(self, memories: list[Memory]) -> list[str]:
        """What goes to keep one player's memories within the caps: facts past their own
        cap (superseded ones first); past ``max_per_player``, the oldest summaries and
        superseded lines, then the oldest other lines. Facts never count against it."""
        rules = self.consolidation
        doomed: list[str] = []
        facts = [m for m in memories if m.kind == "fact"]
        if len(facts) > rules.max_facts_per_player:
            by_age = sorted(facts, key=lambda m: (m.superseded_by is None, m.created_at))
            doomed += [m.id for m in by_age[: len(facts) - rules.max_facts_per_player]]
        others = [m for m in memories if m.kind != "fact"]
        excess = len(others) - rules.max_per_player
        if excess > 0:
            spare_first = sorted(
                others,
                key=lambda m: (
                    not (m.kind == "summary" or m.superseded_by is not None),
                    m.created_at,
                ),
            )
            doomed += [m.id for m in spare_first[:excess]]
        return doomed

    def _forget(self, npc_id: str, memory_ids: list[str]) -> None:
        # The store's forget, not the engine's: this runs on the writer thread, which the
        # engine's forget waits for. Saves keep their copies (the store archives them).
        self.store.forget(npc_id, memory_ids=memory_ids)

    def _check_npc_cap(self, npc_id: str, written: int) -> None:
        rules = self.consolidation
        with self._lock:
            count = self._npc_written.get(npc_id, 0) + written
            self._npc_written[npc_id] = 0 if count >= rules.every else count
        if count < rules.every:
            return
        total = self.store.count(npc_id)
        if total <= rules.max_per_npc:
            return
        # Trim to 95 % of the cap so the next trim is many writes away.
        excess = total - int(rules.max_per_npc * 0.95)
        for kinds in TRIM_ORDER:
            doomed = self.store.oldest(npc_id, excess, kinds)
            if doomed:
                self._forget(npc_id, [m.id for m in doomed])
                excess -= len(doomed)
            if excess <= 0:
                break
        log.info("memory upkeep %s: over its cap of %d, oldest trimmed", npc_id, rules.max_per_npc)
