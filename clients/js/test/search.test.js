// search() against a real gateway: matches newest first, highlights in code points,
// rooms, paging by cursor, and a refused query's code.

import { test } from "node:test";
import assert from "node:assert/strict";

import { Client, GatewayError } from "../src/index.js";
import { gatewayPerFile, post } from "./gateway.js";

const shared = gatewayPerFile();

test("search finds, highlights, limits to rooms and pages by cursor", async () => {
  await post(shared.gw.url, "s-one", "😀 kickoff meeting");
  await post(shared.gw.url, "s-two", "meeting notes");
  await post(shared.gw.url, "s-two", "nothing here");
  const c = new Client(shared.gw.url);
  const all = await c.search("meeting");
  assert.deepEqual(all.results.map((r) => r.message.text), ["meeting notes", "😀 kickoff meeting"]);
  const [start, end] = all.results[1].highlights[0];
  assert.equal(Array.from(all.results[1].message.text).slice(start, end).join(""), "meeting");
  const one = await c.search("meet", { rooms: ["s-one"] });
  assert.deepEqual(one.results.map((r) => r.message.room), ["s-one"]);
  const first = await c.search("meeting", { limit: 1 });
  assert.equal(first.results.length, 1);
  const second = await c.search("meeting", { limit: 1, cursor: first.next_cursor });
  assert.equal(second.results[0].message.text, "😀 kickoff meeting");
  assert.equal(second.next_cursor, null);
  assert.deepEqual(await c.search("-only"), { results: [], next_cursor: null });
  await assert.rejects(
    c.search("meeting", { cursor: "not a cursor" }),
    (e) => e instanceof GatewayError && e.code === "invalid_request",
  );
  c.close();
});
