// The shared-socket worker: one connection to the gateway for every tab of an origin.
//
// Loaded as a module SharedWorker by `sharedClient()` (src/index.js); the gateway
// serves it at /sdk/worker.js, next to /sdk/chat-gateway.js. Tabs with the same
// configuration (URLs, user or token) share one `Client`; each tab keeps its own
// rooms and, per room, its own cursor (seq of the last message it was given) and
// change number, so each tab gets every message of its rooms once, in order:
//
// - the shared client holds the union of the tabs' rooms, and leaves a room when
//   the last tab holding it leaves it (or goes: `bye` on pagehide, or no heartbeat
//   for DEAD_AFTER ms);
// - a tab that subscribes behind the shared cursor is filled from history first,
//   while live messages for it wait, then given them by the seq + 1 rule.
//
// Tab <-> worker messages (MessagePort): see `TabPort` below and `SharedClient`
// in src/index.js. A new surface of `Client` needs its name in CALLS (and, if it
// emits a per-room event, in ROOM_EVENTS, or in CHANGE_EVENTS when numbered in the
// room's change stream).

import { Client, GatewayError } from "./index.js";

const CALLS = new Set([
  "connect", "publish", "emit", "edit", "delete", "typing", "history", "presence", "markRead",
  "readState", "readPositions", "reconnectNow", "replies", "versions", "setState",
  "deleteState", "patchState", "getState", "react", "unreact", "search",
]);
const ROOM_EVENTS = ["typing", "presence", "event", "read", "snapshot", "value"];
const CHANGE_EVENTS = ["change", "reactions", "thread"];
const STATE_EVENTS = ["state", "connecting", "connected", "disconnected", "closed", "refreshed"];
const DEAD_AFTER = 15000;

function errorJSON(err) {
  return {
    code: err?.code ?? "error",
    message: String(err?.message ?? err),
    detail: err?.detail ?? {},
    room: err?.room,
    frame: err?.frame,
  };
}

/** One Client and the tabs that share it. */
class Shared {
  constructor(key, config, pool) {
    this.key = key;
    this.pool = pool;
    this.tabs = new Set();
    const options = { ...config.options };
    if (config.getToken) options.getToken = () => this.askToken();
    this.client = new Client(config.urls, options);
    for (const type of STATE_EVENTS) {
      this.client.on(type, (ev) => this.broadcast(type, { ...ev, error: ev.error && errorJSON(ev.error) }));
    }
    this.client.on("error", (err) => this.broadcast("error", errorJSON(err)));
    this.client.on("message", (m) => this.forRoom(m.room, (tab) => tab.message(m)));
    // edits, deletes, reactions and threads: one change stream per room, numbered
    for (const type of CHANGE_EVENTS) {
      this.client.on(type, (c) => this.forRoom(c.room, (tab) => tab.change(type, c)));
    }
    this.client.on("unsubscribed", (ev) => this.forRoom(ev.room, (tab) => tab.ended(ev)));
    for (const type of ROOM_EVENTS) {
      this.client.on(type, (ev) => this.forRoom(ev.room, (tab) => tab.post({ op: "event", type, ev })));
    }
  }

  broadcast(type, ev) {
    for (const tab of this.tabs) tab.post({ op: "event", type, ev });
  }

  forRoom(room, fn) {
    for (const tab of this.tabs) if (tab.rooms.has(room)) fn(tab);
  }

  holds(room) {
    for (const tab of this.tabs) if (tab.rooms.has(room)) return true;
    return false;
  }

  /** A token from a tab that has a provider (the newest first). */
  async askToken() {
    const tabs = [...this.tabs].reverse();
    for (const tab of tabs) {
      try {
        return await tab.ask("token");
      } catch {
        // that tab is gone or its provider failed: ask the next
      }
    }
    throw new GatewayError("token_refresh_failed", "no tab could give a token");
  }

  leave(tab) {
    this.tabs.delete(tab);
    for (const room of tab.rooms.keys()) if (!this.holds(room)) this.client.unsubscribe(room);
    tab.rooms.clear();
    if (this.tabs.size === 0) {
      this.client.close("no tab left");
      this.pool.delete(this.key);
    }
  }
}

/** A tab's view: its rooms and cursors, and the port to it. */
class TabPort {
  constructor(port, pool) {
    this.port = port;
    this.pool = pool;
    this.shared = null;
    this.rooms = new Map(); // name -> {cursor, change, filling, waiting: []}
    this.asks = new Map();
    this.nextAsk = 1;
    this.seen = Date.now();
    port.onmessage = (ev) => this.onMessage(ev.data);
    port.addEventListener?.("close", () => this.gone()); // where ports tell
    port.start?.();
  }

  post(msg) {
    try {
      this.port.postMessage(msg);
    } catch {
      this.gone();
    }
  }

  ask(what) {
    const id = this.nextAsk++;
    return new Promise((resolve, reject) => {
      this.asks.set(id, { resolve, reject });
      this.post({ op: "ask", id, what });
    });
  }

  gone() {
    if (!this.shared) return;
    const shared = this.shared;
    this.shared = null;
    for (const { reject } of this.asks.values()) reject(new Error("tab gone"));
    this.asks.clear();
    shared.leave(this);
    this.pool.tabs.delete(this);
  }

  async onMessage(msg) {
    this.seen = Date.now();
    switch (msg?.op) {
      case "hello":
        return this.hello(msg.config);
      case "ping":
        return;
      case "bye":
        return this.gone();
      case "answer": {
        const ask = this.asks.get(msg.id);
        this.asks.delete(msg.id);
        if (msg.error) ask?.reject(new Error(msg.error));
        else ask?.resolve(msg.value);
        return;
      }
      case "call":
        return this.call(msg.id, msg.method, msg.args ?? []);
      default:
        return;
    }
  }

  hello(config) {
    const key = JSON.stringify(config);
    let shared = this.pool.get(key);
    if (!shared) {
      shared = new Shared(key, config, this.pool);
      this.pool.set(key, shared);
    }
    shared.tabs.add(this);
    this.shared = shared;
    this.post({ op: "event", type: "state", ev: { state: shared.client.state, initial: true } });
  }

  async call(id, method, args) {
    try {
      let value;
      if (!this.shared) throw new GatewayError("closed", "the tab said goodbye");
      if (method === "subscribe") value = await this.subscribe(args[0], args[1] ?? {});
      else if (method === "unsubscribe") value = this.unsubscribe(args[0]);
      else if (method === "subscribeState") value = await this.subscribeState(args[0], args[1] ?? {});
      else if (CALLS.has(method)) value = await this.shared.client[method](...args);
      else throw new GatewayError("invalid_request", `no such call: ${method}`);
      if (method === "pages") value = undefined;
      this.post({ op: "result", id, value });
    } catch (err) {
      this.post({ op: "error", id, error: errorJSON(err) });
    }
  }

  async subscribe(name, { since } = {}) {
    const client = this.shared.client;
    const existing = this.rooms.get(name);
    if (existing && !existing.filling) {
      return { room: name, seq: existing.cursor, change: existing.change, kind: existing.kind };
    }
    const room = { cursor: since, change: undefined, filling: true, waiting: [] };
    this.rooms.set(name, room);
    let answer;
    try {
      answer = await client.subscribe(name, { since });
    } catch (err) {
      this.rooms.delete(name);
      throw err;
    }
    const shared = client.cursor(name);
    if (room.cursor === undefined) room.cursor = answer.seq;
    if (room.change === undefined) room.change = answer.change;
    room.kind = answer.kind;
    // behind the shared cursor: fill from history what the shared client gave before
    let after = room.cursor;
    while (shared !== undefined && after < shared && this.rooms.get(name) === room) {
      const page = await client.history(name, { after, limit: 200 });
      for (const m of page.messages) if (m.seq <= shared) this.deliver(name, room, m);
      if (!page.has_more || page.messages.length === 0) break;
      after = page.messages[page.messages.length - 1].seq;
    }
    room.filling = false;
    for (const m of room.waiting.splice(0)) this.deliver(name, room, m);
    return { room: name, seq: answer.seq, change: answer.change, kind: answer.kind };
  }

  /** A state room: the shared client holds its values (with the conflation of the
   * first tab that asked); this tab gets them now, then the `snapshot` and `value`
   * events the shared client applies. */
  async subscribeState(name, { conflateMs } = {}) {
    const view = await this.shared.client.subscribeState(name, { conflateMs });
    // no frame is handled between the view's resolution and here: the values and the
    // events after them join up
    this.rooms.set(name, { state: true });
    const values = {};
    for (const key of view.keys()) values[key] = view.entry(key);
    return { room: name, seq: view.seq, values };
  }

  unsubscribe(name) {
    if (!this.rooms.delete(name)) return;
    if (this.shared && !this.shared.holds(name)) this.shared.client.unsubscribe(name);
  }

  message(m) {
    const room = this.rooms.get(m.room);
    if (!room) return;
    if (room.filling) room.waiting.push(m);
    else this.deliver(m.room, room, m);
  }

  deliver(name, room, m) {
    if (m.seq <= room.cursor) return; // given already
    room.cursor = m.seq;
    this.post({ op: "event", type: "message", ev: m });
  }

  change(type, c) {
    const room = this.rooms.get(c.room);
    if (!room || room.state) return;
    if (room.change !== undefined && c.change <= room.change) return;
    room.change = c.change;
    this.post({ op: "event", type, ev: c });
  }

  ended(ev) {
    this.rooms.delete(ev.room);
    this.post({ op: "event", type: "unsubscribed", ev });
  }
}

const pool = new Map(); // configuration -> Shared
pool.tabs = new Set();

setInterval(() => {
  const now = Date.now();
  for (const tab of [...pool.tabs]) if (now - tab.seen > DEAD_AFTER) tab.gone();
}, DEAD_AFTER / 3);

globalThis.onconnect = (ev) => {
  const tab = new TabPort(ev.ports[0], pool);
  pool.tabs.add(tab);
};
