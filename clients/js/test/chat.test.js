// Edits, deletes, typing, read state and errors against a real gateway.

import { test } from "node:test";
import assert from "node:assert/strict";

import { Client, GatewayError } from "../src/index.js";
import { eventually, gatewayPerFile } from "./gateway.js";

const shared = gatewayPerFile({ RATE_LIMIT: "10/60s" });

test("edit and delete resolve with the message; subscribers get numbered changes", async () => {
  const ana = new Client(shared.gw.url, { user: "ana" });
  const bob = new Client(shared.gw.url, { user: "bob" });
  const changes = [];
  bob.on("change", (ev) => changes.push(ev));
  try {
    await Promise.all([ana.connect(), bob.connect()]);
    const sub = await bob.subscribe("edits", { since: 0 });
    assert.deepEqual(sub, { room: "edits", seq: 0, change: 0 });
    const m = await ana.publish("edits", "helo");
    assert.equal(m.deleted_at, undefined);
    const edited = await ana.edit("edits", m.seq, "hello");
    assert.equal(edited.text, "hello");
    assert.equal(edited.version, 2);
    assert.equal(typeof edited.edited_at, "string");
    // the wire: a changed message that is not deleted has deleted_at null
    assert.equal(edited.deleted_at, null);
    assert.ok(edited.deleted_at == null, "not a tombstone");
    const gone = await ana.delete("edits", m.seq);
    assert.equal(gone.text, "");
    assert.ok(gone.deleted_at != null, "a tombstone");
    await assert.rejects(bob.edit("edits", m.seq, "mine"), (e) =>
      e instanceof GatewayError && typeof e.message === "string" && e.message.length > 0);
    await eventually(() => changes.length === 2, 10000, "two changes");
    assert.deepEqual(changes.map((c) => [c.kind, c.change]), [["updated", 1], ["deleted", 2]]);
  } finally {
    ana.close();
    bob.close();
  }
});

test("react and unreact resolve with the summary; subscribers get reactions events", async () => {
  const ana = new Client(shared.gw.url, { user: "ana" });
  const bob = new Client(shared.gw.url, { user: "bob" });
  const seen = [];
  bob.on("reactions", (ev) => seen.push(ev));
  try {
    await Promise.all([ana.connect(), bob.connect()]);
    await bob.subscribe("reacts", { since: 0 });
    const m = await ana.publish("reacts", "hello");
    const liked = await ana.react("reacts", m.seq, "\u{1F44D}");
    assert.deepEqual(liked.reactions, { "\u{1F44D}": { count: 1, users: ["ana"] } });
    const again = await bob.react("reacts", m.seq, "\u{1F44D}");
    assert.deepEqual(again.reactions["\u{1F44D}"], { count: 2, users: ["ana", "bob"] });
    const back = await ana.unreact("reacts", m.seq, "\u{1F44D}");
    assert.deepEqual(back.reactions, { "\u{1F44D}": { count: 1, users: ["bob"] } });
    await assert.rejects(ana.react("reacts", m.seq, ""), (e) =>
      e instanceof GatewayError && e.code === "invalid_request");
    await eventually(() => seen.length === 3, 10000, "three reactions events");
    assert.deepEqual(seen.map((e) => [e.room, e.seq, e.change]),
      [["reacts", m.seq, 1], ["reacts", m.seq, 2], ["reacts", m.seq, 3]]);
    assert.deepEqual(seen[2].reactions, back.reactions);
  } finally {
    ana.close();
    bob.close();
  }
});

test("typing reaches the others; read state, receipts and positions", async () => {
  const ana = new Client(shared.gw.url, { user: "ana" });
  const bob = new Client(shared.gw.url, { user: "bob" });
  const typing = [];
  const receipts = [];
  bob.on("typing", (ev) => typing.push(ev));
  bob.on("read", (ev) => receipts.push(ev));
  try {
    await Promise.all([ana.connect(), bob.connect()]);
    await ana.subscribe("desk");
    await bob.subscribe("desk");
    ana.typing("desk");
    await eventually(() => typing.length === 1, 10000, "typing");
    assert.deepEqual(typing, [{ room: "desk", user: "ana" }]);
    await ana.publish("desk", "one");
    await ana.publish("desk", "two");
    assert.deepEqual(await ana.markRead("desk", 1), { room: "desk", seq: 1, unread: 1, mentions: 0 });
    await eventually(() => receipts.some((r) => r.user === "ana"), 10000, "ana's receipt");
    assert.deepEqual(receipts.find((r) => r.user === "ana"), { room: "desk", user: "ana", seq: 1 });
    assert.deepEqual(await ana.readPositions(), { rooms: [{ room: "desk", seq: 1, unread: 1, mentions: 0 }] });
    assert.deepEqual(await bob.readPositions(), { rooms: [] });
  } finally {
    ana.close();
    bob.close();
  }
});

test("errors carry code, status, message and the retry hint as the server sent them",
  async () => {
    const c = new Client(shared.gw.url, { user: "rl" });
    try {
      await c.connect();
      // the post bucket (10/60s) of this address is shared with the tests above: use it up
      let limited;
      for (let i = 0; i < 20 && !limited; i++) {
        limited = await c.publish("rl-room", "x").then(() => undefined, (e) => e);
      }
      assert.ok(limited, "the bucket ran dry");
      assert.equal(limited.code, "rate_limited");
      assert.equal(typeof limited.retryAfter, "number");
      assert.ok(limited.message.length > 0);
      // over HTTP: the error body, and the status
      const bad = await c.history("no room").catch((e) => e);
      assert.equal(bad.code, "invalid_request");
      assert.equal(bad.status, 422);
      assert.equal(bad.message, bad.detail.message);
    } finally {
      c.close();
    }
  });
