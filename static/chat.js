// The browser chat client: history over HTTP, live messages and publishing
// over one WebSocket, resumed with `since` after every drop.
//
// One rule keeps the list exact: a message is rendered only if its seq is one
// more than the last one rendered (`lastSeq`). Older seqs are duplicates and
// are dropped; a jump asks the server to resend from `lastSeq`.
//
// State is exposed in the DOM for people and tests alike: #status carries
// data-state (idle, connecting, connected, reconnecting, refused), every
// rendered message carries data-seq, and #messages carries data-last-seq.
//
// With sign-in (auth mode) the page needs a token: `?token=` or one pasted in
// the join form; the name is then the token's `sub`. A 401 or 403 (the token
// missing, expired or not granting the room) is final: the page stops
// retrying, says why and asks for a token, instead of knocking forever.
"use strict";

(function () {
  const MAX_TEXT = 4000;
  const ROOM_RE = /^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$/;
  const PAGE = 50;
  const PING_EVERY = 20000; // ms of silence before we ping
  const DEAD_AFTER = 45000; // ms of silence before the socket is given up
  // A refused subscribe that no retry can fix (unauthorized and forbidden: see refuse()).
  const FATAL = new Set(["invalid_request", "not_found"]);

  const $ = (id) => document.getElementById(id);
  const el = {
    status: $("status"), join: $("join"), name: $("name"), room: $("room"),
    token: $("token"), joinError: $("join-error"), title: $("room-title"), older: $("older"),
    list: $("messages"), presence: $("presence"), presenceList: $("presence-list"),
    presenceCount: $("presence-count"), notice: $("notice"), compose: $("compose"),
    text: $("text"), send: $("send"), counter: $("counter"),
  };
  const params = new URLSearchParams(location.search);

  const s = {
    gen: 0, room: "", name: "", token: "", ws: null, subscribed: false, resyncing: false,
    lastSeq: 0, firstSeq: 0, loaded: false, attempt: 0, timer: null,
    lastFrameAt: 0, refs: new Map(), nextRef: 1, blockedUntil: 0, presence: new Map(),
    tokenName: "",
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

  function headers() {
    return s.token ? { Authorization: "Bearer " + s.token } : {};
  }

  // The token's `sub`, for showing who we are (the server verifies the token;
  // this only reads it).
  function tokenSub(tok) {
    try {
      const b64 = tok.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
      const sub = JSON.parse(new TextDecoder().decode(bytes)).sub;
      return typeof sub === "string" ? sub : "";
    } catch (e) {
      return "";
    }
  }

  // A 401 or 403: retrying with the same credentials cannot help.
  class Refused extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  function errorOf(r) {
    const message = (r.body && r.body.error && r.body.error.message) || "HTTP " + r.status;
    return r.status === 401 || r.status === 403 ? new Refused(r.status, message) : new Error(message);
  }

  function chars(text) {
    return Array.from(text).length; // code points, as the server counts them
  }

  function wsUrl() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    // With a token the server knows who this is; in open mode `user` names us in presence.
    return scheme + "//" + location.host + "/v1/ws" +
      (s.token ? "?token=" + encodeURIComponent(s.token)
             : (s.name ? "?user=" + encodeURIComponent(s.name) : ""));
  }

  async function getJSON(path) {
    const resp = await fetch(path, { headers: headers(), cache: "no-store" });
    let body = null;
    try { body = await resp.json(); } catch (e) { /* not JSON */ }
    return { ok: resp.ok, status: resp.status, body };
  }

  // -- rendering -----------------------------------------------------------------

  function messageItem(m) {
    const li = document.createElement("li");
    li.dataset.seq = String(m.seq);
    li.dataset.id = m.id || "";
    if (m.author === s.name) li.className = "mine";
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
    body.textContent = m.text; // text, never HTML
    li.append(head, body);
    showChange(li, m);
    return li;
  }

  // -- edits, deletes, typing, unread (docs/API.md, "Chat") --------------------------

  // A changed message carries version, edited_at, deleted_at; a tombstone has no text.
  function showChange(li, m) {
    li.dataset.version = String(m.version || 1);
    li.classList.toggle("edited", Boolean(m.edited_at) && !m.deleted_at);
    li.classList.toggle("deleted", Boolean(m.deleted_at));
    li.querySelector(".text").textContent = m.deleted_at ? "This message was deleted." : m.text;
    let mark = li.querySelector(".edited-mark");
    if (m.edited_at && !m.deleted_at && !mark) {
      mark = document.createElement("span");
      mark.className = "edited-mark";
      mark.textContent = " (edited)";
      li.querySelector(".meta").append(mark);
    } else if (mark && (!m.edited_at || m.deleted_at)) mark.remove();
  }

  function changed(f) {
    if (f.room !== s.room) return;
    if (typeof f.change === "number") s.lastChange = Math.max(s.lastChange || 0, f.change);
    const m = f.message;
    const li = el.list.querySelector(`li[data-seq="${m.seq}"]`);
    // Replace the shown message, unless it already shows this version or a later one.
    if (li && Number(li.dataset.version || 1) <= (m.version || 1)) showChange(li, m);
  }

  const typingEl = document.createElement("p");
  typingEl.id = "typing";
  typingEl.className = "typing";
  typingEl.setAttribute("aria-live", "polite");
  el.list.after(typingEl);
  const typists = new Map(); // user -> when their notice expires (ms)
  let lastTypingSent = 0;

  function renderTyping() {
    const now = Date.now();
    for (const [user, until] of typists) if (until <= now) typists.delete(user);
    const names = [...typists.keys()].sort();
    typingEl.dataset.users = names.join(",");
    typingEl.textContent = !names.length ? "" :
      names.length === 1 ? `${names[0]} is typing…` : `${names.join(", ")} are typing…`;
  }
  setInterval(renderTyping, 500);

  function typingFrame(f) {
    if (f.room !== s.room || !f.user) return;
    typists.set(f.user, Date.now() + 3000);
    renderTyping();
  }

  function typed() {
    // The server passes one notice per user and room every 2 s; send no more than that.
    if (!s.subscribed || !s.ws || !el.text.value.trim()) return;
    if (Date.now() - lastTypingSent < 2000) return;
    lastTypingSent = Date.now();
    s.ws.send(JSON.stringify({ type: "typing", room: s.room }));
  }

  const unreadEl = document.createElement("span");
  unreadEl.id = "unread";
  unreadEl.className = "count";
  el.title.append(" ", unreadEl);
  let readTimer = null;

  function renderUnread() {
    const n = Math.max(0, s.lastSeq - (s.readSeq || 0));
    unreadEl.dataset.unread = String(n);
    unreadEl.textContent = n ? `(${n} unread)` : "";
    document.title = (n ? `(${n}) ` : "") + (s.room ? `# ${s.room} · chat-gateway` : "chat-gateway");
  }

  // What is on screen while the page is visible counts as read: tell the server.
  function markRead() {
    if (!s.subscribed || !s.ws || document.hidden || !nearBottom()) { renderUnread(); return; }
    if (s.lastSeq <= (s.readSeq || 0) || readTimer) { renderUnread(); return; }
    readTimer = setTimeout(() => {
      readTimer = null;
      if (s.ws && s.ws.readyState === WebSocket.OPEN && s.lastSeq > (s.readSeq || 0)) {
        s.ws.send(JSON.stringify({ type: "read", room: s.room, seq: s.lastSeq }));
      }
    }, 300);
    renderUnread();
  }
  async function loadRead(gen) {
    // The stored position, so the count survives a reload (open mode: ours by name).
    try {
      const q = token ? "" : "?user=" + encodeURIComponent(s.name);
      const r = await getJSON(`/v1/rooms/${encodeURIComponent(s.room)}/read${q}`);
      if (gen !== s.gen || !r.ok || !r.body) return;
      s.readSeq = Math.max(s.readSeq || 0, r.body.seq || 0);
      renderUnread();
    } catch (e) { /* a server without read positions */ }
  }
  document.addEventListener("visibilitychange", markRead);
  el.list.addEventListener("scroll", markRead);

  function nearBottom() {
    const l = el.list;
    return l.scrollHeight - l.scrollTop - l.clientHeight < 80;
  }

  // The one door into the list: in order, once.
  function accept(m) {
    if (m.seq <= s.lastSeq) return; // already shown
    if (m.seq !== s.lastSeq + 1) { resync(); return; }
    const stick = nearBottom();
    el.list.append(messageItem(m));
    s.lastSeq = m.seq;
    if (!s.firstSeq) s.firstSeq = m.seq;
    el.list.dataset.lastSeq = String(s.lastSeq);
    if (stick) el.list.scrollTop = el.list.scrollHeight;
    markRead();
  }

  function subscribeFrame() {
    // Resume changes too once a change position is known (the first subscribe learns it).
    const f = { type: "subscribe", room: s.room, since: s.lastSeq };
    if (typeof s.lastChange === "number") f.changes_since = s.lastChange;
    return f;
  }

  function resync() {
    // A jump past lastSeq: ask for everything after it again (frames before
    // the new `subscribed` that do not fit are ignored by accept()).
    if (s.resyncing || !s.ws || s.ws.readyState !== WebSocket.OPEN) return;
    s.resyncing = true;
    s.ws.send(JSON.stringify(subscribeFrame()));
  }

  async function loadHistory(gen) {
    const r = await getJSON(`/v1/rooms/${encodeURIComponent(s.room)}/messages?limit=${PAGE}`);
    if (gen !== s.gen) return;
    if (!r.ok) throw errorOf(r);
    const msgs = r.body.messages || [];
    if (msgs.length) {
      s.lastSeq = msgs[0].seq - 1; // start the chain at the page's first message
      msgs.forEach(accept);
    }
    el.older.hidden = !r.body.has_more;
    s.loaded = true;
    el.list.scrollTop = el.list.scrollHeight;
  }

  async function loadOlder() {
    if (!s.firstSeq || s.firstSeq <= 1) { el.older.hidden = true; return; }
    const gen = s.gen;
    const r = await getJSON(`/v1/rooms/${encodeURIComponent(s.room)}/messages?limit=${PAGE}&before=${s.firstSeq}`);
    if (gen !== s.gen || !r.ok) return;
    const msgs = (r.body.messages || []).filter((m) => m.seq < s.firstSeq);
    const height = el.list.scrollHeight;
    const frag = document.createDocumentFragment();
    msgs.forEach((m) => frag.append(messageItem(m)));
    el.list.prepend(frag);
    if (msgs.length) s.firstSeq = msgs[0].seq;
    el.list.scrollTop += el.list.scrollHeight - height;
    el.older.hidden = !r.body.has_more || s.firstSeq <= 1;
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
      const r = await getJSON(`/v1/rooms/${encodeURIComponent(s.room)}/presence`);
      if (gen !== s.gen || !r.ok || !r.body) return;
      const users = Array.isArray(r.body) ? r.body : (r.body.users || r.body.present || []);
      s.presence = new Map(users.map((u) => [userName(u), 1]).filter(([n]) => n));
      renderPresence();
    } catch (e) { /* no presence on this server */ }
  }

  function presenceFrame(f) {
    const name = userName(f.user);
    if (!name) return;
    if (f.action === "join") s.presence.set(name, 1);
    else if (f.action === "leave") s.presence.delete(name);
    renderPresence();
  }

  // -- the socket ------------------------------------------------------------------

  function connect(gen) {
    if (gen !== s.gen) return;
    s.timer = null;
    setStatus("connecting", s.attempt ? `Reconnecting to ${s.room}…` : `Connecting to ${s.room}…`);
    // A reconnect first asks over HTTP whether the credentials still hold: a
    // refused WebSocket upgrade shows the page no status, this does.
    const ready = s.loaded ? probe() : loadHistory(gen);
    ready.then(() => {
      if (gen !== s.gen) return;
      const ws = new WebSocket(wsUrl());
      s.ws = ws;
      s.subscribed = false;
      ws.onopen = () => {
        if (gen !== s.gen) return;
        s.lastFrameAt = Date.now();
        ws.send(JSON.stringify(subscribeFrame()));
      };
      ws.onmessage = (ev) => { if (gen === s.gen) frame(JSON.parse(ev.data)); };
      ws.onclose = (ev) => { if (gen === s.gen && s.ws === ws) dropped(gen, ev.code); };
    }, (err) => {
      if (gen !== s.gen) return;
      if (err instanceof Refused) refuse(err.status, err.message);
      else retry(gen, 0, err instanceof TypeError ? "the server cannot be reached"
                                                  : "history unavailable: " + err.message);
    });
  }

  async function probe() {
    const r = await getJSON(`/v1/rooms/${encodeURIComponent(s.room)}/messages?after=${s.lastSeq}&limit=1`);
    if (r.status === 401 || r.status === 403) throw errorOf(r);
  }

  // Stop for good (until the next join) and say what would let us in.
  function refuse(status, message) {
    s.gen += 1;
    clearTimeout(s.timer);
    s.timer = null;
    const ws = s.ws;
    s.ws = null;
    if (ws) ws.close(1000);
    s.subscribed = false;
    s.refs.clear();
    updateCompose();
    let text;
    if (status === 403) {
      text = `Your token does not let you into ${s.room} (${message}). ` +
        "Paste a token that grants it, or pick another room.";
    } else if (s.token) {
      text = `Your token was not accepted (${message}). Paste a new token and join again.`;
    } else {
      text = `This server asks you to sign in (${message}). Paste a token and join again.`;
    }
    setStatus("refused", `Cannot join ${s.room}`);
    notice(text, "error");
    el.token.setAttribute("aria-invalid", "true");
    el.token.focus();
  }

  function dropped(gen, code) {
    s.ws = null;
    s.subscribed = false;
    updateCompose();
    if (s.refs.size) {
      const n = s.refs.size;
      notice(`The connection dropped before ${n} message${n > 1 ? "s were" : " was"} confirmed. ` +
             "Check that it appears before sending it again.", "warning");
      s.refs.clear();
    }
    retry(gen, code, code === 1001 ? "the server is restarting" :
                     code === 1013 ? "the connection fell behind" : "the connection was lost");
  }

  function retry(gen, code, why) {
    // Exponential backoff with jitter; a server going away (1001) is retried at once.
    const base = code === 1001 && s.attempt === 0 ? 200 : Math.min(8000, 500 * 2 ** s.attempt);
    const delay = Math.round(base * (0.6 + Math.random() * 0.4));
    s.attempt += 1;
    clearTimeout(s.timer);
    s.timer = setTimeout(() => connect(gen), delay);
    const secs = Math.max(1, Math.round(delay / 1000));
    setStatus("reconnecting", `Disconnected (${why}). Retrying in ${secs} s…`);
  }

  function frame(f) {
    s.lastFrameAt = Date.now();
    switch (f.type) {
      case "subscribed":
        if (f.room !== s.room) return;
        s.subscribed = true;
        s.resyncing = false;
        if (typeof s.lastChange !== "number" && typeof f.change === "number") s.lastChange = f.change;
        markRead();
        s.attempt = 0;
        setStatus("connected", `Connected to ${s.room}`);
        if (el.notice.dataset.kind === "connection") notice("");
        updateCompose();
        loadPresence(s.gen);
        break;
      case "message":
        if (f.room === s.room) accept(f.message);
        break;
      case "ack":
        // The message itself arrives as a `message` frame, in order.
        s.refs.delete(f.ref);
        if (f.read && f.read.room === s.room) { s.readSeq = f.read.seq; renderUnread(); }
        break;
      case "message_updated":
      case "message_deleted":
        changed(f);
        break;
      case "typing":
        typingFrame(f);
        break;
      case "error":
        refused(f);
        break;
      case "presence":
        if (f.room === s.room) presenceFrame(f);
        break;
      default: // pong, event, unsubscribed: nothing to show
    }
  }

  function refused(f) {
    const text = f.ref !== undefined ? s.refs.get(f.ref) : undefined;
    if (f.ref !== undefined) s.refs.delete(f.ref);
    if (text !== undefined && !el.text.value) { el.text.value = text; updateCompose(); }
    if (f.code === "rate_limited") {
      rateLimited(Number(f.retry_after) || 1);
    } else if (text !== undefined) {
      notice(`Your message was not sent: ${f.message}`, "error");
    } else if (!s.subscribed) {
      // The subscription itself was refused.
      if (f.code === "unauthorized" || f.code === "forbidden") {
        refuse(f.code === "forbidden" ? 403 : 401, f.message);
      } else if (FATAL.has(f.code)) {
        s.gen += 1; // stop retrying
        if (s.ws) s.ws.close(1000);
        setStatus("refused", `Cannot join ${s.room}: ${f.message}`);
      } else {
        notice(`The server could not serve ${s.room} (${f.message}); retrying.`, "connection");
        if (s.ws) s.ws.close(4000);
      }
    } else {
      notice(f.message, "error");
    }
  }

  function rateLimited(seconds) {
    s.blockedUntil = Date.now() + seconds * 1000;
    const show = () => {
      const left = Math.ceil((s.blockedUntil - Date.now()) / 1000);
      if (left <= 0) {
        notice("");
        updateCompose();
        return;
      }
      el.notice.hidden = false;
      el.notice.dataset.kind = "rate";
      el.notice.dataset.retryAfter = String(left);
      el.notice.textContent = `You're sending messages faster than this room allows. ` +
        `You can send again in ${left} s; your message is kept.`;
    };
    notice("");
    show();
    noticeTimer = setInterval(show, 250);
    updateCompose();
  }

  // Keep an idle socket honest: ping after silence, give up after more.
  setInterval(() => {
    const ws = s.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) return;
    const quiet = Date.now() - s.lastFrameAt;
    if (quiet > DEAD_AFTER) ws.close(4001);
    else if (quiet > PING_EVERY) ws.send(JSON.stringify({ type: "ping" }));
  }, 5000);

  window.addEventListener("online", () => {
    if (s.timer && s.room) { clearTimeout(s.timer); connect(s.gen); }
  });

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

  function send() {
    const text = el.text.value.trim();
    if (!text || chars(text) > MAX_TEXT) { updateCompose(); return; }
    if (!s.subscribed || !s.ws) {
      notice("Not connected yet: your message is kept and can be sent once connected.", "connection");
      return;
    }
    if (Date.now() < s.blockedUntil) return;
    const ref = "c" + s.nextRef++;
    const f = { type: "publish", room: s.room, text, ref };
    if (!s.token) f.author = s.name;
    s.refs.set(ref, text);
    s.ws.send(JSON.stringify(f));
    el.text.value = "";
    if (el.notice.dataset.kind === "error") notice("");
    updateCompose();
  }

  el.compose.addEventListener("submit", (ev) => { ev.preventDefault(); send(); });
  el.text.addEventListener("input", updateCompose);
  el.text.addEventListener("input", typed);
  el.text.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); send(); }
  });
  el.older.addEventListener("click", loadOlder);

  // -- joining -----------------------------------------------------------------------

  function join(room, name, tok) {
    s.gen += 1;
    const old = s.ws;
    s.ws = null;
    if (old) old.close(1000);
    clearTimeout(s.timer);
    Object.assign(s, { room, name, token: tok, subscribed: false, resyncing: false, lastSeq: 0,
                       firstSeq: 0, loaded: false, attempt: 0, presence: new Map() });
    Object.assign(s, { lastChange: null, readSeq: 0 });
    typists.clear();
    renderTyping();
    s.refs.clear();
    el.list.replaceChildren();
    el.list.dataset.lastSeq = "0";
    el.older.hidden = true;
    el.presence.hidden = true;
    el.title.textContent = `# ${room}`;
    el.title.append(" ", unreadEl);
    renderUnread();
    notice("");
    el.token.setAttribute("aria-invalid", "false");
    try {
      if (!tok) localStorage.setItem("chat.name", name);
      localStorage.setItem("chat.room", room);
    } catch (e) { /* storage may be off */ }
    const q = new URLSearchParams(location.search);
    q.set("room", room);
    if (tok) {
      // The name comes from the token. A pasted token is not written into the
      // address (it would stay in the history); a stale one there is dropped.
      q.delete("name");
      if (q.get("token") !== tok) q.delete("token");
    } else {
      q.set("name", name);
      q.delete("token");
    }
    history.replaceState(null, "", "?" + q.toString());
    updateCompose();
    loadRead(s.gen);
    connect(s.gen);
  }

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
  el.token.value = params.get("token") || "";
  tokenChanged();
  updateCompose();
  if (params.get("room") && (params.get("name") || el.token.value)) el.join.requestSubmit();
  else (el.name.value ? el.room : el.name).focus();
})();
