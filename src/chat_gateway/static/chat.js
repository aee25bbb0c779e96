// The browser chat client, built on the gateway's JavaScript client (served at
// /sdk/chat-gateway.js, the module in clients/js). The client keeps one WebSocket
// for every room joined: it reconnects with backoff, resumes each room from the
// last seq it delivered, delivers every message once and in order, and sends each
// message with an idempotency key until it is acknowledged. This page renders.
//
// Rooms: the rooms joined are listed at the side (kept in localStorage), each with
// its unread count (the room's latest seq after the read position) and, where the
// server counts them (`GET /v1/read` gives `mentions`), a mention badge. One room
// is shown at a time; every joined room stays subscribed.
//
// Joining a room: subscribe (the server answers with the room's latest seq), then
// load the page of history up to that seq; later messages arrive live after it.
//
// State is exposed in the DOM for people and tests alike: #status carries
// data-state (idle, connecting, connected, reconnecting, refused) for the room
// shown, every rendered message carries data-seq, #messages carries
// data-last-seq, and each room of the list carries data-unread / data-mentions.
//
// Text from a message is only ever put in the page as text nodes; links are
// <a> elements made here around the http(s) addresses found in the text.
//
// The message box: a text leaves it only once the server has stored it. While a
// post is in flight the box is read-only; a refused post (rate limit, slow mode,
// mute, the publish hook) stays in the box with the reason shown, so a refused
// text is never merged with the next one.
//
// With sign-in (auth mode) the page needs a token: `?token=` or one pasted in
// the join dialog; the name is then the token's `sub`. A 401 (the token missing
// or expired) is final: the page stops retrying, says why and asks for a token.
import { Client, backoff } from "/sdk/chat-gateway.js";

const MAX_TEXT = 4000;
const ROOM_RE = /^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$/;
const PAGE = 50;
const TYPING_EVERY = 2000; // ms between two typing frames of ours
const TYPING_SHOWN = 3000; // ms a "typing" notice stays without a new frame
const GROUP_MS = 5 * 60 * 1000; // one author's messages within this are one group
const LONG_PRESS = 450; // ms a touch holds a message to show its actions
const QUICK = ["👍", "❤️", "😂", "🎉", "👀", "✅"];
// A refused subscribe that no retry can fix (unauthorized and forbidden: see refuse()).
const FATAL = new Set(["invalid_request", "not_found"]);
const ROOMS_STORE = "chat.rooms";
const THEME_STORE = "chat.theme";
const TOKEN_STORE = "chat.token";
const URL_RE = /\bhttps?:\/\/[^\s<>"'`]+/gi;

const $ = (id) => document.getElementById(id);
const el = {
  app: $("app"), status: $("status"), dialog: $("join-dialog"), join: $("join"),
  name: $("name"), room: $("room"), token: $("token"), joinError: $("join-error"),
  joinCancel: $("join-cancel"), title: $("room-title"), older: $("older"),
  timeline: $("timeline"), list: $("messages"), empty: $("empty"), presence: $("presence"),
  presenceList: $("presence-list"), presenceCount: $("presence-count"), notice: $("notice"),
  compose: $("compose"), text: $("text"), send: $("send"), counter: $("counter"),
  typing: $("typing"), rooms: $("rooms"), noRooms: $("no-rooms"), addRoom: $("add-room"),
  sidebar: $("sidebar"), scrim: $("scrim"), openRooms: $("open-rooms"), leave: $("leave"),
  me: $("me"), meName: $("me-name"), meAvatar: $("me-avatar"), theme: $("theme"),
  thread: $("thread"), threadParent: $("thread-parent"), threadReplies: $("thread-replies"),
  threadCount: $("thread-count"), threadCompose: $("thread-compose"),
  threadText: $("thread-text"), threadError: $("thread-error"), threadClose: $("thread-close"),
  unread: document.createElement("span"),
};
el.unread.id = "unread";
el.unread.className = "unread-pill";
const params = new URLSearchParams(location.search);

const s = {
  gen: 0, name: "", token: "", client: null, active: "", rooms: new Map(),
  conn: { state: "idle", text: "Not connected" }, stopped: "", blockedUntil: 0,
  lastTyping: 0, tokenName: "", thread: null, positions: false,
};

function newRoom(name) {
  return {
    name, msgs: [], bySeq: new Map(), lastSeq: 0, firstSeq: 0, latest: 0, loaded: false,
    hasMore: false, subscribed: false, joining: false, retries: 0, timer: null, readSeq: 0,
    readOff: false, readTimer: null, mentions: 0, presence: new Map(), typers: new Map(),
    users: new Set(), refused: "", draft: "", sending: false,
  };
}

const active = () => s.rooms.get(s.active);

// -- small helpers -----------------------------------------------------------

let noticeTimer = null;
function notice(text, kind) {
  clearInterval(noticeTimer);
  noticeTimer = null;
  el.notice.hidden = !text;
  el.notice.textContent = text || "";
  el.notice.dataset.kind = kind || "";
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

function tokenSub(tok) {
  const sub = tokenClaims(tok).sub;
  return typeof sub === "string" ? sub : "";
}

function chars(text) {
  return Array.from(text).length; // code points, as the server counts them
}

function store(kind, key, value) {
  try {
    const area = kind === "session" ? sessionStorage : localStorage;
    if (value === null) area.removeItem(key);
    else area.setItem(key, value);
  } catch (e) { /* storage may be off */ }
}

function stored(kind, key) {
  try {
    return (kind === "session" ? sessionStorage : localStorage).getItem(key) || "";
  } catch (e) {
    return "";
  }
}

function button(label, cls, onClick, aria) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = cls;
  b.textContent = label;
  if (aria) b.setAttribute("aria-label", aria);
  if (onClick) b.addEventListener("click", onClick);
  return b;
}

// Two letters for an avatar: the initials of a name's first two parts, else its
// first two characters.
export function initials(name) {
  const parts = String(name).split(/[\s._@-]+/).filter(Boolean);
  const letters = parts.length > 1 ? [Array.from(parts[0])[0], Array.from(parts[1])[0]]
    : Array.from(parts[0] || "?").slice(0, 2);
  return letters.join("").toUpperCase();
}

function hue(name) {
  let h = 2166136261; // FNV-1a: short names that differ by a letter land apart
  for (const c of String(name)) h = Math.imul(h ^ c.codePointAt(0), 16777619) >>> 0;
  return String(h % 8);
}

// Icons: a few strokes of SVG made here (nothing is fetched).
const ICONS = {
  react: ["M8 14s1.5 2 4 2 4-2 4-2", "M9 9h.01", "M15 9h.01", "circle:12,12,10"],
  reply: ["M9 17l-5-5 5-5", "M20 18v-2a4 4 0 0 0-4-4H4"],
  edit: ["M12 20h9", "M16.5 3.5a2.12 2.12 0 0 1 3 3L7 19l-4 1 1-4Z"],
  delete: ["M3 6h18", "M8 6V4h8v2", "M19 6l-1 14H6L5 6", "M10 11v6", "M14 11v6"],
  ban: ["circle:12,12,10", "M4.9 4.9l14.2 14.2"],
  mute: ["M11 5 6 9H2v6h4l5 4z", "M23 9l-6 6", "M17 9l6 6"],
  send: ["M22 2 11 13", "M22 2l-7 20-4-9-9-4z"],
  menu: ["M3 6h18", "M3 12h18", "M3 18h18"],
  close: ["M18 6 6 18", "M6 6l12 12"],
  plus: ["M12 5v14", "M5 12h14"],
  leave: ["M9 21H5a2 2 0 0 1-2-2V5a2 2 0 0 1 2-2h4", "M16 17l5-5-5-5", "M21 12H9"],
  system: ["circle:12,12,9", "fill:M12 3a9 9 0 0 0 0 18z"],
  dark: ["M21 12.8A9 9 0 1 1 11.2 3a7 7 0 0 0 9.8 9.8z"],
  light: ["circle:12,12,4", "M12 2v2", "M12 20v2", "M4.9 4.9l1.4 1.4", "M17.7 17.7l1.4 1.4",
          "M2 12h2", "M20 12h2", "M4.9 19.1l1.4-1.4", "M17.7 6.3l1.4-1.4"],
};
const SVG = "http://www.w3.org/2000/svg";

function icon(name) {
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", "0 0 24 24");
  svg.setAttribute("class", "icon");
  svg.setAttribute("aria-hidden", "true");
  for (const part of ICONS[name] || []) {
    let shape;
    if (part.startsWith("circle:")) {
      const [cx, cy, r] = part.slice(7).split(",");
      shape = document.createElementNS(SVG, "circle");
      Object.entries({ cx, cy, r }).forEach(([k, v]) => shape.setAttribute(k, v));
    } else {
      shape = document.createElementNS(SVG, "path");
      shape.setAttribute("d", part.replace(/^fill:/, ""));
      if (part.startsWith("fill:")) shape.setAttribute("class", "filled");
    }
    svg.append(shape);
  }
  return svg;
}

function iconButton(name, cls, onClick, aria) {
  const b = button("", cls, onClick, aria);
  b.append(icon(name));
  return b;
}

function avatar(name) {
  const a = document.createElement("span");
  a.className = "avatar";
  a.dataset.c = hue(name);
  a.setAttribute("aria-hidden", "true");
  a.textContent = initials(name);
  return a;
}

// The text with each http(s) address as a link, made of text nodes and <a>
// elements only: nothing of the text is ever parsed as HTML.
export function linkified(text) {
  const frag = document.createDocumentFragment();
  let at = 0;
  for (const match of text.matchAll(URL_RE)) {
    let url = match[0];
    // punctuation closing a sentence or a bracket is not part of the address
    while (/[.,;:!?)\]}]$/.test(url)) {
      if (url.endsWith(")") && (url.match(/\(/g) || []).length >= (url.match(/\)/g) || []).length) break;
      url = url.slice(0, -1);
    }
    const start = match.index;
    if (start > at) frag.append(mentioned(text.slice(at, start)));
    const a = document.createElement("a");
    a.href = url;
    a.rel = "noopener noreferrer";
    a.target = "_blank";
    a.textContent = url;
    frag.append(a);
    at = start + url.length;
  }
  if (at < text.length) frag.append(mentioned(text.slice(at)));
  return frag;
}

// Text with each `@name` in a <span class="mention"> (text nodes only).
function mentioned(text) {
  const frag = document.createDocumentFragment();
  let at = 0;
  for (const match of text.matchAll(/(^|[^\w@])(@[A-Za-z0-9][\w.:-]{0,63})/g)) {
    const start = match.index + match[1].length;
    const name = match[2].replace(/[.:-]+$/, "");
    if (start > at) frag.append(document.createTextNode(text.slice(at, start)));
    const span = document.createElement("span");
    span.className = name.slice(1) === s.name ? "mention me" : "mention";
    span.textContent = name;
    frag.append(span);
    at = start + name.length;
  }
  if (at < text.length) frag.append(document.createTextNode(text.slice(at)));
  return frag;
}

// -- times and days -------------------------------------------------------------

function when(m) {
  const d = new Date(m.created_at);
  return isNaN(d) ? null : d;
}

function dayKey(d) {
  return d ? `${d.getFullYear()}-${d.getMonth()}-${d.getDate()}` : "";
}

function dayLabel(d) {
  const today = new Date();
  const yesterday = new Date(today.getFullYear(), today.getMonth(), today.getDate() - 1);
  if (dayKey(d) === dayKey(today)) return "Today";
  if (dayKey(d) === dayKey(yesterday)) return "Yesterday";
  return d.toLocaleDateString([], {
    weekday: "long", month: "long", day: "numeric",
    year: d.getFullYear() === today.getFullYear() ? undefined : "numeric",
  });
}

function clock(d) {
  return d ? d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }) : "";
}

// Whether `m` continues `prev`'s group: same author, same day, within GROUP_MS,
// and not a reply (a reply shows what it answers, under its author's name).
export function continues(prev, m) {
  if (!prev || prev.author !== m.author || m.reply_to) return false;
  const a = when(prev);
  const b = when(m);
  return Boolean(a && b && dayKey(a) === dayKey(b) && b - a >= 0 && b - a < GROUP_MS);
}

function separator(d) {
  const li = document.createElement("li");
  li.className = "day";
  li.setAttribute("role", "separator");
  li.dataset.day = dayKey(d);
  const label = document.createElement("span");
  label.textContent = dayLabel(d);
  li.setAttribute("aria-label", label.textContent);
  li.append(label);
  return li;
}

// Where the messages not read yet begin, when a room with unread ones is opened.
function newLine() {
  const li = document.createElement("li");
  li.className = "new-line";
  li.setAttribute("role", "separator");
  li.setAttribute("aria-label", "New messages");
  const label = document.createElement("span");
  label.textContent = "New";
  li.append(label);
  return li;
}

// -- rendering a message -----------------------------------------------------------

function mentionsMe(m) {
  return Boolean(s.name && m.author !== s.name && Array.isArray(m.mentions) &&
                 m.mentions.includes(s.name));
}

function replyCount(r, m) {
  if (m.thread && typeof m.thread.replies === "number") return m.thread.replies;
  let n = 0;
  for (const x of r.msgs) if (x.reply_to === m.seq) n += 1;
  return n;
}

function fillItem(li, m, cont, r = s.rooms.get(m.room)) {
  li.dataset.seq = String(m.seq);
  li.dataset.id = m.id || "";
  li.dataset.version = String(m.version || 1);
  li.dataset.author = m.author;
  li.className = "msg";
  if (cont) li.classList.add("cont");
  if (m.author === s.name) li.classList.add("mine");
  if (mentionsMe(m)) li.classList.add("mentions-me");
  const d = when(m);
  const gutter = document.createElement("div");
  gutter.className = "gutter";
  if (cont) {
    const t = document.createElement("span");
    t.className = "gutter-time";
    t.setAttribute("aria-hidden", "true");
    t.textContent = clock(d);
    gutter.append(t);
  } else {
    gutter.append(avatar(m.author));
  }
  const body = document.createElement("div");
  body.className = "body";
  const head = document.createElement("div");
  head.className = "meta";
  const who = document.createElement("span");
  who.className = "author";
  who.textContent = m.author;
  const time = document.createElement("time");
  time.dateTime = m.created_at || "";
  time.textContent = clock(d);
  if (d) time.title = d.toLocaleString();
  head.append(who, " ", time);
  body.append(head);
  if (m.reply_to && r) body.append(replyRef(r, m));
  const text = document.createElement("p");
  text.className = "text";
  if (m.deleted_at) {
    li.classList.add("deleted");
    text.textContent = "This message was deleted.";
  } else {
    text.append(linkified(m.text));
    if (m.edited_at) {
      li.classList.add("edited");
      const mark = document.createElement("span");
      mark.className = "edited-mark";
      mark.textContent = " (edited)";
      head.append(mark);
    }
  }
  body.append(text);
  if (!m.deleted_at) body.append(reactionsRow(m));
  const replies = r ? replyCount(r, m) : 0;
  if (replies > 0 && !m.deleted_at) {
    const link = button(`${replies} ${replies === 1 ? "reply" : "replies"}`, "thread-link",
                        () => openThread(m.seq, link));
    if (m.thread?.last_at) {
      const last = new Date(m.thread.last_at);
      if (!isNaN(last)) link.append(" ", Object.assign(document.createElement("span"),
        { className: "hint", textContent: `· last ${clock(last)}` }));
    }
    body.append(link);
  }
  li.replaceChildren(gutter, body);
  if (!m.deleted_at) li.append(actions(li, m));
  return li;
}

function replyRef(r, m) {
  const parent = r.bySeq.get(m.reply_to);
  const ref = button("", "reply-ref", () => openThread(m.reply_to, ref));
  ref.dataset.replyTo = String(m.reply_to);
  const arrow = document.createElement("span");
  arrow.setAttribute("aria-hidden", "true");
  arrow.textContent = "↪ ";
  const who = document.createElement("strong");
  who.textContent = parent ? parent.author : "a message";
  const snippet = document.createElement("span");
  snippet.className = "reply-snippet";
  snippet.textContent = parent ? (parent.deleted_at ? "deleted" : parent.text.slice(0, 120)) : "";
  ref.append(arrow, "replying to ", who, " ", snippet);
  return ref;
}

function reactionsRow(m) {
  const row = document.createElement("div");
  row.className = "reactions";
  for (const [reaction, info] of Object.entries(m.reactions || {})) {
    if (!info || !info.count) continue;
    const mine = Array.isArray(info.users) && info.users.includes(s.name);
    const chip = button("", "reaction", () => react(m, reaction, !mine));
    chip.dataset.reaction = reaction;
    chip.setAttribute("aria-pressed", mine ? "true" : "false");
    const who = (info.users || []).join(", ");
    chip.setAttribute("aria-label",
      `${reaction} ${info.count}${who ? ` (${who})` : ""}: ${mine ? "remove yours" : "add yours"}`);
    chip.title = who;
    const emoji = document.createElement("span");
    emoji.textContent = reaction;
    const count = document.createElement("span");
    count.className = "n";
    count.textContent = String(info.count);
    chip.append(emoji, count);
    row.append(chip);
  }
  row.hidden = !row.children.length;
  return row;
}

function moderates(room) {
  const patterns = tokenClaims(s.token).moderate;
  if (!Array.isArray(patterns)) return false;
  return patterns.some((p) => typeof p === "string" &&
    (p.endsWith("*") ? room.startsWith(p.slice(0, -1)) : p === room));
}

// The actions of a message: shown on hover, on focus (keyboard) and on a long
// press (touch).
function actions(li, m) {
  const bar = document.createElement("div");
  bar.className = "actions";
  bar.setAttribute("role", "toolbar");
  bar.setAttribute("aria-label", `Actions for ${m.author}'s message`);
  const picker = document.createElement("div");
  picker.className = "picker";
  picker.hidden = true;
  picker.setAttribute("role", "group");
  picker.setAttribute("aria-label", "Reactions");
  for (const q of QUICK) {
    picker.append(button(q, "pick", () => { picker.hidden = true; react(m, q, true); },
                         `React with ${q}`));
  }
  const reactButton = iconButton("react", "act", () => {
    picker.hidden = !picker.hidden;
    reactButton.setAttribute("aria-expanded", String(!picker.hidden));
    if (!picker.hidden) picker.querySelector("button").focus();
  }, "Add reaction");
  picker.addEventListener("keydown", (ev) => {
    if (ev.key !== "Escape") return;
    ev.stopPropagation();
    picker.hidden = true;
    reactButton.setAttribute("aria-expanded", "false");
    reactButton.focus();
  });
  reactButton.dataset.action = "react";
  reactButton.setAttribute("aria-expanded", "false");
  bar.append(reactButton, picker);
  const reply = iconButton("reply", "act", () => openThread(m.seq, reply), "Reply in thread");
  reply.dataset.action = "reply";
  bar.append(reply);
  if (m.author === s.name) {
    const edit = iconButton("edit", "act", () => startEdit(li, m), "Edit message");
    edit.dataset.action = "edit";
    const del = iconButton("delete", "act", () => {
      if (del.dataset.confirm !== "true") {
        del.dataset.confirm = "true";
        del.textContent = "Delete?";
        del.setAttribute("aria-label", "Confirm: delete this message");
        return;
      }
      s.client.delete(m.room, m.seq).then(
        (gone) => changed({ kind: "deleted", room: m.room, message: gone }),
        (err) => notice(`The message was not deleted: ${err.message}`, "error"),
      );
    }, "Delete message");
    del.dataset.action = "delete";
    del.addEventListener("blur", () => {
      del.dataset.confirm = "false";
      del.replaceChildren(icon("delete"));
      del.setAttribute("aria-label", "Delete message");
    });
    bar.append(edit, del);
  } else if (s.token && moderates(m.room)) {
    for (const [action, label] of [["ban", "Ban author"], ["mute", "Mute author"]]) {
      const b = iconButton(action, "act", () => {
        s.client[action](m.room, m.author, { reason: `from message ${m.seq}` }).then(
          () => notice(`${m.author} was ${action === "ban" ? "banned" : "muted"}.`, "moderated"),
          (err) => notice(`Could not ${action} ${m.author}: ${err.message}`, "error"),
        );
      }, label);
      b.dataset.action = action;
      b.title = label;
      bar.append(b);
    }
  }
  for (const b of bar.querySelectorAll(".act")) b.title ||= b.getAttribute("aria-label");
  return bar;
}

// Long press on a touch screen: the message's actions, until a touch elsewhere.
let pressTimer = null;
el.list.addEventListener("pointerdown", (ev) => {
  if (ev.pointerType !== "touch") return;
  const li = ev.target.closest("li.msg");
  clearTimeout(pressTimer);
  if (!li || ev.target.closest(".actions, a, button")) return;
  pressTimer = setTimeout(() => {
    for (const open of el.list.querySelectorAll("li.actions-open")) open.classList.remove("actions-open");
    li.classList.add("actions-open");
  }, LONG_PRESS);
});
for (const type of ["pointerup", "pointercancel", "pointermove"]) {
  el.list.addEventListener(type, (ev) => {
    if (type !== "pointermove" || Math.abs(ev.movementX) + Math.abs(ev.movementY) > 6) {
      clearTimeout(pressTimer);
    }
  });
}
document.addEventListener("pointerdown", (ev) => {
  if (ev.target.closest?.("li.actions-open")) return;
  for (const open of el.list.querySelectorAll("li.actions-open")) open.classList.remove("actions-open");
});
el.list.addEventListener("contextmenu", (ev) => {
  if (ev.target.closest("li.actions-open")) ev.preventDefault();
});

function react(m, reaction, add) {
  const call = add ? s.client.react(m.room, m.seq, reaction)
    : s.client.unreact(m.room, m.seq, reaction);
  call.then(
    (msg) => { if (msg && msg.seq === m.seq) reactionsChanged({ room: m.room, seq: m.seq, reactions: msg.reactions || {} }); },
    (err) => notice(`The reaction was not ${add ? "added" : "removed"}: ${err.message}`, "error"),
  );
}

// Editing in place: Enter saves, Escape (or Cancel) puts the message back.
function startEdit(li, m) {
  const text = li.querySelector(".text");
  if (!text || li.querySelector(".edit-form")) return;
  const form = document.createElement("form");
  form.className = "edit-form";
  const box = document.createElement("textarea");
  box.className = "edit-text";
  box.value = m.text;
  box.rows = Math.min(8, m.text.split("\n").length + 1);
  box.setAttribute("aria-label", "Edit message");
  const save = button("Save", "small", null);
  save.type = "submit";
  const cancel = button("Cancel", "small secondary", () => done());
  const hint = document.createElement("span");
  hint.className = "hint";
  hint.textContent = "Enter saves, Escape cancels";
  const row = document.createElement("div");
  row.className = "edit-row";
  row.append(save, cancel, hint);
  form.append(box, row);
  text.replaceWith(form);
  li.classList.add("editing");
  box.focus();
  box.setSelectionRange(box.value.length, box.value.length);
  function done() {
    const r = s.rooms.get(m.room);
    const now = r?.bySeq.get(m.seq) || m;
    const idx = r ? r.msgs.indexOf(now) : -1;
    fillItem(li, now, li.classList.contains("cont"));
    if (idx >= 0) li.querySelector("[data-action=edit]")?.focus();
  }
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const next = box.value.trim();
    if (!next || next === m.text) return done();
    if (chars(next) > MAX_TEXT) { notice(`An edit is at most ${MAX_TEXT} characters.`, "error"); return; }
    box.readOnly = true;
    s.client.edit(m.room, m.seq, next).then(
      (msg) => { changed({ kind: "updated", room: m.room, message: msg }); done(); },
      (err) => { box.readOnly = false; notice(`The edit was not saved: ${err.message}`, "error"); },
    );
  });
  box.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); form.requestSubmit(); }
    else if (ev.key === "Escape") { ev.preventDefault(); ev.stopPropagation(); done(); }
  });
}

// -- the timeline -------------------------------------------------------------------

function nearBottom() {
  const t = el.timeline;
  return t.scrollHeight - t.scrollTop - t.clientHeight < 80;
}

function showLastSeq() {
  const r = active();
  el.list.dataset.lastSeq = String(r ? r.lastSeq : 0);
  el.empty.hidden = !r || !r.loaded || r.msgs.length > 0;
}

// The list of the room shown, with a separator before each day's first message.
function renderTimeline() {
  const r = active();
  const frag = document.createDocumentFragment();
  let prev = null;
  let marked = false;
  for (const m of r ? r.msgs : []) {
    const d = when(m);
    if (!prev || dayKey(when(prev)) !== dayKey(d)) { if (d) frag.append(separator(d)); }
    if (!marked && r.newFrom && m.seq > r.newFrom && m.author !== s.name) {
      frag.append(newLine());
      marked = true;
    }
    frag.append(fillItem(document.createElement("li"), m, continues(prev, m), r));
    prev = m;
  }
  // a whole room drawn at once is not read out message by message
  el.list.setAttribute("aria-busy", "true");
  el.list.replaceChildren(frag);
  requestAnimationFrame(() => el.list.removeAttribute("aria-busy"));
  el.older.hidden = !r || !r.hasMore || r.firstSeq <= 1;
  showLastSeq();
}

function redraw(r, seq) {
  if (r.name !== s.active) return;
  const li = el.list.querySelector(`li[data-seq="${Number(seq)}"]`);
  const m = r.bySeq.get(seq);
  if (li && m) fillItem(li, m, li.classList.contains("cont"), r);
  if (s.thread && s.thread.room === r.name) renderThread();
}

function remember(r, m) {
  r.bySeq.set(m.seq, m);
  if (m.author) r.users.add(m.author);
}

// The one door into a room for live messages: the client delivers them in order
// and once; a seq at or below the last one held (one a history page already
// brought) is not added twice.
function accept(m) {
  const r = s.rooms.get(m.room);
  if (!r || m.seq <= r.lastSeq) return;
  const prev = r.msgs[r.msgs.length - 1];
  r.msgs.push(m);
  remember(r, m);
  r.lastSeq = m.seq;
  r.latest = Math.max(r.latest, m.seq);
  if (!r.firstSeq) r.firstSeq = m.seq;
  if (r.name !== s.active && m.seq > r.readSeq) {
    if (mentionsMe(m)) r.mentions += 1;
    // a message frame without its mentions: the server's count says
    else if (!Array.isArray(m.mentions) && s.name && m.text?.includes("@" + s.name)) refreshPositions();
  }
  if (r.name === s.active) {
    const stick = nearBottom();
    const d = when(m);
    if (d && (!prev || dayKey(when(prev)) !== dayKey(d))) el.list.append(separator(d));
    el.list.append(fillItem(document.createElement("li"), m, continues(prev, m), r));
    showLastSeq();
    if (stick || m.author === s.name) el.timeline.scrollTop = el.timeline.scrollHeight;
  }
  if (m.reply_to) {
    redraw(r, m.reply_to);
    if (s.thread && s.thread.room === r.name && s.thread.seq === m.reply_to) renderThread();
  }
  markRead();
  renderRooms();
}

// An edit or a delete: the message held is replaced, unless it already is this
// version or a later one (a history page may be newer than the event).
function changed(ev) {
  if (ev.kind !== "updated" && ev.kind !== "deleted") return threadChanged(ev);
  const r = s.rooms.get(ev.room);
  if (!r || !ev.message) return;
  const seq = Number(ev.message.seq);
  const held = r.bySeq.get(seq);
  if (!held || (held.version || 1) > (ev.message.version || 1)) return;
  const m = { ...held, ...ev.message };
  if (ev.kind === "deleted" && !m.deleted_at) m.deleted_at = new Date().toISOString();
  if (!ev.message.reactions && held.reactions && !m.deleted_at) m.reactions = held.reactions;
  r.msgs[r.msgs.indexOf(held)] = m;
  remember(r, m);
  redraw(r, seq);
  for (const x of r.msgs) if (x.reply_to === seq) redraw(r, x.seq);
}

function reactionsChanged(ev) {
  const r = s.rooms.get(ev.room);
  const held = r?.bySeq.get(ev.seq);
  if (!held) return;
  const m = { ...held, reactions: ev.reactions || {} };
  r.msgs[r.msgs.indexOf(held)] = m;
  remember(r, m);
  redraw(r, ev.seq);
}

// `thread_updated`: the parent's `thread` summary (servers with replies only).
function threadChanged(ev) {
  const seq = Number(ev.seq ?? ev.message?.seq);
  const thread = ev.thread ?? ev.message?.thread;
  const r = s.rooms.get(ev.room);
  const held = r?.bySeq.get(seq);
  if (!held || !thread) return;
  const m = { ...held, thread };
  r.msgs[r.msgs.indexOf(held)] = m;
  remember(r, m);
  redraw(r, seq);
}

// The latest page of history, up to the seq the subscription started after.
async function loadHistory(r, gen, upTo) {
  let page = { messages: [], has_more: false };
  if (upTo > 0) page = await s.client.history(r.name, { limit: PAGE, before: upTo + 1 });
  if (gen !== s.gen) return;
  const msgs = page.messages.filter((m) => m.seq <= upTo);
  msgs.forEach((m) => remember(r, m));
  r.msgs = [...msgs, ...r.msgs.filter((m) => m.seq > upTo)]; // live ones came meanwhile
  if (msgs.length) {
    r.firstSeq = msgs[0].seq;
    r.lastSeq = Math.max(r.lastSeq, msgs[msgs.length - 1].seq);
  } else if (!r.firstSeq) {
    r.firstSeq = upTo + 1;
  }
  r.hasMore = page.has_more;
  if (r.name === s.active) {
    renderTimeline();
    el.timeline.scrollTop = el.timeline.scrollHeight;
  }
}

async function loadOlder() {
  const r = active();
  if (!r || !r.firstSeq || r.firstSeq <= 1) { el.older.hidden = true; return; }
  const gen = s.gen;
  let page;
  try {
    page = await s.client.history(r.name, { limit: PAGE, before: r.firstSeq });
  } catch (err) {
    if (gen === s.gen) notice(`Earlier messages could not be loaded: ${err.message}`, "error");
    return;
  }
  if (gen !== s.gen) return;
  const msgs = page.messages.filter((m) => m.seq < r.firstSeq);
  msgs.forEach((m) => remember(r, m));
  r.msgs = [...msgs, ...r.msgs];
  if (msgs.length) r.firstSeq = msgs[0].seq;
  r.hasMore = page.has_more;
  if (r.name !== s.active) return;
  const height = el.timeline.scrollHeight;
  const top = el.timeline.scrollTop;
  renderTimeline();
  el.timeline.scrollTop = top + el.timeline.scrollHeight - height;
}

// -- the room list ----------------------------------------------------------------

function saveRooms() {
  store("local", ROOMS_STORE, JSON.stringify([...s.rooms.keys()]));
}

function unreadOf(r) {
  return Math.max(0, Math.max(r.latest, r.lastSeq) - r.readSeq);
}

// Each room's item is made once and updated in place, so that a keyboard's focus
// on it survives the counts changing.
const roomItems = new Map();

function roomItem(name) {
  let li = roomItems.get(name);
  if (li) return li;
  li = document.createElement("li");
  const b = button("", "room", () => { switchTo(name); closeDrawer(); el.text.focus(); });
  b.dataset.room = name;
  const hash = document.createElement("span");
  hash.className = "hash";
  hash.setAttribute("aria-hidden", "true");
  hash.textContent = "#";
  const label = document.createElement("span");
  label.className = "room-name";
  label.textContent = name;
  const mention = document.createElement("span");
  mention.className = "badge mention";
  mention.setAttribute("aria-hidden", "true");
  const unread = document.createElement("span");
  unread.className = "badge unread";
  unread.setAttribute("aria-hidden", "true");
  b.append(hash, label, mention, unread);
  li.append(b);
  roomItems.set(name, li);
  return li;
}

function renderRooms() {
  let total = 0;
  for (const name of roomItems.keys()) if (!s.rooms.has(name)) roomItems.delete(name);
  const items = [];
  for (const r of s.rooms.values()) {
    const n = r.readOff ? 0 : unreadOf(r);
    const shown = n && r.name !== s.active ? n : 0;
    total += n;
    const li = roomItem(r.name);
    const b = li.firstChild;
    b.dataset.unread = String(n);
    b.dataset.mentions = String(r.mentions);
    if (r.name === s.active) b.setAttribute("aria-current", "page");
    else b.removeAttribute("aria-current");
    b.classList.toggle("has-unread", Boolean(shown));
    if (r.refused) b.dataset.refused = "true"; else delete b.dataset.refused;
    const [mention, unread] = b.querySelectorAll(".badge");
    mention.hidden = !r.mentions;
    mention.textContent = r.mentions ? `@${r.mentions}` : "";
    unread.hidden = !shown;
    unread.textContent = shown > 99 ? "99+" : shown ? String(shown) : "";
    const said = [r.name];
    if (r.mentions) said.push(`${r.mentions} mention${r.mentions === 1 ? "" : "s"}`);
    if (shown) said.push(`${shown} unread`);
    b.setAttribute("aria-label", said.join(", "));
    items.push(li);
  }
  const same = items.length === el.rooms.children.length &&
    items.every((li, i) => el.rooms.children[i] === li);
  if (!same) el.rooms.replaceChildren(...items);
  el.noRooms.hidden = s.rooms.size > 0;
  // on a phone the list is behind the menu button: it says when other rooms have news
  let elsewhere = 0;
  let mentions = 0;
  for (const x of s.rooms.values()) {
    if (x.name === s.active) continue;
    elsewhere += x.readOff ? 0 : unreadOf(x);
    mentions += x.mentions;
  }
  el.openRooms.dataset.news = mentions ? "mention" : elsewhere ? "unread" : "";
  el.openRooms.setAttribute("aria-label", "Rooms" + (mentions ? `, ${mentions} mention${mentions === 1 ? "" : "s"}` : "") +
    (elsewhere ? `, ${elsewhere} unread elsewhere` : ""));
  const r = active();
  const n = r && !r.readOff ? unreadOf(r) : 0;
  el.unread.dataset.unread = String(n);
  el.unread.textContent = n ? `${n} unread` : "";
  el.unread.hidden = !n;
  document.title = (total ? `(${total}) ` : "") + (s.active ? `# ${s.active} · chat-gateway` : "chat-gateway");
}

function openDrawer() {
  el.app.classList.add("drawer-open");
  el.scrim.hidden = false;
  el.openRooms.setAttribute("aria-expanded", "true");
  (el.rooms.querySelector("[aria-current]") || el.sidebar.querySelector("button"))?.focus();
}

function closeDrawer() {
  if (!el.app.classList.contains("drawer-open")) return;
  el.app.classList.remove("drawer-open");
  el.scrim.hidden = true;
  el.openRooms.setAttribute("aria-expanded", "false");
}

el.openRooms.addEventListener("click", () => {
  if (el.app.classList.contains("drawer-open")) closeDrawer(); else openDrawer();
});
el.scrim.addEventListener("click", closeDrawer);
document.addEventListener("keydown", (ev) => {
  if (ev.key !== "Escape" || el.dialog.open) return;
  if (el.app.classList.contains("drawer-open")) { closeDrawer(); el.openRooms.focus(); }
  else if (!el.thread.hidden && el.thread.contains(document.activeElement)) closeThread();
});

// -- presence (rendered only where the server offers it) ------------------------

function userName(u) {
  return typeof u === "string" ? u : (u && (u.user || u.name || u.sub)) || "";
}

function renderPresence() {
  const r = active();
  if (!r || !r.presenceOn) { el.presence.hidden = true; return; }
  el.presenceList.replaceChildren(...[...r.presence.keys()].sort().map((name) => {
    const li = document.createElement("li");
    li.dataset.user = name;
    li.append(avatar(name), Object.assign(document.createElement("span"), { textContent: name }));
    return li;
  }));
  el.presenceCount.textContent = `(${r.presence.size})`;
  el.presence.hidden = false;
}

async function loadPresence(r, gen) {
  try {
    const got = await s.client.presence(r.name);
    if (gen !== s.gen) return;
    r.presence = new Map((got.users || []).map((u) => [userName(u), 1]).filter(([n]) => n));
    r.presence.forEach((_, name) => r.users.add(name));
    r.presenceOn = true;
    renderPresence();
  } catch (e) { /* no presence on this server */ }
}

function presenceChanged(ev) {
  const r = s.rooms.get(ev.room);
  const name = userName(ev.user);
  if (!r || !name) return;
  if (ev.action === "join") { r.presence.set(name, 1); r.users.add(name); }
  else if (ev.action === "leave") { r.presence.delete(name); stoppedTyping(r, name); }
  if (r.name === s.active) renderPresence();
}

// -- read positions and unread counts ----------------------------------------------

// What is on screen while the page is visible counts as read: tell the server
// (at most one request per 300 ms).
function markRead() {
  renderRooms();
  const r = active();
  if (!r || !r.subscribed || !r.loaded || r.readOff || document.hidden || !nearBottom()) return;
  if (r.lastSeq <= r.readSeq || r.readTimer) return;
  const gen = s.gen;
  r.readTimer = setTimeout(async () => {
    r.readTimer = null;
    if (gen !== s.gen || r.lastSeq <= r.readSeq) return;
    try {
      const got = await s.client.markRead(r.name, r.lastSeq);
      if (gen !== s.gen) return;
      r.readSeq = Math.max(r.readSeq, got.seq || 0);
      if (typeof got.mentions === "number") r.mentions = got.mentions;
      else if (r.readSeq >= r.latest) r.mentions = 0;
      markRead();
    } catch (err) {
      if (gen === s.gen && (err.status === 404 || err.status === 405)) r.readOff = true;
    }
  }, 300);
}

// The stored position, so the counts survive a reload.
async function loadRead(r, gen) {
  try {
    const got = await s.client.readState(r.name);
    if (gen !== s.gen) return;
    r.readSeq = Math.max(r.readSeq, got.seq || 0);
    if (typeof got.mentions === "number" && r.name !== s.active) r.mentions = got.mentions;
    renderRooms();
  } catch (err) {
    if (gen === s.gen && (err.status === 404 || err.status === 405)) r.readOff = true;
  }
}

// Every room's position and, where the server counts them, its mentions.
async function loadPositions(gen) {
  if (s.positions) return;
  s.positions = true;
  try {
    const got = await s.client.readPositions();
    if (gen !== s.gen) return;
    for (const p of got.rooms || []) {
      const r = s.rooms.get(p.room);
      if (!r) continue;
      r.readSeq = Math.max(r.readSeq, p.seq || 0);
      if (typeof p.mentions === "number" && r.name !== s.active) r.mentions = p.mentions;
    }
    renderRooms();
  } catch (e) { /* no read positions on this server */ }
}

let positionsTimer = null;
function refreshPositions() {
  clearTimeout(positionsTimer);
  positionsTimer = setTimeout(() => { s.positions = false; loadPositions(s.gen); }, 500);
}

document.addEventListener("visibilitychange", markRead);
el.timeline.addEventListener("scroll", markRead);

// -- typing ----------------------------------------------------------------------

function renderTyping() {
  const r = active();
  const names = r ? [...r.typers.keys()].sort() : [];
  el.typing.dataset.users = names.join(",");
  el.typing.textContent = !names.length ? ""
    : names.length === 1 ? `${names[0]} is typing…`
    : names.length === 2 ? `${names[0]} and ${names[1]} are typing…`
    : "Several people are typing…";
}

function someoneTyping(ev) {
  const r = s.rooms.get(ev.room);
  const name = userName(ev.user);
  if (!r || !name || name === s.name) return;
  clearTimeout(r.typers.get(name));
  r.typers.set(name, setTimeout(() => { r.typers.delete(name); renderTyping(); }, TYPING_SHOWN));
  renderTyping();
}

function stoppedTyping(r, name) {
  if (!r.typers.has(name)) return;
  clearTimeout(r.typers.get(name));
  r.typers.delete(name);
  renderTyping();
}

function clearTyping() {
  for (const r of s.rooms.values()) {
    r.typers.forEach((timer) => clearTimeout(timer));
    r.typers.clear();
  }
  renderTyping();
}

// At most one typing frame every TYPING_EVERY ms, and only with something typed.
function typing() {
  const r = active();
  if (!r || !r.subscribed || !el.text.value.trim() || Date.now() - s.lastTyping < TYPING_EVERY) return;
  s.lastTyping = Date.now();
  s.client.typing(r.name);
}

// -- the connection ---------------------------------------------------------------

function setStatus(state, text) {
  el.status.dataset.state = state;
  el.status.textContent = text;
}

// The status line speaks of the room shown.
function showStatus() {
  const r = active();
  if (s.stopped) return setStatus("refused", s.stopped);
  if (!r) return setStatus("idle", "Not connected");
  if (r.refused) return setStatus("refused", r.refused);
  if (s.conn.state === "reconnecting") return setStatus("reconnecting", s.conn.text);
  if (r.subscribed && r.loaded) return setStatus("connected", `Connected to ${r.name}`);
  setStatus("connecting", r.loaded ? `Reconnecting to ${r.name}…` : `Connecting to ${r.name}…`);
}

function why(ev) {
  const r = active();
  if (r && !r.loaded && ev.code === 1006) return "the server cannot be reached";
  return ev.code === 1001 ? "the server is restarting"
    : ev.code === 1013 ? "the connection fell behind" : "the connection was lost";
}

function listen(client, gen) {
  const on = (type, fn) => client.on(type, (ev) => { if (gen === s.gen) fn(ev); });
  on("connecting", () => { s.conn = { state: "connecting" }; showStatus(); });
  on("disconnected", (ev) => {
    for (const r of s.rooms.values()) r.subscribed = false;
    const secs = Math.max(1, Math.round((ev.delay || 0) / 1000));
    s.conn = { state: "reconnecting", text: `Disconnected (${why(ev)}). Retrying in ${secs} s…` };
    updateCompose();
    showStatus();
  });
  on("closed", (ev) => {
    if (ev.status === 401 || ev.status === 403 || ev.code === 1008) {
      refuse(ev.status === 403 ? 403 : 401, ev.error?.message || ev.reason);
    } else {
      stop(`Disconnected from ${s.active} (${ev.reason || "closed"}). Join again to reconnect.`);
    }
  });
  on("subscribed", (ev) => {
    const r = s.rooms.get(ev.room);
    if (!r) return;
    s.conn = { state: "connected" };
    r.subscribed = true;
    r.retries = 0;
    r.latest = Math.max(r.latest, ev.seq || 0);
    if (r.loaded) connected(r);
  });
  on("unsubscribed", (ev) => {
    const r = s.rooms.get(ev.room);
    if (!r) return;
    r.subscribed = false;
    if (ev.reason === "banned") return restricted(r, { code: "banned" });
    r.refused = `Removed from ${r.name}${ev.reason ? ` (${ev.reason})` : ""}.`;
    showStatus();
    updateCompose();
    renderRooms();
  });
  on("message", accept);
  on("change", changed);
  on("reactions", reactionsChanged);
  on("thread", threadChanged);
  on("frame", (f) => { if (f.type === "thread_updated") threadChanged(f); });
  on("presence", presenceChanged);
  on("typing", someoneTyping);
  on("read", (ev) => {
    const r = s.rooms.get(ev.room);
    if (!r || ev.user !== s.name) return; // another tab or device of ours read it
    r.readSeq = Math.max(r.readSeq, ev.seq || 0);
    if (r.readSeq >= r.latest) r.mentions = 0;
    renderRooms();
  });
  on("error", (err) => {
    // A server without typing or in-band refresh refuses the frame: nothing to show.
    if (err.frame === "typing" || err.frame === "refresh") return;
    if (err.room !== undefined) {
      // a subscription refused on a reconnection (the first one is handled in subscribe())
      const r = s.rooms.get(err.room);
      if (r && !r.joining) subscribeRefused(r, gen, err);
      return;
    }
    if (err.code === "connect_failed" || err.code === "invalid_frame") return;
    notice(err.message, "error");
  });
}

function connected(r) {
  loadPositions(s.gen);
  if (r.name !== s.active) { renderRooms(); return; }
  showStatus();
  if (el.notice.dataset.kind === "connection") notice("");
  updateCompose();
  loadPresence(r, s.gen);
  markRead();
}

// Subscribe from the last seq held (from the latest at first); the client keeps
// the subscription across reconnections.
async function subscribe(r, gen) {
  r.timer = null;
  r.joining = true;
  let sub;
  try {
    sub = await s.client.subscribe(r.name, r.loaded ? { since: r.lastSeq } : {});
  } catch (err) {
    if (gen === s.gen) subscribeRefused(r, gen, err);
    return;
  } finally {
    if (gen === s.gen) r.joining = false;
  }
  if (gen !== s.gen || s.rooms.get(r.name) !== r) return;
  if (!r.loaded) {
    try {
      await loadHistory(r, gen, sub.seq);
    } catch (err) {
      if (gen !== s.gen) return;
      if (err.code === "banned") return restricted(r, err);
      if (err.status === 401 || err.status === 403) return refuse(err.status, err.message, r);
      r.firstSeq = r.firstSeq || sub.seq + 1;
      r.hasMore = true; // the button tries again
      if (r.name === s.active) {
        el.older.hidden = false;
        notice(`Earlier messages could not be loaded: ${err.message}`, "error");
      }
    }
    if (gen !== s.gen) return;
    r.loaded = true;
    if (r.name === s.active) showLastSeq();
    loadRead(r, gen);
  }
  if (r.subscribed) connected(r);
}

function subscribeRefused(r, gen, err) {
  r.subscribed = false;
  updateCompose();
  if (err.code === "unauthorized" || err.code === "forbidden") {
    if (r.name === s.active || err.code === "unauthorized") {
      refuse(err.code === "forbidden" ? 403 : 401, err.message, r);
    } else {
      r.refused = `No access to ${r.name}`;
      renderRooms();
    }
  } else if (err.code === "banned") {
    restricted(r, err);
  } else if (FATAL.has(err.code)) {
    r.refused = `Cannot join ${r.name}: ${err.message}`;
    showStatus();
    renderRooms();
  } else if (err.code !== "closed" && err.code !== "unsubscribed") {
    // the server could not serve the room now (store down, too many subscriptions): again later
    const delay = backoff(r.retries++, 500, 8000);
    if (r.name === s.active) {
      notice(`The server could not serve ${r.name} (${err.message}); retrying.`, "connection");
    }
    clearTimeout(r.timer);
    r.timer = setTimeout(() => subscribe(r, gen), delay);
  }
}

// Stop for good (until the next join).
function stop(status) {
  s.gen += 1;
  const client = s.client;
  s.client = null;
  if (client) client.close();
  for (const r of s.rooms.values()) {
    clearTimeout(r.timer);
    clearTimeout(r.readTimer);
    r.subscribed = false;
  }
  s.stopped = status;
  clearTyping();
  updateCompose();
  showStatus();
}

// Stop and say what would let us in.
function refuse(status, message, r = active()) {
  const room = r ? r.name : s.active;
  stop(`Cannot join ${room}`);
  let text;
  if (status === 403) {
    text = `Your token does not let you into ${room} (${message}). ` +
      "Paste a token that grants it, or pick another room.";
  } else if (s.token) {
    text = `Your token was not accepted (${message}). Paste a new token and join again.`;
  } else {
    text = `This server asks you to sign in (${message}). Paste a token and join again.`;
  }
  notice(text, "error");
  el.joinError.textContent = text;
  el.joinError.hidden = false;
  el.room.value = room;
  el.token.setAttribute("aria-invalid", "true");
  openDialog(el.token);
}

window.addEventListener("online", () => { if (s.client) s.client.reconnectNow(); });

// -- composing -----------------------------------------------------------------

function updateCompose() {
  const r = active();
  const n = chars(el.text.value.trim());
  const over = n - MAX_TEXT;
  el.counter.textContent = over > 0
    ? `${n} / ${MAX_TEXT}: ${over} character${over > 1 ? "s" : ""} too long. Shorten it to send.`
    : `${n} / ${MAX_TEXT}`;
  el.counter.dataset.over = over > 0 ? "true" : "false";
  el.counter.dataset.near = n > MAX_TEXT * 0.9 ? "true" : "false";
  el.text.setAttribute("aria-invalid", over > 0 ? "true" : "false");
  el.text.disabled = !r;
  el.text.readOnly = Boolean(r && r.sending);
  el.text.setAttribute("aria-busy", r && r.sending ? "true" : "false");
  el.text.placeholder = r ? `Message #${r.name}` : "Join a room to write";
  el.send.disabled = !r || !r.subscribed || r.sending || n === 0 || over > 0 ||
    Date.now() < s.blockedUntil;
  grow(el.text);
}

function grow(box) {
  box.style.height = "auto";
  box.style.height = Math.min(box.scrollHeight + 2, 200) + "px";
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

// `@name` of a user seen in the room (an author or someone present): their ids.
function mentionsIn(r, text) {
  const found = new Set();
  for (const match of text.matchAll(/(^|[^\w@])@([A-Za-z0-9][\w.:-]{0,63})/g)) {
    const name = match[2].replace(/[.:-]+$/, "");
    if (r.users.has(name) && name !== s.name) found.add(name);
  }
  return [...found].slice(0, 50);
}

function publishOptions(r, text, replyTo) {
  const options = {};
  const mentions = mentionsIn(r, text);
  if (mentions.length) options.mentions = mentions;
  if (replyTo) options.replyTo = replyTo;
  return options;
}

// Why a post was refused, said in the notice; the text stays where it was typed.
function refusedPost(r, err) {
  if (err.code === "rate_limited") rateLimited(Number(err.retryAfter) || 1);
  else if (err.code === "slow_mode") slowMode(r, err);
  else if (err.code === "banned" || err.code === "muted") restricted(r, err);
  else notice(`Your message was not sent: ${err.message}`, "error");
}

function send() {
  const r = active();
  const text = el.text.value.trim();
  if (!r || r.sending || !text || chars(text) > MAX_TEXT) { updateCompose(); return; }
  if (!r.subscribed) {
    notice("Not connected yet: your message is kept and can be sent once connected.", "connection");
    return;
  }
  if (Date.now() < s.blockedUntil) return;
  const gen = s.gen;
  r.sending = true;
  delete el.text.dataset.refused;
  if (["error", "muted"].includes(el.notice.dataset.kind)) notice("");
  updateCompose();
  // Sent again after a reconnection with the same idempotency key until acked: stored once.
  s.client.publish(r.name, text, publishOptions(r, text)).then(() => {
    r.sending = false;
    r.draft = "";
    if (gen === s.gen && r.name === s.active) {
      el.text.value = "";
      s.lastTyping = 0; // the next message's typing is news again
    }
    updateCompose();
  }, (err) => {
    r.sending = false;
    r.draft = text;
    if (gen !== s.gen) return;
    if (r.name === s.active) el.text.dataset.refused = err.code || "refused";
    updateCompose();
    refusedPost(r, err);
  });
}

el.compose.addEventListener("submit", (ev) => { ev.preventDefault(); send(); });
el.text.addEventListener("input", () => {
  delete el.text.dataset.refused;
  updateCompose();
  typing();
});
el.text.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); send(); }
});
el.older.addEventListener("click", loadOlder);

// -- threads -------------------------------------------------------------------------
// A reply is a message with `reply_to` (servers with replies); it shows in the
// room under what it answers, and in the thread panel with its parent and the
// parent's other replies (`GET …/messages/{seq}/replies` where the client has it).

let threadOpener = null;

function openThread(seq, opener) {
  const r = active();
  if (!r || !r.bySeq.has(seq)) return;
  threadOpener = opener || null;
  const li = opener?.closest("li[data-seq]");
  if (li && el.list.contains(li)) {
    opener.dataset.seq = li.dataset.seq;
    opener.dataset.find = opener.dataset.action ? `[data-action="${opener.dataset.action}"]`
      : `.${opener.classList[0]}`;
  }
  s.thread = { room: r.name, seq, fetched: [] };
  el.thread.hidden = false;
  el.app.classList.add("with-panel");
  closeSearch();
  el.threadError.hidden = true;
  el.threadText.value = "";
  renderThread();
  fetchReplies(s.thread);
  el.threadText.focus();
}

function closeThread() {
  if (el.thread.hidden) return;
  el.thread.hidden = true;
  el.app.classList.remove("with-panel");
  s.thread = null;
  // the opener's message may have been drawn again meanwhile (a new reply counted):
  // the same control of the same message then
  let back = threadOpener;
  if (back && !back.isConnected && threadOpener.dataset.seq) {
    back = el.list.querySelector(`li[data-seq="${threadOpener.dataset.seq}"] ${threadOpener.dataset.find}`);
  }
  (back && back.isConnected ? back : el.text).focus();
}

async function fetchReplies(thread) {
  if (typeof s.client?.replies !== "function") return;
  try {
    const got = await s.client.replies(thread.room, thread.seq, { limit: 100 });
    if (s.thread !== thread) return;
    thread.fetched = got.messages || got.replies || [];
    renderThread();
  } catch (e) { /* a server without replies: the replies held are shown */ }
}

function renderThread() {
  const t = s.thread;
  const r = t && s.rooms.get(t.room);
  const parent = r?.bySeq.get(t.seq);
  if (!parent) return;
  const item = fillItem(document.createElement("li"), parent, false, r);
  item.querySelector(".thread-link")?.remove();
  item.querySelector(".actions")?.remove();
  el.threadParent.replaceChildren(item);
  const replies = new Map();
  for (const m of t.fetched) if (m.reply_to === t.seq) replies.set(m.seq, r.bySeq.get(m.seq) || m);
  for (const m of r.msgs) if (m.reply_to === t.seq) replies.set(m.seq, m);
  const sorted = [...replies.values()].sort((a, b) => a.seq - b.seq);
  let prev = null;
  el.threadReplies.replaceChildren(...sorted.map((m) => {
    const li = fillItem(document.createElement("li"), m, continues(prev, m), r);
    li.querySelector(".reply-ref")?.remove();
    li.querySelector("[data-action=reply]")?.remove();
    prev = m;
    return li;
  }));
  const n = Math.max(sorted.length, parent.thread?.replies || 0);
  el.threadCount.textContent = n ? `${n} ${n === 1 ? "reply" : "replies"}` : "No replies yet";
}

el.threadClose.addEventListener("click", closeThread);
el.threadCompose.addEventListener("submit", (ev) => {
  ev.preventDefault();
  const t = s.thread;
  const r = t && s.rooms.get(t.room);
  const text = el.threadText.value.trim();
  if (!r || !text || el.threadText.readOnly) return;
  if (chars(text) > MAX_TEXT) { el.threadError.textContent = `At most ${MAX_TEXT} characters.`; el.threadError.hidden = false; return; }
  if (!r.subscribed) { el.threadError.textContent = "Not connected yet: your reply is kept."; el.threadError.hidden = false; return; }
  el.threadText.readOnly = true;
  el.threadError.hidden = true;
  s.client.publish(r.name, text, publishOptions(r, text, t.seq)).then((m) => {
    el.threadText.readOnly = false;
    if (s.thread !== t) return;
    el.threadText.value = "";
    if (m && m.reply_to !== t.seq) {
      // a server without replies stored it as a message of the room
      el.threadCount.textContent = "This server keeps replies in the room.";
    }
  }, (err) => {
    el.threadText.readOnly = false;
    el.threadError.textContent = `Your reply was not sent: ${err.message}`;
    el.threadError.hidden = false;
  });
});
el.threadText.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); el.threadCompose.requestSubmit(); }
});
el.threadText.addEventListener("input", () => grow(el.threadText));

// -- joining and switching rooms ----------------------------------------------------

function identityChanged(name, tok) {
  return !s.client || s.stopped || s.name !== name || s.token !== tok;
}

// A client for this identity, with every listed room subscribed on it.
function connect(name, tok) {
  s.gen += 1;
  const gen = s.gen;
  if (s.client) s.client.close();
  clearTyping();
  // With a token the server knows who this is; in open mode `user` names us in
  // presence and as the author of what we send.
  const client = new Client(location.origin, tok ? { token: tok, maxDelay: 8000 }
                                                 : { user: name, maxDelay: 8000 });
  Object.assign(s, { name, token: tok, client, stopped: "", positions: false,
                     conn: { state: "connecting" }, lastTyping: 0 });
  for (const [room, old] of s.rooms) {
    clearTimeout(old.timer);
    clearTimeout(old.readTimer);
    const r = newRoom(room);
    r.draft = old.draft;
    s.rooms.set(room, r);
  }
  el.meName.textContent = name;
  el.meAvatar.replaceChildren(avatar(name));
  el.me.hidden = !name;
  if (!tok) store("local", "chat.name", name);
  store("session", TOKEN_STORE, tok || null);
  listen(client, gen);
  for (const r of s.rooms.values()) subscribe(r, gen);
  client.connect().catch(() => { /* closed for good: the "closed" event said why */ });
}

function join(room, name, tok) {
  const fresh = !s.rooms.has(room);
  if (fresh) s.rooms.set(room, newRoom(room));
  else s.rooms.get(room).refused = "";
  saveRooms();
  if (identityChanged(name, tok)) connect(name, tok);
  else if (fresh) subscribe(s.rooms.get(room), s.gen);
  else if (!s.rooms.get(room).subscribed && !s.rooms.get(room).joining) subscribe(s.rooms.get(room), s.gen);
  switchTo(room);
}

function switchTo(room) {
  const before = active();
  if (before && before.name !== room) before.draft = el.text.value;
  s.active = room;
  const r = active();
  closeThread();
  notice("");
  el.token.setAttribute("aria-invalid", "false");
  el.title.textContent = r ? `# ${room}` : "No room joined";
  if (r) el.title.append(" ", el.unread);
  el.leave.hidden = !r;
  el.text.value = r ? r.draft : "";
  delete el.text.dataset.refused;
  if (r) r.newFrom = r.loaded && !r.readOff && unreadOf(r) > 0 ? r.readSeq : 0;
  store("local", "chat.room", room);
  const q = new URLSearchParams(location.search);
  if (r) q.set("room", room); else q.delete("room");
  // A token never goes into the address (it would stay in the history).
  q.delete("token");
  if (s.token || !s.name) q.delete("name"); // the name comes from the token
  else q.set("name", s.name);
  const query = q.toString();
  history.replaceState(null, "", location.pathname + (query ? "?" + query : ""));
  renderTimeline();
  el.timeline.scrollTop = el.timeline.scrollHeight;
  const line = el.list.querySelector(".new-line");
  if (line && line.offsetTop < el.timeline.scrollTop) el.timeline.scrollTop = line.offsetTop - 40;
  renderTyping();
  renderPresence();
  if (r && r.subscribed && r.loaded) loadPresence(r, s.gen);
  showStatus();
  updateCompose();
  markRead();
}

function leave(room) {
  const r = s.rooms.get(room);
  if (!r) return;
  clearTimeout(r.timer);
  clearTimeout(r.readTimer);
  if (s.client && r.subscribed) s.client.unsubscribe(room);
  s.rooms.delete(room);
  saveRooms();
  const next = s.rooms.keys().next();
  switchTo(next.done ? "" : next.value);
  if (next.done) openDialog();
}

el.leave.addEventListener("click", () => leave(s.active));

// -- the join dialog -----------------------------------------------------------------

let dialogOpener = null;

function openDialog(focus) {
  dialogOpener = document.activeElement;
  el.joinCancel.hidden = s.rooms.size === 0 && !s.stopped;
  if (!el.dialog.open) el.dialog.showModal();
  (focus || (el.name.value && !el.name.disabled ? el.room : el.name)).focus();
  if (focus === el.room || (!focus && el.name.value)) el.room.select();
}

function closeDialog() {
  if (el.dialog.open) el.dialog.close();
}

el.dialog.addEventListener("close", () => {
  el.joinError.hidden = true;
  if (dialogOpener && dialogOpener.isConnected && dialogOpener !== document.body) {
    dialogOpener.focus();
  }
});
el.joinCancel.addEventListener("click", closeDialog);
for (const b of [el.addRoom, $("add-room-2"), $("switch-user")]) {
  b.addEventListener("click", () => {
    closeDrawer();
    if (b.id !== "switch-user") el.room.value = "";
    openDialog(b.id !== "switch-user" ? el.room : el.name.disabled ? el.token : el.name);
  });
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
  dialogOpener = null;
  closeDialog();
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

// -- search ------------------------------------------------------------------

const search = { q: "", cursor: null, gen: 0 };
const searchEl = {
  form: $("search"), q: $("q"), status: $("search-status"), results: $("search-results"),
  more: $("search-more"), panel: $("search-panel"), close: $("search-close"),
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
  const d = new Date(m.created_at);
  meta.textContent = `# ${m.room} · ${m.author}` +
    (isNaN(d) ? "" : ` · ${d.toLocaleString([], { dateStyle: "short", timeStyle: "short" })}`);
  li.append(avatar(m.author), meta, highlighted(m.text, hit.highlights));
  if (s.rooms.has(m.room)) {
    li.classList.add("go");
    li.tabIndex = 0;
    const go = () => {
      switchTo(m.room);
      el.list.querySelector(`li[data-seq="${m.seq}"]`)?.scrollIntoView({ block: "center" });
    };
    li.addEventListener("click", go);
    li.addEventListener("keydown", (ev) => { if (ev.key === "Enter") go(); });
  }
  return li;
}

function searchClient() {
  if (s.client) return s.client;
  const tok = el.token.value.trim() || stored("session", TOKEN_STORE);
  return new Client(location.origin, tok ? { token: tok } : {});
}

function closeSearch() {
  if (searchEl.panel.hidden) return;
  searchEl.panel.hidden = true;
  if (el.thread.hidden) el.app.classList.remove("with-panel");
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
    closeSearch();
    return;
  }
  if (!el.thread.hidden) closeThread();
  searchEl.panel.hidden = false;
  el.app.classList.add("with-panel");
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
searchEl.close.addEventListener("click", () => { closeSearch(); searchEl.q.focus(); });

// -- moderation ------------------------------------------------------------------
// A ban or mute notice and the slow-mode wait; for moderators (a token whose
// `moderate` claim grants the room) ban and mute in each message's actions.

function slowMode(r, err) {
  const every = Number(err.detail?.slow_mode) || 0;
  rateLimited(Number(err.retryAfter) || 1,
              `Slow mode is on in ${r.name}: one message every ${every} s.`, "slow_mode");
}

function restricted(r, err) {
  if (err.code === "banned") {
    r.subscribed = false;
    r.refused = `Banned from ${r.name}`;
    if (s.client) s.client.unsubscribe(r.name);
    renderRooms();
    if (r.name !== s.active) return;
    showStatus();
    updateCompose();
    notice(`You are banned from ${r.name}: you cannot read or post here.`, "banned");
  } else if (r.name === s.active) {
    notice(`You are muted in ${r.name}: you can read, but not post or type.`, "muted");
  }
}

// -- colour theme: the system's, or dark or light by choice ---------------------------

const THEMES = ["system", "dark", "light"];
function applyTheme(theme) {
  if (theme === "system") delete document.documentElement.dataset.theme;
  else document.documentElement.dataset.theme = theme;
  el.theme.setAttribute("aria-label", `Colour theme: ${theme}`);
  el.theme.title = `Colour theme: ${theme}`;
  el.theme.replaceChildren(icon(theme));
}
el.theme.addEventListener("click", () => {
  const now = document.documentElement.dataset.theme || "system";
  const next = THEMES[(THEMES.indexOf(now) + 1) % THEMES.length];
  store("local", THEME_STORE, next === "system" ? null : next);
  applyTheme(next);
});

// -- start ---------------------------------------------------------------------------

for (const b of document.querySelectorAll("[data-icon]")) b.replaceChildren(icon(b.dataset.icon));

applyTheme(THEMES.includes(stored("local", THEME_STORE)) ? stored("local", THEME_STORE) : "system");
let savedRooms = [];
try { savedRooms = JSON.parse(stored("local", ROOMS_STORE) || "[]"); } catch (e) { /* bad value */ }
for (const room of Array.isArray(savedRooms) ? savedRooms : []) {
  if (typeof room === "string" && ROOM_RE.test(room)) s.rooms.set(room, newRoom(room));
}
el.name.value = params.get("name") || stored("local", "chat.name");
el.room.value = params.get("room") || stored("local", "chat.room") || "lobby";
// A token in the address (`?token=`) is read once and taken out of the address
// bar and the history at once, as the dashboard does with `?key=`; it is kept
// for this tab only (sessionStorage), so a reload still joins.
el.token.value = params.get("token") || stored("session", TOKEN_STORE);
if (params.has("token")) {
  const rest = new URLSearchParams(location.search);
  rest.delete("token");
  const query = rest.toString();
  history.replaceState(null, "", location.pathname + (query ? "?" + query : "") + location.hash);
}
tokenChanged();
renderRooms();
updateCompose();
{
  const tok = el.token.value.trim();
  const name = tok ? tokenSub(tok) : el.name.value.trim();
  const wanted = params.get("room") || "";
  if (wanted && name) {
    el.join.requestSubmit();
  } else if (s.rooms.size && name) {
    const start = s.rooms.has(stored("local", "chat.room")) ? stored("local", "chat.room")
      : s.rooms.keys().next().value;
    s.active = start;
    connect(name, tok);
    switchTo(start);
  } else {
    openDialog();
  }
}
