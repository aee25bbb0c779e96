// Client for chat-gateway (https://… /v1/ws and the HTTP API), for browsers and Node 20+.
//
// One WebSocket per client, driven by a small state machine:
//
//   disconnected ──connect()──▶ connecting ──open──▶ connected
//        ▲                          │                    │
//        └──── backoff (full jitter) ◀── socket closed ──┘
//   closed: for good, after close(), a refused upgrade (HTTP 401/403; in a browser,
//   which hides the status, a 401 learnt from the HTTP API), a close
//   with 1008 (policy: the token was refused or expired, and no token provider can
//   give a new one) or 4001 (disconnected by the server API).
//
// Every subscribed room keeps a cursor: the seq of the last message delivered to
// the application. A message is delivered only when its seq is cursor + 1; a seq
// at or below the cursor is a replay and is dropped; a seq past cursor + 1 is a
// gap, and the socket is reopened so the server replays from the cursor. Every
// (re)connection subscribes again with `since: cursor`, so nothing is missed and
// nothing shows twice across drops, instance kills and restarts.
//
// Every publish carries an idempotency key, made once and kept until the ack
// arrives: a publish whose ack was lost with the socket is sent again, with the
// same key, on the next connection, and the server acks it with the message it
// stored the first time.
//
// Changes (edits, deletes) are numbered per room: the client keeps the number of the
// last one delivered and resubscribes with `changes_since`, so a change made while
// it was away arrives after the reconnection, once.
//
// A state room (a namespace with `kind = "state"` on the gateway) holds the latest
// JSON value per key. `subscribeState` keeps the room's values and the highest seq it
// has applied; the first subscription gets a snapshot, every resubscription asks
// `since` that seq and gets the newest write of each key written meanwhile, once, so
// the client ends with exactly the store's values. A snapshot replaces the values.
// State seqs skip (a key written twice while away comes once, conflation keeps only
// the newest per key): a skip is no gap there, and each key's value only moves
// forward (a frame older than the key's seq is dropped).

export const VERSION = "0.1.0";

/** Connection states. */
export const State = Object.freeze({
  DISCONNECTED: "disconnected",
  CONNECTING: "connecting",
  CONNECTED: "connected",
  CLOSED: "closed",
});

/** Close codes this client gives meaning to (the server's and its own). */
export const CloseCode = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001, // the instance shuts down: reconnect elsewhere
  ABNORMAL: 1006, // no close frame: network loss, killed instance, refused upgrade
  POLICY_VIOLATION: 1008, // token refused or expired
  TRY_AGAIN_LATER: 1013, // the client could not keep up: resume with since
  NO_PONG: 4000, // client side: no answer to a ping in time
  SERVER_DISCONNECT: 4001, // the server API disconnected this user
  GAP: 4002, // client side: a seq past cursor + 1 arrived; reopen and replay
});

/** An error of the gateway (error body or error frame) or of this client. */
export class GatewayError extends Error {
  constructor(code, message, extra = {}) {
    super(message);
    this.name = "GatewayError";
    /** The error code: an API code (`rate_limited`, `forbidden`, …) or `closed`, `timeout`. */
    this.code = code;
    /** HTTP status, for errors of HTTP requests and refused upgrades. */
    this.status = extra.status;
    /** Seconds to wait before trying again, when the gateway said so. */
    this.retryAfter = extra.retry_after ?? extra.retryAfter;
    /** The whole error object as the gateway sent it. */
    this.detail = extra;
  }
}

const TERMINAL_HTTP = new Set([401, 403]);

/** The GatewayError of an HTTP answer with the error body (a request's or a refused
 * upgrade's): code, message and retry hint as the server sent them, else the
 * `Retry-After` header, else what the status says. */
export function errorOfResponse(status, body, retryAfterHeader) {
  let e = {};
  try {
    const parsed = typeof body === "string" ? JSON.parse(body || "{}") : body;
    if (parsed && typeof parsed.error === "object" && parsed.error !== null) e = parsed.error;
  } catch {
    // not JSON: the status speaks
  }
  const extra = { ...e, status };
  if (typeof e.retry_after !== "number" && retryAfterHeader != null) {
    const seconds = Number(retryAfterHeader);
    if (Number.isFinite(seconds)) extra.retry_after = seconds;
  }
  return new GatewayError(e.code ?? "http_" + status, e.message ?? `HTTP ${status}`, extra);
}

function reportListenerError(err) {
  if (typeof globalThis.reportError === "function") globalThis.reportError(err);
  else queueMicrotask(() => { throw err; });
}

/** Exponential backoff with full jitter: a random delay in [0, min(max, base·2^attempt)],
 * at least `base`. */
export function backoff(attempt, base, max) {
  const ceiling = Math.min(max, base * 2 ** Math.min(attempt, 30));
  return Math.min(max, base + Math.random() * ceiling);
}

function newKey() {
  const c = globalThis.crypto;
  if (typeof c?.randomUUID === "function") return c.randomUUID();
  const bytes = new Uint8Array(16);
  c.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** Seconds since the epoch at which a JWT expires, or undefined (not verified: the
 * server does that; the client only plans its refresh). */
export function tokenExpiry(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const claims = JSON.parse(atob(part + "=".repeat((4 - (part.length % 4)) % 4)));
    return typeof claims.exp === "number" ? claims.exp : undefined;
  } catch {
    return undefined;
  }
}

/** History pages of a room through `client.history`: backwards from the latest (or
 * `before`), or forwards from `after`; each page ascending by seq. */
async function* pageThrough(client, room, { limit, before, after }) {
  for (;;) {
    const page = await client.history(room, { limit, before, after });
    if (page.messages.length === 0) return;
    yield page.messages;
    if (!page.has_more) return;
    if (after !== undefined) after = page.messages[page.messages.length - 1].seq;
    else before = page.messages[0].seq;
  }
}

/** A state room's values as a client holds them: read-only, Map-like, live. */
export class StateView {
  #st;

  constructor(st, room) {
    this.#st = st;
    this.room = room;
  }

  /** The highest seq applied (the room's position these values are at). */
  get seq() {
    return this.#st.seq;
  }

  get size() {
    return this.#st.values.size;
  }

  get(key) {
    return this.#st.values.get(key)?.value;
  }

  has(key) {
    return this.#st.values.has(key);
  }

  /** `{value, seq, updated_at}` of a key, or undefined. */
  entry(key) {
    const e = this.#st.values.get(key);
    return e && { ...e };
  }

  keys() {
    return this.#st.values.keys();
  }

  *values() {
    for (const e of this.#st.values.values()) yield e.value;
  }

  *entries() {
    for (const [k, e] of this.#st.values) yield [k, e.value];
  }

  [Symbol.iterator]() {
    return this.entries();
  }

  forEach(fn) {
    for (const [k, v] of this.entries()) fn(v, k, this);
  }

  /** `{key: value}` of every key. */
  toJSON() {
    return Object.fromEntries(this.entries());
  }
}

class Emitter {
  #listeners = new Map();

  /** Listen to an event; returns a function that stops listening. */
  on(type, fn) {
    if (!this.#listeners.has(type)) this.#listeners.set(type, new Set());
    this.#listeners.get(type).add(fn);
    return () => this.off(type, fn);
  }

  off(type, fn) {
    this.#listeners.get(type)?.delete(fn);
  }

  once(type, fn) {
    const off = this.on(type, (ev) => { off(); fn(ev); });
    return off;
  }

  /** Call the listeners of `type` (the client's own events, not sent anywhere). */
  fire(type, ev) {
    for (const fn of [...(this.#listeners.get(type) ?? [])]) {
      try {
        fn(ev);
      } catch (err) {
        reportListenerError(err);
      }
    }
  }
}

/** What a subscribed room needs across connections. */
class Room {
  constructor(name, since) {
    this.name = name;
    /** seq of the last message delivered; undefined until the first `subscribed`. */
    this.cursor = since;
    /** number of the last change (edit, delete) delivered; undefined until known. */
    this.change = undefined;
    this.subscribed = false;
    /** the room's kind, from `subscribed` */
    this.kind = undefined;
    this.waiters = [];
    /** a state room's: {conflateMs, values: Map key -> {value, seq, updated_at}} */
    this.state = undefined;
  }

  settle(err, value) {
    for (const [resolve, reject] of this.waiters.splice(0)) err ? reject(err) : resolve(value);
    // a state room waiting for its snapshot fails with its subscription
    if (err && this.state) for (const [, reject] of this.state.ready.splice(0)) reject(err);
  }
}

const DEFAULTS = {
  minDelay: 500,
  maxDelay: 20000,
  pingInterval: 20000,
  pongTimeout: 10000,
  refreshMargin: 30,
};

export class Client extends Emitter {
  /**
   * @param {string | string[]} url base URL(s) of the gateway (http or https); with
   *   several, each reconnection tries the next one.
   * @param {object} [options] see index.d.ts
   */
  constructor(url, options = {}) {
    super();
    this.urls = (Array.isArray(url) ? url : [url]).map((u) => u.replace(/\/+$/, ""));
    if (this.urls.length === 0) throw new TypeError("at least one gateway URL is needed");
    this.options = { ...DEFAULTS, ...options };
    this.token = options.token;
    this.state = State.DISCONNECTED;
    this.rooms = new Map(); // name -> Room
    this.pending = new Map(); // ref -> {frame, resolve, reject}, in send order
    this.answers = []; // non-publish frames sent on this socket, awaiting their answer
    this.sock = null;
    this.urlIndex = 0;
    this.attempt = 0;
    this.nextRef = 1;
    this.timers = new Set();
    this.pingTimer = null;
    this.lastSeen = 0;
    this.forceNewToken = false;
  }

  // -- connection --------------------------------------------------------------

  /** Start connecting (if not yet); resolves when connected, rejects when closed for good. */
  connect() {
    if (this.state === State.CLOSED) {
      return Promise.reject(new GatewayError("closed", "the client is closed"));
    }
    const ready = new Promise((resolve, reject) => {
      if (this.state === State.CONNECTED) return resolve();
      const offs = [
        this.on("connected", () => { offs.forEach((f) => f()); resolve(); }),
        this.on("closed", (ev) => {
          offs.forEach((f) => f());
          reject(new GatewayError(ev.error?.code ?? "closed", ev.reason || "closed",
                                  { status: ev.status }));
        }),
      ];
    });
    if (this.state === State.DISCONNECTED && this.timers.size === 0) this.#open();
    return ready;
  }

  /** Close for good: no reconnection; pending publishes and subscriptions are rejected. */
  close(reason = "closed by the client") {
    if (this.state === State.CLOSED) return;
    this.#detach(CloseCode.NORMAL, reason);
    this.#closed(CloseCode.NORMAL, reason);
  }

  #setState(state, ev = {}) {
    this.state = state;
    const event = { state, ...ev };
    this.fire(state, event);
    this.fire("state", event);
  }

  #later(ms, fn) {
    const id = setTimeout(() => { this.timers.delete(id); fn(); }, ms);
    this.timers.add(id);
    return id;
  }

  #clearTimers() {
    for (const id of this.timers) clearTimeout(id);
    this.timers.clear();
    clearInterval(this.pingTimer);
    this.pingTimer = null;
  }

  async #webSocketClass() {
    if (this.options.WebSocket) return this.options.WebSocket;
    if (typeof globalThis.WebSocket === "function") return globalThis.WebSocket;
    try {
      const mod = await import("ws");
      return mod.WebSocket ?? mod.default;
    } catch {
      throw new GatewayError("no_websocket", "no WebSocket here: install the `ws` package "
                             + "or pass options.WebSocket");
    }
  }

  /** The token to use now: the given one, or a fresh one from the provider when there is
   * none, it expires within the refresh margin, or the server refused the last one. */
  async #currentToken() {
    const provider = this.options.getToken;
    if (!provider) return this.token;
    const exp = this.token ? tokenExpiry(this.token) : undefined;
    const soon = exp !== undefined && exp - Date.now() / 1000 < this.options.refreshMargin;
    if (!this.token || soon || this.forceNewToken) {
      this.token = await provider();
      this.forceNewToken = false;
    }
    return this.token;
  }

  async #open() {
    this.#setState(State.CONNECTING, { attempt: this.attempt });
    let sock;
    try {
      const WS = await this.#webSocketClass();
      const token = await this.#currentToken();
      if (this.state !== State.CONNECTING) return; // closed meanwhile
      const base = this.urls[this.urlIndex % this.urls.length];
      const query = new URLSearchParams();
      if (token) query.set("token", token);
      else if (this.options.user) query.set("user", this.options.user);
      const qs = query.toString();
      sock = new WS(base.replace(/^http/, "ws") + "/v1/ws" + (qs ? "?" + qs : ""));
    } catch (err) {
      if (this.state !== State.CONNECTING) return;
      this.fire("error", err instanceof GatewayError ? err
        : new GatewayError("connect_failed", String(err?.message ?? err)));
      if (err?.code === "no_websocket") return this.#closed(CloseCode.ABNORMAL, err.message, err);
      return this.#disconnected(CloseCode.ABNORMAL, String(err?.message ?? err));
    }
    this.sock = sock;
    let httpStatus;
    let refusal; // the GatewayError of a refused upgrade, with the server's reason
    let opened = false;
    if (typeof sock.on === "function") {
      // `ws` (Node) hands over a refused upgrade's response: read its error body, then
      // abort the handshake ourselves (a browser hides both status and body)
      sock.on("unexpected-response", (req, res) => {
        httpStatus = res.statusCode;
        let body = "";
        res.setEncoding("utf8");
        res.on("data", (chunk) => { if (body.length < 65536) body += chunk; });
        res.on("end", () => {
          refusal = errorOfResponse(httpStatus, body, res.headers["retry-after"]);
          sock.terminate();
        });
        res.on("error", () => sock.terminate());
      });
    }
    sock.addEventListener("open", () => {
      if (this.sock !== sock) return;
      opened = true;
      this.#onOpen();
    });
    sock.addEventListener("message", (ev) => {
      if (this.sock !== sock) return;
      this.lastSeen = Date.now();
      let frame;
      try {
        frame = JSON.parse(typeof ev.data === "string" ? ev.data : String(ev.data));
      } catch {
        return this.fire("error", new GatewayError("invalid_frame", "a frame was not JSON"));
      }
      this.#onFrame(frame);
    });
    sock.addEventListener("error", (ev) => {
      // `ws` reports a refused upgrade as "Unexpected server response: 401"; browsers
      // hide the status, so there a refused upgrade looks like a network failure.
      const text = String(ev?.message ?? ev?.error?.message ?? "");
      const m = /Unexpected server response: (\d{3})/.exec(text);
      if (m) httpStatus = Number(m[1]);
    });
    sock.addEventListener("close", (ev) => {
      if (this.sock !== sock) return;
      this.sock = null;
      this.#onClose(ev.code, refusal?.message ?? ev.reason ?? "", httpStatus, opened, refusal);
    });
  }

  #onOpen() {
    this.attempt = 0;
    this.answers = [];
    this.lastSeen = Date.now();
    for (const room of this.rooms.values()) this.#sendSubscribe(room);
    // same keys: stored once (emits were rejected with the socket they were sent on)
    for (const p of this.pending.values()) this.#send(p.frame);
    this.pingTimer = setInterval(() => this.#ping(), this.options.pingInterval);
    this.#planRefresh();
    this.#setState(State.CONNECTED, { url: this.urls[this.urlIndex % this.urls.length] });
  }

  #ping() {
    const sent = Date.now();
    this.#send({ type: "ping", ref: "ping-" + this.nextRef++ }, { kind: "ping" });
    this.#later(this.options.pongTimeout, () => {
      if (this.state === State.CONNECTED && this.lastSeen < sent) {
        this.#drop(CloseCode.NO_PONG, "no answer to a ping");
      }
    });
  }

  #planRefresh() {
    const exp = this.token && this.options.getToken ? tokenExpiry(this.token) : undefined;
    if (exp === undefined) return;
    const inMs = Math.max(0, (exp - this.options.refreshMargin) * 1000 - Date.now());
    const sock = this.sock;
    this.#later(Math.min(inMs, 2 ** 31 - 1), async () => {
      if (this.sock !== sock || this.state !== State.CONNECTED) return;
      try {
        this.token = await this.options.getToken();
      } catch (err) {
        return this.fire("error", new GatewayError("token_refresh_failed",
                                                   String(err?.message ?? err)));
      }
      if (this.sock === sock) this.#send({ type: "refresh", token: this.token }, { kind: "refresh" });
    });
  }

  /** Drop the current socket at once (no closing handshake to wait for) and reconnect. */
  #drop(code, reason) {
    this.#detach(code, reason);
    this.#onClose(code, reason, undefined, true);
  }

  #detach(code, reason) {
    const sock = this.sock;
    this.sock = null;
    if (!sock) return;
    try {
      if (typeof sock.terminate === "function") sock.terminate();
      else sock.close(code >= 4000 || code === 1000 ? code : 1000, reason.slice(0, 120));
    } catch {
      // already closing
    }
  }

  #onClose(code, reason, httpStatus, opened, refusal) {
    if (this.state === State.CLOSED) return;
    clearInterval(this.pingTimer);
    this.pingTimer = null;
    for (const id of this.timers) clearTimeout(id);
    this.timers.clear();
    for (const room of this.rooms.values()) room.subscribed = false;
    this.answers = [];
    for (const [ref, p] of this.pending) {
      if (!p.once) continue; // an emit is not stored, so it is never sent twice
      this.pending.delete(ref);
      p.reject(new GatewayError("disconnected", "the connection closed before the emit's ack"));
    }
    if (httpStatus !== undefined && TERMINAL_HTTP.has(httpStatus)) {
      const codeName = httpStatus === 401 ? "unauthorized" : "forbidden";
      const error = refusal
        ?? new GatewayError(codeName, `HTTP ${httpStatus}`, { status: httpStatus });
      return this.#closed(code, error.message, error, httpStatus);
    }
    if (code === CloseCode.SERVER_DISCONNECT) {
      return this.#closed(code, reason || "disconnected by the server");
    }
    if (code === CloseCode.POLICY_VIOLATION) {
      // An expired token: with a provider, reconnect with a new one (once per
      // connection that opened; a second refusal in a row is final).
      if (!this.options.getToken || !opened) {
        return this.#closed(code, reason || "policy violation");
      }
      this.forceNewToken = true;
    }
    this.#disconnected(code, reason, httpStatus, refusal);
    if (httpStatus === undefined && !opened) this.#probe();
  }

  #disconnected(code, reason, httpStatus, error) {
    const delay = backoff(this.attempt++, this.options.minDelay, this.options.maxDelay);
    this.#setState(State.DISCONNECTED, { code, reason, status: httpStatus, delay, error });
    this.urlIndex += 1;
    this.#later(delay, () => { if (this.state === State.DISCONNECTED) this.#open(); });
  }

  /**
   * An upgrade failed and its HTTP status is unknown (a browser hides it; a network
   * failure has none). The HTTP API answers with the status the upgrade got: a 401
   * there means these credentials are refused, and retrying cannot help.
   */
  async #probe() {
    const room = this.rooms.keys().next().value;
    if (room === undefined) return;
    let error;
    try {
      await this.history(room, { limit: 1 });
      return;
    } catch (err) {
      error = err;
    }
    // meanwhile another attempt may have got through, or the client was closed
    if (error?.status !== 401 || this.state === State.CLOSED || this.state === State.CONNECTED) {
      return;
    }
    this.#detach(CloseCode.NORMAL, "unauthorized");
    // the error is the gateway's own (code `unauthorized`, its message says why)
    this.#closed(CloseCode.ABNORMAL, error.message, error, 401);
  }

  /** While waiting to reconnect (state `disconnected`), try at once (e.g. when the
   * browser is back online). */
  reconnectNow() {
    if (this.state !== State.DISCONNECTED) return;
    for (const id of this.timers) clearTimeout(id);
    this.timers.clear();
    this.#open();
  }

  #closed(code, reason, error, httpStatus) {
    this.#clearTimers();
    this.#setState(State.CLOSED, { code, reason, error, status: httpStatus });
    const err = error ?? new GatewayError("closed", reason || "the client is closed");
    for (const p of this.pending.values()) p.reject(err);
    this.pending.clear();
    for (const room of this.rooms.values()) room.settle(err);
  }

  #send(frame, answer) {
    if (!this.sock || this.sock.readyState !== 1) return false; // 1: OPEN
    if (answer) this.answers.push(answer);
    this.sock.send(JSON.stringify(frame));
    return true;
  }

  // -- frames ------------------------------------------------------------------

  #onFrame(f) {
    switch (f.type) {
      case "message":
        return this.#onMessage(f.room, f.message);
      case "snapshot":
        return this.#onSnapshot(f);
      case "state":
        return this.#onState(f);
      case "ack": {
        const p = this.pending.get(f.ref);
        if (p) {
          this.pending.delete(f.ref);
          p.resolve(f.message);
        }
        return;
      }
      case "error":
        return this.#onError(f);
      case "subscribed": {
        this.#answered("subscribe", f.room);
        const room = this.rooms.get(f.room);
        if (!room) return;
        if (room.state && f.kind !== "state") return this.#wrongKind(room, f.kind);
        if (room.cursor === undefined) room.cursor = f.seq;
        // changes are resumed from here on (a server without changes sends no number)
        if (room.change === undefined && typeof f.change === "number") room.change = f.change;
        room.subscribed = true;
        room.kind = f.kind ?? "stored";
        const ev = { room: f.room, seq: f.seq, change: f.change, kind: room.kind };
        room.settle(null, ev);
        return this.fire("subscribed", ev);
      }
      case "unsubscribed": {
        if (f.reason === undefined && this.#answered("unsubscribe", f.room)) return;
        // the server API ended this subscription
        if (this.rooms.delete(f.room)) {
          this.fire("unsubscribed", { room: f.room, reason: f.reason });
        }
        return;
      }
      case "pong":
        this.#answered("ping");
        return;
      case "refreshed":
        this.#answered("refresh");
        this.#planRefresh();
        return this.fire("refreshed", { exp: f.exp });
      case "message_updated":
      case "message_deleted":
      case "reactions_updated":
      case "thread_updated":
        return this.#onChange(f);
      case "event":
        return this.fire("event", { room: f.room, event: f.event, data: f.data });
      case "presence":
        return this.fire("presence", { room: f.room, action: f.action, user: f.user });
      case "typing":
        return this.fire("typing", { room: f.room, user: f.user });
      case "read":
        return this.fire("read", { room: f.room, user: f.user, seq: f.seq });
      default:
        return this.fire("frame", f); // a frame type newer than this client
    }
  }

  /** Pop the oldest frame awaiting an answer if it is of this kind (and room). */
  #answered(kind, room) {
    const head = this.answers[0];
    if (!head || head.kind !== kind || (room !== undefined && head.room !== room)) {
      // a typing frame has no answer when it succeeds: the ping after it (its fence)
      // answering means it went through
      if (head?.kind === "typing" && kind === "ping") {
        this.answers.shift();
        return this.#answered(kind, room);
      }
      return false;
    }
    this.answers.shift();
    return true;
  }

  #onMessage(name, msg) {
    const room = this.rooms.get(name);
    // before this connection's `subscribed` (which the server sends first), a frame is
    // left over from an earlier subscription: the replay after `subscribed` brings it
    if (!room || !room.subscribed || !msg || typeof msg.seq !== "number") return;
    if (msg.seq <= room.cursor) return; // a replay: shown already
    if (msg.seq > room.cursor + 1) {
      // a gap: reopen; the new subscription replays from the cursor
      return this.#drop(CloseCode.GAP, `seq ${msg.seq} after ${room.cursor} in ${name}`);
    }
    room.cursor = msg.seq;
    this.fire("message", msg);
  }

  #onSnapshot(f) {
    const room = this.rooms.get(f.room);
    if (!room?.state || !room.subscribed || typeof f.seq !== "number") return;
    const values = new Map();
    for (const [key, v] of Object.entries(f.values ?? {})) {
      values.set(key, { value: v.value, seq: v.seq, updated_at: v.updated_at });
    }
    room.state.values = values; // a snapshot replaces whatever was held
    room.state.seq = f.seq;
    for (const [resolve] of room.state.ready.splice(0)) resolve(room.view);
    this.fire("snapshot", { room: f.room, seq: f.seq, values: f.values ?? {} });
  }

  /** `subscribed` to a room subscribed as a state room says it is of another kind
   * (a server before room kinds says none: no state room either). */
  #wrongKind(room, kind) {
    this.rooms.delete(room.name);
    this.#send({ type: "unsubscribe", room: room.name },
               { kind: "unsubscribe", room: room.name });
    const err = new GatewayError("wrong_room_kind",
                                 `${room.name} is not a state room (it is ${kind ?? "stored"})`);
    err.room = room.name;
    room.settle(err);
  }

  #onState(f) {
    const room = this.rooms.get(f.room);
    // a frame before this connection's `subscribed` is left over (the resubscription
    // brings the key's newest value)
    if (!room?.state || !room.subscribed || typeof f.seq !== "number") return;
    const st = room.state;
    // a subscription's writes come in seq order: one at or below the highest applied
    // is held already (never go back to an older value)
    if (st.seq !== undefined && f.seq <= st.seq) return;
    st.seq = f.seq;
    const ev = { room: f.room, seq: f.seq, key: f.key, updated_at: f.updated_at };
    if (f.deleted) {
      ev.deleted = true;
      st.values.delete(f.key);
    } else {
      ev.value = f.value;
      st.values.set(f.key, { value: f.value, seq: f.seq, updated_at: f.updated_at });
    }
    this.fire("value", ev);
  }

  #onChange(f) {
    const room = this.rooms.get(f.room);
    // as for messages: a frame before this connection's `subscribed` is left over, and
    // one numbered at or below the last change delivered is a replay
    if (!room || !room.subscribed) return;
    if (typeof f.change === "number") {
      if (room.change !== undefined && f.change <= room.change) return;
      room.change = f.change;
    }
    if (f.type === "thread_updated") {
      return this.fire("thread", { room: f.room, change: f.change, seq: f.seq, thread: f.thread });
    }
    if (f.type === "reactions_updated") {
      return this.fire("reactions", {
        room: f.room,
        change: f.change,
        seq: f.seq,
        reactions: f.reactions,
      });
    }
    this.fire("change", {
      kind: f.type === "message_updated" ? "updated" : "deleted",
      room: f.room,
      change: f.change,
      message: f.message,
    });
  }

  #onError(f) {
    const err = new GatewayError(f.code, f.message, f);
    if (f.ref !== undefined && this.pending.has(f.ref)) {
      const p = this.pending.get(f.ref);
      this.pending.delete(f.ref);
      return p.reject(err);
    }
    const head = this.answers.shift();
    if (head?.kind === "subscribe") {
      const room = this.rooms.get(head.room);
      if (room && !room.subscribed) {
        this.rooms.delete(head.room);
        room.settle(err);
      }
      err.room = head.room;
    } else if (head?.kind === "refresh") {
      err.frame = "refresh"; // a server without in-band refresh: reconnect at expiry instead
    } else if (head?.kind === "typing") {
      err.frame = "typing";
      err.room = head.room;
    }
    this.fire("error", err);
  }

  // -- rooms and messages ----------------------------------------------------------

  /**
   * Subscribe to a room. Resolves with `{room, seq}` (the room's latest seq) once
   * subscribed; from then every message with seq > `since` (or, without `since`, every
   * new message) is emitted as `message`, in order, once, across reconnections.
   */
  subscribe(name, { since } = {}) {
    if (this.state === State.CLOSED) {
      return Promise.reject(new GatewayError("closed", "the client is closed"));
    }
    let room = this.rooms.get(name);
    if (!room) {
      room = new Room(name, since);
      this.rooms.set(name, room);
      if (this.state === State.CONNECTED) this.#sendSubscribe(room);
    } else if (room.subscribed) {
      return Promise.resolve({ room: name, seq: room.cursor, change: room.change, kind: room.kind });
    }
    return new Promise((resolve, reject) => room.waiters.push([resolve, reject]));
  }

  #sendSubscribe(room) {
    const frame = { type: "subscribe", room: room.name };
    if (room.state) {
      // resume from the highest seq applied (none yet: a snapshot)
      if (room.state.seq !== undefined) frame.since = room.state.seq;
      if (room.state.conflateMs !== undefined) frame.conflate_ms = room.state.conflateMs;
      // `subscribed` says the room's kind: another than state fails the subscription
      return this.#send(frame, { kind: "subscribe", room: room.name });
    }
    if (room.cursor !== undefined) frame.since = room.cursor;
    if (room.change !== undefined) frame.changes_since = room.change;
    this.#send(frame, { kind: "subscribe", room: room.name });
  }

  /**
   * Subscribe to a state room (a namespace with `kind = "state"`): the client holds
   * its values (`state(room)`), first from a snapshot, then kept current by each
   * write, and after a reconnection resumes from the highest seq it applied, so the
   * keys written meanwhile arrive once and it ends with exactly the store's values.
   * `conflateMs`: at most one update per key per interval, the newest (absent: the
   * namespace's default; 0: every write). Resolves with the view once the values
   * are in (the snapshot, or on a resumed subscription the subscription itself).
   * Events: `snapshot` `{room, seq, values}` (the values replaced) and `value`
   * `{room, seq, key, value | deleted, updated_at}`.
   */
  subscribeState(name, { conflateMs } = {}) {
    if (this.state === State.CLOSED) {
      return Promise.reject(new GatewayError("closed", "the client is closed"));
    }
    let room = this.rooms.get(name);
    if (room && !room.state) {
      return Promise.reject(new GatewayError("subscribed",
        `${name} is subscribed as a message room: unsubscribe first`));
    }
    if (!room) {
      room = new Room(name, undefined);
      room.state = { conflateMs, seq: undefined, values: new Map(), ready: [] };
      room.view = new StateView(room.state, name);
      this.rooms.set(name, room);
      if (this.state === State.CONNECTED) this.#sendSubscribe(room);
    }
    const st = room.state;
    if (st.seq !== undefined) {
      if (room.subscribed) return Promise.resolve(room.view);
      return new Promise((resolve, reject) =>
        room.waiters.push([() => resolve(room.view), reject]));
    }
    // first subscription: wait for the snapshot (or the subscription's failure)
    return new Promise((resolve, reject) => st.ready.push([resolve, reject]));
  }

  /** The values of a state room this client subscribed to (`subscribeState`): a
   * read-only Map-like view, live (undefined for a room not subscribed so). */
  stateOf(name) {
    return this.rooms.get(name)?.view;
  }

  /** Stop receiving a room's messages. */
  unsubscribe(name) {
    const room = this.rooms.get(name);
    if (!room) return;
    this.rooms.delete(name);
    room.settle(new GatewayError("unsubscribed", `unsubscribed from ${name}`));
    this.#send({ type: "unsubscribe", room: name }, { kind: "unsubscribe", room: name });
  }

  /** The seq of the last message of the room delivered to the application. */
  cursor(name) {
    return this.rooms.get(name)?.cursor;
  }

  /**
   * Publish a message; resolves with the stored message. The publish waits for a
   * connection if there is none, and is sent again with the same idempotency key after
   * a reconnection until acked, so it is stored once. `replyTo`: the seq of the
   * message of the room this one replies to (its `thread` then counts it, announced
   * as a `thread` event); `mentions`: user ids (at most 50) the message mentions.
   */
  publish(room, text, { key, replyTo, mentions } = {}) {
    const frame = { type: "publish", room, text };
    if (replyTo !== undefined && replyTo !== null) frame.reply_to = replyTo;
    if (mentions !== undefined && mentions !== null) frame.mentions = mentions;
    return this.#keyed(frame, key);
  }

  /** Edit the message at `seq`; resolves with it as edited. Sent with an idempotency
   * key until acked, as a publish is. */
  edit(room, seq, text, { key } = {}) {
    return this.#keyed({ type: "edit", room, seq, text }, key);
  }

  /** Delete the message at `seq`; resolves with the tombstone (`text` "",
   * `deleted_at` set). */
  delete(room, seq, { key } = {}) {
    return this.#keyed({ type: "delete", room, seq }, key);
  }

  /** Add this user's reaction to the message at `seq` (once per user: again changes
   * nothing); resolves with the message and its reactions. Sent until acked. */
  react(room, seq, reaction) {
    return this.#acked({ type: "react", room, seq, reaction });
  }

  /** Remove this user's reaction from the message at `seq`; resolves with the message. */
  unreact(room, seq, reaction) {
    return this.#acked({ type: "unreact", room, seq, reaction });
  }

  /** A frame the server acks with a message: a ref and an idempotency key, resent with
   * the same key after every reconnection until acked, so it takes effect once. */
  #keyed(fields, key) {
    const frame = { ...fields, key: key ?? newKey() };
    if (!this.token && this.options.user) frame.author = this.options.user;
    return this.#acked(frame);
  }

  /** A frame the server acks with a message, with a ref, resent after every
   * reconnection until acked (react/unreact are idempotent, publish/edit/delete keyed). */
  #acked(fields) {
    if (this.state === State.CLOSED) {
      return Promise.reject(new GatewayError("closed", "the client is closed"));
    }
    const ref = fields.type + "-" + this.nextRef++;
    const frame = { ...fields, ref };
    return new Promise((resolve, reject) => {
      this.pending.set(ref, { frame, resolve, reject });
      if (this.state === State.CONNECTED) this.#send(frame);
    });
  }

  /**
   * Send an event to every subscriber of an ephemeral room (one whose namespace is
   * `kind = "ephemeral"` on the gateway): nothing is stored. Resolves once the gateway
   * acked it; sent once, on the connection of the moment (rejected when there is none,
   * or when it closes before the ack). Subscribers get it as an `event`.
   */
  emit(room, event, data = {}) {
    if (this.state !== State.CONNECTED) {
      return Promise.reject(new GatewayError("disconnected", "not connected: nothing was emitted"));
    }
    const ref = "emit-" + this.nextRef++;
    return new Promise((resolve, reject) => {
      this.pending.set(ref, { frame: null, once: true, resolve: () => resolve(), reject });
      this.#send({ type: "emit", room, event, data, ref });
    });
  }

  /** Tell the room's other subscribers that this user is typing. */
  typing(room) {
    if (this.#send({ type: "typing", room }, { kind: "typing", room })) {
      // a fence: typing has no answer when it succeeds, the ping after it does
      this.#send({ type: "ping", ref: "fence-" + this.nextRef++ }, { kind: "ping" });
    }
  }

  // -- HTTP --------------------------------------------------------------------

  async #http(method, path, body) {
    const token = await this.#currentToken();
    const headers = { accept: "application/json" };
    if (token) headers.authorization = "Bearer " + token;
    if (body !== undefined) headers["content-type"] = "application/json";
    const doFetch = this.options.fetch ?? globalThis.fetch;
    const r = await doFetch(this.urls[this.urlIndex % this.urls.length] + path, {
      method, headers, body: body === undefined ? undefined : JSON.stringify(body),
    });
    const data = await r.json().catch(() => ({}));
    if (!r.ok) throw errorOfResponse(r.status, data, r.headers.get("retry-after"));
    return data;
  }

  /** One page of a room's history: `{messages, has_more}`, ascending by seq. */
  history(room, { limit, before, after } = {}) {
    const q = new URLSearchParams();
    if (limit !== undefined) q.set("limit", String(limit));
    if (before !== undefined) q.set("before", String(before));
    if (after !== undefined) q.set("after", String(after));
    const qs = q.toString();
    return this.#http("GET", `/v1/rooms/${encodeURIComponent(room)}/messages${qs ? "?" + qs : ""}`);
  }

  /**
   * Page through a room's history. Without `after`: backwards from the latest (or from
   * `before`), newest page first; with `after`: forwards from that seq. Each page is
   * an array of messages ascending by seq.
   */
  async *pages(room, { limit, before, after } = {}) {
    yield* pageThrough(this, room, { limit, before, after });
  }

  /**
   * Full-text search (`GET /v1/search`), newest first, in the rooms the token may read
   * (or only `rooms`): `{results: [{message, highlights}], next_cursor}`. Highlights are
   * `[start, end)` in code points: slice `Array.from(message.text)`, not the string.
   */
  search(q, { rooms, limit, cursor } = {}) {
    const params = new URLSearchParams({ q });
    for (const room of rooms ?? []) params.append("room", room);
    if (limit !== undefined) params.set("limit", String(limit));
    if (cursor) params.set("cursor", cursor);
    return this.#http("GET", "/v1/search?" + params);
  }

  /** One page of the replies to the message at `seq`, ascending by seq
   * (`GET /v1/rooms/{room}/messages/{seq}/replies`): `{messages, has_more, next}`;
   * pass `next` as `after` for the following page. */
  replies(room, seq, { after, limit } = {}) {
    const q = new URLSearchParams();
    if (after !== undefined && after !== null) q.set("after", String(after));
    if (limit !== undefined) q.set("limit", String(limit));
    const qs = q.toString();
    return this.#http("GET",
      `/v1/rooms/${encodeURIComponent(room)}/messages/${seq}/replies${qs ? "?" + qs : ""}`);
  }

  /** The earlier texts of the message at `seq` (`GET …/messages/{seq}/versions`):
   * `{room, seq, version, versions: [{version, text, edited_at}]}`, oldest first. Its
   * author, a moderator of the room or an API key only. */
  versions(room, seq) {
    return this.#http("GET",
      `/v1/rooms/${encodeURIComponent(room)}/messages/${seq}/versions${this.#reader()}`);
  }

  /** The users here now: `{room, users}` (`GET /v1/rooms/{room}/presence`). */
  presence(room) {
    return this.#http("GET", `/v1/rooms/${encodeURIComponent(room)}/presence`);
  }

  /** Mark the room read up to `seq` (`POST /v1/rooms/{room}/read`):
   * `{room, seq, unread, mentions}`.
   * Open mode: the position of `options.user`. */
  markRead(room, seq) {
    const body = { seq };
    if (!this.token && this.options.user) body.user = this.options.user;
    return this.#http("POST", `/v1/rooms/${encodeURIComponent(room)}/read`, body);
  }

  /** `{room, seq, unread, mentions}` of the room for this user (`GET /v1/rooms/{room}/read`);
   * `mentions`: unread messages mentioning the user. */
  readState(room) {
    return this.#http("GET", `/v1/rooms/${encodeURIComponent(room)}/read${this.#reader()}`);
  }

  /** Every room this user has a read position in or unread mentions in
   * (`GET /v1/read`): `{rooms: [...]}`. */
  readPositions() {
    return this.#http("GET", `/v1/read${this.#reader()}`);
  }

  #reader() {
    return !this.token && this.options.user
      ? "?" + new URLSearchParams({ user: this.options.user }) : "";
  }

  // -- state rooms over HTTP (an API key as the token, or a user where the namespace's
  // client_publish allows) --------------------------------------------------------

  #statePath(room, key) {
    const path = `/v1/rooms/${encodeURIComponent(room)}/state`;
    return key === undefined ? path : `${path}/${encodeURIComponent(key)}`;
  }

  /** Set a key of a state room to a JSON value: `{room, key, seq, value, updated_at}`. */
  setState(room, key, value) {
    return this.#http("PUT", this.#statePath(room, key), { value });
  }

  /** Delete a key: `{room, key, seq, deleted: true, updated_at}`. */
  deleteState(room, key) {
    return this.#http("DELETE", this.#statePath(room, key));
  }

  /** Set and delete keys in one transaction (contiguous seqs, `set` first):
   * `{room, seq, writes: [...]}`. */
  patchState(room, { set, delete: deleted } = {}) {
    const body = {};
    if (set !== undefined) body.set = set;
    if (deleted !== undefined) body.delete = deleted;
    return this.#http("PATCH", this.#statePath(room), body);
  }

  /** Every live key: `{room, seq, values: {key: {value, seq, updated_at}}}`. */
  getState(room) {
    return this.#http("GET", this.#statePath(room));
  }

  // -- moderation (a token whose `moderate` claim grants the room, or an API key as
  // the token) ---------------------------------------------------------------------

  #restriction(method, kind, room, user, body) {
    const path = `/v1/rooms/${encodeURIComponent(room)}/${kind}`;
    return this.#http(method, user === undefined ? path : `${path}/${encodeURIComponent(user)}`,
                      body);
  }

  /** Ban `user` from the room (`duration` seconds; absent: until lifted): the log entry. */
  ban(room, user, { duration, reason } = {}) {
    return this.#restriction("POST", "bans", room, undefined, { user, duration, reason });
  }

  /** Lift a ban: the log entry (GatewayError `not_found` when there was none). */
  unban(room, user) {
    return this.#restriction("DELETE", "bans", room, user);
  }

  /** The room's active bans: `[{user, reason, by, created_at, expires_at}]`. */
  async bans(room) {
    return (await this.#restriction("GET", "bans", room)).bans;
  }

  /** Mute `user` in the room: they may read, not post, edit or type. */
  mute(room, user, { duration, reason } = {}) {
    return this.#restriction("POST", "mutes", room, undefined, { user, duration, reason });
  }

  unmute(room, user) {
    return this.#restriction("DELETE", "mutes", room, user);
  }

  async mutes(room) {
    return (await this.#restriction("GET", "mutes", room)).mutes;
  }

  /** One post per `seconds` per user who does not moderate the room (0: off). */
  setSlowMode(room, seconds) {
    return this.#http("PUT", `/v1/rooms/${encodeURIComponent(room)}/settings`,
                      { slow_mode: seconds });
  }

  /** The room's settings, `{room, slow_mode}` (whoever may read the room). */
  roomSettings(room) {
    return this.#http("GET", `/v1/rooms/${encodeURIComponent(room)}/settings`);
  }

  /** The room's moderation log, newest first: `{room, actions, next_cursor}`. */
  moderationLog(room, { limit, cursor } = {}) {
    const q = new URLSearchParams();
    if (limit !== undefined) q.set("limit", String(limit));
    if (cursor) q.set("cursor", cursor);
    const qs = q.toString();
    return this.#http("GET", `/v1/rooms/${encodeURIComponent(room)}/moderation${qs ? "?" + qs : ""}`);
  }
}

// -- one socket per browser: the SharedWorker mode ---------------------------------

const SHARED_CALLS = ["publish", "emit", "edit", "delete", "history", "presence", "markRead",
                      "readState", "readPositions", "reconnectNow", "replies", "versions",
                      "setState", "deleteState", "patchState", "getState", "react", "unreact",
                      "search"];

/**
 * The same surface as `Client`, served by a SharedWorker (src/worker.js) that holds one
 * connection for every tab of the origin with the same configuration. Each tab keeps
 * its own rooms and cursors. Made by `sharedClient()`.
 */
export class SharedClient extends Emitter {
  constructor(url, options = {}) {
    super();
    const { workerUrl, getToken, WebSocket: _ws, fetch: _fetch, ...rest } = options;
    this.state = State.DISCONNECTED;
    this.shared = true;
    this.calls = new Map();
    this.nextId = 1;
    this.cursors = new Map();
    this.stateRooms = new Map(); // room -> {st, view}
    this.getToken = getToken;
    const worker = new SharedWorker(workerUrl ?? new URL("./worker.js", import.meta.url),
                                    { type: "module", name: "chat-gateway" });
    this.port = worker.port;
    this.port.onmessage = (ev) => this.#onMessage(ev.data);
    this.port.start();
    const urls = (Array.isArray(url) ? url : [url]).map((u) => new URL(u, globalThis.location?.href).href.replace(/\/+$/, ""));
    this.port.postMessage({ op: "hello", config: { urls, options: rest, getToken: !!getToken } });
    this.heartbeat = setInterval(() => this.port.postMessage({ op: "ping" }), 5000);
    this.bye = () => this.close();
    globalThis.addEventListener?.("pagehide", this.bye);
    for (const name of SHARED_CALLS) this[name] = (...args) => this.#call(name, args);
  }

  #call(method, args) {
    if (this.state === State.CLOSED && this.closedHere) {
      return Promise.reject(new GatewayError("closed", "the client is closed"));
    }
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.calls.set(id, { resolve, reject });
      this.port.postMessage({ op: "call", id, method, args });
    });
  }

  async #onMessage(msg) {
    if (msg.op === "result" || msg.op === "error") {
      const call = this.calls.get(msg.id);
      this.calls.delete(msg.id);
      if (msg.op === "result") return call?.resolve(msg.value);
      return call?.reject(this.#error(msg.error));
    }
    if (msg.op === "ask") {
      try {
        const value = await this.getToken();
        this.port.postMessage({ op: "answer", id: msg.id, value });
      } catch (err) {
        this.port.postMessage({ op: "answer", id: msg.id, error: String(err?.message ?? err) });
      }
      return;
    }
    if (msg.op !== "event") return;
    const { type, ev } = msg;
    if (type === "state") {
      this.state = ev.state;
      if (ev.initial) return;
    }
    if (type === "message") this.cursors.set(ev.room, ev.seq);
    if ((type === "snapshot" || type === "value") && !this.#applyState(type, ev)) return;
    if (type === "unsubscribed") {
      this.cursors.delete(ev.room);
      this.stateRooms.delete(ev.room);
    }
    if (type === "error") return this.fire("error", this.#error(ev));
    if (ev && ev.error) ev.error = this.#error(ev.error);
    this.fire(type, ev);
  }

  #error(e) {
    const err = new GatewayError(e.code, e.message, e.detail ?? {});
    if (e.room !== undefined) err.room = e.room;
    if (e.frame !== undefined) err.frame = e.frame;
    return err;
  }

  /** Resolves once the shared connection is up. */
  connect() {
    return this.#call("connect", []);
  }

  subscribe(room, { since } = {}) {
    if (since !== undefined) this.cursors.set(room, since);
    return this.#call("subscribe", [room, { since }]).then((answer) => {
      if (!this.cursors.has(room)) this.cursors.set(room, answer.seq);
      return answer;
    });
  }

  unsubscribe(room) {
    this.cursors.delete(room);
    this.stateRooms.delete(room);
    this.#call("unsubscribe", [room]).catch(() => {});
  }

  cursor(room) {
    return this.cursors.get(room);
  }

  /** A state room through the shared connection: the worker holds its values (with
   * the conflation of the first tab that asked), this tab a copy kept current by the
   * `snapshot` and `value` events it relays. */
  async subscribeState(room, { conflateMs } = {}) {
    const held = this.stateRooms.get(room);
    if (held) return held.view;
    const answer = await this.#call("subscribeState", [room, { conflateMs }]);
    const st = { seq: answer.seq, values: new Map(Object.entries(answer.values)) };
    const view = new StateView(st, room);
    this.stateRooms.set(room, { st, view });
    return view;
  }

  stateOf(room) {
    return this.stateRooms.get(room)?.view;
  }

  #applyState(type, ev) {
    const held = this.stateRooms.get(ev.room);
    if (!held) return false;
    const st = held.st;
    if (type === "snapshot") {
      st.values = new Map(Object.entries(ev.values));
      st.seq = ev.seq;
      return true;
    }
    if (st.seq !== undefined && ev.seq <= st.seq) return false;
    st.seq = ev.seq;
    if (ev.deleted) st.values.delete(ev.key);
    else st.values.set(ev.key, { value: ev.value, seq: ev.seq, updated_at: ev.updated_at });
    return true;
  }

  typing(room) {
    this.#call("typing", [room]).catch(() => {});
  }

  async *pages(room, { limit, before, after } = {}) {
    yield* pageThrough(this, room, { limit, before, after });
  }

  /** This tab leaves: its rooms are left (unless another tab holds them); the shared
   * connection closes with the last tab. */
  close() {
    if (this.closedHere) return;
    this.closedHere = true;
    clearInterval(this.heartbeat);
    globalThis.removeEventListener?.("pagehide", this.bye);
    this.port.postMessage({ op: "bye" });
    const err = new GatewayError("closed", "the client is closed");
    for (const call of this.calls.values()) call.reject(err);
    this.calls.clear();
    this.state = State.CLOSED;
    this.fire("closed", { state: State.CLOSED, reason: "closed by the client" });
    this.fire("state", { state: State.CLOSED, reason: "closed by the client" });
  }
}

/**
 * One socket per browser, not per tab (opt-in): where `SharedWorker` exists, a
 * `SharedClient` whose connection lives in a SharedWorker shared by every tab of the
 * origin with the same URLs and credentials; elsewhere (no SharedWorker: Node, some
 * mobile browsers) a plain `Client`. `options.workerUrl` is where the worker script is
 * (default: `worker.js` next to this module; the gateway serves it at /sdk/worker.js).
 * A `getToken` provider stays in the tab: the worker asks a tab for each new token.
 */
export function sharedClient(url, options = {}) {
  if (typeof globalThis.SharedWorker !== "function") return new Client(url, options);
  return new SharedClient(url, options);
}
