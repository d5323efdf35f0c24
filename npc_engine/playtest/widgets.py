"""The playtest UI's pieces: the /help text, the NPC list item, a chat line, the memory
table and how a typed flag value is read."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.widgets import ListItem, Static

from npc_engine.playtest.session import MemoryView, NpcCard

HELP = """\
/npc ID            talk to another NPC (or pick one on the left)
/player ID         speak as another player
/event TEXT        the NPC witnesses TEXT (stored as a memory, known to every player)
/context K=V …     game context for the next turns; K= removes a key; /context clear
/trust N|+N|-N     set (or change by N) how much the NPC trusts this player (-100…100)
/flag K=V …        set the player's game flags (true/false, numbers, words); K= deletes one
/state             show trust, flags and the persona entries they unlock
/memories [QUERY]  the NPC's memories: newest first, or ranked for QUERY with scores
/scene ID ID … [-- TOPIC]  NPCs talk among themselves (you listen); each line's prompt
                   and memories go to the inspector; /tick passes rumours on
/forget            the NPC forgets everything about this player
/prompt            show the exact prompt of the last turn (inspector)
/retry             take the last exchange back and ask again
/reset             start the conversation over (memories stay)
/save [FILE]       write the transcript as Markdown
/help              this list
Esc cancels a reply in flight · F2 shows or hides the inspector · Ctrl+Q quits"""


def flag_value(text: str) -> bool | int | str | None:
    """A flag typed in a slash command: true/false, an integer, a word; empty deletes it."""
    if not text:
        return None
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if text.lstrip("-").isdigit():
        return int(text)
    return text


def memory_table(memories: list[MemoryView], title: str) -> Table:
    table = Table(title=title, expand=True, show_lines=False, title_justify="left")
    table.add_column("score", justify="right", width=6)
    table.add_column("relev.", justify="right", width=6)
    table.add_column("recency", justify="right", width=7)
    table.add_column("import.", justify="right", width=7)
    table.add_column("memory", ratio=1)

    def number(value: float | None) -> str:
        return f"{value:.2f}" if value is not None else "–"

    for memory in memories:
        table.add_row(
            number(memory.score),
            number(memory.relevance),
            number(memory.recency),
            number(memory.importance),
            Text(
                f"[{memory.kind}] {memory.text}"
                + (f" (heard from {memory.source})" if memory.source else "")
            ),
        )
    return table


class NpcItem(ListItem):
    def __init__(self, card: NpcCard) -> None:
        self.card = card
        label = Text.assemble((card.name, "bold"), f"\n{card.role}")
        if card.mood:
            label.append(f"\nmood: {card.mood}", style="italic dim")
        super().__init__(Static(label), id=f"npc-{card.id}")


class ChatLine(Static):
    """One line of the conversation; an NPC line grows while its reply streams."""

    def __init__(self, speaker: str, text: str, kind: str) -> None:
        super().__init__(classes=kind)
        self.speaker, self.body, self.kind = speaker, text, kind
        self.deltas = 0
        self.refresh_text(streaming=False)

    def refresh_text(self, streaming: bool, suffix: str = "") -> None:
        text = Text.assemble((f"{self.speaker}: ", "bold") if self.speaker else "", self.body)
        if streaming:
            text.append("▌", style="blink")
        if suffix:
            text.append(f"  {suffix}", style="dim italic")
        self.update(text)

    def append(self, piece: str) -> None:
        self.body += piece
        self.deltas += 1
        self.refresh_text(streaming=True)
