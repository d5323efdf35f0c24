"""Standalone lorebooks (SillyTavern World Info, a V2/V3 character_book on its own) imported
as lore files and exported back; secondary keys and their logic; a lorebook from outside is
untrusted like a card (bounded, validated whole, all-or-nothing, one line naming the field).
Every lorebook here is built in the test."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from npc_engine.card_files import CardError
from npc_engine.lore import KeyMatcher
from npc_engine.lorebook_export import lore_to_lorebook, read_lore_file
from npc_engine.lorebook_formats import CHARACTER_BOOK, LOREBOOK_V3, WORLD_INFO
from npc_engine.lorebooks import check_lore_target, lorebook_to_lore, write_lorebook
from npc_engine.persona.loader import load_personas
from npc_engine.persona.model import LoreFile, WorldLore

from .conftest import SAMPLE_PERSONAS, run_cli

pytestmark = pytest.mark.timeout(120)

MAPPED = (
    "id",
    "text",
    "keys",
    "secondary_keys",
    "secondary_logic",
    "always",
    "priority",
    "known_by",
    "reveal_when",
)


def wi_entry(uid: int, **fields: Any) -> dict[str, Any]:
    """A SillyTavern World Info entry with the fields its editor writes."""
    return {
        "uid": uid,
        "key": [],
        "keysecondary": [],
        "comment": "",
        "content": "",
        "constant": False,
        "selective": True,
        "selectiveLogic": 0,
        "order": 100,
        "position": 0,
        "disable": False,
        "displayIndex": uid,
        "depth": 4,
        "probability": 100,
        "useProbability": True,
        "group": "",
        "caseSensitive": None,
        **fields,
    }


def world_info() -> dict[str, Any]:
    entries = [
        wi_entry(
            0,
            key=["Vellmoor", "marsh"],
            comment="Vellmoor",
            content="Vellmoor is a drowned marsh town where {{user}} is a stranger.",
        ),
        wi_entry(
            1,
            key=["wyrm"],
            keysecondary=["bridge", "/toll(s|ing)?/"],
            selectiveLogic=3,
            comment="wyrm",
            content="The bridge wyrm takes a toll of salt from every cart.",
            order=250,
            position=4,
        ),
        wi_entry(
            2,
            key=["lantern"],
            keysecondary=["festival"],
            selectiveLogic=2,
            comment="lanterns",
            content="Lanterns are hung on every door in the dark months.",
        ),
        wi_entry(3, comment="moons", content="Vellmoor has two moons.", constant=True),
        wi_entry(4, key=["/bell(s)?/"], comment="bells", content="The bells ring for the dead."),
        wi_entry(5, key=["old"], comment="off", content="A disabled entry.", disable=True),
        wi_entry(6, key=["empty"], comment="blank", content="   "),
    ]
    return {"entries": {str(e["uid"]): e for e in entries}}


def write(path: Path, value: Any) -> Path:
    path.write_text(json.dumps(value))
    return path


def personas_copy(tmp_path: Path) -> Path:
    personas = tmp_path / "personas"
    shutil.copytree(SAMPLE_PERSONAS, personas)
    return personas


def imported_world(folder: Path, source: Path, **kwargs: Any) -> list[WorldLore]:
    imported = lorebook_to_lore(source, **kwargs)
    check_lore_target(source, folder, imported, force=True)
    write_lorebook(folder, imported, source.name, force=True)
    registry = load_personas(folder)
    assert registry.problems == []
    (world,) = registry.worlds.values()
    return [e for e in world.lore if (e.id or "").startswith(f"{imported.name}.")]


def mapped(entry: WorldLore) -> dict[str, Any]:
    return {name: getattr(entry, name) for name in MAPPED}


# -- secondary keys -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("logic", "said"),
    [
        ("and_any", {"salt duke", "salt customs", "salt duke customs"}),
        ("and_all", {"salt duke customs"}),
        ("not_any", {"salt"}),
        ("not_all", {"salt", "salt duke", "salt customs"}),
    ],
)
def test_secondary_logic_narrows_a_key_match(logic: str, said: set[str]) -> None:
    entry = WorldLore(
        text="t", keys=["salt"], secondary_keys=["duke", "/custom(s|house)/"], secondary_logic=logic
    )
    matcher = KeyMatcher([entry, WorldLore(text="u", keys=["duke"])])
    for line in ("salt", "salt duke", "salt customs", "salt duke customs", "duke customs"):
        found = matcher.matches(f"They spoke of {line} today.")
        assert (0 in found) == (line in said), (logic, line)
        assert (1 in found) == ("duke" in line)  # a key of one entry is not another's
    if logic in ("and_any", "not_all"):
        assert matcher.matches("the salt and the DUKE")[0] == "salt"  # the key is shown


def test_secondary_keys_are_checked_like_keys() -> None:
    with pytest.raises(ValueError, match="not a valid regular expression"):
        WorldLore(text="t", keys=["a"], secondary_keys=["/(unclosed/"])
    with pytest.raises(ValueError, match="secondary_logic"):
        WorldLore(text="t", keys=["a"], secondary_keys=["b"], secondary_logic="and_some")


# -- import ---------------------------------------------------------------------------------


def test_world_info_imports_as_world_lore_known_by_everyone(tmp_path: Path) -> None:
    personas = personas_copy(tmp_path)
    source = write(tmp_path / "Vellmoor.json", world_info())
    imported = lorebook_to_lore(source)
    assert imported.name == "vellmoor"
    assert "known_by" not in imported.lore
    assert any("prompt head of every NPC" in note for note in imported.notes)
    entries = {e.id: e for e in imported_world(personas, source)}
    assert list(entries) == [
        "vellmoor.vellmoor",
        "vellmoor.wyrm",
        "vellmoor.lanterns",
        "vellmoor.moons",
        "vellmoor.bells",
    ]
    first = entries["vellmoor.vellmoor"]
    assert first.text == "Vellmoor is a drowned marsh town where the player is a stranger."
    assert first.keys == ["Vellmoor", "marsh"] and first.known_by == [] and not first.constant
    assert first.extensions == {"uid": 0, "comment": "Vellmoor"}  # not ST's defaults
    wyrm = entries["vellmoor.wyrm"]
    assert wyrm.secondary_keys == ["bridge", "/toll(s|ing)?/"]
    assert wyrm.secondary_logic == "and_all"
    assert wyrm.extensions["position"] == 4 and "selectiveLogic" not in wyrm.extensions
    assert entries["vellmoor.lanterns"].secondary_logic == "not_any"
    assert entries["vellmoor.moons"].constant
    book = LoreFile.model_validate(
        yaml.safe_load((personas / "lore" / "vellmoor.yaml").read_text())
    )
    left_out = book.extensions["lorebook"]["entries_left_out"]
    assert [e["uid"] for e in left_out] == [5, 6]  # disabled and empty: kept, not used


def test_known_by_flag_and_entries_reaching_further(tmp_path: Path) -> None:
    value = world_info()
    value["entries"]["0"]["extensions"] = {"npc_engine": {"known_by": ["mara", "wren"]}}
    value["entries"]["1"]["extensions"] = {"npc_engine": {"known_by": ["mara"]}}
    source = write(tmp_path / "v.json", value)
    imported = lorebook_to_lore(source, known_by=["mara", "The Fog Runners"])
    assert imported.lore["known_by"] == ["mara", "The Fog Runners"]
    assert "known_by" not in imported.lore["entries"][0]  # wren: further than --known-by
    assert imported.lore["entries"][1]["known_by"] == ["mara"]  # narrower: kept
    assert any("entries.0: known_by ['mara', 'wren'] dropped" in w for w in imported.warnings)
    # without --known-by the world's lorebook narrows as it likes
    assert lorebook_to_lore(source).lore["entries"][0]["known_by"] == ["mara", "wren"]


def test_character_book_and_lorebook_v3_shapes(tmp_path: Path) -> None:
    book = {
        "name": "Salt Roads",
        "scan_depth": 3,
        "entries": [
            {
                "keys": ["caravan"],
                "content": "@@depth 2\nCaravans leave at dawn.",
                "enabled": True,
                "insertion_order": 5,
                "name": "caravans",
                "priority": 7,
                "selective": True,
                "secondary_keys": ["dawn"],
                "extensions": {"selectiveLogic": 1, "position": 4},
            },
            {"keys": ["toll"], "content": "Off.", "enabled": False},
            {"keys": ["^salt$"], "use_regex": True, "content": "Salt is money here."},
        ],
    }
    for shape, value in (
        (CHARACTER_BOOK, book),
        (LOREBOOK_V3, {"spec": "lorebook_v3", "data": book}),
    ):
        imported = lorebook_to_lore(write(tmp_path / f"{shape}.json", value))
        assert imported.name == "salt_roads"
        first, regex = imported.lore["entries"]
        assert first["id"] == "salt_roads.caravans" and first["text"] == "Caravans leave at dawn."
        assert first["priority"] == 7 and first["secondary_logic"] == "not_all"
        assert first["extensions"]["decorators"] == ["@@depth 2"]
        assert first["extensions"]["extensions"] == {"position": 4}
        assert regex["keys"] == ["/^salt$/"]
        kept = imported.lore["extensions"]["lorebook"]
        assert kept["format"] == shape and kept["scan_depth"] == 3
        assert kept["entries_left_out"][0]["content"] == "Off."


def test_a_bad_or_reserved_name_is_refused(tmp_path: Path) -> None:
    source = write(tmp_path / "World.json", world_info())
    with pytest.raises(CardError, match="'world' cannot be a lorebook name; pass --id"):
        lorebook_to_lore(source)
    with pytest.raises(CardError, match=r": --id: cannot make a lorebook name"):
        lorebook_to_lore(source, name="no spaces")
    value = world_info()
    value["extensions"] = {"npc_engine": {"name": "not a name\n"}}  # ignored: from the file
    assert lorebook_to_lore(write(tmp_path / "Ok Book.json", value)).name == "ok_book"


def test_a_card_is_still_a_card(tmp_path: Path) -> None:
    source = write(tmp_path / "card.json", {"spec": "chara_card_v2", "data": {"entries": {}}})
    with pytest.raises(CardError, match="entries"):
        lorebook_to_lore(source)


# -- export and the round trip ----------------------------------------------------------------


def test_round_trip_keeps_every_mapped_field(tmp_path: Path) -> None:
    personas = personas_copy(tmp_path)
    source = write(tmp_path / "Vellmoor.json", world_info())
    imported_world(personas, source)
    lore_file = personas / "lore" / "vellmoor.yaml"
    # the writer adds what a World Info file has no field for
    data = yaml.safe_load(lore_file.read_text())
    data["entries"][0].update(priority=9, reveal_when="trust >= 20", known_by=["mara"])
    lore_file.write_text(yaml.safe_dump(data, sort_keys=False))
    registry = load_personas(personas)
    assert registry.problems == []
    (world,) = registry.worlds.values()
    before = [e for e in world.lore if (e.id or "").startswith("vellmoor.")]
    for shape in (WORLD_INFO, LOREBOOK_V3, CHARACTER_BOOK):
        exported = lore_to_lorebook(read_lore_file(lore_file), "vellmoor", shape)
        out = write(tmp_path / f"back-{shape}.json", exported)
        again = imported_world(personas_copy(tmp_path / shape), out)
        assert [mapped(e) for e in again] == [mapped(e) for e in before], shape
        if shape == WORLD_INFO:
            assert [e.extensions for e in again] == [e.extensions for e in before]
        book = LoreFile.model_validate(
            yaml.safe_load((tmp_path / shape / "personas" / "lore" / "vellmoor.yaml").read_text())
        )
        assert len(book.extensions["lorebook"]["entries_left_out"]) == 2, shape
    # World Info back: the writer's fields as they were, ours under extensions.npc_engine
    back = lore_to_lorebook(read_lore_file(lore_file), "vellmoor")
    original = world_info()["entries"]
    assert list(back["entries"]) == ["0", "1", "2", "3", "4", "5", "6"]
    for uid in ("1", "3", "4"):
        entry = dict(back["entries"][uid])
        assert entry.pop("extensions")["npc_engine"]["id"].startswith("vellmoor.")
        assert {k: entry[k] for k in original[uid]} == original[uid]  # every field back
    assert back["entries"]["0"]["content"] == original["0"]["content"]  # {{user}} again
    assert back["entries"]["0"]["extensions"]["npc_engine"] == {
        "id": "vellmoor.vellmoor",
        "reveal_when": "trust >= 20",
        "known_by": ["mara"],
        "priority": 9,
    }
    assert back["entries"]["5"] == original["5"]  # the disabled entry, as it was
    # a World Info entry of ST's defaults keeps none of them in the lore file
    assert data["entries"][3]["extensions"] == {"uid": 3, "comment": "moons"}


@pytest.mark.slow
def test_cli_import_validate_export(tmp_path: Path) -> None:
    personas = personas_copy(tmp_path)
    source = write(tmp_path / "Vellmoor.json", world_info())
    done = run_cli("import", str(source), "--out", str(personas), "--known-by", "mara,wren")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"wrote {personas / 'lore' / 'vellmoor.yaml'}" in done.stdout
    again = run_cli("import", str(source), "--out", str(personas))
    assert again.returncode == 2 and "exists; pass --force" in again.stderr
    checked = run_cli("validate", "--no-sizes", str(personas))
    assert checked.returncode == 0, checked.stdout
    out = tmp_path / "back.json"
    lore_file = personas / "lore" / "vellmoor.yaml"
    exported = run_cli("export", "--lore", str(lore_file), "--out", str(out))
    assert exported.returncode == 0, exported.stderr
    back = json.loads(out.read_text())
    assert back["extensions"]["npc_engine"] == {"name": "vellmoor", "known_by": ["mara", "wren"]}
    assert back["entries"]["1"]["keysecondary"] == ["bridge", "/toll(s|ing)?/"]


# -- untrusted ------------------------------------------------------------------------------


def _bad(value: dict[str, Any], uid: str, **fields: Any) -> dict[str, Any]:
    value["entries"][uid].update(fields)
    return value


MALFORMED = [
    (lambda: {"entries": {"0": "text"}}, "entries.0", "an entry is a JSON object"),
    (lambda: _bad(world_info(), "1", key="/(a+/"), "entries.1.key", "regular expression"),
    (
        lambda: _bad(world_info(), "1", keysecondary=["/(?=x)/"]),
        "entries.1.keysecondary",
        "lookahead",
    ),
    (lambda: _bad(world_info(), "1", selectiveLogic=7), "entries.1.selectiveLogic", "0 (AND ANY)"),
    (lambda: _bad(world_info(), "2", constant="maybe"), "entries.2.constant", "boolean"),
    (lambda: _bad(world_info(), "0", key=[3]), "entries.0.key.0", "string"),
    (
        lambda: _bad(world_info(), "0", extensions={"npc_engine": {"reveal_when": "trust >>"}}),
        "entries.0.extensions.npc_engine.reveal_when",
        "",
    ),
    (
        lambda: _bad(world_info(), "0", content="x" * 300_000),
        "entries",
        "a file holds at most 256 KB",
    ),
    (lambda: {"spec": "lorebook_v3", "data": []}, "data", "should be an object"),
    (
        lambda: {"entries": [{"keys": ["a"], "content": "x", "priority": "high"}]},
        "entries.0.priority",
        "integer",
    ),
]


@pytest.mark.parametrize(("make", "where", "message"), MALFORMED)
def test_malformed_lorebook_is_one_line_naming_file_and_field(
    tmp_path: Path, make: Any, where: str, message: str
) -> None:
    source = write(tmp_path / "bad.json", make())
    with pytest.raises(CardError) as caught:
        lorebook_to_lore(source)
    assert caught.value.field == where
    assert str(caught.value).startswith(f"{source}: {where}: ")
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_malformed_lorebook_on_the_command_line_exits_2_and_writes_nothing(
    tmp_path: Path,
) -> None:
    source = write(tmp_path / "Bad.json", _bad(world_info(), "1", key=["/(a+/"]))
    out = tmp_path / "out"
    done = run_cli("import", str(source), "--out", str(out))
    assert done.returncode == 2 and not out.exists()
    assert done.stderr.startswith(f"npc-engine: error: {source}: entries.1.key: ")
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1


def test_taken_ids_and_redos_keys(tmp_path: Path) -> None:
    personas = personas_copy(tmp_path)
    value = world_info()
    value["entries"]["0"]["extensions"] = {"npc_engine": {"id": "lighthouse"}}
    source = write(tmp_path / "v.json", value)
    imported = lorebook_to_lore(source, name="vellmoor")
    assert imported.lore["entries"][0]["id"] == "vellmoor.lighthouse"  # always its own prefix
    # a name whose ids the world uses is refused before anything is written
    source = write(tmp_path / "w.json", world_info())
    imported_world(personas, source)
    (personas / "lore" / "w.yaml").rename(personas / "lore" / "other.yaml")
    before = sorted(p.name for p in (personas / "lore").iterdir())
    with pytest.raises(CardError, match=r"lore id 'w\.vellmoor' is taken; pass --id"):
        check_lore_target(source, personas, lorebook_to_lore(source))
    assert sorted(p.name for p in (personas / "lore").iterdir()) == before
    # a backtracking key runs in linear time (RE2)
    redos = _bad(world_info(), "4", key=["/(a+)+$/"])
    (entry, *_) = [
        WorldLore.model_validate(e)
        for e in lorebook_to_lore(write(tmp_path / "r.json", redos)).lore["entries"]
        if e["id"] == "r.bells"
    ]
    started = time.perf_counter()
    assert KeyMatcher([entry]).matches("a" * 3000 + "!") == {}
    assert time.perf_counter() - started < 0.5


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5000) | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_wi_entry = st.fixed_dictionaries(
    {},
    optional={
        "uid": st.integers(0, 9) | st.text(max_size=3),
        "key": st.lists(st.sampled_from(["a", "b c", "/x+/", "/(y/", "", 3]), max_size=3)
        | st.text(max_size=6),
        "keysecondary": st.lists(st.sampled_from(["d", "/e?/", "/(?=f)/"]), max_size=3),
        "content": st.text(max_size=30) | st.just("{{user}} and {{char}}"),
        "comment": st.text(max_size=10),
        "constant": st.booleans() | st.just("yes"),
        "selective": st.booleans(),
        "selectiveLogic": st.integers(-1, 5),
        "disable": st.booleans(),
        "order": _json,
        "extensions": st.fixed_dictionaries(
            {},
            optional={
                "npc_engine": st.fixed_dictionaries(
                    {},
                    optional={
                        "id": st.text(max_size=8) | _json,
                        "known_by": st.lists(st.sampled_from(["mara", "wren", ""]), max_size=2)
                        | _json,
                        "reveal_when": st.sampled_from(["trust > 3", "trust >", "flags.x"]),
                        "priority": st.integers(-300, 300),
                    },
                )
            },
        ),
    },
)
_lorebook = st.one_of(
    st.fixed_dictionaries({"entries": st.dictionaries(st.text(max_size=3), _wi_entry, max_size=5)}),
    st.fixed_dictionaries({"entries": st.lists(_wi_entry | _json, max_size=4)}),
    st.fixed_dictionaries({"spec": st.just("lorebook_v3"), "data": _json}),
    _json.filter(lambda v: isinstance(v, dict)),
)


@pytest.mark.timeout(60)
@settings(
    max_examples=120,
    deadline=2000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(value=_lorebook, known_by=st.sampled_from([None, ["mara"], ["", "x"]]))
# Found by the fuzzer: an entry naming the same readers as --known-by came back without
# them after export (inherited), so the round trip differed.
@example(
    value={
        "entries": {"0": {"content": "x", "extensions": {"npc_engine": {"known_by": ["mara"]}}}}
    },
    known_by=["mara"],
)
def test_fuzzed_lorebooks_import_whole_or_not_at_all(
    value: dict[str, Any], known_by: list[str] | None
) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        source = write(root / "book.json", value)
        folder = root / "out"
        try:
            imported = lorebook_to_lore(source, known_by=known_by)
            check_lore_target(source, folder, imported)
        except CardError as exc:
            event(f"refused: {exc.field.split('.')[-1]}")
            assert str(exc).startswith(f"{source}: ") and "\n" not in str(exc)
            assert not folder.exists()
            return
        event("imported")
        written = write_lorebook(folder, imported, source.name)
        assert all(p.resolve().is_relative_to(folder.resolve()) for p in written)
        registry = load_personas(folder)
        assert registry.problems == []
        (world,) = registry.worlds.values()
        for entry in world.lore:
            if known_by:
                assert set(entry.known_by) <= set(known_by)
        back = lore_to_lorebook(read_lore_file(written[0]), imported.name)
        again = lorebook_to_lore(write(root / "back.json", back), known_by=known_by)
        assert [mapped(WorldLore.model_validate(e)) for e in again.lore["entries"]] == [
            mapped(WorldLore.model_validate(e)) for e in imported.lore["entries"]
        ]


# -- over the wire ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)  # ~26 s on 2 busy cores
def test_world_info_is_used_in_a_turn_over_protocol(real_config: Any, tmp_path: Path) -> None:
    from npc_engine.client import NpcClient

    from .conftest import start_server_process

    personas = personas_copy(tmp_path)
    source = write(tmp_path / "Vellmoor.json", world_info())
    done = run_cli("import", str(source), "--out", str(personas))
    assert done.returncode == 0, done.stdout + done.stderr
    checked = run_cli("validate", "--no-sizes", str(personas))
    assert checked.returncode == 0 and "lore entries valid" in checked.stdout, checked.stdout

    async def talk(url: str) -> dict[str, Any]:
        async with await NpcClient.connect(url) as client:
            reply = await client.say(
                "mara",
                "They say the wyrm at the bridge takes tolls now?",
                player_id="p1",
                max_tokens=16,
                inspect=True,
            )
            return dict(await reply.result())

    config = real_config.model_copy(update={"personas_dir": personas})
    process, url = start_server_process(config, "--allow-inspect")
    try:
        said = asyncio.run(asyncio.wait_for(talk(url), 200))
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(60)
    lore = {item["id"]: item for item in said["inspect"]["lore"]}
    assert lore["vellmoor.wyrm"]["why"].startswith("key 'wyrm'")
    assert "The bridge wyrm takes a toll of salt" in said["inspect"]["prompt"]
    assert "Vellmoor has two moons." in said["inspect"]["prompt"]  # constant: in the head
