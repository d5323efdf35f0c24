"""Generative Agents retrieval scoring (Park et al. 2023, §4.1), as pure functions."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from npc_engine.config import RetrievalConfig
from npc_engine.memory.types import Candidate, ScoredMemory


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


def score_candidates(
    candidates: Sequence[Candidate], now: datetime, config: RetrievalConfig
) -> list[ScoredMemory]:
    """Score and sort, best first. Candidates below ``min_relevance`` are dropped."""
    kept = [c for c in candidates if c.relevance >= config.min_relevance]
    recency = [
        recency_of(c.memory.last_accessed_at or c.memory.created_at, now, config.recency_decay)
        for c in kept
    ]
    importance = [c.memory.importance / 10.0 for c in kept]
    relevance = [c.relevance for c in kept]
    floor = config.normalize_floor
    rec_n = _normalise(recency, floor)
    imp_n = _normalise(importance, floor)
    rel_n = _normalise(relevance, floor)
    scored = [
        ScoredMemory(
            memory=candidate.memory,
            score=config.weight_recency * rec_n[i]
            + config.weight_relevance * rel_n[i]
            + config.weight_importance * imp_n[i],
            relevance=relevance[i],
            recency=recency[i],
            importance=importance[i],
        )
        for i, candidate in enumerate(kept)
    ]
    scored.sort(key=lambda s: s.score, reverse=True)
    return scored
