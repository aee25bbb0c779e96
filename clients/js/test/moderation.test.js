// Moderation methods against a real gateway: a moderator's token bans, mutes, sets
// slow mode and reads the log; the banned user's post is refused with the code.

import { test } from "node:test";
import assert from "node:assert/strict";

import { Client, GatewayError } from "../src/index.js";
import { gatewayPerFile, jwt } from "./gateway.js";

const SECRET = "js-moderation-secret-0123456789abcdef";
const shared = gatewayPerFile({ AUTH_SECRET: SECRET });

const exp = () => Math.floor(Date.now() / 1000) + 600;

test("ban, mute, slow mode and the log", async () => {
  const mod = new Client(shared.gw.url, { token: jwt(SECRET, { sub: "mo", exp: exp(), moderate: ["js-*"] }) });
  const ana = new Client(shared.gw.url, { token: jwt(SECRET, { sub: "ana", exp: exp() }) });
  const room = "js-mod";
  const ban = await mod.ban(room, "ana", { duration: 600, reason: "spam" });
  assert.equal(ban.action, "banned");
  assert.equal(ban.by, "mo");
  assert.deepEqual((await mod.bans(room)).map((b) => b.user), ["ana"]);
  await assert.rejects(ana.history(room), (e) => e instanceof GatewayError && e.code === "banned");
  await mod.unban(room, "ana");
  await assert.rejects(mod.unban(room, "ana"), (e) => e.code === "not_found");
  await mod.mute(room, "ana");
  assert.deepEqual((await mod.mutes(room)).map((m) => m.user), ["ana"]);
  await mod.unmute(room, "ana");
  await mod.setSlowMode(room, 600);
  assert.equal((await ana.roomSettings(room)).slow_mode, 600);
  await assert.rejects(ana.ban(room, "bo"), (e) => e.code === "forbidden");
  const page = await mod.moderationLog(room, { limit: 2 });
  assert.deepEqual(page.actions.map((a) => a.action), ["slow_mode", "unmuted"]);
  const older = await mod.moderationLog(room, { cursor: page.next_cursor });
  assert.deepEqual(older.actions.map((a) => a.action), ["muted", "unbanned", "banned"]);
  mod.close();
  ana.close();
});
