// Real gateways for the tests: `chat-gateway serve` processes from the repository's
// virtual environment, on free loopback ports, sharing a throwaway Postgres database
// and a Redis key prefix of their own.

import { spawn, spawnSync } from "node:child_process";
import { randomBytes, createHmac } from "node:crypto";
import { createServer, connect } from "node:net";
import { fileURLToPath } from "node:url";
import path from "node:path";
import { before, after } from "node:test";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../..");
const SCALE = Number(process.env.TEST_TIMEOUT_SCALE ?? "1") || 1;
const PG = ["-h", process.env.PGHOST ?? "127.0.0.1", "-U", process.env.PGUSER ?? "postgres"];
const REDIS_URL = process.env.TEST_REDIS_URL ?? "redis://127.0.0.1:6379/0";

/** A wait in milliseconds, scaled by TEST_TIMEOUT_SCALE for loaded machines. */
export const t = (ms) => ms * SCALE;

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export function gatewayCommand() {
  const venv = process.env.VENV ? path.resolve(ROOT, process.env.VENV) : path.join(ROOT, ".venv");
  return process.env.CHAT_GATEWAY ?? path.join(venv, "bin", "chat-gateway");
}

export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.unref();
    srv.on("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

function run(cmd, args, what) {
  const r = spawnSync(cmd, args, { encoding: "utf8" });
  if (r.status !== 0) {
    throw new Error(`${what} failed (${cmd} ${args.join(" ")}): ${r.error?.message ?? r.stderr}. `
      + "Start PostgreSQL on 127.0.0.1:5432 with a passwordless `postgres` role "
      + "(or set PGHOST/PGUSER) and Redis on 127.0.0.1:6379.");
  }
  return r.stdout;
}

function checkRedis() {
  const { hostname, port } = new URL(REDIS_URL);
  return new Promise((resolve, reject) => {
    const s = connect(Number(port || 6379), hostname, () => { s.end(); resolve(); });
    s.on("error", () => reject(new Error(
      `Redis is not reachable at ${REDIS_URL}: start it (redis-server --port 6379) `
      + "or set TEST_REDIS_URL.")));
  });
}

/** A throwaway database and key prefix; `env` for gateways sharing them. */
export async function environment(extra = {}) {
  await checkRedis();
  const tag = "cgsdkjs_" + randomBytes(6).toString("hex");
  run("createdb", [...PG, tag], "creating a test database");
  const host = PG[1];
  const user = PG[3];
  return {
    env: {
      DATABASE_URL: `postgresql://${user}@${host}:5432/${tag}`,
      REDIS_URL,
      KEY_PREFIX: tag + ":",
      RATE_LIMIT: "100000/1s",
      CONNECT_RATE_LIMIT: "100000/1s",
      PUBLISH_RATE_LIMIT: "100000/1s",
      LOG_LEVEL: "warning",
      POSITION_INTERVAL: "1",
      ...extra,
    },
    cleanup() {
      spawnSync("dropdb", [...PG, "--if-exists", "--force", tag]);
      const { hostname, port } = new URL(REDIS_URL);
      const keys = spawnSync("redis-cli", ["-h", hostname, "-p", String(port || 6379),
                                           "--scan", "--pattern", tag + ":*"],
                             { encoding: "utf8" }).stdout.split("\n").filter(Boolean);
      for (let i = 0; i < keys.length; i += 500) {
        spawnSync("redis-cli", ["-h", hostname, "-p", String(port || 6379), "del",
                                ...keys.slice(i, i + 500)]);
      }
    },
  };
}

export class Gateway {
  constructor(env) {
    this.env = env;
    this.proc = null;
    this.log = "";
  }

  get url() {
    return `http://127.0.0.1:${this.port}`;
  }

  async start() {
    this.port = await freePort();
    const cmd = gatewayCommand();
    this.proc = spawn(cmd, ["serve", "--host", "127.0.0.1", "--port", String(this.port)], {
      env: { ...process.env, ...this.env },
      stdio: ["ignore", "pipe", "pipe"],
    });
    const keep = (chunk) => { this.log = (this.log + chunk).slice(-4000); };
    this.proc.stdout.on("data", keep);
    this.proc.stderr.on("data", keep);
    let failed = null;
    this.proc.on("error", (err) => { failed = err; });
    const deadline = Date.now() + t(20000);
    while (Date.now() < deadline) {
      if (failed) {
        throw new Error(`cannot run ${cmd} (${failed.message}): create the repository's `
          + "virtual environment first: python3 -m venv .venv && .venv/bin/pip install -e .");
      }
      if (this.proc.exitCode !== null) {
        throw new Error(`gateway exited (${this.proc.exitCode}):\n${this.log}`);
      }
      try {
        const r = await fetch(this.url + "/readyz");
        if (r.status === 200) return this;
      } catch {
        // not listening yet
      }
      await sleep(50);
    }
    throw new Error(`gateway on port ${this.port} not ready:\n${this.log}`);
  }

  /** SIGKILL: the instance vanishes without closing its sockets. */
  kill() {
    if (this.proc && this.proc.exitCode === null) this.proc.kill("SIGKILL");
  }

  async stop() {
    if (!this.proc || this.proc.exitCode !== null || this.proc.signalCode !== null) return;
    const exited = new Promise((r) => this.proc.once("exit", r));
    this.proc.kill("SIGTERM");
    const timer = setTimeout(() => this.proc.kill("SIGKILL"), t(15000));
    await exited;
    clearTimeout(timer);
  }
}

export async function post(base, room, text, headers = {}) {
  const r = await fetch(`${base}/v1/rooms/${room}/messages`, {
    method: "POST",
    headers: { "content-type": "application/json", ...headers },
    body: JSON.stringify({ text }),
  });
  if (r.status >= 300) throw new Error(`post: ${r.status} ${await r.text()}`);
  return r.json();
}

/** Resolves when check() is truthy, polling; rejects after `ms` (scaled). */
export async function eventually(check, ms = 10000, what = "condition") {
  const deadline = Date.now() + t(ms);
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(25);
  }
}

/** An HS256 JWT, signed here as an identity provider would. */
export function jwt(secret, claims) {
  const b64 = (obj) => Buffer.from(JSON.stringify(obj)).toString("base64url");
  const head = b64({ alg: "HS256", typ: "JWT" });
  const body = b64(claims);
  const sig = createHmac("sha256", secret).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${sig}`;
}

// One gateway for a test file: started before its first test, stopped after its
// last. ``shared.gw`` and ``shared.envr`` are set once it has started.
export function gatewayPerFile(extra = {}) {
  const shared = { envr: undefined, gw: undefined };
  before(async () => {
    shared.envr = await environment(extra);
    shared.gw = await new Gateway(shared.envr.env).start();
  });
  after(async () => {
    await shared.gw?.stop();
    shared.envr?.cleanup();
  });
  return shared;
}
