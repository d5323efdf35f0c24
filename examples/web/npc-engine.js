// @ts-check
// npc-engine.js: a browser client for npc-engine's protocol v1 (docs/protocol.md).
// One ES module, no build step, no dependencies: `import { NpcClient } from "./npc-engine.js"`.
//
//   const client = await NpcClient.connect("ws://127.0.0.1:8765/", { token });
//   const reply = client.say("mara", "Any rooms free?", { playerId: "p1" });
//   for await (const piece of reply) bubble.textContent += piece;
//   const end = await reply.done;   // reply.end: text, reason, emotion, game_action, usage…
//
// A page's origin must be allowed by the server (`npc-engine serve --origin https://…`),
// else the browser's handshake is refused (HTTP 403) and connect() rejects with
// code "connection_refused". A page served over https must use a wss:// server URL.

/**
 * @typedef {{id: string, name: string, role: string, mood?: string}} NpcInfo
 * @typedef {{type: "welcome", re: string, protocol: string, server: string, session: string,
 *   capabilities: string[], npcs: NpcInfo[]}} Welcome
 * @typedef {{code: string, message: string}} ReplyError
 * @typedef {{type: "reply.end", re: string, text: string,
 *   reason: "stop" | "length" | "cancelled" | "error", emotion: string | null,
 *   action: {type: string, description: string} | null,
 *   game_action: {name: string, args: Object<string, unknown>} | null,
 *   guard: "secret" | "out_of_world" | null, usage: Object<string, number> | null,
 *   error: ReplyError | null, scene_id?: string}} ReplyEnd
 * @typedef {{type: "state", re: string, npc_id: string | null, player_id: string,
 *   trust: number | null, flags: Object<string, boolean | number | string>,
 *   unlocked: string[] | null, facts?: Object<string, unknown>[] | null}} StateAnswer
 * @typedef {{type: "scene.end", re: string, scene_id: string,
 *   reason: "max_turns" | "ended" | "cancelled" | "error", turns: number}} SceneEnd
 * @typedef {{playerId?: string, context?: Object<string, unknown>, maxTokens?: number,
 *   gameTime?: number, priority?: "foreground" | "background", deadlineMs?: number,
 *   sceneId?: string}} SayOptions
 */

/** An `error` answer from the server, or a connection that failed or closed. */
export class NpcEngineError extends Error {
  /**
   * @param {string} code  a protocol error code (`unknown_npc`, `busy`…), or
   *   `connection_refused` / `disconnected` / `unauthorized` for the connection itself
   * @param {string} message
   * @param {Object<string, unknown>} [details]
   */
  constructor(code, message, details = {}) {
    super(`${code}: ${message}`);
    this.name = "NpcEngineError";
    this.code = code;
    this.details = details;
  }
}

/** Drops fields left undefined or null, so optional ones are not sent. */
function compact(/** @type {Object<string, unknown>} */ fields) {
  return Object.fromEntries(Object.entries(fields).filter(([, v]) => v !== undefined && v !== null));
}

/**
 * One reply (to `say` or `greet`): its text deltas as they stream, then its `reply.end`.
 * Read it with `for await (const piece of reply)`, or set `ondelta`; `done` resolves with
 * the `reply.end` (rejects with NpcEngineError when the request was refused).
 */
export class ReplyStream {
  /** @param {string} id the request id (what `cancel` takes) */
  constructor(id) {
    this.id = id;
    /** @type {string | null} the NPC speaking (from `reply.start`) */
    this.npcId = null;
    /** the text so far */
    this.text = "";
    /** @type {((piece: string, seq: number) => void) | null} */
    this.ondelta = null;
    /** @type {((npcId: string) => void) | null} called at `reply.start` */
    this.onstart = null;
    /** @type {string[]} */
    this._queue = [];
    /** @type {(() => void) | null} */
    this._wake = null;
    this._finished = false;
    /** @type {Promise<ReplyEnd>} */
    this.done = new Promise((resolve, reject) => {
      this._resolve = resolve;
      this._reject = reject;
    });
    this.done.catch(() => {}); // reported through iteration or `await done`, never "unhandled"
  }

  /** @param {Object<string, any>} frame */
  _feed(frame) {
    if (frame.type === "reply.start") {
      this.npcId = frame.npc_id;
      this.onstart?.(frame.npc_id);
    } else if (frame.type === "reply.delta") {
      this.text += frame.text;
      this._queue.push(frame.text);
      this.ondelta?.(frame.text, frame.seq);
    } else if (frame.type === "reply.end") {
      this._finish(() => this._resolve(/** @type {ReplyEnd} */ (frame)));
    } else if (frame.type === "error") {
      this._fail(new NpcEngineError(frame.code, frame.message, frame.details));
    }
    this._wake?.();
  }

  /** @param {NpcEngineError} error */
  _fail(error) {
    this._finish(() => this._reject(error));
    this._wake?.();
  }

  /** @param {() => void} settle */
  _finish(settle) {
    if (!this._finished) {
      this._finished = true;
      settle();
    }
  }

  /** @returns {AsyncGenerator<string, void, void>} */
  async *[Symbol.asyncIterator]() {
    for (;;) {
      if (this._queue.length) {
        yield /** @type {string} */ (this._queue.shift());
      } else if (this._finished) {
        await this.done; // throws when the request was refused
        return;
      } else {
        await new Promise((wake) => (this._wake = () => { this._wake = null; wake(undefined); }));
      }
    }
  }
}

/**
 * A scene (`scene.start`): NPCs talk among themselves. Each line is a ReplyStream given to
 * `online` as it starts; `done` resolves with the `scene.end`.
 */
export class SceneStream {
  /** @param {string} id @param {string} sceneId */
  constructor(id, sceneId) {
    this.id = id;
    this.sceneId = sceneId;
    /** @type {((line: ReplyStream) => void) | null} */
    this.online = null;
    /** @type {ReplyStream | null} */
    this._line = null;
    /** @type {Promise<SceneEnd>} */
    this.done = new Promise((resolve, reject) => {
      this._resolve = resolve;
      this._reject = reject;
    });
    this.done.catch(() => {});
  }

  /** @param {Object<string, any>} frame */
  _feed(frame) {
    if (frame.type === "reply.start") {
      this._line = new ReplyStream(this.id);
      this._line._feed(frame); // npcId is known when `online` sees the line
      this.online?.(this._line);
    } else if (frame.type.startsWith("reply.")) this._line?._feed(frame);
    else if (frame.type === "scene.end") this._resolve(/** @type {SceneEnd} */ (frame));
    else if (frame.type === "error") this._fail(new NpcEngineError(frame.code, frame.message, frame.details));
  }

  /** @param {NpcEngineError} error */
  _fail(error) {
    this._line?._fail(error);
    this._reject(error);
  }
}

export class NpcClient {
  /** @param {WebSocket} socket */
  constructor(socket) {
    this.socket = socket;
    /** @type {Welcome | null} */
    this.welcome = null;
    /** @type {((error: NpcEngineError) => void) | null} called once when the connection ends */
    this.onclose = null;
    this._nextId = 1;
    /** @type {Map<string, {resolve: (frame: any) => void, reject: (error: NpcEngineError) => void}>} */
    this._waiting = new Map();
    /** @type {Map<string, ReplyStream | SceneStream>} */
    this._streams = new Map();
    socket.addEventListener("message", (event) => this._receive(event.data));
    socket.addEventListener("close", (event) => this._closed(event.code, event.reason));
  }

  /**
   * Open the WebSocket and say `hello`.
   * @param {string} [url] `ws://127.0.0.1:8765/` by default; `wss://…` on https pages
   * @param {{token?: string, client?: string}} [options]
   * @returns {Promise<NpcClient>}
   */
  static connect(url = "ws://127.0.0.1:8765/", { token, client = "npc-engine-js" } = {}) {
    return new Promise((resolve, reject) => {
      const socket = new WebSocket(url);
      let opened = false;
      socket.addEventListener("open", () => {
        opened = true;
        const npc = new NpcClient(socket);
        npc
          .request({ type: "hello", protocol: "1", client, token })
          .then((welcome) => {
            npc.welcome = /** @type {Welcome} */ (welcome);
            resolve(npc);
          })
          .catch((error) => {
            socket.close();
            reject(error);
          });
      });
      // The browser tells a page nothing about a refused handshake (HTTP 403), only that
      // the socket closed before it opened.
      socket.addEventListener("close", (event) => {
        if (opened) return;
        const origin = globalThis.location?.origin ?? "this page";
        reject(
          new NpcEngineError(
            "connection_refused",
            `could not open ${url} (close code ${event.code}). Either no server listens ` +
              `there, or it refused this page's origin: start it with ` +
              `\`npc-engine serve --origin ${origin}\`. A page served over https needs a wss:// URL.`,
            { url, origin },
          ),
        );
      });
    });
  }

  /** The NPCs the server plays (from `welcome`). @returns {NpcInfo[]} */
  get npcs() {
    return this.welcome?.npcs ?? [];
  }

  close() {
    this.socket.close(1000);
  }

  /**
   * Send one request and wait for its single answer (`ok`, `state`, `pong`…).
   * @param {Object<string, unknown>} message
   * @returns {Promise<Object<string, any>>} rejects with NpcEngineError on `error`
   */
  request(message) {
    const id = this._id();
    return new Promise((resolve, reject) => {
      this._waiting.set(id, { resolve, reject });
      this._send({ ...message, id });
    });
  }

  /**
   * The player says a line to an NPC; the reply streams.
   * @param {string} npcId @param {string} text @param {SayOptions} [options]
   * @returns {ReplyStream}
   */
  say(npcId, text, options = {}) {
    return this._stream("say", { npc_id: npcId, text, ...this._options(options) });
  }

  /**
   * The player walks up: the persona's greeting at a first meeting (no model time), later
   * one from what the NPC remembers. Streams like `say`.
   * @param {string} npcId @param {SayOptions} [options] @returns {ReplyStream}
   */
  greet(npcId, options = {}) {
    return this._stream("greet", { npc_id: npcId, ...this._options(options) });
  }

  /** Cancel a reply or a scene by its request id (`reply.id`, `scene.id`). @param {string} target */
  cancel(target) {
    return this.request({ type: "cancel", target });
  }

  /**
   * `state.get`: the player's flags, and with `npcId` that NPC's trust.
   * @param {string} playerId @param {{npcId?: string}} [options] @returns {Promise<StateAnswer>}
   */
  getState(playerId, { npcId } = {}) {
    return /** @type {Promise<StateAnswer>} */ (
      this.request(compact({ type: "state.get", player_id: playerId, npc_id: npcId }))
    );
  }

  /**
   * `state.set`: trust (absolute or a delta; needs `npcId`) and flags (null deletes one).
   * @param {string} playerId
   * @param {{npcId?: string, trust?: number, trustDelta?: number,
   *   flags?: Object<string, boolean | number | string | null>, gameTime?: number}} changes
   * @returns {Promise<StateAnswer>}
   */
  setState(playerId, { npcId, trust, trustDelta, flags, gameTime } = {}) {
    const message = compact({
      type: "state.set", player_id: playerId, npc_id: npcId, trust, trust_delta: trustDelta,
      flags, game_time: gameTime,
    });
    return /** @type {Promise<StateAnswer>} */ (this.request(message));
  }

  /**
   * `scene.start`: 2–6 NPCs talk among themselves (the player may join with
   * `say(npcId, text, {sceneId})`).
   * @param {string} sceneId @param {string[]} npcIds
   * @param {{playerId?: string, topic?: string, maxTurns?: number, maxTokens?: number,
   *   gameTime?: number}} [options]
   * @returns {SceneStream}
   */
  scene(sceneId, npcIds, { playerId, topic, maxTurns, maxTokens, gameTime } = {}) {
    const id = this._id();
    const stream = new SceneStream(id, sceneId);
    this._streams.set(id, stream);
    this._send(compact({
      type: "scene.start", id, scene_id: sceneId, npc_ids: npcIds, player_id: playerId, topic,
      max_turns: maxTurns, max_tokens: maxTokens, game_time: gameTime,
    }));
    return stream;
  }

  ping() {
    return this.request({ type: "ping" });
  }

  // --- inside ---

  _id() {
    return String(this._nextId++);
  }

  /** @param {SayOptions} options */
  _options({ playerId = "player", context, maxTokens, gameTime, priority, deadlineMs, sceneId }) {
    return {
      player_id: playerId, context, max_tokens: maxTokens, game_time: gameTime, priority,
      deadline_ms: deadlineMs, scene_id: sceneId,
    };
  }

  /** @param {string} type @param {Object<string, unknown>} fields */
  _stream(type, fields) {
    const id = this._id();
    const stream = new ReplyStream(id);
    this._streams.set(id, stream);
    this._send(compact({ type, id, ...fields }));
    return stream;
  }

  /** @param {Object<string, unknown>} message */
  _send(message) {
    if (this.socket.readyState !== WebSocket.OPEN) {
      const error = { type: "error", code: "disconnected", message: "the connection is closed" };
      queueMicrotask(() => this._settle(String(message.id), error));
      return;
    }
    this.socket.send(JSON.stringify(compact(message)));
  }

  /** @param {unknown} data */
  _receive(data) {
    if (typeof data !== "string") return; // this client says hello in JSON: frames are text
    const frame = JSON.parse(data);
    this._settle(frame.re, frame);
  }

  /** @param {string | undefined} re @param {Object<string, any>} frame */
  _settle(re, frame) {
    if (re === undefined) return; // an error about a frame without an id
    const stream = this._streams.get(re);
    if (stream) {
      stream._feed(frame);
      const over = frame.type === "error" || frame.type === "scene.end" ||
        (frame.type === "reply.end" && stream instanceof ReplyStream);
      if (over) this._streams.delete(re);
      return;
    }
    const waiting = this._waiting.get(re);
    if (!waiting) return;
    this._waiting.delete(re);
    if (frame.type === "error") waiting.reject(new NpcEngineError(frame.code, frame.message, frame.details));
    else waiting.resolve(frame);
  }

  /** @param {number} code @param {string} reason */
  _closed(code, reason) {
    const error = code === 4401
      ? new NpcEngineError("unauthorized", "wrong or missing token (close code 4401)")
      : new NpcEngineError("disconnected", `connection closed (code ${code}${reason ? `: ${reason}` : ""})`);
    for (const { reject } of this._waiting.values()) reject(error);
    for (const stream of this._streams.values()) stream._fail(error);
    this._waiting.clear();
    this._streams.clear();
    this.onclose?.(error);
  }
}
