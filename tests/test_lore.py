"""The lorebook (issue 14, part 1) and the authoring aids (part 3).

Fast tests use the scripted generator and the in-memory store (bag-of-words lore vectors);
the Chroma tests use real Chroma on disk and the real MiniLM; the probe test asks the
committed question set against the generated 2,000-entry world."""

from __future__ import annotations

import shutil
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from npc_engine.conditions import GameFacts
from npc_engine.config import load_config
from npc_engine.dialogue import DialogueEngine
from npc_engine.generation.scripted import ScriptedGenerator
from npc_engine.lore import ChosenLore, KeyMatcher, Lorebook, LoreSettings
from npc_engine.memory.in_memory import BagOfWordsLoreIndex, InMemoryStore
from npc_engine.persona.authoring import skeleton
from npc_engine.persona.loader import load_personas
from npc_engine.persona.model import Persona, World, WorldLore
from npc_engine.prompt import render_world

from .conftest import FAKE_STORE_RETRIEVAL, REPO, SAMPLE_PERSONAS, run_cli

pytestmark = pytest.mark.timeout(180)


def world_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "personas"
    shutil.copytree(SAMPLE_PERSONAS, folder)
    return folder


def engine_on(
    folder: Path, generator: ScriptedGenerator | None = None, **config: object
) -> DialogueEngine:
    store = InMemoryStore()
    config.setdefault("retrieval", FAKE_STORE_RETRIEVAL)
    return DialogueEngine(
        load_personas(folder),
        generator or ScriptedGenerator(respond=lambda _p: "Aye."),
        store,
        load_config(**config),
        lore_vectors=store.lore_vectors(),
    )


def entries(*items: dict[str, object]) -> list[WorldLore]:
    return [
        WorldLore.model_validate({"id": f"e{i}", "always": False, **item})
        for i, item in enumerate(items)
    ]


# -- loading ----------------------------------------------------------------------------


def test_lore_files_join_the_world_with_ids_and_are_not_personas(sample_personas: Path) -> None:
    registry = load_personas(sample_personas)
    assert registry.problems == []
    assert "saltwhistle" not in registry.personas  # lore/*.yaml is not a persona
    world = next(iter(registry.worlds.values()))
    by_id = {entry.id: entry for entry in world.lore}
    assert by_id["world.0"].always is True  # world.yaml lore without keys: always
    assert by_id["lighthouse"].always is False  # a lorebook file entry: looked up
    assert by_id["fog"].always is True
    assert by_id["crypt-entrance"].known_by == ["The Fog Runners", "mara"]
    looked_up = [e for e in world.lore if not e.constant]
    assert len(looked_up) >= 25 and any(e.reveal_when for e in looked_up)
    assert any(e.known_by for e in looked_up) and any(e.keys for e in looked_up)


def test_broken_lore_files_name_file_line_and_field(tmp_path: Path) -> None:
    folder = world_copy(tmp_path)
    (folder / "lore/bad.yaml").write_text(
        textwrap.dedent(
            """\
            entries:
              - text: A key that is no regex.
                keys: ["/[unclosed/"]
              - text: Gated wrongly.
                reveal_when: trust >>= 3
              - txt: misspelled
            """
        )
    )
    (folder / "lore/twice.yaml").write_text(
        "entries:\n  - text: One.\n  - id: fog\n    text: A second entry named fog.\n"
    )
    problems = [str(p) for p in load_personas(folder).problems]
    bad, twice = folder / "lore/bad.yaml", folder / "lore/twice.yaml"
    expected = [
        f"{bad}:3: entries[0].keys: key '/[unclosed/' is not a valid regular expression",
        f"{bad}:5: entries[1].reveal_when: unexpected '>='",
        f"{bad}:6: entries[2].txt: unknown field; did you mean 'text'?",
        f"{twice}:3: entries[1].id: duplicate lore id 'fog' (also at "
        f"{folder / 'lore/saltwhistle.yaml'}:",
    ]
    for start in expected:
        assert any(p.startswith(start) for p in problems), (start, problems)
    world = next(iter(load_personas(folder).worlds.values()))
    assert "twice.0" in {e.id for e in world.lore}  # the rest of that file still loads
    # a broken lore file does not take the personas down
    assert len(load_personas(folder).personas) == 4


def test_a_world_without_the_lore_folder_keeps_its_lore_in_the_head() -> None:
    world = World.model_validate(
        {"name": "W", "setting": "S.", "lore": ["Always known.", {"text": "Keyed.", "keys": ["k"]}]}
    )
    head = render_world(world)
    assert "Always known." in head and "Keyed." not in head


# -- choosing ---------------------------------------------------------------------------


def test_keys_match_whole_words_phrases_and_regexes_in_any_case() -> None:
    book = entries(
        {"text": "a", "keys": ["lighthouse"]},
        {"text": "b", "keys": ["Gull Point"]},
        {"text": "c", "keys": ["/ship(s|wright)?\\b/"]},
        {"text": "d", "keys": ["inn"]},
    )
    matcher = KeyMatcher(book)
    assert matcher.matches("Who kept the LIGHTHOUSE on gull   point?") == {
        0: "lighthouse",
        1: "gull point",
    }
    assert matcher.matches("The shipwright is drunk.") == {2: "/ship(s|wright)?\\b/"}
    assert matcher.matches("Tell me about the innkeeper and the lighthouses.") == {}  # whole words


@pytest.mark.timeout(20)
def test_regex_keys_are_re2_linear_time_and_any_case() -> None:
    """A backtracking ``(a+)+$`` held the GIL for 7.5 s on 27 characters (issue: ReDoS)."""
    matcher = KeyMatcher(
        entries({"text": "a", "keys": ["/(a+)+$/"]}, {"text": "b", "keys": ["/KRAK[e]n/"]})
    )
    started = time.perf_counter()
    assert matcher.matches("a" * 5000 + "!") == {}
    assert matcher.matches("a" * 5000) == {0: "/(a+)+$/"}
    assert matcher.matches("the Kraken sleeps") == {1: "/KRAK[e]n/"}  # any case, as before
    assert time.perf_counter() - started < 1.0
    with pytest.raises(ValidationError, match="no backreferences"):
        WorldLore.model_validate({"text": "x", "keys": ["/(a)\\1/"]})


def lorebook_of(items: list[WorldLore]) -> Lorebook:
    world = World(name="W", setting="S.", lore=items)
    return Lorebook(
        world, BagOfWordsLoreIndex([e.text for e in world.lore]), lambda t: len(t.split())
    )


def choose(
    book: Lorebook,
    persona: Persona,
    query: str,
    *,
    settings: LoreSettings,
    facts: GameFacts | None = None,
    recent: str = "",
    shown: set[str] | None = None,
) -> list[ChosenLore]:
    return book.choose(
        persona,
        facts or GameFacts(),
        query=query,
        recent=recent,
        shown=shown or set(),
        settings=settings,
    )


def test_choice_keys_first_then_meaning_within_budget_and_gates(sample_personas: Path) -> None:
    mara = load_personas(sample_personas).personas["mara"].persona
    book = lorebook_of(
        entries(
            {"text": "The old lighthouse keeper walked into the sea.", "keys": ["keeper"]},
            {"text": "The lighthouse on the point burns whale oil.", "priority": 3},
            {"text": "The lighthouse key hangs in the Watchhouse.", "known_by": ["guard_tom"]},
            {"text": "The lighthouse will be relit at midwinter.", "reveal_when": "flags.relit"},
            {"text": "Herring " * 80, "keys": ["lighthouse"]},  # over budget alone
        )
    )
    settings = LoreSettings(budget_tokens=60, max_entries=4, min_similarity=0.2)
    chosen = choose(book, mara, "Who was the lighthouse keeper?", settings=settings)
    assert [c.entry_id for c in chosen] == ["e0", "e1"]
    assert chosen[0].why == "key 'keeper', similar" and chosen[1].why == "similar"
    opened = choose(
        book,
        mara,
        "Who was the lighthouse keeper?",
        facts=GameFacts(flags={"relit": True}),
        shown={"lore:e0"},  # already in the window: not repeated
        settings=settings,
    )
    assert [c.entry_id for c in opened] == ["e1", "e3"]
    nothing = choose(book, mara, "Good evening!", settings=settings)
    assert nothing == []


def test_keys_in_the_recent_talk_count_too(sample_personas: Path) -> None:
    mara = load_personas(sample_personas).personas["mara"].persona
    book = lorebook_of(entries({"text": "Brindle market sells rope.", "keys": ["Brindle"]}))
    settings = LoreSettings(min_similarity=0.9)
    asked = choose(
        book, mara, "And is it far?", recent="Have you been to Brindle?", settings=settings
    )
    assert [c.entry_id for c in asked] == ["e0"]


def test_chosen_lore_goes_in_the_notes_once_and_the_head_stays_the_same(tmp_path: Path) -> None:
    generator = ScriptedGenerator(respond=lambda _p: "Aye.")
    engine = engine_on(SAMPLE_PERSONAS, generator)
    first = engine.say("mara", "Who kept the lighthouse?", player_id="p1")
    assert [c.entry_id for c in first.lore] == ["lighthouse"]
    prompt = generator.prompts[-1]
    head_end = prompt.index("Any rooms free tonight?")  # the first example: after the head
    lighthouse = "kept by the Orrin family"
    assert prompt.index(lighthouse) > head_end  # in this turn's notes, not the stable head
    assert "(What you know of the world that may matter now:)" in prompt
    assert "The Fog Runners meet in the crypt" in prompt[:head_end]  # always + known_by mara
    second = engine.say("mara", "Tell me more about the lighthouse.", player_id="p1")
    assert second.lore == []  # still in the conversation window
    assert generator.prompts[-1].count(lighthouse) == 1
    assert generator.prompts[-1].startswith(prompt[:head_end])
    tom = engine.say("guard_tom", "How do I get into the crypt?", player_id="p1")
    assert "crypt-entrance" not in [c.entry_id for c in tom.lore]  # known by Mara, not Tom
    gated = engine.say("guard_tom", "Who rang the bell?", player_id="p1")
    assert "bell-ringer" not in [c.entry_id for c in gated.lore]
    engine.set_state("p1", flags={"bell_rumour": True})
    unlocked = engine.say("guard_tom", "Who rang the bell at night?", player_id="p1")
    assert "bell-ringer" in [c.entry_id for c in unlocked.lore]


def test_lore_is_dropped_before_memories_when_the_prompt_is_too_long(tmp_path: Path) -> None:
    folder = world_copy(tmp_path)
    long_entry = {"id": "long", "text": "The lighthouse " + "stone " * 300, "keys": ["lighthouse"]}
    (folder / "lore/long.yaml").write_text(yaml.safe_dump({"entries": [long_entry]}))
    generator = ScriptedGenerator(respond=lambda _p: "Aye.", n_ctx=900)
    engine = engine_on(folder, generator, lore={"budget_tokens": 2000})
    result = engine.say("mara", "The lighthouse?", player_id="p1", max_tokens=16)
    # the lowest-ranked go first, until it fits: the long one (ranked second), not the best
    assert result.dropped.get("lore", 0) >= 1
    assert [c.entry_id for c in result.lore] == ["lighthouse"]
    assert "stone stone" not in generator.prompts[-1]


# -- vectors in Chroma ------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm() -> object:
    from npc_engine.memory.minilm import OfflineMiniLM
    from npc_engine.model_files import ensure_installed
    from npc_engine.model_registry import EMBEDDING_MODEL, MODELS, ModelCache

    cache = ModelCache(load_config().cache_dir)
    ensure_installed(cache, MODELS[EMBEDDING_MODEL], lambda _m: None)
    return OfflineMiniLM(cache)


def test_chroma_lore_vectors_embed_only_what_changed(tmp_path: Path, minilm: object) -> None:
    import chromadb
    import numpy as np

    from npc_engine.memory.lore_vectors import ChromaLoreVectors

    calls: list[int] = []

    def counting(texts: list[str]) -> list[list[float]]:
        calls.append(len(texts))
        return minilm(texts)  # type: ignore[operator,no-any-return]

    texts = ["The lighthouse went dark.", "Herring runs failed.", "The inn has four rooms."]
    client = chromadb.PersistentClient(path=str(tmp_path / "chroma"))
    first = ChromaLoreVectors(client, counting, "minilm").index(texts)
    assert first.embedded == 3
    scores = first.scores("Why is there no light on the point?")
    assert int(np.argmax(scores)) == 0
    del client
    client = chromadb.PersistentClient(path=str(tmp_path / "chroma"))  # a restart
    vectors = ChromaLoreVectors(client, counting, "minilm")
    calls.clear()
    again = vectors.index(texts)
    assert again.embedded == 0 and sum(calls) == 0  # nothing re-embedded
    assert np.allclose(again.scores("lighthouse"), first.scores("lighthouse"), atol=1e-5)
    calls.clear()
    changed = vectors.index([texts[0], "Herring runs failed twice.", texts[2]])
    assert changed.embedded == 1
    assert vectors.prune([texts[0], "Herring runs failed twice.", texts[2]]) == 1


def test_a_new_data_directory_reads_lore_vectors_from_the_shared_file(
    tmp_path: Path, minilm: object
) -> None:
    import sqlite3

    import chromadb
    import numpy as np

    from npc_engine.memory.lore_vectors import ChromaLoreVectors, SharedLoreVectors

    calls: list[str] = []

    def counting(texts: list[str]) -> list[list[float]]:
        calls.extend(texts)
        return minilm(texts)  # type: ignore[operator,no-any-return]

    texts = ["The lighthouse went dark.", "Herring runs failed.", "The inn has four rooms."]
    path = tmp_path / "cache" / "lore-vectors.sqlite3"

    def index(folder: str, shared: SharedLoreVectors | None) -> Any:
        client = chromadb.PersistentClient(path=str(tmp_path / folder))
        return ChromaLoreVectors(client, counting, "minilm", shared).index(texts)

    first = index("slot1", SharedLoreVectors(path, 384))
    assert first.embedded == 3 and calls == texts
    calls.clear()
    second = index("slot2", SharedLoreVectors(path, 384))  # another data directory
    assert second.embedded == 0 and calls == []
    assert np.allclose(second.scores("lighthouse"), first.scores("lighthouse"), atol=1e-6)
    # A damaged row is embedded again, never read as a vector.
    calls.clear()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE vectors SET vector = ? WHERE rowid = 1", (b"\x00" * 12,))
    assert index("slot3", SharedLoreVectors(path, 384)).embedded == 1 and len(calls) == 1
    # A file that cannot be opened is done without.
    calls.clear()
    assert index("slot4", SharedLoreVectors(tmp_path / "slot1", 384)).embedded == 3


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_probe_recall_on_the_generated_2000_entry_world(tmp_path: Path) -> None:
    """The committed probe set against the generated world, the engine opened as the
    server opens it (real Chroma, real MiniLM, the default model's tokenizer): the entry
    answering each question is among those chosen within the default budget for ≥ 90%;
    a restart embeds nothing."""
    sys.path.insert(0, str(REPO / "tools"))
    import lore_probe
    import make_world

    spec = lore_probe.load_probes()
    assert len(spec["probes"]) >= 50
    world = tmp_path / "world"
    generated = make_world.write_world(world, spec["entries"], spec["seed"])
    by_id = {entry.id: entry.text for entry in generated}
    for probe in spec["probes"]:  # the committed set still matches the generator
        assert by_id[probe["entry"]] == probe["text"]
    shared = tmp_path / "lore-vectors.sqlite3"  # this test's own: the first open embeds all
    config = lore_probe.world_config(
        world, tmp_path / "data", generation={"backend": "llama"}, lore_vector_cache=shared
    )
    runtime, opened = lore_probe.open_world(config)
    try:
        assert opened.entries >= 2000 and opened.embedded == opened.entries
        result = lore_probe.ask(runtime.engine, spec["probes"], lore_probe.settings_of(config))
        assert result.recall >= 0.9, result.misses
        assert result.chosen_per_line <= config.lore.max_entries
        # and it serves: a real turn of the model with the answering entry in its notes
        probe = spec["probes"][0]
        turn = runtime.engine.say("mara", probe["question"], player_id="probe", max_tokens=16)
        assert turn.reason in ("stop", "length") and turn.text.strip()
        assert probe["entry"] in [chosen.entry_id for chosen in turn.lore]
        assert probe["text"] in turn.prompt
    finally:
        runtime.close()
    again, reopened = lore_probe.open_world(config)
    again.close()
    assert reopened.embedded == 0


# -- authoring aids ---------------------------------------------------------------------


def test_one_field_objects_take_a_plain_string(tmp_path: Path) -> None:
    folder = world_copy(tmp_path)
    text = (folder / "guard_tom.yaml").read_text()
    assert "relationships:" in text
    (folder / "extra.yaml").write_text(
        "name: Pell\nrole: Ferryman\ndescription: Rows the ferry.\n"
        "relationships:\n  mara: Respects her, but knows she hides something.\n"
    )
    world = yaml.safe_load((folder / "world.yaml").read_text())
    world["places"].append("The Ferry Landing")
    world["factions"].append("The Net-Menders' Guild")
    (folder / "world.yaml").write_text(yaml.safe_dump(world))
    registry = load_personas(folder)
    assert registry.problems == []
    pell = registry.personas["extra"].persona
    assert pell.relationships["mara"].attitude == "Respects her, but knows she hides something."
    loaded_world = next(iter(registry.worlds.values()))
    assert loaded_world.places[-1].name == "The Ferry Landing"
    assert loaded_world.factions[-1].name == "The Net-Menders' Guild"


@pytest.mark.slow  # runs the CLI in a subprocess
def test_new_writes_a_skeleton_that_explains_every_field_and_validates(tmp_path: Path) -> None:
    text = skeleton("smith", "../schema.json")
    from npc_engine.persona.model import Persona

    for name, info in Persona.model_fields.items():
        assert f"{name}:" in text, name
        if info.description:
            assert info.description.split()[0] in text
    out = tmp_path / "personas"
    result = run_cli("new", "smith", "--out", str(out))
    assert result.returncode == 0, result.stderr
    written = (out / "smith.yaml").read_text()
    assert written.startswith("# yaml-language-server: $schema=")
    schema = (out / written.splitlines()[0].split("$schema=")[1]).resolve()
    assert schema == (REPO / "npc_engine/schemas/persona.schema.json").resolve()
    assert load_personas(out).problems == []
    assert run_cli("new", "smith", "--out", str(out)).returncode == 2  # no overwrite
    # every commented example is valid as written: uncomment each field's block
    fields = tuple(f"{name}:" for name in Persona.model_fields)
    kept: list[str] = []
    for block in written.split("\n\n")[1:]:
        lines = [line.removeprefix("# ") for line in block.splitlines()]
        start = next(i for i, line in enumerate(lines) if line.startswith(fields))
        kept += lines[start:]
    full = yaml.safe_load("\n".join(kept).replace("other_npc_id", "mara"))
    assert set(full) == set(Persona.model_fields)  # every example is valid as written


@pytest.mark.slow
def test_validate_reports_prefix_sizes_and_warns_of_told_secrets(tmp_path: Path) -> None:
    folder = world_copy(tmp_path)
    mara = yaml.safe_load((folder / "mara.yaml").read_text())
    mara["greeting"] = "Welcome, love. Mind the crypt under the drowned chapel."
    mara["secrets"] = [
        {"text": "The Fog Runners hide their brandy in the crypt under the drowned chapel."},
        {"text": "She poisoned her husband.", "keys": ["poisoned"]},
    ]
    mara["knowledge"] = ["Half the town thinks she poisoned her husband."]
    (folder / "mara.yaml").write_text(yaml.safe_dump(mara, sort_keys=False))
    result = run_cli("validate", str(folder), "--n-ctx", "1200")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "Stable prompt prefix" in out
    sizes = {
        line.split(":")[0].strip(): int(line.split(":")[1].split()[0])
        for line in out.splitlines()
        if line.startswith("  ")
    }
    assert set(sizes) == {"guard_tom", "mara", "wren", "ysolde"} and min(sizes.values()) > 300
    mara_file = folder / "mara.yaml"
    assert f"{mara_file}:" in out
    assert "secrets.0: warning: greeting says 'crypt', 'drowned', words of this secret" in out
    assert "secrets.1: warning: knowledge.0 says 'poisoned'" in out
    assert "leaving the conversation, memories and lore less than 50% of n_ctx=1200" in out
    clean = run_cli("validate", str(SAMPLE_PERSONAS))
    assert "warning" not in clean.stdout and clean.returncode == 0
