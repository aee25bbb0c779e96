// Tokens: a refused upgrade closes the client for good; a token provider keeps a
// client connected past its tokens' expiry, resuming without a gap.

import { test } from "node:test";
import assert from "node:assert/strict";

import { WebSocket as NodeWebSocket } from "ws";

import { Client, State } from "../src/index.js";
import { eventually, gatewayPerFile, jwt, sleep } from "./gateway.js";

const SECRET = "sdk-test-secret-0123456789abcdef";
const shared = gatewayPerFile({ AUTH_SECRET: SECRET });

const now = () => Math.floor(Date.now() / 1000);

test("a refused upgrade (HTTP 401) closes the client for good", async () => {
  const c = new Client(shared.gw.url, { token: jwt("wrong-secret", { sub: "ana", exp: now() + 60 }),
                                 minDelay: 50 });
  const states = [];
  c.on("state", (ev) => states.push(ev));
  await assert.rejects(c.connect(), (e) => e.code === "unauthorized" && e.status === 401);
  assert.equal(c.state, State.CLOSED);
  assert.equal(states.at(-1).status, 401);
  assert.equal(states.filter((s) => s.state === State.CONNECTING).length, 1, "no retry");
});

test("a refused upgrade says why, in the server's words", async () => {
  const c = new Client(shared.gw.url, { minDelay: 50 }); // no token
  const states = [];
  c.on("state", (ev) => states.push(ev));
  await assert.rejects(c.connect(), (e) => e.code === "unauthorized" && e.status === 401
    && e.message === "a bearer token is required");
  const closed = states.at(-1);
  assert.equal(closed.state, State.CLOSED);
  assert.equal(closed.reason, "a bearer token is required");
  assert.equal(closed.error.code, "unauthorized");
  assert.equal(closed.error.detail.message, "a bearer token is required");
});

// A WebSocket as a browser has it: a refused upgrade's status and body are hidden.
class BrowserWebSocket extends NodeWebSocket {
  on(type, listener) {
    return type === "unexpected-response" ? this : super.on(type, listener);
  }

  addEventListener(type, listener, options) {
    if (type !== "error") return super.addEventListener(type, listener, options);
    return super.addEventListener(type, () => listener({ type: "error" }), options);
  }
}

test("where the upgrade's status is hidden, the HTTP API's 401 closes the client", async () => {
  const c = new Client(shared.gw.url, { token: jwt("wrong-secret", { sub: "ana", exp: now() + 60 }),
                                 WebSocket: BrowserWebSocket, minDelay: 50, maxDelay: 100 });
  const states = [];
  c.on("state", (ev) => states.push(ev));
  const subscribed = c.subscribe("probe");
  await assert.rejects(c.connect(), (e) => e.code === "unauthorized" && e.status === 401
    && e.message !== "HTTP 401");
  await assert.rejects(subscribed, (e) => e.code === "unauthorized" && e.status === 401);
  assert.equal(c.state, State.CLOSED);
  assert.equal(states.at(-1).status, 401);
  const attempts = states.filter((s) => s.state === State.CONNECTING).length;
  await sleep(500);
  assert.equal(states.filter((s) => s.state === State.CONNECTING).length, attempts, "no retry");
});

test("where the upgrade's status is hidden, a valid token is not taken for a refused one",
  async () => {
    const c = new Client(shared.gw.url, { token: jwt(SECRET, { sub: "ana", exp: now() + 60 }),
                                   WebSocket: BrowserWebSocket });
    try {
      await c.connect();
      await c.subscribe("probe-ok");
      assert.equal((await c.publish("probe-ok", "hi")).author, "ana");
    } finally {
      c.close();
    }
  });

test("a token provider carries the connection across token expiry, with no gap", async () => {
  let issued = 0;
  const getToken = async () => {
    issued += 1;
    return jwt(SECRET, { sub: "ana", exp: now() + 2 });
  };
  const c = new Client(shared.gw.url, { getToken, refreshMargin: 1, minDelay: 50, maxDelay: 200 });
  const seqs = [];
  const closes = [];
  c.on("message", (m) => seqs.push(m.seq));
  c.on("disconnected", (ev) => closes.push(ev.code));
  const publisher = new Client(shared.gw.url, { token: jwt(SECRET, { sub: "bob", exp: now() + 600 }) });
  try {
    await c.connect();
    await c.subscribe("auth", { since: 0 });
    await publisher.connect();
    const deadline = Date.now() + 9000; // past a few expiries (2 s + the 5 s leeway)
    let n = 0;
    while (Date.now() < deadline || n < 10) {
      n += 1;
      await publisher.publish("auth", `m${n}`);
      await sleep(100);
    }
    await eventually(() => seqs.length === n, 20000, `${n} messages`);
    assert.deepEqual(seqs, Array.from({ length: n }, (_, i) => i + 1));
    assert.ok(issued >= 2, `a new token was fetched (${issued})`);
    // the server either refreshed in band or closed 1008 at expiry and the client came back
    assert.ok(closes.every((code) => code === 1008), JSON.stringify(closes));
    await eventually(() => c.state === State.CONNECTED, 10000, "connected again");
    const msg = await c.publish("auth", "from ana");
    assert.equal(msg.author, "ana");
  } finally {
    c.close();
    publisher.close();
  }
});

test("without a token provider, the expiry's 1008 closes the client for good", async () => {
  const c = new Client(shared.gw.url, { token: jwt(SECRET, { sub: "ana", exp: now() + 1 }),
                                 minDelay: 50 });
  const closed = new Promise((resolve) => c.on("closed", resolve));
  await c.connect();
  await c.subscribe("auth-expiry");
  assert.equal((await c.publish("auth-expiry", "x")).seq, 1);
  const ev = await closed; // exp + the server's 5 s leeway
  assert.equal(ev.code, 1008);
  assert.equal(c.state, State.CLOSED);
  await assert.rejects(c.publish("auth-expiry", "late"), (e) => e.code === "closed");
});
