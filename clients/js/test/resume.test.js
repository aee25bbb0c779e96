// Exactly once across failures: an instance killed mid-stream, an ack lost with
// its socket, a socket cut right after a publish was sent.

import { test, after } from "node:test";
import assert from "node:assert/strict";
import { WebSocket as WS } from "ws";

import { Client, State } from "../src/index.js";
import { Gateway, environment, eventually, post, sleep, t } from "./gateway.js";

const cleanups = [];
after(async () => {
  for (const fn of cleanups.reverse()) await fn();
});

async function gateways(n) {
  const envr = await environment();
  const gws = [];
  cleanups.push(() => envr.cleanup());
  for (let i = 0; i < n; i++) {
    const gw = await new Gateway(envr.env).start();
    cleanups.push(() => gw.stop());
    gws.push(gw);
  }
  return gws;
}

const fast = { minDelay: 50, maxDelay: 400 };

test("an instance killed mid-stream: the client resumes on another, no gap, no duplicate",
  async () => {
    const [a, b] = await gateways(2);
    const c = new Client([a.url, b.url], fast);
    const seqs = [];
    const urls = [];
    c.on("message", (m) => seqs.push(m.seq));
    c.on("connected", (ev) => urls.push(ev.url));
    const drops = [];
    c.on("disconnected", (ev) => drops.push(ev.code));
    try {
      await c.connect();
      await c.subscribe("stream", { since: 0 });
      const total = 120;
      let posted = 0;
      const poster = (async () => {
        for (; posted < total; posted++) {
          await post(b.url, "stream", `m${posted + 1}`);
          if (posted % 10 === 0) await sleep(5);
        }
      })();
      await eventually(() => seqs.length >= 40, 20000, "40 messages before the kill");
      a.kill();
      await poster;
      await eventually(() => seqs.length >= total, 30000, `${total} messages`);
      await sleep(t(300)); // anything extra would show up now
      assert.deepEqual(seqs, Array.from({ length: total }, (_, i) => i + 1));
      assert.ok(drops.length >= 1, "the kill was seen as a drop");
      assert.deepEqual(urls.slice(0, 2), [a.url, b.url], "resumed on the other instance");
      assert.equal(c.state, State.CONNECTED);
    } finally {
      c.close();
    }
  });

/** A `ws` socket that, once, drops the connection at the moment an ack arrives: the
 * server stored the message, the client never hears of it. */
function lossyAt(kind, counter) {
  return class extends WS {
    addEventListener(type, fn, opts) {
      if (type !== "message") return super.addEventListener(type, fn, opts);
      return super.addEventListener(type, (ev) => {
        if (counter.armed && kind === "ack" && String(ev.data).includes('"type":"ack"')) {
          counter.armed = false;
          counter.dropped += 1;
          this.terminate();
          return;
        }
        fn(ev);
      }, opts);
    }

    send(data, ...rest) {
      if (String(data).includes('"type":"publish"')) counter.publishes.push(JSON.parse(data));
      super.send(data, ...rest);
      if (counter.armed && kind === "send" && String(data).includes('"type":"publish"')) {
        counter.armed = false;
        counter.dropped += 1;
        this.terminate(); // cut right after the frame left: the server may or may not have it
      }
    }
  };
}

for (const kind of ["ack", "send"]) {
  test(`a publish whose ${kind === "ack" ? "ack was lost" : "socket was cut after sending"}`
       + " is stored once", async () => {
    const [gw] = await gateways(1);
    const counter = { armed: false, dropped: 0, publishes: [] };
    const c = new Client(gw.url, { ...fast, WebSocket: lossyAt(kind, counter) });
    const seen = [];
    c.on("message", (m) => seen.push(m.seq));
    try {
      await c.connect();
      await c.subscribe("once", { since: 0 });
      assert.equal((await c.publish("once", "before")).seq, 1);
      counter.armed = true;
      const msg = await c.publish("once", "exactly once");
      assert.equal(counter.dropped, 1);
      assert.equal(msg.text, "exactly once");
      assert.equal(msg.seq, 2);
      const keyed = counter.publishes.filter((f) => f.text === "exactly once");
      assert.equal(keyed.length, 2, "sent again after the reconnection");
      assert.equal(keyed[0].key, keyed[1].key, "with the same key");
      assert.equal((await c.publish("once", "after")).seq, 3);
      const page = await c.history("once");
      assert.deepEqual(page.messages.map((m) => m.text), ["before", "exactly once", "after"]);
      await eventually(() => seen.length === 3, 10000, "three messages");
      assert.deepEqual(seen, [1, 2, 3]);
    } finally {
      c.close();
    }
  });
}

test("a replayed or gapped frame never shows twice or out of order", async () => {
  const [gw] = await gateways(1);
  for (let i = 1; i <= 4; i++) await post(gw.url, "dup", `d${i}`);
  // a socket that repeats every message frame and hides seq 3 the first time
  let hidden = false;
  class Faulty extends WS {
    addEventListener(type, fn, opts) {
      if (type !== "message") return super.addEventListener(type, fn, opts);
      return super.addEventListener(type, (ev) => {
        const f = JSON.parse(ev.data);
        if (f.type === "message" && f.message.seq === 3 && !hidden) {
          hidden = true;
          return;
        }
        fn(ev);
        if (f.type === "message") fn(ev);
      }, opts);
    }
  }
  const c = new Client(gw.url, { ...fast, WebSocket: Faulty });
  const seqs = [];
  const drops = [];
  c.on("message", (m) => seqs.push(m.seq));
  c.on("disconnected", (ev) => drops.push(ev.code));
  try {
    await c.connect();
    await c.subscribe("dup", { since: 0 });
    await eventually(() => seqs.length === 4, 10000, "four messages");
    await sleep(t(200));
    assert.deepEqual(seqs, [1, 2, 3, 4]);
    assert.deepEqual(drops, [4002], "the gap reopened the socket once");
  } finally {
    c.close();
  }
});
