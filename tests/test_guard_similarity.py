"""The secret guard's meaning check on a labelled set, with the real MiniLM embedder: the
default threshold cuts no harmless line and, with the personas' keys, most leaks."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from npc_engine.config import load_config
from npc_engine.dialogue import DialogueEngine
from npc_engine.game_state import Standing
from npc_engine.generation.scripted import ScriptedGenerator
from npc_engine.guard import ReplyGuard
from npc_engine.memory.in_memory import InMemoryStore
from npc_engine.memory.minilm import OfflineMiniLM
from npc_engine.model_registry import ModelCache
from npc_engine.persona.loader import load_personas

pytestmark = pytest.mark.timeout(120)

LABELLED = Path(__file__).parent / "probes" / "guard_similarity.yaml"


@pytest.mark.slow
def test_default_threshold_on_the_labelled_set(sample_personas: Path) -> None:
    config = load_config()
    embed = OfflineMiniLM(ModelCache(config.cache_dir))
    engine = DialogueEngine(
        load_personas(sample_personas), ScriptedGenerator([]), InMemoryStore(), config, embed=embed
    )
    cut = {True: 0, False: 0}
    total = {True: 0, False: 0}
    for item in yaml.safe_load(LABELLED.read_text()):
        loaded = engine.persona(item["npc"])
        rules = engine.secrets.guard_rules(loaded, Standing(0))
        assert f"secrets.{item['secret']}" in {s.entry for s in rules.secrets}
        for leak, lines in ((True, item["leak"]), (False, item["harmless"])):
            for line in lines:
                guard = ReplyGuard(rules, "-")
                guard.feed(line + " ")
                guard.finish()
                total[leak] += 1
                cut[leak] += guard.cut is not None
    recall, false_cuts = cut[True] / total[True], cut[False] / total[False]
    print(
        f"\nguard on the labelled set: leaks cut {cut[True]}/{total[True]}, harmless cut "
        f"{cut[False]}/{total[False]}"
    )
    assert false_cuts <= 0.05
    assert recall >= 0.75
