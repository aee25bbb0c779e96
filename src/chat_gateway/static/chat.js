// The browser chat client, built on the gateway's JavaScript client (served at
// /sdk/chat-gateway.js, the module in clients/js). The client keeps the
// WebSocket: it reconnects with backoff, resumes the room from the last seq it
// delivered, delivers every message once and in order, and sends each message
// with an idempotency key until it is acknowledged, so a message is stored once
// even when the connection drops before its ack. This page only renders.
//
// Joining: subscribe (the server answers with the room's latest seq), then load
// the page of history up to that seq; later messages arrive live after it.
//
// State is exposed in the DOM for people and tests alike: #status carries
// data-state (idle, connecting, connected, reconnecting, refused), every
// rendered message carries data-seq, and #messages carries data-last-seq.
//
// With sign-in (auth mode) the page needs a token: `?token=` or one pasted in
// the join form; the name is then the token's `sub`. A 401 or 403 (the token
// missing, expired or not granting the room) is final: the page stops
// retrying, says why and asks for a token, instead of knocking forever.
import { Client, backoff } from "/sdk/chat-gateway.js";

const MAX_TEXT = 4000;
const ROOM_RE = /^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$/;
const PAGE = 50;
const TYPING_EVERY = 2000; // ms between two typing frames of ours
const TYPING_SHOWN = 3000; // ms a "typing" notice stays without a new frame
// A refused subscribe that no retry can fix (unauthorized and forbidden: see refuse()).
const FATAL = new Set(["invalid_request", "not_found"]);

const $ = (id) => document.getElementById(id);
const el = {
  status: $("status"), join: $("join"), name: $("name"), room: $("room"),
  token: $("token"), joinError: $("join-error"), title: $("room-title"), older: $("older"),
  list: $("messages"), presence: $("presence"), presenceList: $("presence-list"),
  presenceCount: $("presence-count"), notice: $("notice"), compose: $("compose"),
  text: $("text"), send: $("send"), counter: $("counter"), typing: $("typing"),
  unread: document.createElement("span"),
};
el.unread.id = "unread";
el.unread.className = "count";
const params = new URLSearchParams(location.search);
const TOKEN_STORE = "chat.token";

const s = {
  gen: 0, room: "", name: "", token: "", client: null, subscribed: false, joining: false,
  lastSeq: 0, firstSeq: 0, loaded: false, retries: 0, timer: null, blockedUntil: 0,
  presence: new Map(), typers: new Map(), lastTyping: 0, tokenName: "", readSeq: 0,
  readTimer: null, readOff: false,
};

// -- small helpers -----------------------------------------------------------

function setStatus(state, text) {
  el.status.dataset.state = state;
  el.status.textContent = text;
}

let noticeTimer = null;
function notice(text, kind) {
  clearInterval(noticeTimer);
  noticeTimer = null;
  el.notice.hidden = !text;
  el.notice.textContent = text || "";
  el.notice.dataset.kind = kind || "";
}

// The token's `sub`, for showing who we are (the server verifies the token;
// this only reads it).
function tokenSub(tok) {
  const sub = tokenClaims(tok).sub;
  return typeof sub === "string" ? sub : "";
}

// The token's claims (unverified: only for what the page shows and offers).
function tokenClaims(tok) {
  try {
    const b64 = tok.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    return JSON.parse(new TextDecoder().decode(bytes)) || {};
  } catch (e) {
    return {};
  }
}

function chars(text) {
  return Array.from(text).length; // code points, as the server counts them
}

// -- rendering -----------------------------------------------------------------

function fillItem(li, m) {
  li.dataset.seq = String(m.seq);
  li.dataset.id = m.id || "";
  li.dataset.version = String(m.version || 1);
  li.className = m.author === s.name ? "mine" : "";
  const head = document.createElement("div");
  head.className = "meta";
  const who = document.createElement("span");
  who.className = "author";
  who.textContent = m.author;
  const when = document.createElement("time");
  when.dateTime = m.created_at || "";
  const d = new Date(m.created_at);
  when.textContent = isNaN(d) ? "" : d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  head.append(who, " ", when);
  const body = document.createElement("p");
  body.className = "text";
  if (m.deleted_at) {
    li.classList.add("deleted");
    body.textContent = "This message was deleted.";
  } else {
    body.textContent = m.text; // text, never HTML
    if (m.edited_at) {
      li.classList.add("edited");
      const mark = document.createElement("span");
      mark.className = "edited-mark";
      mark.textContent = " (edited)";
      head.append(mark);
    }
  }
  li.replaceChildren(head, body);
  moderationMenu(li, m);
  return li;
}

function messageItem(m) {
  return fillItem(document.createElement("li"), m);
}

function nearBottom() {
  const l = el.list;
  return l.scrollHeight - l.scrollTop - l.clientHeight < 80;
}

function showLastSeq() {
  el.list.dataset.lastSeq = String(s.lastSeq);
}

// The one door into the list for live messages: the client delivers them in
// order and once; a seq at or below the last one shown (one a history page
// already brought) is not shown twice.
function accept(m) {
  if (m.room !== s.room || m.seq <= s.lastSeq) return;
  const stick = nearBottom();
  el.list.append(messageItem(m));
  s.lastSeq = m.seq;
  if (!s.firstSeq) s.firstSeq = m.seq;
  showLastSeq();
  if (stick) el.list.scrollTop = el.list.scrollHeight;
  markRead();
}

// An edit or a delete: the message shown is redrawn, unless it already shows this
// version or a later one (a history page may be newer than the event); one not
// shown is left alone.
function changed(ev) {
  if (ev.room !== s.room || !ev.message) return;
  const li = el.list.querySelector(`li[data-seq="${Number(ev.message.seq)}"]`);
  if (!li || Number(li.dataset.version || 1) > (ev.message.version || 1)) return;
  const m = ev.kind === "deleted" && !ev.message.deleted_at
    ? { ...ev.message, deleted_at: new Date().toISOString() } : ev.message;
  fillItem(li, m);
}

// The latest page of history, up to the seq the subscription started after.
async function loadHistory(gen, upTo) {
  let page = { messages: [], has_more: false };
  if (upTo > 0) page = await s.client.history(s.room, { limit: PAGE, before: upTo + 1 });
  if (gen !== s.gen) return;
  const msgs = page.messages.filter((m) => m.seq <= upTo);
  const frag = document.createDocumentFragment();
  msgs.forEach((m) => frag.append(messageItem(m)));
  el.list.prepend(frag); // live messages that came meanwhile are all past upTo
  if (msgs.length) {
    s.firstSeq = msgs[0].seq;
    s.lastSeq = Math.max(s.lastSeq, msgs[msgs.length - 1].seq);
  } else if (!s.firstSeq) {
    s.firstSeq = upTo + 1;
  }
  showLastSeq();
  el.older.hidden = !page.has_more;
  el.list.scrollTop = el.list.scrollHeight;
}

async function loadOlder() {
  if (!s.firstSeq || s.firstSeq <= 1) { el.older.hidden = true; return; }
  const gen = s.gen;
  let page;
  try {
    page = await s.client.history(s.room, { limit: PAGE, before: s.firstSeq });
  } catch (err) {
    if (gen === s.gen) notice(`Earlier messages could not be loaded: ${err.message}`, "error");
    return;
  }
  if (gen !== s.gen) return;
  const msgs = page.messages.filter((m) => m.seq < s.firstSeq);
  const height = el.list.scrollHeight;
  const frag = document.createDocumentFragment();
  msgs.forEach((m) => frag.append(messageItem(m)));
  el.list.prepend(frag);
  if (msgs.length) s.firstSeq = msgs[0].seq;
  el.list.scrollTop += el.list.scrollHeight - height;
  el.older.hidden = !page.has_more || s.firstSeq <= 1;
}

// -- presence (rendered only where the server offers it) ------------------------

function userName(u) {
  return typeof u === "string" ? u : (u && (u.user || u.name || u.sub)) || "";
}

function renderPresence() {
  el.presenceList.replaceChildren();
  [...s.presence.keys()].sort().forEach((name) => {
    const li = document.createElement("li");
    li.textContent = name;
    li.dataset.user = name;
    el.presenceList.append(li);
  });
  el.presenceCount.textContent = `(${s.presence.size})`;
  el.presence.hidden = false;
}

async function loadPresence(gen) {
  try {
    const r = await s.client.presence(s.room);
    if (gen !== s.gen) return;
    s.presence = new Map((r.users || []).map((u) => [userName(u), 1]).filter(([n]) => n));
    renderPresence();
  } catch (e) { /* no presence on this server */ }
}

function presenceChanged(ev) {
  const name = userName(ev.user);
  if (ev.room !== s.room || !name) return;
  if (ev.action === "join") s.presence.set(name, 1);
  else if (ev.action === "leave") s.presence.delete(name);
  renderPresence();
}

// -- read positions and the unread count ----------------------------------------------

function renderUnread() {
  const n = Math.max(0, s.lastSeq - s.readSeq);
  el.unread.dataset.unread = String(n);
  el.unread.textContent = n ? `(${n} unread)` : "";
  document.title = (n ? `(${n}) ` : "") + (s.room ? `# ${s.room} · chat-gateway` : "chat-gateway");
}

// What is on screen while the page is visible counts as read: tell the server
// (at most one request per 300 ms).
function markRead() {
  renderUnread();
  if (!s.subscribed || !s.loaded || s.readOff || document.hidden || !nearBottom()) return;
  if (s.lastSeq <= s.readSeq || s.readTimer) return;
  const gen = s.gen;
  s.readTimer = setTimeout(async () => {
    s.readTimer = null;
    if (gen !== s.gen || s.lastSeq <= s.readSeq) return;
    try {
      const r = await s.client.markRead(s.room, s.lastSeq);
      if (gen !== s.gen) return;
      s.readSeq = Math.max(s.readSeq, r.seq || 0);
      markRead();
    } catch (err) {
      if (gen === s.gen && (err.status === 404 || err.status === 405)) s.readOff = true;
    }
  }, 300);
}

// The stored position, so the count survives a reload.
async function loadRead(gen) {
  try {
    const r = await s.client.readState(s.room);
    if (gen !== s.gen) return;
    s.readSeq = Math.max(s.readSeq, r.seq || 0);
    renderUnread();
  } catch (err) {
    if (gen === s.gen && (err.status === 404 || err.status === 405)) s.readOff = true;
  }
}

document.addEventListener("visibilitychange", markRead);
el.list.addEventListener("scroll", markRead);

// -- typing ----------------------------------------------------------------------

function renderTyping() {
  const names = [...s.typers.keys()].sort();
  el.typing.dataset.users = names.join(",");
  el.typing.textContent = !names.length ? ""
    : names.length === 1 ? `${names[0]} is typing…`
    : names.length === 2 ? `${names[0]} and ${names[1]} are typing…`
    : "Several people are typing…";
}

function someoneTyping(ev) {
  const name = userName(ev.user);
  if (ev.room !== s.room || !name || name === s.name) return;
  clearTimeout(s.typers.get(name));
  s.typers.set(name, setTimeout(() => { s.typers.delete(name); renderTyping(); }, TYPING_SHOWN));
  renderTyping();
}

function stoppedTyping(name) {
  if (!s.typers.has(name)) return;
  clearTimeout(s.typers.get(name));
  s.typers.delete(name);
  renderTyping();
}

function clearTyping() {
  s.typers.forEach((timer) => clearTimeout(timer));
  s.typers.clear();
  renderTyping();
}

// At most one typing frame every TYPING_EVERY ms, and only with something typed.
function typing() {
  if (!s.subscribed || !el.text.value.trim() || Date.now() - s.lastTyping < TYPING_EVERY) return;
  s.lastTyping = Date.now();
  s.client.typing(s.room);
}

// -- the connection ---------------------------------------------------------------

function why(ev) {
  if (!s.loaded && ev.code === 1006) return "the server cannot be reached";
  return ev.code === 1001 ? "the server is restarting"
    : ev.code === 1013 ? "the connection fell behind" : "the connection was lost";
}

function listen(client, gen) {
  const on = (type, fn) => client.on(type, (ev) => { if (gen === s.gen) fn(ev); });
  on("connecting", () => {
    setStatus("connecting", s.loaded ? `Reconnecting to ${s.room}…` : `Connecting to ${s.room}…`);
  });
  on("disconnected", (ev) => {
    s.subscribed = false;
    updateCompose();
    const secs = Math.max(1, Math.round((ev.delay || 0) / 1000));
    setStatus("reconnecting", `Disconnected (${why(ev)}). Retrying in ${secs} s…`);
  });
  on("closed", (ev) => {
    if (ev.status === 401 || ev.status === 403 || ev.code === 1008) {
      refuse(ev.status === 403 ? 403 : 401, ev.error?.message || ev.reason);
    } else {
      stop(`Disconnected from ${s.room} (${ev.reason || "closed"}). Join again to reconnect.`);
    }
  });
  on("subscribed", (ev) => {
    if (ev.room !== s.room) return;
    s.subscribed = true;
    s.retries = 0;
    if (s.loaded) connected();
  });
  on("unsubscribed", (ev) => {
    if (ev.room !== s.room) return;
    if (ev.reason === "banned") return restricted({ code: "banned" });
    stop(`Removed from ${s.room}${ev.reason ? ` (${ev.reason})` : ""}.`);
  });
  on("message", accept);
  on("change", changed);
  on("presence", (ev) => {
    presenceChanged(ev);
    if (ev.action === "leave") stoppedTyping(userName(ev.user));
  });
  on("typing", someoneTyping);
  on("error", (err) => {
    // A server without typing or in-band refresh refuses the frame: nothing to show.
    if (err.frame === "typing" || err.frame === "refresh") return;
    if (err.room !== undefined) {
      // a subscription refused on a reconnection (the first one is handled in subscribe())
      if (err.room === s.room && !s.joining) subscribeRefused(gen, err);
      return;
    }
    if (err.code === "connect_failed" || err.code === "invalid_frame") return;
    notice(err.message, "error");
  });
}

function connected() {
  setStatus("connected", `Connected to ${s.room}`);
  if (el.notice.dataset.kind === "connection") notice("");
  updateCompose();
  loadPresence(s.gen);
  markRead();
}

// Subscribe from the last seq shown (from the latest at first); the client keeps
// the subscription across reconnections.
async function subscribe(gen) {
  s.timer = null;
  s.joining = true;
  let sub;
  try {
    sub = await s.client.subscribe(s.room, s.loaded ? { since: s.lastSeq } : {});
  } catch (err) {
    if (gen === s.gen) subscribeRefused(gen, err);
    return;
  } finally {
    if (gen === s.gen) s.joining = false;
  }
  if (gen !== s.gen) return;
  if (!s.loaded) {
    try {
      await loadHistory(gen, sub.seq);
    } catch (err) {
      if (gen !== s.gen) return;
      if (err.code === "banned") return restricted(err);
      if (err.status === 401 || err.status === 403) return refuse(err.status, err.message);
      s.firstSeq = s.firstSeq || sub.seq + 1;
      el.older.hidden = false; // the button tries again
      notice(`Earlier messages could not be loaded: ${err.message}`, "error");
    }
    if (gen !== s.gen) return;
    s.loaded = true;
    loadRead(gen);
  }
  if (s.subscribed) connected();
}

function subscribeRefused(gen, err) {
  s.subscribed = false;
  updateCompose();
  if (err.code === "unauthorized" || err.code === "forbidden") {
    refuse(err.code === "forbidden" ? 403 : 401, err.message);
  } else if (err.code === "banned") {
    restricted(err);
  } else if (FATAL.has(err.code)) {
    stop(`Cannot join ${s.room}: ${err.message}`);
  } else if (err.code !== "closed" && err.code !== "unsubscribed") {
    // the server could not serve the room now (store down, too many subscriptions): again later
    const delay = backoff(s.retries++, 500, 8000);
    notice(`The server could not serve ${s.room} (${err.message}); retrying.`, "connection");
    clearTimeout(s.timer);
    s.timer = setTimeout(() => subscribe(gen), delay);
  }
}

// Stop for good (until the next join).
function stop(status) {
  s.gen += 1;
  clearTimeout(s.timer);
  s.timer = null;
  const client = s.client;
  if (client) client.close();
  s.subscribed = false;
  clearTyping();
  updateCompose();
  setStatus("refused", status);
}

// Stop and say what would let us in.
function refuse(status, message) {
  stop(`Cannot join ${s.room}`);
  let text;
  if (status === 403) {
    text = `Your token does not let you into ${s.room} (${message}). ` +
      "Paste a token that grants it, or pick another room.";
  } else if (s.token) {
    text = `Your token was not accepted (${message}). Paste a new token and join again.`;
  } else {
    text = `This server asks you to sign in (${message}). Paste a token and join again.`;
  }
  notice(text, "error");
  el.token.setAttribute("aria-invalid", "true");
  el.token.focus();
}

window.addEventListener("online", () => { if (s.client) s.client.reconnectNow(); });

// -- composing -----------------------------------------------------------------

function updateCompose() {
  const n = chars(el.text.value.trim());
  const over = n - MAX_TEXT;
  el.counter.textContent = over > 0
    ? `${n} / ${MAX_TEXT}: ${over} character${over > 1 ? "s" : ""} too long. Shorten it to send.`
    : `${n} / ${MAX_TEXT}`;
  el.counter.dataset.over = over > 0 ? "true" : "false";
  el.text.setAttribute("aria-invalid", over > 0 ? "true" : "false");
  el.text.disabled = !s.room;
  el.send.disabled = !s.subscribed || n === 0 || over > 0 || Date.now() < s.blockedUntil;
}

function rateLimited(seconds, why = "You're sending messages faster than this room allows.",
                     kind = "rate") {
  s.blockedUntil = Date.now() + seconds * 1000;
  const show = () => {
    const left = Math.ceil((s.blockedUntil - Date.now()) / 1000);
    if (left <= 0) {
      notice("");
      updateCompose();
      return;
    }
    el.notice.hidden = false;
    el.notice.dataset.kind = kind;
    el.notice.dataset.retryAfter = String(left);
    el.notice.textContent = `${why} You can send again in ${left} s; your message is kept.`;
  };
  notice("");
  show();
  noticeTimer = setInterval(show, 250);
  updateCompose();
}

function send() {
  const text = el.text.value.trim();
  if (!text || chars(text) > MAX_TEXT) { updateCompose(); return; }
  if (!s.subscribed) {
    notice("Not connected yet: your message is kept and can be sent once connected.", "connection");
    return;
  }
  if (Date.now() < s.blockedUntil) return;
  const gen = s.gen;
  // Sent again after a reconnection with the same idempotency key until acked: stored once.
  s.client.publish(s.room, text).catch((err) => {
    if (gen !== s.gen) return;
    if (!el.text.value) { el.text.value = text; updateCompose(); }
    if (err.code === "rate_limited") rateLimited(Number(err.retryAfter) || 1);
    else if (err.code === "slow_mode") slowMode(err);
    else if (err.code === "banned" || err.code === "muted") restricted(err);
    else notice(`Your message was not sent: ${err.message}`, "error");
  });
  s.lastTyping = 0; // the next message's typing is news again
  el.text.value = "";
  if (el.notice.dataset.kind === "error") notice("");
  updateCompose();
}

el.compose.addEventListener("submit", (ev) => { ev.preventDefault(); send(); });
el.text.addEventListener("input", () => { updateCompose(); typing(); });
el.text.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); send(); }
});
el.older.addEventListener("click", loadOlder);

// -- joining -----------------------------------------------------------------------

function join(room, name, tok) {
  s.gen += 1;
  const gen = s.gen;
  if (s.client) s.client.close();
  clearTimeout(s.timer);
  clearTyping();
  // With a token the server knows who this is; in open mode `user` names us in
  // presence and as the author of what we send.
  const client = new Client(location.origin, tok ? { token: tok, maxDelay: 8000 }
                                                 : { user: name, maxDelay: 8000 });
  clearTimeout(s.readTimer);
  Object.assign(s, { room, name, token: tok, client, subscribed: false, joining: false,
                     lastSeq: 0, firstSeq: 0, loaded: false, retries: 0, timer: null,
                     lastTyping: 0, presence: new Map(), readSeq: 0, readTimer: null,
                     readOff: false });
  el.list.replaceChildren();
  showLastSeq();
  el.older.hidden = true;
  el.presence.hidden = true;
  el.title.textContent = `# ${room}`;
  el.title.append(" ", el.unread);
  renderUnread();
  notice("");
  el.token.setAttribute("aria-invalid", "false");
  try {
    if (!tok) localStorage.setItem("chat.name", name);
    localStorage.setItem("chat.room", room);
  } catch (e) { /* storage may be off */ }
  const q = new URLSearchParams(location.search);
  q.set("room", room);
  // A token never goes into the address (it would stay in the history).
  q.delete("token");
  if (tok) q.delete("name"); // the name comes from the token
  else q.set("name", name);
  try {
    if (tok) sessionStorage.setItem(TOKEN_STORE, tok);
    else sessionStorage.removeItem(TOKEN_STORE);
  } catch (e) { /* storage may be off */ }
  history.replaceState(null, "", "?" + q.toString());
  updateCompose();
  listen(client, gen);
  subscribe(gen);
  client.connect().catch(() => { /* closed for good: the "closed" event said why */ });
}

// -- search ------------------------------------------------------------------

const search = { q: "", cursor: null, gen: 0 };
const searchEl = {
  form: $("search"), q: $("q"), status: $("search-status"), results: $("search-results"),
  more: $("search-more"),
};

// The text with each highlighted span in a <mark>, built from text nodes only (a
// message is never parsed as HTML). Highlights count code points: slice the
// array of code points, not the UTF-16 string.
function highlighted(text, spans) {
  const points = Array.from(text);
  const out = document.createElement("p");
  out.className = "text";
  let at = 0;
  for (const [start, end] of spans) {
    if (start < at || end > points.length || start >= end) continue;
    out.append(document.createTextNode(points.slice(at, start).join("")));
    const mark = document.createElement("mark");
    mark.textContent = points.slice(start, end).join("");
    out.append(mark);
    at = end;
  }
  out.append(document.createTextNode(points.slice(at).join("")));
  return out;
}

function searchItem(hit) {
  const m = hit.message;
  const li = document.createElement("li");
  li.dataset.room = m.room;
  li.dataset.seq = String(m.seq);
  const meta = document.createElement("div");
  meta.className = "meta";
  const when = new Date(m.created_at);
  meta.textContent = `${m.room} · ${m.author}` +
    (isNaN(when) ? "" : ` · ${when.toLocaleString([], { dateStyle: "short", timeStyle: "short" })}`);
  li.append(meta, highlighted(m.text, hit.highlights));
  return li;
}

function searchClient() {
  if (s.client) return s.client;
  const tok = el.token.value.trim() || params.get("token") || "";
  return new Client(location.origin, tok ? { token: tok } : {});
}

async function runSearch(more) {
  const gen = more ? search.gen : ++search.gen;
  if (!more) {
    search.q = searchEl.q.value.trim();
    search.cursor = null;
    searchEl.results.replaceChildren();
  }
  if (!search.q) {
    searchEl.results.hidden = true;
    searchEl.more.hidden = true;
    searchEl.status.textContent = "";
    return;
  }
  searchEl.status.textContent = "Searching…";
  let page;
  try {
    page = await searchClient().search(search.q, { limit: 20, cursor: search.cursor || undefined });
  } catch (err) {
    if (gen !== search.gen) return;
    searchEl.status.textContent = err.message || "The search failed.";
    searchEl.more.hidden = true;
    return;
  }
  if (gen !== search.gen) return; // a newer search started meanwhile
  searchEl.results.append(...page.results.map(searchItem));
  search.cursor = page.next_cursor;
  const n = searchEl.results.children.length;
  searchEl.results.hidden = n === 0;
  searchEl.more.hidden = !page.next_cursor;
  searchEl.status.textContent = n === 0 ? "No messages found."
    : `${n} message${n === 1 ? "" : "s"} found${page.next_cursor ? " so far" : ""}.`;
}

searchEl.form.addEventListener("submit", (ev) => { ev.preventDefault(); runSearch(false); });
searchEl.more.addEventListener("click", () => runSearch(true));

el.join.addEventListener("submit", (ev) => {
  ev.preventDefault();
  const tok = el.token.value.trim();
  const name = tok ? tokenSub(tok) : el.name.value.trim();
  const room = el.room.value.trim();
  let problem = "";
  if (!name && !tok) problem = "Pick a name first (or paste a token if the server asks you to sign in).";
  else if (!ROOM_RE.test(room)) {
    problem = "Room names start with a letter or digit and use only letters, digits and . _ : - (up to 128).";
  }
  el.joinError.hidden = !problem;
  el.joinError.textContent = problem;
  (problem.startsWith("Pick") ? el.name : el.room).setAttribute("aria-invalid", problem ? "true" : "false");
  if (problem) return;
  el.name.setAttribute("aria-invalid", "false");
  join(room, name, tok);
  el.text.focus();
});

// With a token the name is the token's: shown, not typed.
function tokenChanged() {
  const tok = el.token.value.trim();
  el.name.disabled = Boolean(tok);
  if (tok) el.name.value = tokenSub(tok);
  else if (el.name.value === s.tokenName) el.name.value = "";
  s.tokenName = tok ? el.name.value : "";
}
el.token.addEventListener("input", tokenChanged);

// -- start ---------------------------------------------------------------------------

let saved = {};
try { saved = { name: localStorage.getItem("chat.name"), room: localStorage.getItem("chat.room") }; }
catch (e) { /* storage may be off */ }
el.name.value = params.get("name") || saved.name || "";
el.room.value = params.get("room") || saved.room || "lobby";
// A token in the address (`?token=`) is read once and taken out of the address
// bar and the history at once, as the dashboard does with `?key=`; it is kept
// for this tab only (sessionStorage), so a reload still joins.
let storedToken = "";
try { storedToken = sessionStorage.getItem(TOKEN_STORE) || ""; } catch (e) { /* off */ }
el.token.value = params.get("token") || storedToken;
if (params.has("token")) {
  const rest = new URLSearchParams(location.search);
  rest.delete("token");
  const query = rest.toString();
  history.replaceState(null, "", location.pathname + (query ? "?" + query : "") + location.hash);
}
tokenChanged();
updateCompose();
if (params.get("room") && (params.get("name") || el.token.value)) el.join.requestSubmit();
else (el.name.value ? el.room : el.name).focus();

// -- moderation ------------------------------------------------------------------
// A ban or mute notice, the slow-mode wait, and for moderators (a token whose
// `moderate` claim grants the room) "Ban author" / "Mute author" in each
// message's menu. Kept here in one block.

function slowMode(err) {
  const every = Number(err.detail?.slow_mode) || 0;
  rateLimited(Number(err.retryAfter) || 1,
              `Slow mode is on in ${s.room}: one message every ${every} s.`, "slow_mode");
}

function restricted(err) {
  if (err.code === "banned") {
    stop(`Banned from ${s.room}`);
    notice(`You are banned from ${s.room}: you cannot read or post here.`, "banned");
  } else {
    notice(`You are muted in ${s.room}: you can read, but not post or type.`, "muted");
  }
}

function moderates(room) {
  const patterns = tokenClaims(s.token).moderate;
  if (!Array.isArray(patterns)) return false;
  return patterns.some((p) => typeof p === "string" &&
    (p.endsWith("*") ? room.startsWith(p.slice(0, -1)) : p === room));
}

function moderationMenu(li, m) {
  if (!s.token || !m.author || m.author === s.name || !moderates(s.room)) return;
  const menu = document.createElement("details");
  menu.className = "msg-menu";
  const label = document.createElement("summary");
  label.textContent = "⋯";
  label.setAttribute("aria-label", `Actions for ${m.author}'s message`);
  menu.append(label);
  for (const [action, text] of [["ban", "Ban author"], ["mute", "Mute author"]]) {
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.action = action;
    button.textContent = text;
    button.addEventListener("click", () => {
      menu.open = false;
      s.client[action](s.room, m.author, { reason: `from message ${m.seq}` }).then(
        () => notice(`${m.author} was ${action === "ban" ? "banned" : "muted"}.`, "moderated"),
        (err) => notice(`Could not ${action} ${m.author}: ${err.message}`, "error"),
      );
    });
    menu.append(button);
  }
  li.querySelector(".meta").append(" ", menu);
}
