// emit() against a real gateway whose `live` namespace holds ephemeral rooms.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";

import { Client, GatewayError } from "../src/index.js";
import { Gateway, environment, eventually } from "./gateway.js";

let envr;
let gw;

before(async () => {
  const file = path.join(mkdtempSync(path.join(tmpdir(), "cg-ns-")), "namespaces.toml");
  writeFileSync(file, '[namespaces.live]\nkind = "ephemeral"\n');
  envr = await environment({ NAMESPACES_FILE: file });
  gw = await new Gateway(envr.env).start();
});

after(async () => {
  await gw?.stop();
  envr?.cleanup();
});

test("emit reaches subscribers of an ephemeral room as an event; a stored room refuses it",
  async () => {
    const ana = new Client(gw.url, { user: "ana" });
    const bob = new Client(gw.url, { user: "bob" });
    const events = [];
    bob.on("event", (ev) => events.push(ev));
    try {
      await assert.rejects(ana.emit("live:x", "goal"), (e) => e.code === "disconnected");
      await Promise.all([ana.connect(), bob.connect()]);
      await bob.subscribe("live:x");
      assert.equal(await ana.emit("live:x", "goal", { min: 9 }), undefined);
      await eventually(() => events.length === 1, 10000, "the event");
      assert.deepEqual(events, [{ room: "live:x", event: "goal", data: { min: 9 } }]);
      await assert.rejects(ana.emit("lobby", "goal"), (e) =>
        e instanceof GatewayError && e.code === "wrong_room_kind");
    } finally {
      ana.close();
      bob.close();
    }
  });
