"""Generative Agents retrieval scoring (Park et al. 2023, §4.1), as pure functions."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from npc_engine.config import RetrievalConfig
from npc_engine.memory.types import Candidate, Memory, ScoredMemory


def _normalise(values: Sequence[float], floor: float) -> list[float]:
    """Min-max scale to [0, 1]; a spread below ``floor`` is scaled by ``floor`` instead."""
    if not values:
        return []
    low, high = min(values), max(values)
    spread = max(high - low, floor)
    if spread == 0:
        return [0.5 for _ in values]
    return [(value - low) / spread for value in values]


def recency_of(last_accessed: datetime, now: datetime, decay_per_hour: float) -> float:
    hours = max((now - last_accessed).total_seconds() / 3600.0, 0.0)
    return float(decay_per_hour**hours)


def hours_since_recalled(memory: Memory, now: datetime, game_now: float | None) -> float:
    """Hours since the memory was made or last recalled: on the game's clock when both the
    turn and the memory have a game time, else on the wall clock."""
    game_then = memory.accessed_game_time
    if game_now is not None and game_then is not None:
        return max((game_now - game_then) / 60.0, 0.0)
    then = memory.last_accessed_at or memory.created_at
    return max((now - then).total_seconds() / 3600.0, 0.0)


def fused_relevance(candidates: Sequence[Candidate], rrf_k: float) -> list[float]:
    """Reciprocal rank fusion (Cormack et al. 2009) of the meaning rank (cosine) and the
    keyword rank (BM25), scaled so that first in both lists is 1.0 and first by meaning
    alone is 0.5: a memory that shares the question's rare words climbs past one that is
    only similar in tone."""
    order = sorted(range(len(candidates)), key=lambda i: candidates[i].relevance, reverse=True)
    meaning_rank = {index: place for place, index in enumerate(order)}
    best = 2.0 / (rrf_k + 1)
    fused = []
    for index, candidate in enumerate(candidates):
        score = 1.0 / (rrf_k + 1 + meaning_rank[index])
        if candidate.keyword_rank is not None:
            score += 1.0 / (rrf_k + 1 + candidate.keyword_rank)
        fused.append(score / best)
    return fused


def relevance_bar(memory: Memory, config: RetrievalConfig) -> float:
    """How similar to the query a memory must be to be used at all."""
    if memory.kind == "event":
        return config.min_relevance_events
    return config.min_relevance_small_talk if memory.states_little else config.min_relevance


def score_candidates(
    candidates: Sequence[Candidate],
    now: datetime,
    config: RetrievalConfig,
    game_now: float | None = None,
) -> list[ScoredMemory]:
    """Score and sort, best first. Candidates below their ``relevance_bar`` are dropped.
    ``game_now``: the game's clock (minutes), which recency follows when given."""
    kept = [c for c in candidates if c.relevance >= relevance_bar(c.memory, config)]
    matched = fused_relevance(kept, config.rrf_k) if config.hybrid else [c.relevance for c in kept]
    recency = [
        float(config.recency_decay ** hours_since_recalled(c.memory, now, game_now)) for c in kept
    ]
    importance = [c.memory.importance / 10.0 for c in kept]
    relevance = [c.relevance for c in kept]
    floor = config.normalize_floor
    rec_n = _normalise(recency, floor)
    imp_n = _normalise(importance, floor)
    rel_n = _normalise(matched, floor)
    scored = [
        ScoredMemory(
            memory=candidate.memory,
            score=config.weight_recency * rec_n[i]
            + config.weight_relevance * rel_n[i]
            + config.weight_importance * imp_n[i],
            relevance=relevance[i],
            recency=recency[i],
            importance=importance[i],
            keyword_rank=candidate.keyword_rank,
        )
        for i, candidate in enumerate(kept)
    ]
    scored.sort(key=lambda s: s.score, reverse=True)
    # The same words remembered again (a question asked twice, a stock reply) add nothing
    # to the prompt and would crowd out other memories: only the best-scored copy stays.
    seen: set[str] = set()
    distinct = []
    for memory in scored:
        said = " ".join(memory.memory.searchable.lower().split())
        if said not in seen:
            seen.add(said)
            distinct.append(memory)
    return distinct
