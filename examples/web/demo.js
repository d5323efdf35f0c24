// @ts-check
// The web demo: a canvas town. Click an NPC to walk up (greet) and talk; the reply
// streams into the log and a speech bubble. Drag two NPCs together: they start a scene.
// Query parameters: ?server=ws://127.0.0.1:8765/&token=…&player=p1
import { NpcClient, NpcEngineError } from "./npc-engine.js";

const params = new URLSearchParams(location.search);
const SERVER = params.get("server") ?? "ws://127.0.0.1:8765/";
const TOKEN = params.get("token") ?? undefined;
const PLAYER = params.get("player") ?? "web-player";
const TOGETHER = 70; // pixels: two NPCs this close stand together and talk

const $ = (/** @type {string} */ id) => /** @type {HTMLElement} */ (document.getElementById(id));
const canvas = /** @type {HTMLCanvasElement} */ ($("town"));
const ctx = /** @type {CanvasRenderingContext2D} */ (canvas.getContext("2d"));
const input = /** @type {HTMLInputElement} */ ($("say-text"));

/** Where the sample personas stand; any other NPC gets a free spot. */
const SPOTS = { mara: [170, 330], guard_tom: [430, 250], wren: [600, 400], ysolde: [330, 455] };
const COLOURS = ["#a8452c", "#2f5d8a", "#5b7f2b", "#6b3f7d", "#b07a1e", "#3a7a78"];

/** @typedef {{id: string, name: string, role: string, x: number, y: number, colour: string,
 *   bubble: string}} TownNpc */
/** @type {TownNpc[]} */
let npcs = [];
/** @type {NpcClient | null} */
let client = null;
/** @type {TownNpc | null} */
let facing = null;
/** @type {import("./npc-engine.js").ReplyStream | null} */
let current = null;
let sceneRunning = false;

// What the page saw, for tests and the curious (`npcDemo` in the console).
const demo = {
  npcs: () => npcs.map(({ id, x, y }) => ({ id, x, y })),
  client: () => client,
  /** @type {{npcId: string, deltas: string[], end: Object<string, any> | null} | null} */
  lastReply: null,
  /** @type {{lines: {npcId: string, text: string}[], end: Object<string, any> | null} | null} */
  lastScene: null,
  /** @type {number | null} */
  trust: null,
  /** @type {string | null} */
  error: null,
  replies: 0, // replies that ended
};
Object.assign(window, { npcDemo: demo });

function setStatus(/** @type {string} */ state, /** @type {string} */ text) {
  document.body.dataset.connection = state;
  $("status").textContent = text;
}

function showError(/** @type {unknown} */ error) {
  demo.error = error instanceof NpcEngineError ? error.code : String(error);
  $("error").textContent = error instanceof Error ? error.message : String(error);
}

function log(/** @type {string} */ who, /** @type {string} */ text, /** @type {string} */ kind) {
  const line = document.createElement("p");
  line.className = kind;
  const name = document.createElement("b");
  name.textContent = `${who}: `;
  const words = document.createElement("span");
  words.textContent = text;
  line.append(name, words);
  $("log").append(line);
  $("log").scrollTop = $("log").scrollHeight;
  return words;
}

/** Stream a reply into a log line and the NPC's bubble; resolves with `reply.end`. */
async function play(/** @type {import("./npc-engine.js").ReplyStream} */ reply, /** @type {TownNpc} */ npc) {
  current = reply;
  document.body.dataset.reply = "streaming";
  /** @type {string[]} */
  const deltas = [];
  demo.lastReply = { npcId: npc.id, deltas, end: null };
  const words = log(npc.name, "…", "npc");
  setBusy(true);
  try {
    for await (const piece of reply) {
      deltas.push(piece);
      words.textContent = npc.bubble = reply.text;
      redraw();
    }
    const end = await reply.done;
    demo.lastReply.end = end;
    words.textContent = npc.bubble = end.text + (end.reason === "cancelled" ? " (cancelled)" : "");
    redraw();
    return end;
  } catch (error) {
    words.textContent = "(no answer)";
    showError(error);
    return null;
  } finally {
    current = null;
    setBusy(false);
    demo.replies += 1;
    document.body.dataset.reply = "ended";
  }
}

function setBusy(/** @type {boolean} */ busy) {
  const ready = client !== null && facing !== null;
  input.disabled = !ready;
  /** @type {HTMLButtonElement} */ ($("say-send")).disabled = !ready || busy;
  /** @type {HTMLButtonElement} */ ($("cancel")).disabled = !busy;
  /** @type {HTMLButtonElement} */ ($("gift")).disabled = !ready;
}

function showTrust(/** @type {number | null} */ trust) {
  demo.trust = trust;
  $("trust-value").textContent = trust === null ? "–" : String(trust);
  const fill = $("trust-fill");
  const share = Math.abs(trust ?? 0) / 2; // -100…100 → 0…50 % of the track from its middle
  fill.style.width = `${share}%`;
  fill.style.left = (trust ?? 0) < 0 ? `${50 - share}%` : "50%";
  fill.style.background = (trust ?? 0) < 0 ? "#b0452c" : "#4f8a3c";
}

async function walkUpTo(/** @type {TownNpc} */ npc) {
  if (!client || current) return;
  facing = npc;
  redraw();
  $("npc-name").textContent = npc.name;
  $("npc-role").textContent = npc.role;
  $("error").textContent = "";
  setBusy(false);
  client.getState(PLAYER, { npcId: npc.id }).then((state) => showTrust(state.trust), showError);
  await play(client.greet(npc.id, { playerId: PLAYER }), npc);
  input.focus();
}

$("say-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = input.value.trim();
  if (!client || !facing || current || !text) return;
  input.value = "";
  log("You", text, "you");
  const context = { location: "Saltwhistle harbour", time_of_day: "evening" };
  await play(client.say(facing.id, text, { playerId: PLAYER, context, maxTokens: 60 }), facing);
});

$("cancel").addEventListener("click", () => {
  if (client && current) client.cancel(current.id).catch(showError);
});

$("gift").addEventListener("click", () => {
  if (!client || !facing) return;
  client.setState(PLAYER, { npcId: facing.id, trustDelta: 10 }).then((s) => showTrust(s.trust), showError);
});

/** Two NPCs stand together: they talk (a two-line scene). */
function startScene(/** @type {TownNpc} */ a, /** @type {TownNpc} */ b) {
  if (!client || sceneRunning) return;
  sceneRunning = true;
  document.body.dataset.scene = "running";
  /** @type {{npcId: string, text: string}[]} */
  const lines = [];
  const scene = client.scene(`meet-${Date.now()}`, [a.id, b.id], {
    topic: "the fog over the harbour", maxTurns: 2, maxTokens: 32,
  });
  demo.lastScene = { lines, end: null };
  const sceneLine = $("scene-line");
  sceneLine.textContent = `${a.name} and ${b.name} talk…`;
  scene.online = (line) => {
    const npc = npcs.find((n) => n.id === line.npcId) ?? a;
    const entry = { npcId: npc.id, text: "" };
    lines.push(entry);
    const show = () => {
      entry.text = npc.bubble = line.text;
      redraw();
      sceneLine.replaceChildren(Object.assign(document.createElement("b"), { textContent: `${npc.name}: ` }), line.text);
    };
    line.ondelta = show;
    line.done.then(show, () => {});
  };
  scene.done
    .then((end) => (demo.lastScene && (demo.lastScene.end = end)), showError)
    .finally(() => {
      sceneRunning = false;
      document.body.dataset.scene = "ended";
    });
}

// --- the town ---

function drawHouse(/** @type {number} */ x, /** @type {number} */ y, /** @type {number} */ w,
  /** @type {string} */ wall, /** @type {string} */ roof, /** @type {string} */ sign) {
  ctx.fillStyle = wall;
  ctx.fillRect(x, y, w, 80);
  ctx.fillStyle = roof;
  ctx.beginPath();
  ctx.moveTo(x - 10, y);
  ctx.lineTo(x + w / 2, y - 45);
  ctx.lineTo(x + w + 10, y);
  ctx.fill();
  ctx.fillStyle = "#3b2a1a";
  ctx.fillRect(x + w / 2 - 12, y + 42, 24, 38);
  ctx.fillStyle = "#f4ecd8";
  ctx.font = "bold 13px Georgia, serif";
  ctx.textAlign = "center";
  ctx.fillText(sign, x + w / 2, y + 24);
}

/** @typedef {{x: number, y: number, w: number, h: number}} Box */
const overlaps = (/** @type {Box} */ a, /** @type {Box} */ b) =>
  a.x < b.x + b.w && b.x < a.x + a.w && a.y < b.y + b.h && b.y < a.y + a.h;

/** Draw an NPC's speech bubble above it, and above the bubbles already `drawn`. */
function drawBubble(/** @type {TownNpc} */ npc, /** @type {Box[]} */ drawn) {
  const words = npc.bubble.length > 90 ? `${npc.bubble.slice(0, 88)}…` : npc.bubble;
  ctx.font = "13px Georgia, serif";
  const lines = [];
  let line = "";
  for (const word of words.split(" ")) {
    if (line && ctx.measureText(`${line} ${word}`).width > 200) {
      lines.push(line);
      line = word;
    } else line = line ? `${line} ${word}` : word;
  }
  lines.push(line);
  const w = 220;
  const h = lines.length * 16 + 10;
  const x = Math.min(Math.max(npc.x - w / 2, 4), canvas.width - w - 4);
  const box = { x, y: npc.y - 40 - h, w, h };
  for (let other; (other = drawn.find((b) => overlaps(b, box))); ) box.y = other.y - h - 6;
  drawn.push(box);
  const y = Math.max(box.y, 4);
  ctx.fillStyle = "rgba(255, 252, 240, 0.95)";
  ctx.strokeStyle = "#2b2118";
  ctx.beginPath();
  ctx.roundRect(x, y, w, h, 8);
  ctx.fill();
  ctx.stroke();
  ctx.fillStyle = "#2b2118";
  ctx.textAlign = "left";
  lines.forEach((text, i) => ctx.fillText(text, x + 10, y + 18 + i * 16));
}

function draw() {
  ctx.fillStyle = "#7fa36b";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  ctx.fillStyle = "#3f6f9a"; // the harbour
  ctx.fillRect(0, 470, canvas.width, 50);
  ctx.fillStyle = "#8a6a44"; // the pier
  ctx.fillRect(280, 440, 110, 80);
  ctx.fillStyle = "#c9b58a"; // the road
  ctx.fillRect(0, 190, canvas.width, 36);
  drawHouse(60, 90, 170, "#8c5a3c", "#5a2e1e", "The Rusty Anchor");
  drawHouse(360, 90, 140, "#7b7f86", "#40444a", "Watchhouse");
  drawHouse(560, 260, 120, "#6f7f4a", "#3e4a26", "Herbs");
  for (const npc of npcs) {
    const selected = npc === facing;
    ctx.fillStyle = "rgba(0, 0, 0, 0.2)";
    ctx.beginPath();
    ctx.ellipse(npc.x, npc.y + 18, 16, 5, 0, 0, Math.PI * 2);
    ctx.fill();
    ctx.fillStyle = npc.colour;
    ctx.fillRect(npc.x - 10, npc.y - 6, 20, 24);
    ctx.fillStyle = "#f0c9a0";
    ctx.beginPath();
    ctx.arc(npc.x, npc.y - 14, 9, 0, Math.PI * 2);
    ctx.fill();
    ctx.lineWidth = selected ? 3 : 1;
    ctx.strokeStyle = selected ? "#ffe066" : "#2b2118";
    ctx.stroke();
    ctx.lineWidth = 1;
    ctx.fillStyle = "#1d1711";
    ctx.font = "bold 12px Georgia, serif";
    ctx.textAlign = "center";
    ctx.fillText(npc.name, npc.x, npc.y + 34);
  }
  /** @type {Box[]} */
  const drawn = [];
  for (const npc of npcs) if (npc.bubble) drawBubble(npc, drawn);
}

let drawQueued = false;
/** Draw the town at the next frame, once: only when something changed (an idle page costs
 * no CPU, which the model on the same machine needs). */
function redraw() {
  if (drawQueued) return;
  drawQueued = true;
  requestAnimationFrame(() => {
    drawQueued = false;
    draw();
  });
}

// --- the mouse: click talks, drag moves ---

/** @type {{npc: TownNpc, dx: number, dy: number, moved: boolean} | null} */
let dragging = null;

function npcAt(/** @type {MouseEvent} */ event) {
  const box = canvas.getBoundingClientRect();
  const x = event.clientX - box.left - canvas.clientLeft; // canvas pixels, inside its border
  const y = event.clientY - box.top - canvas.clientTop;
  const npc = npcs.find((n) => Math.abs(n.x - x) < 16 && y > n.y - 26 && y < n.y + 22);
  return npc ? { npc, dx: npc.x - x, dy: npc.y - y } : null;
}

canvas.addEventListener("mousedown", (event) => {
  const hit = npcAt(event);
  if (hit) dragging = { ...hit, moved: false };
});
canvas.addEventListener("mousemove", (event) => {
  if (!dragging) return;
  const box = canvas.getBoundingClientRect();
  dragging.npc.x = event.clientX - box.left - canvas.clientLeft + dragging.dx;
  dragging.npc.y = event.clientY - box.top - canvas.clientTop + dragging.dy;
  dragging.moved = true;
  redraw();
});
canvas.addEventListener("mouseup", () => {
  if (!dragging) return;
  const { npc, moved } = dragging;
  dragging = null;
  if (!moved) {
    walkUpTo(npc);
    return;
  }
  const near = npcs.find((other) => other !== npc && Math.hypot(other.x - npc.x, other.y - npc.y) < TOGETHER);
  if (near) startScene(npc, near);
});

// --- start ---

redraw();
setStatus("connecting", `connecting to ${SERVER} …`);
NpcClient.connect(SERVER, { token: TOKEN, client: "npc-engine-web-demo" }).then(
  (connected) => {
    client = connected;
    npcs = connected.npcs.map((npc, i) => {
      const [x, y] = SPOTS[/** @type {keyof typeof SPOTS} */ (npc.id)] ?? [90 + i * 120, 300];
      return { ...npc, x, y, colour: COLOURS[i % COLOURS.length], bubble: "" };
    });
    setStatus("ready", `connected to ${SERVER} · ${connected.welcome?.server}`);
    redraw();
    connected.onclose = (error) => {
      client = null;
      setStatus("closed", error.message);
      setBusy(false);
    };
  },
  (error) => {
    demo.error = error instanceof NpcEngineError ? error.code : String(error);
    setStatus("refused", error.message);
  },
);
