// The client against real gateways: subscribe, publish, typed events, history paging,
// errors with codes.

import { test } from "node:test";
import assert from "node:assert/strict";

import { Client, GatewayError, State, backoff } from "../src/index.js";
import { eventually, freePort, gatewayPerFile, post } from "./gateway.js";

const shared = gatewayPerFile();

test("backoff has full jitter between the base and the capped exponential", () => {
  const seen = new Set();
  for (let i = 0; i < 200; i++) {
    const d = backoff(3, 100, 500);
    assert.ok(d >= 100 && d <= 500, String(d));
    seen.add(Math.round(d / 50));
  }
  assert.ok(seen.size > 3, "delays are spread, not one value");
  assert.ok(backoff(40, 100, 1000) <= 1000);
});

test("publish resolves with the stored message; subscribers get it once, in order", async () => {
  const ana = new Client(shared.gw.url, { user: "ana" });
  const bob = new Client(shared.gw.url, { user: "bob" });
  const states = [];
  ana.on("state", (ev) => states.push(ev.state));
  const got = [];
  bob.on("message", (m) => got.push(m));
  try {
    await Promise.all([ana.connect(), bob.connect()]);
    assert.deepEqual(states, [State.CONNECTING, State.CONNECTED]);
    assert.deepEqual(await bob.subscribe("lobby"), { room: "lobby", seq: 0, change: 0 });
    const sent = [];
    for (let i = 1; i <= 5; i++) sent.push(ana.publish("lobby", `hello ${i}`));
    const msgs = await Promise.all(sent);
    assert.deepEqual(msgs.map((m) => m.seq), [1, 2, 3, 4, 5]);
    assert.equal(msgs[0].author, "ana");
    assert.equal(msgs[0].room, "lobby");
    await eventually(() => got.length === 5, 10000, "five messages");
    assert.deepEqual(got.map((m) => m.text), msgs.map((m) => m.text));
    assert.equal(bob.cursor("lobby"), 5);
  } finally {
    ana.close();
    bob.close();
  }
  assert.equal(ana.state, State.CLOSED);
  await assert.rejects(ana.publish("lobby", "late"), (e) => e.code === "closed");
});

test("subscribe with since replays from the store, then continues live", async () => {
  for (let i = 1; i <= 3; i++) await post(shared.gw.url, "replay", `m${i}`);
  const c = new Client(shared.gw.url);
  const got = [];
  c.on("message", (m) => got.push(m.seq));
  try {
    await c.connect();
    assert.equal((await c.subscribe("replay", { since: 1 })).seq, 3);
    await post(shared.gw.url, "replay", "m4");
    await eventually(() => got.length === 3, 10000, "replay and live");
    assert.deepEqual(got, [2, 3, 4]);
  } finally {
    c.close();
  }
});

test("errors carry codes: a refused publish rejects, a refused subscribe rejects", async () => {
  const c = new Client(shared.gw.url);
  const errors = [];
  c.on("error", (e) => errors.push(e));
  try {
    await c.connect();
    await assert.rejects(c.publish("bad room", "x"), (e) =>
      e instanceof GatewayError && e.code === "invalid_request");
    await assert.rejects(c.publish("ok", "   "), (e) => e.code === "invalid_request");
    await assert.rejects(c.subscribe("-nope"), (e) => e.code === "invalid_request");
    assert.equal(errors.length, 1);
    assert.equal(errors[0].room, "-nope");
    // the socket stays usable
    assert.equal((await c.publish("ok", "fine")).seq, 1);
    await assert.rejects(c.history("bad room"), (e) => e.code === "invalid_request"
      && e.status === 422);
  } finally {
    c.close();
  }
});

test("ephemeral events and presence are typed events", async () => {
  const watcher = new Client(shared.gw.url, { user: "watcher" });
  const events = [];
  const presence = [];
  watcher.on("event", (e) => events.push(e));
  watcher.on("presence", (p) => presence.push(p));
  const other = new Client(shared.gw.url, { user: "cleo" });
  try {
    await watcher.connect();
    await watcher.subscribe("ev");
    const r = await fetch(shared.gw.url + "/v1/publish", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ room: "ev", event: "ping", data: { n: 1 } }),
    });
    assert.equal(r.status, 202);
    await eventually(() => events.length === 1, 10000, "the event");
    assert.deepEqual(events[0], { room: "ev", event: "ping", data: { n: 1 } });
    await other.connect();
    await other.subscribe("ev");
    await eventually(() => presence.some((p) => p.user === "cleo" && p.action === "join"),
                     10000, "cleo's join");
    // and who is here now, over HTTP
    const here = await watcher.presence("ev");
    assert.equal(here.room, "ev");
    assert.deepEqual(here.users, ["cleo", "watcher"]);
  } finally {
    watcher.close();
    other.close();
  }
});

test("history pages backwards from the latest and forwards from a seq", async () => {
  for (let i = 1; i <= 7; i++) await post(shared.gw.url, "hist", `h${i}`);
  const c = new Client(shared.gw.url);
  const back = [];
  for await (const page of c.pages("hist", { limit: 3 })) back.push(page.map((m) => m.seq));
  assert.deepEqual(back, [[5, 6, 7], [2, 3, 4], [1]]);
  const fwd = [];
  for await (const page of c.pages("hist", { limit: 3, after: 2 })) {
    fwd.push(page.map((m) => m.seq));
  }
  assert.deepEqual(fwd, [[3, 4, 5], [6, 7]]);
  const one = await c.history("hist", { limit: 2, before: 3 });
  assert.deepEqual(one.messages.map((m) => m.seq), [1, 2]);
  assert.equal(one.has_more, false);
  c.close();
});

test("a typing frame's answer, or its refusal, never shifts the answers of later frames",
  async () => {
    const c = new Client(shared.gw.url, { user: "tia" });
    const errors = [];
    c.on("error", (e) => errors.push(e));
    try {
      await c.connect();
      c.typing("typing-room");
      c.typing("typing-room");
      // a refused subscribe right after is still matched to its own frame
      await assert.rejects(c.subscribe("-bad"), (e) => e.code === "invalid_request");
      assert.equal((await c.subscribe("typing-room")).room, "typing-room");
      // a server without typing refuses each (invalid_request); one with it answers nothing
      assert.ok(errors.every((e) => e.frame === "typing" || e.room === "-bad"),
                JSON.stringify(errors.map((e) => [e.code, e.frame, e.room])));
      assert.equal(errors.filter((e) => e.room === "-bad").length, 1);
    } finally {
      c.close();
    }
  });

test("disconnected says when the next attempt is; reconnectNow makes it at once", async () => {
  // the first URL has no server: that attempt fails, the next one goes to the gateway
  const dead = `http://127.0.0.1:${await freePort()}`;
  const c = new Client([dead, shared.gw.url], { user: "ana", minDelay: 600000, maxDelay: 600000 });
  const waits = [];
  c.on("disconnected", (ev) => waits.push(ev.delay));
  try {
    const connected = c.connect();
    await eventually(() => c.state === State.DISCONNECTED, 10000, "the failed attempt");
    assert.ok(waits[0] >= 600000, `the backoff delay is reported (${waits[0]})`);
    c.reconnectNow();
    await connected; // not after ten minutes: at once, on the next URL
    assert.equal(c.state, State.CONNECTED);
    c.reconnectNow(); // connected: nothing to do
    assert.equal(c.state, State.CONNECTED);
  } finally {
    c.close();
  }
});

test("a change made while disconnected arrives after the reconnection, once", async () => {
  const c = new Client(shared.gw.url, { user: "ana", minDelay: 1500, maxDelay: 1500 });
  const changes = [];
  c.on("change", (ev) => changes.push(ev));
  const url = `${shared.gw.url}/v1/rooms/chg/messages`;
  const change = (method, seq, body) => fetch(`${url}/${seq}`, {
    method, headers: { "content-type": "application/json" }, body: JSON.stringify(body),
  });
  try {
    await c.connect();
    await c.subscribe("chg", { since: 0 });
    await c.publish("chg", "helo");
    await c.publish("chg", "second");
    assert.equal((await change("PATCH", 1, { text: "hello", author: "ana" })).status, 200);
    await eventually(() => changes.length === 1, 10000, "the live edit");
    assert.equal(changes[0].kind, "updated");
    assert.equal(changes[0].message.text, "hello");
    assert.equal(typeof changes[0].change, "number");

    // the socket drops; while the client waits to reconnect, a message is deleted
    const down = new Promise((resolve) => c.once("disconnected", resolve));
    c.sock.close(4000, "test");
    await down;
    assert.equal((await change("DELETE", 2, { author: "ana" })).status, 200);
    await eventually(() => changes.length === 2, 15000, "the delete, after reconnecting");
    assert.equal(changes[1].kind, "deleted");
    assert.equal(changes[1].message.seq, 2);
    assert.ok(changes[1].change > changes[0].change);
    await eventually(() => c.state === State.CONNECTED, 10000, "connected");
    await new Promise((r) => setTimeout(r, 500));
    assert.equal(changes.length, 2, "no change twice");

    // read positions: open mode names the user
    assert.deepEqual(await c.markRead("chg", 1), { room: "chg", seq: 1, unread: 1, mentions: 0 });
    assert.deepEqual(await c.readState("chg"), { room: "chg", seq: 1, unread: 1, mentions: 0 });
  } finally {
    c.close();
  }
});
