// State rooms against real gateways: snapshot, live writes, conflation, and resume
// after the instance the client was on is killed while keys are written elsewhere.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { createServer, connect } from "node:net";
import { WebSocket } from "ws";

import { Client, GatewayError, StateView } from "../src/index.js";
import { Gateway, environment, eventually } from "./gateway.js";

let envr;
let gw1;
let gw2;

before(async () => {
  const file = path.join(mkdtempSync(path.join(tmpdir(), "cg-ns-")), "namespaces.toml");
  writeFileSync(file, '[namespaces.ticker]\nkind = "state"\nconflate_ms = 0\n\n[namespaces.live]\nkind = "ephemeral"\n');
  envr = await environment({ NAMESPACES_FILE: file });
  [gw1, gw2] = await Promise.all([new Gateway(envr.env).start(),
                                  new Gateway(envr.env).start()]);
});

after(async () => {
  await Promise.all([gw1?.stop(), gw2?.stop()]);
  envr?.cleanup();
});

/** A TCP relay on a fixed port to a gateway: `down()` cuts every socket and refuses
 * new ones, `up(target)` listens again (on the same port) towards `target`. */
class Relay {
  constructor() {
    this.sockets = new Set();
    this.server = null;
  }

  get url() {
    return `http://127.0.0.1:${this.port}`;
  }

  up(target) {
    const { port } = new URL(target);
    this.server = createServer((client) => {
      const upstream = connect(Number(port), "127.0.0.1");
      for (const s of [client, upstream]) {
        this.sockets.add(s);
        s.on("error", () => {});
        s.on("close", () => { this.sockets.delete(s); client.destroy(); upstream.destroy(); });
      }
      client.pipe(upstream).pipe(client);
    });
    return new Promise((resolve) => this.server.listen(this.port ?? 0, "127.0.0.1", () => {
      this.port = this.server.address().port;
      resolve();
    }));
  }

  down() {
    const closed = new Promise((resolve) => this.server.close(resolve));
    for (const s of this.sockets) s.destroy();
    return closed;
  }
}

/** The type of the first frame after `subscribed` when resuming `room` from `since`
 * on a fresh socket: "state" (the writes after it) or "snapshot". */
function firstFrameAfter(url, room, since) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url.replace(/^http/, "ws") + "/v1/ws");
    ws.on("open", () => ws.send(JSON.stringify({ type: "subscribe", room, since })));
    ws.on("message", (data) => {
      const f = JSON.parse(String(data));
      if (f.type === "subscribed") return;
      ws.close();
      resolve(f.type);
    });
    ws.on("error", reject);
  });
}

/** Every live key of the store, as `{key: value}`. */
async function stored(client, room) {
  const got = await client.getState(room);
  return Object.fromEntries(Object.entries(got.values).map(([k, v]) => [k, v.value]));
}

test("a snapshot first, then each write; the view follows; HTTP writes and reads",
  async () => {
    const writer = new Client(gw2.url);
    const reader = new Client(gw1.url);
    const updates = [];
    const snapshots = [];
    reader.on("value", (ev) => updates.push(ev));
    reader.on("snapshot", (ev) => snapshots.push(ev));
    try {
      const a = await writer.setState("ticker:a", "btc", { px: 1 });
      assert.equal(a.key, "btc");
      assert.deepEqual(a.value, { px: 1 });
      await writer.setState("ticker:a", "eth", 2);
      await reader.connect();
      const view = await reader.subscribeState("ticker:a");
      assert.ok(view instanceof StateView);
      assert.equal(reader.stateOf("ticker:a"), view);
      assert.equal(snapshots.length, 1);
      assert.deepEqual(view.toJSON(), { btc: { px: 1 }, eth: 2 });
      assert.equal(view.seq, 2);
      assert.equal(view.entry("btc").seq, 1);
      const patched = await writer.patchState("ticker:a",
                                              { set: { sol: [3], btc: { px: 4 } }, delete: ["eth"] });
      assert.deepEqual(patched.writes.map((w) => w.seq), [3, 4, 5]);
      await eventually(() => updates.length === 3, 10000, "the patch's three writes");
      assert.deepEqual(updates.map((u) => [u.seq, u.key, u.value, u.deleted]),
                       [[3, "sol", [3], undefined], [4, "btc", { px: 4 }, undefined],
                        [5, "eth", undefined, true]]);
      assert.deepEqual(view.toJSON(), { sol: [3], btc: { px: 4 } });
      assert.equal(view.has("eth"), false);
      const removed = await writer.deleteState("ticker:a", "sol");
      assert.equal(removed.deleted, true);
      await eventually(() => !view.has("sol"), 10000, "the delete");
      assert.deepEqual(view.toJSON(), await stored(writer, "ticker:a"));
      assert.equal(view.seq, (await writer.getState("ticker:a")).seq);
      await assert.rejects(writer.setState("lobby", "k", 1),
                           (e) => e instanceof GatewayError && e.code === "wrong_room_kind");
      await assert.rejects(reader.subscribeState("lobby"),
                           (e) => e instanceof GatewayError && e.code === "wrong_room_kind"
                             && /it is stored/.test(e.message));
      // the kind comes from the subscribed frame
      await assert.rejects(reader.subscribeState("live:x"),
                           (e) => e instanceof GatewayError && e.code === "wrong_room_kind"
                             && e.room === "live:x" && /it is ephemeral/.test(e.message));
      assert.equal(reader.stateOf("live:x"), undefined);
      assert.equal((await reader.subscribe("general")).kind, "stored");
      assert.equal((await reader.subscribe("live:y")).kind, "ephemeral");
    } finally {
      writer.close();
      reader.close();
    }
  });

test("conflateMs: the conflated subscriber gets fewer updates, the newest last; "
  + "an unconflated one gets every write", async () => {
    const writer = new Client(gw1.url);
    const slow = new Client(gw1.url);
    const fast = new Client(gw2.url);
    const seen = { slow: [], fast: [] };
    slow.on("value", (ev) => seen.slow.push(ev.value));
    fast.on("value", (ev) => seen.fast.push(ev.value));
    try {
      await Promise.all([slow.connect(), fast.connect()]);
      const [slowView, fastView] = await Promise.all([
        slow.subscribeState("ticker:c", { conflateMs: 1000 }),
        fast.subscribeState("ticker:c", { conflateMs: 0 }),
      ]);
      for (let i = 1; i <= 40; i++) await writer.setState("ticker:c", "n", i);
      await eventually(() => slowView.get("n") === 40 && fastView.get("n") === 40, 15000,
                       "the last value");
      assert.deepEqual(seen.fast, Array.from({ length: 40 }, (_, i) => i + 1));
      assert.ok(seen.slow.length < 40, `conflated: ${seen.slow.length} updates`);
      // never an older value after a newer one
      assert.deepEqual(seen.slow, [...seen.slow].sort((x, y) => x - y));
      assert.equal(seen.slow.at(-1), 40);
    } finally {
      writer.close();
      slow.close();
      fast.close();
    }
  });

test("resume: the instance is killed while keys are written; after reconnecting the "
  + "client holds exactly the store's values, each missed key once, no new snapshot",
  async () => {
    const extra = await new Gateway(envr.env).start();
    const relay = new Relay();
    await relay.up(extra.url);
    const writer = new Client(gw2.url);
    const reader = new Client(relay.url, { minDelay: 50, maxDelay: 200 });
    const updates = [];
    let snapshots = 0;
    reader.on("value", (ev) => updates.push(ev));
    reader.on("snapshot", () => { snapshots += 1; });
    try {
      await writer.patchState("ticker:r", { set: { a: 1, b: 2, c: 3 } });
      await reader.connect();
      const view = await reader.subscribeState("ticker:r");
      assert.deepEqual(view.toJSON(), { a: 1, b: 2, c: 3 });
      const down = new Promise((r) => reader.once("disconnected", r));
      // the instance the client is on dies, and nothing answers until the writes are done
      await relay.down();
      extra.kill();
      await down;
      // while away: a written three times, b deleted, d created, e created and deleted
      for (let i = 10; i <= 12; i++) await writer.setState("ticker:r", "a", i);
      await writer.deleteState("ticker:r", "b");
      await writer.setState("ticker:r", "d", { deep: [1, 2] });
      await writer.setState("ticker:r", "e", "gone soon");
      await writer.deleteState("ticker:r", "e");
      const last = (await writer.getState("ticker:r")).seq;
      assert.deepEqual(updates, [], "nothing arrives while away");
      await relay.up(gw2.url); // the other instance
      await eventually(() => view.seq === last, 15000, "the resumed values");
      assert.deepEqual(view.toJSON(), await stored(writer, "ticker:r"));
      assert.deepEqual(view.toJSON(), { a: 12, c: 3, d: { deep: [1, 2] } });
      assert.equal(snapshots, 1, "resumed with since, not a new snapshot");
      const keys = updates.map((u) => u.key);
      assert.deepEqual([...keys].sort(), ["a", "b", "d", "e"], "each missed key once");
      assert.equal(updates.find((u) => u.key === "a").value, 12);
      // and live again on the new instance
      await writer.setState("ticker:r", "c", 30);
      await eventually(() => view.get("c") === 30, 10000, "a live write after the resume");
    } finally {
      writer.close();
      reader.close();
      extra.kill();
      await relay.down();
    }
  });

test("away longer than tombstones are kept: the resume gets a snapshot, which replaces "
  + "the values (a key deleted while away is gone)", async () => {
    const env = { ...envr.env, STATE_TOMBSTONE_TTL: "1", RETENTION_INTERVAL: "1" };
    const [near, far] = await Promise.all([new Gateway(env).start(), new Gateway(env).start()]);
    const relay = new Relay();
    await relay.up(near.url);
    const writer = new Client(far.url);
    const reader = new Client(relay.url, { minDelay: 50, maxDelay: 200 });
    const snapshots = [];
    reader.on("snapshot", (ev) => snapshots.push(ev.seq));
    try {
      await writer.patchState("ticker:p", { set: { a: 1, b: 2 } });
      await reader.connect();
      const view = await reader.subscribeState("ticker:p");
      assert.deepEqual(view.toJSON(), { a: 1, b: 2 });
      const since = view.seq;
      const down = new Promise((r) => reader.once("disconnected", r));
      await relay.down();
      near.kill();
      await down;
      await writer.deleteState("ticker:p", "b");
      await writer.setState("ticker:p", "c", 3);
      // until b's tombstone is purged: a resume from `since` then gets a snapshot
      await eventually(() => firstFrameAfter(far.url, "ticker:p", since)
        .then((type) => type === "snapshot"), 20000, "b's tombstone purged");
      await relay.up(far.url);
      const { seq } = await writer.getState("ticker:p");
      await eventually(() => view.seq === seq, 15000, "the fresh snapshot");
      assert.deepEqual(view.toJSON(), await stored(writer, "ticker:p"));
      assert.deepEqual(view.toJSON(), { a: 1, c: 3 });
      assert.deepEqual(snapshots, [since, seq]);
    } finally {
      writer.close();
      reader.close();
      await relay.down();
      near.kill();
      await far.stop();
    }
  });
