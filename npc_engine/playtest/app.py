"""The playtest terminal UI (Textual): talk to NPCs, see why they said it, replay.

Layout: NPC picker on the left, the conversation in the middle with the input line, and
an inspector on the right (F2) showing the last turn's prompt, recalled memories with their
score parts, token counts and speed. Slash commands are listed by /help.
"""

from __future__ import annotations

import shlex
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Footer, Header, Input, ListView, Static

from npc_engine.errors import NpcEngineError
from npc_engine.playtest.session import NpcCard, PlaytestSession, TurnView
from npc_engine.playtest.widgets import HELP, ChatLine, NpcItem, flag_value, memory_table

SessionOpener = Callable[[Callable[[str], None]], Awaitable[PlaytestSession]]


class PlaytestApp(App[None]):
    TITLE = "npc-engine playtest"
    CSS = """
    #sidebar { width: 30; border-right: solid $primary; }
    #npcs { height: 1fr; }
    #who { height: auto; padding: 0 1; color: $text-muted; }
    #chat { width: 1fr; }
    #log { height: 1fr; padding: 0 1; }
    #status { height: auto; padding: 0 1; color: $text-muted; }
    #inspector { width: 48%; border-left: solid $primary; padding: 0 1; display: none; }
    #inspector.shown { display: block; }
    ChatLine { margin: 0 0 1 0; }
    ChatLine.player { color: $text; }
    ChatLine.npc { color: $success; }
    ChatLine.system { color: $text-muted; }
    ChatLine.problem { color: $error; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel_reply", "Cancel reply", priority=True),
        Binding("f2", "toggle_inspector", "Inspector"),
        Binding("ctrl+q", "quit", "Quit"),
    ]

    def __init__(
        self,
        open_session: SessionOpener,
        *,
        npc_id: str | None = None,
        player_id: str = "player",
        reload_interval: float = 1.0,
        max_tokens: int | None = None,
    ) -> None:
        super().__init__()
        self.open_session = open_session
        self.session: PlaytestSession | None = None
        self.npc_id = npc_id
        self.player_id = player_id
        self.context: dict[str, Any] = {}
        self.cards: dict[str, NpcCard] = {}
        self.last_turn: TurnView | None = None
        self.transcript: list[tuple[str, str]] = []
        self.replying = False
        self.reload_interval = reload_interval
        self.max_tokens = max_tokens

    # -- layout --------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal():
            with Vertical(id="sidebar"):
                yield ListView(id="npcs")
                yield Static(id="who")
            with Vertical(id="chat"):
                yield VerticalScroll(id="log")
                yield Static("Loading …", id="status")
                yield Input(placeholder="Say something, or /help", id="line", disabled=True)
            with VerticalScroll(id="inspector"):
                yield Static("No turn yet.", id="inspect-stats")
                yield Static(id="inspect-memories")
                yield Static(id="inspect-prompt")
        yield Footer()

    def on_mount(self) -> None:
        self.start_session()

    @work(exclusive=True, group="session")
    async def start_session(self) -> None:
        def progress(message: str) -> None:
            self.call_from_thread(self.set_status, message)

        self.set_status("Loading the model and the memory store …")
        try:
            self.session = await self.open_session(progress)
        except NpcEngineError as exc:
            self.set_status(f"Could not start: {exc}")
            self.add_line("", f"Could not start: {exc}", "problem")
            return
        self.sub_title = self.session.description
        await self.refresh_npcs()
        line = self.query_one("#line", Input)
        line.disabled = False
        line.focus()
        self.set_status("Ready. Type a line and press Enter; /help lists the commands.")
        if self.reload_interval:
            self.set_interval(self.reload_interval, self.check_persona_files)

    async def refresh_npcs(self) -> None:
        assert self.session is not None
        cards = await self.session.npcs()
        self.cards = {card.id: card for card in cards}
        if self.npc_id not in self.cards:
            if self.npc_id is not None:
                self.add_line("", f"No NPC {self.npc_id!r}; pick one on the left.", "problem")
            self.npc_id = cards[0].id if cards else None
        picker = self.query_one("#npcs", ListView)
        await picker.clear()
        await picker.extend(NpcItem(card) for card in cards)
        if self.npc_id in self.cards:
            picker.index = list(self.cards).index(self.npc_id)
        self.show_who()

    # -- helpers -------------------------------------------------------------------------

    def set_status(self, message: str) -> None:
        self.query_one("#status", Static).update(Text(message))

    def show_who(self) -> None:
        card = self.cards.get(self.npc_id or "")
        who = Text.assemble(
            ("talking to ", "dim"),
            (card.name if card else "nobody", "bold"),
            ("\nas ", "dim"),
            (self.player_id, "bold"),
        )
        if self.context:
            who.append("\ncontext: ", style="dim")
            who.append(", ".join(f"{k}={v}" for k, v in self.context.items()))
        self.query_one("#who", Static).update(who)

    def add_line(self, speaker: str, text: str, kind: str) -> ChatLine:
        line = ChatLine(speaker, text, kind)
        log = self.query_one("#log", VerticalScroll)
        log.mount(line)
        log.scroll_end(animate=False)
        return line

    def add_renderable(self, renderable: Any) -> None:
        log = self.query_one("#log", VerticalScroll)
        log.mount(Static(renderable, classes="system"))
        log.scroll_end(animate=False)

    def show_inspector(self, turn: TurnView) -> None:
        rate = turn.tokens_per_second
        stats = Text.assemble(
            ("Last turn\n", "bold"),
            f"prompt {turn.prompt_tokens} tokens ({turn.cached_tokens} cached) · "
            f"reply {turn.completion_tokens} tokens\n",
            "first token "
            + (f"{turn.ttft_ms:,.0f} ms" if turn.ttft_ms is not None else "–")
            + f" · total {turn.total_ms:,.0f} ms · "
            + (f"{rate:.1f} tokens/s" if rate else "– tokens/s")
            + f" · {turn.reason}",
        )
        if turn.dropped:
            stats.append(
                "\nleft out to fit: " + ", ".join(f"{k} {v}" for k, v in turn.dropped.items())
            )
        if turn.error:
            stats.append(f"\nerror: {turn.error}", style="red")
        if turn.trust is not None:
            flags = ", ".join(f"{k}={v}" for k, v in turn.flags.items()) or "none"
            stats.append(f"\ntrust {turn.trust} · flags {flags}")
            stats.append(" · unlocked " + (", ".join(turn.unlocked) or "nothing"))
        if turn.lore:
            stats.append("\nlore noted: ")
            stats.append(
                "; ".join(
                    f"{item['id']} ({item['why']}, {item['similarity']:.2f})" for item in turn.lore
                )
            )
        if turn.guard:
            stats.append(
                f"\nguard cut the reply: {turn.guard} ({turn.guard_entry}: {turn.guard_reason})",
                style="yellow",
            )
        self.query_one("#inspect-stats", Static).update(stats)
        self.query_one("#inspect-memories", Static).update(
            memory_table(turn.memories, f"Recalled memories ({len(turn.memories)})")
        )
        prompt = Text("Prompt\n", style="bold")
        prompt.append(turn.prompt or "(not available)")
        self.query_one("#inspect-prompt", Static).update(prompt)

    # -- input ---------------------------------------------------------------------------

    @on(ListView.Selected, "#npcs")
    def pick_npc(self, event: ListView.Selected) -> None:
        if isinstance(event.item, NpcItem):
            self.switch_npc(event.item.card.id)
            self.query_one("#line", Input).focus()

    def switch_npc(self, npc_id: str) -> None:
        if npc_id not in self.cards:
            self.add_line("", f"No NPC {npc_id!r}. Known: {', '.join(self.cards)}", "problem")
            return
        self.npc_id = npc_id
        self.show_who()
        card = self.cards[npc_id]
        self.add_line("", f"— now talking to {card.name} ({card.role}) —", "system")

    @on(Input.Submitted, "#line")
    async def submitted(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text:
            return
        if self.replying:
            self.set_status("A reply is still coming: wait, or press Esc to cancel it.")
            return
        event.input.value = ""
        if text.startswith("/"):
            await self.run_command(text)
        else:
            self.talk(text)

    @work(exclusive=True, group="turn")
    async def talk(self, text: str) -> None:
        if self.session is None or self.npc_id is None:
            return
        card = self.cards[self.npc_id]
        self.add_line(self.player_id, text, "player")
        self.transcript.append((self.player_id, text))
        reply = self.add_line(card.name, "", "npc")
        reply.refresh_text(streaming=True)
        self.replying = True
        self.set_status(f"{card.name} is answering … (Esc cancels)")
        try:
            turn = await self.session.say(
                self.npc_id,
                self.player_id,
                text,
                context=dict(self.context) or None,
                max_tokens=self.max_tokens,
                on_delta=reply.append,
            )
        except NpcEngineError as exc:
            reply.body = ""
            reply.refresh_text(streaming=False, suffix=f"error: {exc}")
            self.set_status(str(exc))
            return
        finally:
            self.replying = False
        reply.body = turn.text
        extra = [turn.reason] if turn.reason != "stop" else []
        if turn.emotion:
            extra.append(f"emotion: {turn.emotion}")
        if turn.action:
            extra.append(f"action: {turn.action}")
        if turn.game_action:
            args = ", ".join(f"{k}={v}" for k, v in turn.game_action.get("args", {}).items())
            extra.append(f"game action: {turn.game_action['name']}({args})")
        reply.refresh_text(streaming=False, suffix=" · ".join(extra))
        self.transcript.append((card.name, turn.text))
        self.last_turn = turn
        self.show_inspector(turn)
        first = f"{turn.ttft_ms:,.0f} ms" if turn.ttft_ms is not None else "–"
        self.set_status(
            f"first token {first} · {turn.completion_tokens} tokens · "
            f"{len(turn.memories)} memories recalled (F2: inspector)"
        )

    async def action_cancel_reply(self) -> None:
        if self.replying and self.session is not None:
            await self.session.cancel()
            self.set_status("Cancelling …")

    def action_toggle_inspector(self) -> None:
        self.query_one("#inspector").toggle_class("shown")

    def check_persona_files(self) -> None:
        if self.session is None:
            return
        problems = self.session.reload_personas()
        if problems is None:
            return
        if problems:
            self.add_line(
                "",
                "Persona files have problems; the last good version stays in use:\n"
                + "\n".join(problems),
                "problem",
            )
            self.notify("Persona edit rejected: see the conversation pane", severity="error")
        else:
            self.add_line("", "Persona files reloaded.", "system")
            self.notify("Personas reloaded")
            self.run_worker(self.refresh_npcs(), group="npcs")

    # -- slash commands ------------------------------------------------------------------

    async def run_command(self, line: str) -> None:
        name, _, rest = line[1:].partition(" ")
        rest = rest.strip()
        handler = getattr(self, f"command_{name.lower()}", None)
        if handler is None:
            self.add_line("", f"Unknown command /{name}. /help lists them.", "problem")
            return
        try:
            await handler(rest)
        except NpcEngineError as exc:
            self.add_line("", str(exc), "problem")

    async def command_help(self, _rest: str) -> None:
        self.add_line("", HELP, "system")

    async def command_npc(self, rest: str) -> None:
        if rest:
            self.switch_npc(rest)
        else:
            self.query_one("#npcs", ListView).focus()

    async def command_player(self, rest: str) -> None:
        if not rest:
            self.add_line("", f"Speaking as {self.player_id}. Usage: /player ID", "system")
            return
        self.player_id = rest
        self.show_who()
        self.add_line("", f"— now speaking as {rest} —", "system")

    async def command_event(self, rest: str) -> None:
        if not rest or self.session is None or self.npc_id is None:
            self.add_line("", "Usage: /event TEXT", "problem")
            return
        ids = await self.session.event([self.npc_id], rest, None, None)
        self.add_line("", f"event stored for {self.npc_id} ({len(ids)} memory): {rest}", "system")

    async def command_context(self, rest: str) -> None:
        if rest == "clear":
            self.context.clear()
        for pair in shlex.split(rest) if rest != "clear" else []:
            key, sep, value = pair.partition("=")
            if not sep or not key:
                self.add_line("", "Usage: /context key=value [key=value …]", "problem")
                return
            if value:
                self.context[key] = value
            else:
                self.context.pop(key, None)
        self.show_who()
        shown = ", ".join(f"{k}={v}" for k, v in self.context.items()) or "(none)"
        self.add_line("", f"context: {shown}", "system")

    async def command_trust(self, rest: str) -> None:
        if self.session is None or self.npc_id is None or not rest.lstrip("+-").isdigit():
            self.add_line("", "Usage: /trust N (set), /trust +N or /trust -N (change)", "problem")
            return
        change = int(rest)
        relative = rest[0] in "+-"
        state = await self.session.set_state(
            self.npc_id,
            self.player_id,
            trust=None if relative else change,
            trust_delta=change if relative else None,
        )
        self.show_state(state)

    async def command_flag(self, rest: str) -> None:
        if self.session is None or self.npc_id is None or "=" not in rest:
            self.add_line("", "Usage: /flag key=value [key=value …] (key= deletes)", "problem")
            return
        flags: dict[str, Any] = {}
        for pair in shlex.split(rest):
            key, _, value = pair.partition("=")
            flags[key] = flag_value(value)
        self.show_state(await self.session.set_state(self.npc_id, self.player_id, flags=flags))

    async def command_state(self, _rest: str) -> None:
        if self.session is None or self.npc_id is None:
            return
        self.show_state(await self.session.set_state(self.npc_id, self.player_id))

    def show_state(self, state: dict[str, Any]) -> None:
        flags = ", ".join(f"{k}={v}" for k, v in (state.get("flags") or {}).items()) or "none"
        unlocked = ", ".join(state.get("unlocked") or []) or "nothing"
        self.add_line(
            "",
            f"{self.npc_id} trusts {self.player_id}: {state.get('trust')} · flags: {flags} · "
            f"unlocked: {unlocked}",
            "system",
        )

    async def command_memories(self, rest: str) -> None:
        if self.session is None or self.npc_id is None:
            return
        memories = await self.session.memories(self.npc_id, self.player_id, rest or None, 10)
        shared = await self.session.memories(self.npc_id, None, rest or None, 10)
        title = f"{self.npc_id}'s memories " + (f"for {rest!r}" if rest else "(newest first)")
        self.add_renderable(memory_table(memories, f"{title}, with {self.player_id}"))
        self.add_renderable(memory_table(shared, f"{title}, known to every player"))

    async def command_forget(self, _rest: str) -> None:
        if self.session is None or self.npc_id is None:
            return
        count = await self.session.forget(self.npc_id, self.player_id)
        self.add_line("", f"{self.npc_id} forgot {count} memories of {self.player_id}.", "system")

    async def command_prompt(self, _rest: str) -> None:
        if self.last_turn is None:
            self.add_line("", "No turn yet.", "system")
            return
        self.show_inspector(self.last_turn)
        inspector = self.query_one("#inspector", VerticalScroll)
        inspector.add_class("shown")
        inspector.scroll_to_widget(self.query_one("#inspect-prompt"))

    async def command_retry(self, _rest: str) -> None:
        if self.session is None or self.npc_id is None:
            return
        line = await self.session.retry_text(self.npc_id, self.player_id)
        if line is None:
            said = [text for who, text in self.transcript if who == self.player_id]
            if not said:
                self.add_line("", "Nothing to retry yet.", "system")
                return
            line = said[-1]
        self.add_line("", "— retry —", "system")
        self.talk(line)

    async def command_reset(self, _rest: str) -> None:
        if self.session is None or self.npc_id is None:
            return
        await self.session.reset(self.npc_id, self.player_id)
        self.add_line("", "— conversation reset (memories stay) —", "system")

    async def command_scene(self, rest: str) -> None:
        assert self.session is not None
        ids_part, _, topic = rest.partition("--")
        npc_ids = ids_part.split()
        if len(npc_ids) < 2:
            self.add_line("", "Usage: /scene ID ID … [-- TOPIC] (2 to 6 NPCs)", "problem")
            return
        cards = {card.id: card for card in await self.session.npcs()}

        def show(turn: TurnView) -> None:
            name = cards[turn.npc_id].name if turn.npc_id in cards else turn.npc_id
            self.add_line(name, turn.text, "npc")
            self.transcript.append((name, turn.text))
            self.last_turn = turn
            self.show_inspector(turn)

        self.replying = True
        self.set_status("The scene runs … (Esc ends it)")
        try:
            reason = await self.session.scene(
                npc_ids,
                player_id=None,
                topic=topic.strip(),
                max_turns=6,
                max_tokens=self.max_tokens,
                on_line=show,
            )
        except NpcEngineError as exc:
            self.add_line("", f"scene failed: {exc}", "problem")
            return
        finally:
            self.replying = False
        self.add_line("", f"The scene ended ({reason}).", "system")

    async def command_tick(self, _rest: str) -> None:
        assert self.session is not None
        spread = await self.session.world_tick()
        self.add_line("", f"A world tick: {spread} rumour(s) passed on.", "system")

    async def command_save(self, rest: str) -> None:
        path = Path(rest or f"playtest-{datetime.now():%Y%m%d-%H%M%S}.md")
        lines = [f"# Playtest transcript ({self.sub_title})", ""]
        lines += [f"**{who}:** {text}  " for who, text in self.transcript]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        self.add_line("", f"Transcript saved to {path}", "system")

    async def on_unmount(self) -> None:
        if self.session is not None:
            await self.session.close()
