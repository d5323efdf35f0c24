"""The browser client (examples/web/) in a real headless Chromium, against the live server.

The demo page is served by ``npc-engine demo-web`` twice, on two loopback ports: two
origins. The engine allows only the first. Chromium is driven over the DevTools protocol
(a WebSocket, with the ``websockets`` library): it loads the allowed page, clicks an NPC
on the canvas (the greeting), gives a gift (trust), says a line and waits for the streamed
reply, drags a second NPC next to the first (a two-line scene), and takes a screenshot;
then it loads the same page from the other origin, which the server refuses.

``NPC_ENGINE_WRITE_SCREENSHOT=1`` writes the screenshot to docs/web-demo.png (the one the
docs show); otherwise it goes to the test's temporary folder."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from npc_engine.config import EngineConfig
from tests.conftest import REPO, servers, start_server_process

pytestmark = pytest.mark.slow

# Read at import: the autouse fixture hides NPC_ENGINE_ variables from the test itself.
WRITE_SCREENSHOT = os.environ.get("NPC_ENGINE_WRITE_SCREENSHOT") == "1"
SCREENSHOT = REPO / "docs" / "web-demo.png"
VIEWPORT = {"width": 1100, "height": 680}


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("Chromium is missing: `tools/dev.sh test` installs it (apt-get install chromium)")


@contextmanager
def demo_web() -> Iterator[str]:
    """``npc-engine demo-web`` on a free port; yields the page's origin (the engine's URL
    goes in each page's query)."""
    command = [sys.executable, "-m", "npc_engine.cli", "demo-web", "--port", "0"]
    process = servers.popen(command, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("npc-engine web demo at http://127.0.0.1:"), line
        page = urllib.parse.urlsplit(line.split()[4])
        yield f"{page.scheme}://{page.netloc}"
    finally:
        servers.stop(process)


@contextmanager
def headless_chromium(profile: Path) -> Iterator[str]:
    """Chromium without a screen; yields the DevTools WebSocket URL of its page."""
    command = [chromium_binary(), "--headless=new", "--no-sandbox", "--disable-gpu"]
    command += ["--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check"]
    command += ["--disable-extensions", "--mute-audio", "--remote-debugging-port=0"]
    command += [f"--user-data-dir={profile}", "about:blank"]
    log = profile.parent / "chromium.log"
    with open(log, "w") as errors:
        process = servers.popen(command, stdout=subprocess.DEVNULL, stderr=errors)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            assert process.poll() is None, f"chromium exited: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no DevTools port: {log.read_text()[-3000:]}"
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as answer:
            targets = json.load(answer)
        yield next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
    finally:
        servers.stop(process)


class Page:
    """The few DevTools commands the test needs, one at a time."""

    def __init__(self, websocket: ClientConnection) -> None:
        self.websocket = websocket
        self.ids = itertools.count(1)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        command_id = next(self.ids)
        await self.websocket.send(
            json.dumps({"id": command_id, "method": method, "params": params})
        )
        while True:  # events in between are not needed
            answer = json.loads(await self.websocket.recv())
            if answer.get("id") == command_id:
                assert "error" not in answer, f"{method}: {answer['error']}"
                return dict(answer["result"])

    async def evaluate(self, expression: str) -> Any:
        result = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    async def wait_for(self, expression: str, seconds: float) -> Any:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            value = await self.evaluate(expression)
            if value:
                return value
            await asyncio.sleep(0.1)
        state = await self.evaluate("JSON.stringify({...document.body.dataset, ...npcDemo})")
        raise AssertionError(f"not within {seconds} s: {expression}; page: {state}")

    async def open(self, origin: str, query: str) -> None:
        await self.send("Page.navigate", url=f"{origin}/?{query}")
        loaded = f"location.origin === '{origin}' && document.readyState === 'complete'"
        await self.wait_for(f"{loaded} && !!window.npcDemo", 30)
        connection = "document.body.dataset.connection"
        await self.wait_for(f"{connection} !== 'connecting'", 30)

    async def mouse(self, kind: str, x: float, y: float) -> None:
        buttons = 0 if kind == "mouseReleased" else 1
        await self.send(
            "Input.dispatchMouseEvent",
            type=kind,
            x=x,
            y=y,
            button="left",
            buttons=buttons,
            clickCount=1,
        )

    async def npc_position(self, npc_id: str) -> tuple[float, float]:
        """Where an NPC stands on the screen (the middle of its body)."""
        where = await self.evaluate(
            "(() => { const c = document.getElementById('town').getBoundingClientRect();"
            f" const n = npcDemo.npcs().find((n) => n.id === '{npc_id}');"
            " return [c.left + 3 + n.x, c.top + 3 + n.y]; })()"
        )
        return float(where[0]), float(where[1])


async def browse(devtools: str, allowed: str, refused: str, engine: str, shot: Path) -> None:
    async with connect(devtools, max_size=None) as websocket:
        page = Page(websocket)
        await page.send(
            "Emulation.setDeviceMetricsOverride", deviceScaleFactor=1, mobile=False, **VIEWPORT
        )
        query = urllib.parse.urlencode({"server": engine, "player": "web-p1"})

        # The allowed origin: the page connects and lists the NPCs.
        await page.open(allowed, query)
        assert await page.evaluate("document.body.dataset.connection") == "ready", (
            await page.evaluate("document.getElementById('status').textContent")
        )
        ids = await page.evaluate("npcDemo.npcs().map((n) => n.id).sort().join(',')")
        assert ids == "guard_tom,mara,wren,ysolde"

        # Click Mara on the canvas: she greets (a first meeting: the persona's line).
        x, y = await page.npc_position("mara")
        await page.mouse("mousePressed", x, y)
        await page.mouse("mouseReleased", x, y)
        await page.wait_for("npcDemo.replies === 1", 60)
        greeting = await page.evaluate("npcDemo.lastReply.end.text")
        assert greeting.startswith("Shut the door, love"), greeting
        assert await page.wait_for("npcDemo.trust === 0", 10)

        # A gift raises trust (state.set), shown on the trust bar.
        await page.evaluate("document.getElementById('gift').click()")
        assert await page.wait_for("npcDemo.trust === 10", 10)
        assert await page.evaluate("document.getElementById('trust-value').textContent") == "10"

        # Say a line: the reply streams in deltas that add up to reply.end's text.
        await page.evaluate("document.getElementById('say-text').focus()")
        await page.send("Input.insertText", text="Any rooms free tonight?")
        await page.evaluate("document.getElementById('say-send').click()")
        await page.wait_for("npcDemo.replies === 2", 180)
        reply = await page.evaluate("npcDemo.lastReply")
        end = reply["end"]
        assert reply["npcId"] == "mara" and end["type"] == "reply.end", reply
        assert end["reason"] in ("stop", "length"), end
        assert reply["deltas"] and "".join(reply["deltas"]) == end["text"], reply
        shown = await page.evaluate(
            "[...document.querySelectorAll('#log .npc span')].pop().textContent"
        )
        assert shown == end["text"]

        # Drag Wren next to Mara: they stand together and talk (a two-line scene).
        wren, mara = await page.npc_position("wren"), await page.npc_position("mara")
        await page.mouse("mousePressed", *wren)
        await page.mouse("mouseMoved", (wren[0] + mara[0] + 90) / 2, (wren[1] + mara[1]) / 2)
        await page.mouse("mouseMoved", mara[0] + 50, mara[1] + 16)
        await page.mouse("mouseReleased", mara[0] + 50, mara[1] + 16)
        await page.wait_for("document.body.dataset.scene === 'ended'", 180)
        scene = await page.evaluate("npcDemo.lastScene")
        assert scene["end"] and scene["end"]["reason"] in ("max_turns", "ended"), scene
        assert {line["npcId"] for line in scene["lines"]} == {"mara", "wren"}, scene
        assert all(line["text"] for line in scene["lines"]), scene
        assert await page.evaluate("document.getElementById('scene-line').textContent")
        await page.evaluate(
            "new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)))"
        )
        picture = await page.send("Page.captureScreenshot", format="png")
        shot.write_bytes(base64.b64decode(picture["data"]))

        # The client's errors and cancel, through the page's connection.
        refusal = await page.evaluate(
            "npcDemo.client().say('nobody', 'Hello?').done.then(() => 'answered', (e) => e.code)"
        )
        assert refusal == "unknown_npc"
        cancelled = await page.evaluate(
            "(async () => { const client = npcDemo.client();"
            " const reply = client.say('ysolde', 'Tell me of the sea.', {maxTokens: 200});"
            " await client.cancel(reply.id); const end = await reply.done;"
            " return [end.reason, end.text === reply.text]; })()"
        )
        assert cancelled == ["cancelled", True]

        # The same page from an origin the server does not allow: refused, and it says why.
        await page.open(refused, query)
        assert await page.evaluate("document.body.dataset.connection") == "refused"
        assert await page.evaluate("npcDemo.error") == "connection_refused"
        status = await page.evaluate("document.getElementById('status').textContent")
        assert f"npc-engine serve --origin {refused}" in status, status


@pytest.mark.timeout(420)  # ~50 s alone on 2 cores; slower beside other work
def test_browser_page_talks_from_an_allowed_origin_and_is_refused_from_another(
    real_config: EngineConfig, tmp_path: Path
) -> None:
    chromium_binary()  # fails at once, saying how to install it
    with demo_web() as allowed, demo_web() as refused:
        assert allowed != refused
        process, engine_url = start_server_process(real_config, "--origin", allowed)
        try:
            with headless_chromium(tmp_path / "chromium-profile") as devtools:
                shot = SCREENSHOT if WRITE_SCREENSHOT else tmp_path / "web-demo.png"
                asyncio.run(browse(devtools, allowed, refused, engine_url, shot))
        finally:
            servers.stop(process)
    assert shot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
