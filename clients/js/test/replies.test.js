// Replies, mentions and versions against a real gateway.

import { test } from "node:test";
import assert from "node:assert/strict";

import { Client, GatewayError } from "../src/index.js";
import { eventually, gatewayPerFile } from "./gateway.js";

const shared = gatewayPerFile();

test("publish with replyTo replies; subscribers get thread events; replies() pages", async () => {
  const ana = new Client(shared.gw.url, { user: "ana" });
  const bob = new Client(shared.gw.url, { user: "bob" });
  const threads = [];
  bob.on("thread", (ev) => threads.push(ev));
  try {
    await Promise.all([ana.connect(), bob.connect()]);
    await bob.subscribe("threads", { since: 0 });
    const parent = await ana.publish("threads", "question");
    assert.equal(parent.thread, undefined);
    const first = await bob.publish("threads", "answer one", { replyTo: parent.seq });
    assert.equal(first.reply_to, parent.seq);
    const second = await ana.publish("threads", "answer two", { replyTo: parent.seq });
    await eventually(() => threads.length === 2, 10000, "two thread events");
    assert.deepEqual(threads.map((e) => [e.room, e.seq, e.change, e.thread.replies]),
      [["threads", parent.seq, 1, 1], ["threads", parent.seq, 2, 2]]);
    assert.deepEqual(threads[1].thread,
      { replies: 2, last_seq: second.seq, last_at: second.created_at });
    const page = await ana.replies("threads", parent.seq, { limit: 1 });
    assert.deepEqual(page.messages.map((m) => m.text), ["answer one"]);
    assert.equal(page.has_more, true);
    const rest = await ana.replies("threads", parent.seq, { after: page.next });
    assert.deepEqual(rest.messages.map((m) => m.text), ["answer two"]);
    assert.equal(rest.next, null);
    const history = await ana.history("threads");
    assert.deepEqual(history.messages[0].thread, threads[1].thread);
    await assert.rejects(ana.publish("threads", "to nothing", { replyTo: 99 }), (e) =>
      e instanceof GatewayError && e.code === "not_found");
    await assert.rejects(ana.replies("threads", 99), (e) =>
      e instanceof GatewayError && e.code === "not_found" && e.status === 404);
  } finally {
    ana.close();
    bob.close();
  }
});

test("mentions ride on the message and count in the read state until read", async () => {
  const ana = new Client(shared.gw.url, { user: "ana" });
  const bob = new Client(shared.gw.url, { user: "bob" });
  try {
    await Promise.all([ana.connect(), bob.connect()]);
    const first = await ana.publish("mentions", "hello");
    assert.equal(first.mentions, undefined);
    await bob.markRead("mentions", first.seq);
    const m = await ana.publish("mentions", "bob, look", { mentions: ["bob", "bob"] });
    assert.deepEqual(m.mentions, ["bob"]);
    await ana.publish("mentions", "not you", { mentions: ["cy"] });
    assert.deepEqual(await bob.readState("mentions"),
      { room: "mentions", seq: first.seq, unread: 2, mentions: 1 });
    assert.deepEqual((await bob.readPositions()).rooms,
      [{ room: "mentions", seq: first.seq, unread: 2, mentions: 1 }]);
    assert.deepEqual(await bob.markRead("mentions", m.seq),
      { room: "mentions", seq: m.seq, unread: 1, mentions: 0 });
    await assert.rejects(ana.publish("mentions", "x", { mentions: [""] }), (e) =>
      e instanceof GatewayError && e.code === "invalid_request");
  } finally {
    ana.close();
    bob.close();
  }
});

test("versions() gives the author the earlier texts; others are refused", async () => {
  const ana = new Client(shared.gw.url, { user: "ana" });
  const bob = new Client(shared.gw.url, { user: "bob" });
  try {
    await Promise.all([ana.connect(), bob.connect()]);
    const m = await ana.publish("versions", "draft");
    const edited = await ana.edit("versions", m.seq, "final");
    const got = await ana.versions("versions", m.seq);
    assert.equal(got.version, 2);
    assert.deepEqual(got.versions, [{ version: 1, text: "draft", edited_at: edited.edited_at }]);
    await assert.rejects(bob.versions("versions", m.seq), (e) =>
      e instanceof GatewayError && e.code === "forbidden");
    await ana.delete("versions", m.seq);
    await assert.rejects(ana.versions("versions", m.seq), (e) =>
      e instanceof GatewayError && e.code === "not_found");
  } finally {
    ana.close();
    bob.close();
  }
});
