"""Generate a big world for the lorebook: the sample personas and world, plus N generated
lore entries, each a distinct fact (people, towns, ships, legends, events of a made-up
coast), and a probe set of questions each answered by one entry.

    .venv/bin/python tools/make_world.py OUT_DIR [--entries 2000] [--seed 7]
    .venv/bin/python tools/make_world.py --probes tests/probes/lore_questions.yaml

Deterministic for a seed: the committed probe set (tests/probes/lore_questions.yaml) names
entries by id, and the test and the bench regenerate the same world to ask it.
About a third of the questions name no key of their entry: those must be found by meaning.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
PER_FILE = 100  # entries per lore file (a persona-size YAML file each)
DEFAULT_SEED = 7

FIRST = [
    "Tamsin",
    "Orla",
    "Bram",
    "Edda",
    "Corin",
    "Hesper",
    "Jago",
    "Kell",
    "Liane",
    "Merrow",
    "Nessa",
    "Osk",
    "Pell",
    "Quill",
    "Rhun",
    "Sabine",
    "Torv",
    "Ula",
    "Vance",
    "Wynn",
    "Ysel",
    "Ansel",
    "Brisa",
    "Cade",
    "Dova",
    "Elric",
    "Fenna",
    "Garrow",
    "Hild",
    "Ivo",
    "Jessamy",
    "Lorn",
    "Maeve",
    "Niall",
    "Odile",
    "Perrin",
    "Rosk",
    "Sella",
    "Tobin",
    "Verity",
]
LAST = [
    "Vell",
    "Ashdown",
    "Corrie",
    "Drummond",
    "Fairweather",
    "Greaves",
    "Holloway",
    "Ironside",
    "Jessop",
    "Kettering",
    "Larkin",
    "Moorcroft",
    "Netherby",
    "Oakes",
    "Pennick",
    "Quarles",
    "Redfern",
    "Saltonstall",
    "Thackeray",
    "Underhill",
    "Varga",
    "Wetherell",
    "Yarrow",
    "Abernant",
    "Blackwood",
    "Cottle",
    "Dunstan",
    "Elsworth",
    "Fenwick",
    "Gorringe",
    "Hartigan",
    "Inchbald",
    "Jellicoe",
    "Kimber",
    "Lovell",
    "Marchbank",
    "Norgate",
    "Ormsby",
    "Pettifer",
    "Ravenhill",
    "Sturgis",
    "Tolliver",
    "Upcott",
    "Vosper",
    "Whitlock",
    "Yeardley",
    "Ambrose",
    "Birtwistle",
    "Carrack",
    "Dallow",
]
TRADES = [
    "cooper",
    "blacksmith",
    "sailmaker",
    "ropewalker",
    "chandler",
    "net-mender",
    "tanner",
    "glassblower",
    "apothecary",
    "cartwright",
    "boatwright",
    "fletcher",
    "weaver",
    "dyer",
    "baker",
    "brewer",
    "miller",
    "potter",
    "saddler",
    "locksmith",
    "clockmaker",
    "bookbinder",
    "tinker",
    "shepherd",
    "beekeeper",
    "cheesemaker",
    "candlemaker",
    "wheelwright",
    "stonemason",
    "thatcher",
]
QUIRKS = (
    "marks everything they make with a carved heron",
    "has not spoken a word since the drowning of their twin",
    "keeps a tame crow that steals buttons",
    "won a wrestling match against a bear at the autumn fair",
    "pays every debt in foreign gold coins",
    "refuses to work on days when the wind blows from the north",
    "was once a sailor on a whaling ship in the ice seas",
    "sings hymns backwards to keep rats away",
    "has a glass eye that is said to see ghosts",
    "owes three years of rent to the Duke's bailiff",
    "paints the doors of the town blue every spring",
    "was born on the night of a lunar eclipse",
    "buried a chest of silver under an apple tree",
    "lost two fingers to a frostbitten winter",
    "brews a cider so strong it is banned at weddings",
    "writes letters to a sweetheart who never answers",
    "collects the teeth of sharks washed up on the beach",
    "walks to the capital and back every midsummer",
    "is the only person who can read the old runes",
    "keeps bees on the roof of the town hall",
    "trained a goat to carry messages between farms",
    "swears they saw a sea serpent in their youth",
    "never eats fish and will not say why",
    "wears a bronze ring given by a dying knight",
)
SYLLABLES_A = [
    "Dun",
    "Ash",
    "Thorn",
    "Bel",
    "Kes",
    "Mar",
    "Gal",
    "Wyn",
    "Hol",
    "Bry",
    "Cal",
    "Fen",
    "Grim",
    "Hart",
    "Lud",
    "Mor",
    "Nor",
    "Pen",
    "Rav",
    "Sel",
    "Tarn",
    "Ul",
    "Vel",
    "Wick",
    "Yar",
    "Orm",
    "Brac",
    "Cold",
    "Dray",
    "Eld",
]
SYLLABLES_B = [
    "mere",
    "ford",
    "wick",
    "holm",
    "by",
    "stead",
    "ton",
    "haven",
    "moor",
    "dale",
    "gate",
    "bury",
    "wold",
    "mouth",
    "ness",
]
SIZES = ["fishing village", "market town", "hamlet", "walled town", "mining village", "port"]
DIRECTIONS = ["north", "south", "east", "west", "north-east", "south-west"]
PRODUCTS = (
    "blue glass bottles",
    "smoked eels",
    "salt cod",
    "copper kettles",
    "goat cheese wrapped in nettles",
    "black wool",
    "honey mead",
    "oak barrels",
    "slate roof tiles",
    "linen sails",
    "tin buttons",
    "pickled herring",
    "horse fairs",
    "apple brandy",
    "amber beads",
    "whalebone combs",
    "rope of seal hide",
    "iron nails",
    "peat for burning",
    "dried seaweed",
)
LANDMARKS = (
    "a leaning bell tower",
    "a ruined castle on a crag",
    "a stone bridge of nine arches",
    "a windmill with red sails",
    "a standing stone carved with faces",
    "a well said never to freeze",
    "a chapel built from a wrecked ship",
    "a maze of hedges older than the Duke",
)
SHIP_ADJ = [
    "Grey",
    "Silver",
    "Crimson",
    "Lucky",
    "Restless",
    "Bold",
    "Weeping",
    "Laughing",
    "Iron",
    "Golden",
    "Hollow",
    "Wandering",
    "Patient",
    "Quiet",
    "Drunken",
    "Faithful",
    "Broken",
    "Swift",
    "Lonely",
    "Proud",
]
SHIP_NOUN = [
    "Heron",
    "Maiden",
    "Gull",
    "Widow",
    "Anchor",
    "Otter",
    "Lantern",
    "Promise",
    "Serpent",
    "Bell",
    "Kestrel",
    "Tide",
    "Crown",
    "Fiddler",
    "Mermaid",
    "Barrel",
    "Thistle",
    "Raven",
    "Salmon",
    "Harp",
]
RIGS = ["cog", "ketch", "sloop", "brig", "lugger", "carrack", "galley", "schooner"]
CARGOES = (
    "wine from the south",
    "timber for the shipyards",
    "wool bales",
    "pilgrims bound for the holy isle",
    "casks of whale oil",
    "salt from the pans",
    "spices in sealed jars",
    "horses for the Duke's cavalry",
    "coal from the northern pits",
    "letters of the royal post",
)
SHIP_QUIRKS = (
    "has never lost a man overboard",
    "is said to be cursed since she rammed a church boat",
    "carries a cat that the crew believe steers her",
    "once outran three pirate galleys in a storm",
    "flies a flag nobody recognises",
    "was built from the timber of a gallows",
    "has a figurehead that weeps salt water",
    "sank once and was raised again",
)
CREATURE_ADJ = [
    "Pale",
    "Black",
    "Drowned",
    "Howling",
    "Hollow",
    "Silent",
    "Red",
    "Horned",
    "Many-eyed",
    "Grinning",
    "Ashen",
    "Weeping",
    "Crooked",
    "Hungry",
    "Nameless",
    "Burnt",
    "Veiled",
    "Frost",
    "Thorn",
    "Bone",
    "Mossy",
    "Shrieking",
    "Lantern",
    "Tallow",
]
CREATURE_NOUN = [
    "Hound",
    "Lady",
    "Stag",
    "Fisher",
    "Piper",
    "Shepherd",
    "Wolf",
    "Bride",
    "Rider",
    "Tinker",
    "Hare",
    "Monk",
    "Ferryman",
    "Owl",
    "Miller",
    "Goat",
]
LEGENDS = (
    "lure lonely travellers into the bog with a lantern",
    "knock three times on the doors of those who will die within the year",
    "steal the voices of children who whistle after dark",
    "guard a hoard of drowned sailors' rings",
    "grant one wish to anyone who shares bread with it",
    "appear on the shore before every great storm",
    "dance on the graves of oath-breakers",
    "carry off sheep and leave silver pennies behind",
    "sing so sweetly that fishermen forget their names",
    "walk the roads at midsummer looking for its lost head",
)
EVENT_ADJ = [
    "Long",
    "Red",
    "Silent",
    "Hungry",
    "Burning",
    "Frozen",
    "Great",
    "Bitter",
    "Black",
    "Salt",
    "Grey",
    "Weeping",
    "Iron",
    "Short",
    "White",
    "Lean",
    "Wet",
    "Dark",
    "Last",
    "Mad",
    "Cruel",
    "Empty",
    "Green",
    "Brown",
]
EVENT_NOUN = [
    "Frost",
    "Riot",
    "Plague",
    "Flood",
    "Fire",
    "Winter",
    "Famine",
    "Siege",
    "Tide",
    "Rebellion",
    "Summer",
    "Drought",
    "Storm",
    "Quarrel",
]
EVENT_HAPPENINGS = (
    "the harbour froze so hard that carts crossed it",
    "the townsfolk burned the Duke's tithe barn",
    "half the children fell sick with the sweating fever",
    "the river broke its banks and carried off the mill",
    "a great fire took every thatched roof in the market square",
    "the granary ran empty and people ate seaweed bread",
    "raiders from over the sea held the walls for forty days",
    "the sea drew back a mile and returned as a wall of water",
    "the guilds refused to pay the salt tax and the soldiers came",
    "wolves came down from the hills into the streets",
)
ORDINALS = [
    "first",
    "second",
    "third",
    "fourth",
    "fifth",
    "sixth",
    "seventh",
    "eighth",
    "ninth",
    "tenth",
]
DUKES = ["Aldous", "Berengar", "Corwin", "Desmond", "Egbert", "Florian"]


@dataclass
class Entry:
    id: str
    text: str
    keys: list[str]
    questions: list[tuple[str, bool]] = field(default_factory=list)  # (text, names a key)


def _unique(rng: random.Random, make: object, used: set[str]) -> str:
    for _ in range(1000):
        value = make()  # type: ignore[operator]
        if value not in used:
            used.add(value)
            return str(value)
    raise RuntimeError("ran out of unique names; lower --entries")


def generate(count: int, seed: int = DEFAULT_SEED) -> list[Entry]:
    rng = random.Random(seed)
    used: set[str] = set()
    towns = [
        _unique(rng, lambda: rng.choice(SYLLABLES_A) + rng.choice(SYLLABLES_B), used)
        for _ in range(max(count // 7, 10))
    ]
    entries: list[Entry] = []
    kinds = ["person", "person", "town", "ship", "legend", "event", "person"]
    town_index = 0
    while len(entries) < count:
        kind = kinds[len(entries) % len(kinds)]
        number = f"{len(entries):04d}"
        if kind == "town" and town_index < len(towns):
            town = towns[town_index]
            town_index += 1
            product = rng.choice(PRODUCTS)
            landmark = rng.choice(LANDMARKS)
            text = (
                f"{town} is a {rng.choice(SIZES)} {rng.randint(2, 9)} days "
                f"{rng.choice(DIRECTIONS)} of Saltwhistle, known for its {product}; "
                f"it has {landmark}."
            )
            entry = Entry(f"town-{number}", text, [town])
            entry.questions = [(f"What is {town} known for?", True)]
        elif kind == "person" or kind == "town":
            name = _unique(rng, lambda: f"{rng.choice(FIRST)} {rng.choice(LAST)}", used)
            trade, town, quirk = rng.choice(TRADES), rng.choice(towns), rng.choice(QUIRKS)
            text = f"{name} is the {trade} of {town}, who {quirk}."
            entry = Entry(f"person-{number}", text, [name])
            entry.questions = [
                (f"What do you know about {name}?", True),
                (f"Who is the {trade} of {town}, and what is odd about them?", False),
            ]
        elif kind == "ship":
            ship = _unique(rng, lambda: f"{rng.choice(SHIP_ADJ)} {rng.choice(SHIP_NOUN)}", used)
            captain = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
            cargo, quirk = rng.choice(CARGOES), rng.choice(SHIP_QUIRKS)
            text = (
                f"The {ship} is a {rng.choice(RIGS)} out of {rng.choice(towns)} under "
                f"Captain {captain}; she carries {cargo} and {quirk}."
            )
            entry = Entry(f"ship-{number}", text, [f"the {ship}", ship])
            entry.questions = [(f"Have you heard of a ship called the {ship}?", True)]
        elif kind == "legend":
            creature = _unique(
                rng, lambda: f"{rng.choice(CREATURE_ADJ)} {rng.choice(CREATURE_NOUN)}", used
            )
            place = rng.choice(towns)
            legend = rng.choice(LEGENDS)
            text = f"The {creature} of {place} is said to {legend}."
            entry = Entry(f"legend-{number}", text, [creature])
            entry.questions = [
                (f"Is the {creature} real?", True),
                (f"What haunts {place}? I heard something about it that {_third(legend)}.", False),
            ]
        else:
            event = _unique(rng, lambda: f"{rng.choice(EVENT_ADJ)} {rng.choice(EVENT_NOUN)}", used)
            town, happening = rng.choice(towns), rng.choice(EVENT_HAPPENINGS)
            text = (
                f"In the {rng.choice(ORDINALS)} year of Duke {rng.choice(DUKES)}, the {event} "
                f"struck {town}: {happening}."
            )
            entry = Entry(f"event-{number}", text, [f"the {event}"])
            entry.questions = [(f"What happened in the {event}?", True)]
        entries.append(entry)
    return entries


def _third(legend: str) -> str:
    """'lure lonely travellers…' → 'lures lonely travellers…' (for a question)."""
    verb, _, rest = legend.partition(" ")
    verb = verb + ("es" if verb.endswith(("sh", "ch", "ss")) else "s")
    return f"{verb} {rest}"


def probes(entries: list[Entry], count: int, seed: int = DEFAULT_SEED) -> list[dict[str, object]]:
    """``count`` questions, each answered by one entry; a third name no key of theirs."""
    rng = random.Random(seed + 1)
    keyed = [(e, q) for e in entries for q, names_key in e.questions if names_key]
    unkeyed = [(e, q) for e in entries for q, names_key in e.questions if not names_key]
    chosen = rng.sample(unkeyed, count // 3) + rng.sample(keyed, count - count // 3)
    rng.shuffle(chosen)
    return [{"question": q, "entry": e.id, "text": e.text} for e, q in chosen]


def write_world(out: Path, count: int, seed: int = DEFAULT_SEED) -> list[Entry]:
    """The sample personas and world (with its own lorebook) plus ``count`` entries."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(REPO / "personas", out)
    entries = generate(count, seed)
    folder = out / "lore" / "generated"
    folder.mkdir(parents=True)
    for start in range(0, len(entries), PER_FILE):
        part = [
            {"id": e.id, "text": e.text, "keys": e.keys} for e in entries[start : start + PER_FILE]
        ]
        path = folder / f"part-{start // PER_FILE:03d}.yaml"
        path.write_text(yaml.safe_dump({"entries": part}, sort_keys=False, width=100))
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", type=Path, help="folder to write the world into")
    parser.add_argument("--entries", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--probes", type=Path, help="write the probe questions here")
    parser.add_argument("--questions", type=int, default=60)
    args = parser.parse_args(argv)
    if args.out is None and args.probes is None:
        parser.error("give OUT_DIR, --probes FILE, or both")
    entries = generate(args.entries, args.seed)
    if args.out is not None:
        write_world(args.out, args.entries, args.seed)
        print(f"wrote {len(entries)} entries under {args.out / 'lore' / 'generated'}")
    if args.probes is not None:
        header = (
            "# Lorebook probe: each question is answered by one entry of the world that\n"
            f"# tools/make_world.py generates with --entries {args.entries} --seed {args.seed}.\n"
            "# Regenerate: .venv/bin/python tools/make_world.py --probes THIS_FILE\n"
        )
        body = yaml.safe_dump(
            {
                "entries": args.entries,
                "seed": args.seed,
                "probes": probes(entries, args.questions, args.seed),
            },
            sort_keys=False,
            width=100,
        )
        args.probes.write_text(header + body)
        print(f"wrote {args.questions} questions to {args.probes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
