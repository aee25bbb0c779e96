"""Real parts for the tests: throwaway Postgres databases, Redis key prefixes,
gateway processes on free loopback ports, and WebSocket/SSE clients.

Nothing here fakes a server. A service that cannot be reached fails the test
with a sentence saying how to start it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import jwt
import orjson
import redis.asyncio as aioredis
import websockets

from tests.metrics_text import total

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get("TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
# Multiply every wait by this on a slow machine.
SCALE = float(os.environ.get("TEST_TIMEOUT_SCALE", "1"))

PG_HINT = (
    "PostgreSQL is not reachable at {url}: start it with "
    "`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start` "
    "(or set TEST_PG_ADMIN_URL)"
)
REDIS_HINT = (
    "Redis is not reachable at {url}: start it with `redis-server --daemonize yes "
    '--bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no` '
    "(or set TEST_REDIS_URL)"
)


def t(seconds: float) -> float:
    """A timeout, scaled for slow machines."""
    return seconds * SCALE


def _port_block() -> Iterator[int]:
    """The ports this process hands out, in turn, forever.

    Below the kernel's ephemeral range, so that no outgoing connection (of this test
    or of any other) can be given a port between its pick and the bind of the server
    it was picked for, and a client reconnecting to a port where nothing listens yet
    cannot be handed that very port as its own. A block of its own for each
    pytest-xdist worker (``PYTEST_XDIST_WORKER``, inherited by the processes a test
    starts), so that two workers never pick the same port; from a random point of the
    block, so that two runs at once on one machine rarely meet."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    first = 10_000
    workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    size = (ephemeral - first) // workers
    start = first + (worker % workers) * size
    offset = secrets.randbelow(size)  # not random's: a test may seed that
    for i in itertools.count():
        yield start + (offset + i) % size


_PORTS = _port_block()


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports of this process's block (see ``_port_block``),
    each checked free by binding it; all held at once while they are picked."""
    held: list[socket.socket] = []
    try:
        for port in itertools.islice(_PORTS, 5000):
            if len(held) == n:
                break
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # taken, or still in TIME_WAIT: the next one
                s.close()
                continue
            held.append(s)
        if len(held) < n:
            raise RuntimeError(f"no {n} free loopback ports in 5000 tried")
        return [int(s.getsockname()[1]) for s in held]
    finally:
        for s in held:
            s.close()


# -- Postgres and Redis ----------------------------------------------------------


async def create_database(admin_url: str = PG_ADMIN_URL, tag: str = "cgtest") -> str:
    """A new empty database; returns its URL."""
    name = f"{tag}_{uuid.uuid4().hex[:12]}"
    try:
        conn = await asyncpg.connect(admin_url, timeout=5)
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        raise RuntimeError(PG_HINT.format(url=admin_url) + f" [{exc!r}]") from exc
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    base = admin_url.rsplit("/", 1)[0]
    return f"{base}/{name}"


async def drop_database(url: str, admin_url: str = PG_ADMIN_URL) -> None:
    name = url.rsplit("/", 1)[1]
    conn = await asyncpg.connect(admin_url, timeout=5)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def check_redis(url: str = REDIS_URL) -> None:
    client = aioredis.from_url(url, socket_connect_timeout=3)
    try:
        await client.ping()
    except Exception as exc:
        raise RuntimeError(REDIS_HINT.format(url=url) + f" [{exc!r}]") from exc
    finally:
        await client.aclose()


async def delete_prefix(prefix: str, url: str = REDIS_URL) -> None:
    client = aioredis.from_url(url)
    try:
        async for key in client.scan_iter(match=f"{prefix}*", count=1000):
            await client.delete(key)
    finally:
        await client.aclose()


def new_prefix(tag: str = "cgtest") -> str:
    return f"{tag}:{uuid.uuid4().hex[:10]}:"


# -- redis-server processes of the tests' own ---------------------------------------


class RedisServer:
    """A redis-server of the test's own on a free port; stop and start it at will."""

    def __init__(self, port: int | None = None, extra_args: tuple[str, ...] = ()) -> None:
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="cgtest-redis-")
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                "--logfile",
                f"{self.dir}/redis.log",
                *self.extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + t(10)
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith((b"+PONG", b"-NOAUTH")):  # up (asks a password)
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


class RedisClusterServers:
    """A Redis Cluster of the test's own: ``size`` primaries, each with ``replicas``
    replicas, on free ports. Nodes 0 .. size-1 start as the primaries.

    ``restart(i)`` kills primary ``i`` and starts it again on its port with its
    nodes.conf, so it rejoins owning the same slots (with an empty dataset).
    """

    def __init__(self, size: int = 3, node_timeout_ms: int = 5000, replicas: int = 0) -> None:
        self.size = size
        self.replicas = replicas
        args = (
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            str(node_timeout_ms),
        )
        # The bus port is named too: port + 10000 may be taken or past 65535. All
        # 2 * nodes ports are picked together so no two nodes can share one.
        count = size * (1 + replicas)
        ports = free_ports(2 * count)
        self.nodes = [
            RedisServer(ports[2 * i], extra_args=(*args, "--cluster-port", str(ports[2 * i + 1])))
            for i in range(count)
        ]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> RedisClusterServers:
        for node in self.nodes:
            node.start()
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{n.port}" for n in self.nodes),
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            timeout=t(30),
        )
        self.wait_ok()
        if self.replicas:
            self.wait_replicas()
        return self

    def role(self, i: int) -> str:
        """``master`` or ``slave``, as node ``i`` says."""
        return self.info(i, "role").split("\n", 1)[0].strip()

    def wait_replicas(self, timeout: float = 30) -> None:
        """Until every replica is in sync with its primary."""
        deadline = time.monotonic() + t(timeout)
        while time.monotonic() < deadline:
            replicas = [i for i in range(len(self.nodes)) if self.role(i) == "slave"]
            if len(replicas) == self.size * self.replicas and all(
                "master_link_status:up" in self.info(i, "info", "replication") for i in replicas
            ):
                return
            time.sleep(0.1)
        raise RuntimeError("Redis Cluster replicas did not come in sync")

    def info(self, i: int, *command: str) -> str:
        return subprocess.run(
            ["redis-cli", "-p", str(self.nodes[i].port), *command],
            capture_output=True,
            text=True,
            timeout=t(10),
        ).stdout

    def wait_ok(self, timeout: float = 30) -> None:
        """Until every node sees the whole cluster: state ok, all slots, all nodes."""
        want = (
            "cluster_state:ok",
            "cluster_slots_ok:16384",
            f"cluster_known_nodes:{len(self.nodes)}",
        )
        deadline = time.monotonic() + t(timeout)
        while time.monotonic() < deadline:
            infos = [self.info(i, "cluster", "info") for i in range(len(self.nodes))]
            if all(all(w in info for w in want) for info in infos):
                return
            time.sleep(0.1)
        raise RuntimeError(f"Redis Cluster not ok: {infos}")

    def slot_ranges(self) -> list[tuple[int, int, int]]:
        """(first slot, last slot, node index) as node 0 sees them (CLUSTER SLOTS)."""
        out = subprocess.run(
            ["redis-cli", "-p", str(self.nodes[0].port), "--json", "cluster", "slots"],
            capture_output=True,
            text=True,
            timeout=t(10),
        ).stdout
        ports = [n.port for n in self.nodes]
        return [
            (first, last, ports.index(int(primary[1])))
            for first, last, primary, *_ in json.loads(out)
        ]

    def restart(self, i: int, down_for: float = 0.5) -> None:
        self.nodes[i].stop()
        time.sleep(down_for)
        self.nodes[i].start()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class RedisSentinelServers:
    """A primary, ``replicas`` replicas and ``sentinels`` sentinels (``redis-server
    --sentinel``) of the test's own, on free ports, monitoring the primary as
    ``service``. Short timeouts, so a killed primary is replaced in seconds."""

    def __init__(
        self,
        replicas: int = 1,
        sentinels: int = 3,
        service: str = "chat",
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
    ) -> None:
        self.service = service
        ports = free_ports(1 + replicas + sentinels)
        self.servers = [RedisServer(ports[0])]
        self.servers += [
            RedisServer(port, extra_args=("--replicaof", "127.0.0.1", str(ports[0])))
            for port in ports[1 : 1 + replicas]
        ]
        self.sentinel_ports = ports[1 + replicas :]
        self.quorum = sentinels // 2 + 1
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.dir = tempfile.mkdtemp(prefix="cgtest-sentinel-")
        self.sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{self.service}"

    def start(self) -> RedisSentinelServers:
        for server in self.servers:
            server.start()
        primary = self.servers[0].port
        for port in self.sentinel_ports:
            conf = Path(self.dir) / f"sentinel-{port}.conf"  # sentinels rewrite their file
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
                f"logfile {self.dir}/sentinel-{port}.log\n"
                f"sentinel monitor {self.service} 127.0.0.1 {primary} {self.quorum}\n"
                f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.service} {self.failover_timeout_ms}\n"
                f"sentinel parallel-syncs {self.service} 1\n"
            )
            self.sentinels.append(
                subprocess.Popen(
                    ["redis-server", str(conf), "--sentinel"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        self.wait_settled()
        return self

    def ask(self, port: int, *command: str) -> str:
        return subprocess.run(
            ["redis-cli", "-p", str(port), *command], capture_output=True, text=True, timeout=t(10)
        ).stdout

    def primary_port(self) -> int | None:
        """The primary's port as the first sentinel that answers names it."""
        for port in self.sentinel_ports:
            out = self.ask(port, "sentinel", "get-master-addr-by-name", self.service).split()
            if len(out) == 2:
                return int(out[1])
        return None

    def wait_settled(self, timeout: float = 30) -> None:
        """Until every sentinel knows the others and sees every live replica in sync."""
        live = sum(1 for s in self.servers if s.proc is not None) - 1
        deadline = time.monotonic() + t(timeout)
        while time.monotonic() < deadline:
            ok = True
            for port in self.sentinel_ports:
                master = self.ask(port, "sentinel", "master", self.service).split("\n")
                fields = dict(zip(master[::2], master[1::2], strict=False))
                if (
                    fields.get("num-other-sentinels") != str(len(self.sentinel_ports) - 1)
                    or fields.get("num-slaves") != str(live)
                    or fields.get("flags") != "master"
                ):
                    ok = False
            if ok and live:
                primary = self.primary_port()
                ok = primary is not None and (
                    f"connected_slaves:{live}" in self.ask(primary, "info", "replication")
                )
            if ok:
                return
            time.sleep(0.1)
        raise RuntimeError("Redis sentinels did not settle on the primary and its replicas")

    def stop(self) -> None:
        for proc in self.sentinels:
            proc.kill()
            proc.wait(10)
        self.sentinels = []
        for server in self.servers:
            server.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


# -- Postgres clusters of the tests' own -------------------------------------------------

PG_VERSION = os.environ.get("TEST_PG_VERSION") or (
    sorted(os.listdir("/etc/postgresql"))[-1] if os.path.isdir("/etc/postgresql") else "15"
)
PG_TOOLS_HINT = (
    "Debian's PostgreSQL cluster tools (pg_createcluster, pg_ctlcluster, run as "
    "root) are needed: `apt-get install -y postgresql-common postgresql`"
)


class PostgresPair:
    """A primary and a streaming replica of the test's own (Debian clusters on free
    loopback ports, trust auth), the replica synchronous: a commit returns once the
    replica has flushed it. ``remove()`` drops both clusters whatever state they
    are in. The machine's own ``main`` cluster is never touched."""

    def __init__(self, database: str = "chat") -> None:
        tag = uuid.uuid4().hex[:8]
        self.names = [f"cgtest_{tag}_a", f"cgtest_{tag}_b"]
        self.ports = free_ports(2)
        self.database = database
        self.created: list[str] = []

    def url(self, *hosts: int, attrs: str = "read-write") -> str:
        """A URL naming both servers (or the indexes given), for the primary."""
        ports = [self.ports[i] for i in (hosts or (0, 1))]
        hostlist = ",".join(f"127.0.0.1:{p}" for p in ports)
        return f"postgresql://postgres@{hostlist}/{self.database}?target_session_attrs={attrs}"

    def _run(self, *cmd: str, timeout: float = 60) -> str:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=t(timeout))
        except FileNotFoundError:
            raise RuntimeError(PG_TOOLS_HINT) from None
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stdout}{done.stderr}")
        return done.stdout

    def _create(self, i: int, *settings: str) -> None:
        name, port = self.names[i], self.ports[i]
        if name not in self.created:
            self.created.append(name)
        self._run("pg_createcluster", PG_VERSION, name, "-p", str(port), "--", "--auth=trust")
        conf = Path(f"/etc/postgresql/{PG_VERSION}/{name}")
        # fsync off: a stop -m immediate kills processes, not the machine, so the
        # page cache keeps what they wrote; this saves the shared disk the flushes.
        (conf / "conf.d" / "cgtest.conf").write_text(
            "\n".join(
                (
                    "listen_addresses = '127.0.0.1'",
                    "unix_socket_directories = '/tmp'",
                    "shared_buffers = 16MB",
                    "max_connections = 60",
                    "fsync = off",
                    "wal_keep_size = 64MB",
                    *settings,
                )
            )
            + "\n"
        )
        (conf / "pg_hba.conf").write_text(
            "local all all trust\n"
            "host all all 127.0.0.1/32 trust\n"
            "host replication all 127.0.0.1/32 trust\n"
        )

    def set_synchronous(self, i: int, on: bool) -> None:
        """Whether server ``i`` waits for a synchronous standby (read at its next
        start or reload)."""
        conf = Path(f"/etc/postgresql/{PG_VERSION}/{self.names[i]}/conf.d/cgtest.conf")
        lines = [
            line
            for line in conf.read_text().splitlines()
            if not line.startswith("synchronous_standby_names")
        ]
        if on:
            lines.append("synchronous_standby_names = '*'")
        conf.write_text("\n".join(lines) + "\n")

    def ctl(self, i: int, *action: str) -> None:
        self._run("pg_ctlcluster", "--skip-systemctl-redirect", PG_VERSION, self.names[i], *action)

    def sql(self, i: int, query: str, database: str | None = None) -> str:
        return self._run(
            "psql",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.ports[i]),
            "-U",
            "postgres",
            "-d",
            database or self.database,
            "-XAtc",
            query,
            timeout=20,
        ).strip()

    def start(self) -> PostgresPair:
        try:
            self._create(0)
            self.ctl(0, "start")
            self._run(
                "createdb",
                "-h",
                "127.0.0.1",
                "-p",
                str(self.ports[0]),
                "-U",
                "postgres",
                self.database,
            )
            self.make_standby(1, of=0)
            # Synchronous from here on, on the primary only (in its own config file,
            # not in the data directory a base backup copies): a promoted standby
            # with no standby of its own must not wait for one.
            self.set_synchronous(0, True)
            self.ctl(0, "reload")
            self.wait_sync()
        except BaseException:
            self.remove()
            raise
        return self

    def make_standby(self, i: int, of: int) -> None:
        """Cluster ``i`` (created here if new, else stopped) is emptied and becomes a
        streaming standby of ``of``, from a base backup."""
        if self.names[i] not in self.created:
            self._create(i)
        else:
            with contextlib.suppress(RuntimeError):
                self.ctl(i, "stop", "-m", "immediate")
        data = f"/var/lib/postgresql/{PG_VERSION}/{self.names[i]}"
        self._run("find", data, "-mindepth", "1", "-delete")  # the directory stays postgres's
        self._run(
            "runuser",
            "-u",
            "postgres",
            "--",
            "pg_basebackup",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.ports[of]),
            "-U",
            "postgres",
            "-D",
            data,
            "-R",
            "-X",
            "stream",
            "-c",
            "fast",
        )
        self.ctl(i, "start")

    def in_recovery(self, i: int) -> bool:
        return self.sql(i, "SELECT pg_is_in_recovery()") == "t"

    def wait_sync(self, timeout: float = 30) -> None:
        """Until the primary (0) has its standby streaming as the synchronous one."""
        deadline = time.monotonic() + t(timeout)
        while time.monotonic() < deadline:
            if self.sql(0, "SELECT sync_state FROM pg_stat_replication") == "sync":
                return
            time.sleep(0.1)
        raise RuntimeError("the Postgres standby did not become synchronous")

    def remove(self) -> None:
        for name in self.created:
            subprocess.run(
                ["pg_dropcluster", "--stop", PG_VERSION, name], capture_output=True, timeout=60
            )
            # what a half-made cluster pg_dropcluster does not know may leave
            for path in (
                f"/var/lib/postgresql/{PG_VERSION}/{name}",
                f"/etc/postgresql/{PG_VERSION}/{name}",
            ):
                subprocess.run(["rm", "-rf", path], capture_output=True, timeout=60)
        self.created = []


# -- gateway processes -------------------------------------------------------------


def embedded_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """Environment for a gateway that needs no service: a SQLite file in ``tmp_path``
    and the in-process broker, rate limits out of the way, info logs (tests read them)."""
    return {
        "DATABASE_URL": f"sqlite:///{tmp_path}/gateway.db",
        "REDIS_URL": "memory://",
        "LOG_LEVEL": "info",
        "RATE_LIMIT": "100000/1s",
        "CONNECT_RATE_LIMIT": "100000/1s",
        "PUBLISH_RATE_LIMIT": "100000/1s",
        **extra,
    }


def log_lines(text: str) -> list[dict[str, Any]]:
    """The JSON lines of a gateway's log."""
    return [orjson.loads(line) for line in text.splitlines() if line.startswith("{")]


def no_errors(log: str) -> None:
    """Assert that a gateway's JSON log has no line at error level or above."""
    bad = [line for line in log_lines(log) if line["level"] in ("error", "critical")]
    assert not bad, bad


@dataclass
class Instance:
    """One real ``chat-gateway serve`` process on a free loopback port."""

    env: dict[str, str]
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    log_path: str = ""
    cwd: str | None = None
    inherit_env: bool = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    def start(self) -> Instance:
        base = (
            dict(os.environ)
            if self.inherit_env
            else {
                k: os.environ[k] for k in ("PATH", "HOME", "LANG", "VIRTUAL_ENV") if k in os.environ
            }
        )
        env = {**base, **self.env, "PORT": str(self.port), "HOST": "127.0.0.1"}
        fd, self.log_path = tempfile.mkstemp(prefix=f"cgtest-gw-{self.port}-", suffix=".log")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "chat_gateway", "serve"],
            env=env,
            stdout=fd,
            stderr=fd,
            cwd=self.cwd or ROOT,
        )
        os.close(fd)
        return self

    async def wait_ready(self, timeout: float = 20) -> Instance:
        deadline = time.monotonic() + t(timeout)
        async with httpx.AsyncClient() as client:
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(
                        f"gateway on port {self.port} exited "
                        f"({self.proc.returncode}):\n{self.log()}"
                    )
                try:
                    r = await client.get(self.url + "/readyz", timeout=1)
                    if r.status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.05)
        raise RuntimeError(f"gateway on port {self.port} not ready:\n{self.log()}")

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text()[-4000:]
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)

    def stop(self, timeout: float = 15) -> int | None:
        if self.proc is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(t(timeout))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


async def all_ready(http: httpx.AsyncClient, gws: list[Instance]) -> bool:
    """Whether every gateway of ``gws`` answers /readyz with 200."""
    codes = [(await http.get(g.url + "/readyz")).status_code for g in gws]
    return all(c == 200 for c in codes)


@asynccontextmanager
async def instances(n: int, env: dict[str, str]) -> AsyncIterator[list[Instance]]:
    """``n`` gateways sharing ``env``, started at once (migrations race under the advisory lock)."""
    started: list[Instance] = []
    try:
        for port in free_ports(n):
            started.append(Instance(dict(env), port=port).start())
        await asyncio.gather(*(i.wait_ready() for i in started))
        yield started
    finally:
        for inst in started:
            inst.stop()


# -- clients ---------------------------------------------------------------------


class WSClient:
    """A raw WebSocket client speaking the v1 frames."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.frames: list[dict[str, Any]] = []

    @classmethod
    @asynccontextmanager
    async def connect(cls, url: str, **kwargs: Any) -> AsyncIterator[WSClient]:
        async with websockets.connect(
            url, open_timeout=t(10), max_size=2**22, compression=None, **kwargs
        ) as conn:
            yield cls(conn)

    async def send(self, frame: dict[str, Any]) -> None:
        await self.conn.send(orjson.dumps(frame).decode())

    async def recv(self, timeout: float = 10) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.conn.recv(), t(timeout))
        frame = orjson.loads(raw)
        self.frames.append(frame)
        return frame  # type: ignore[no-any-return]

    async def expect(self, type_: str, timeout: float = 10) -> dict[str, Any]:
        """The next frame of ``type_``; message frames met on the way are kept."""
        deadline = time.monotonic() + t(timeout)
        while True:
            frame = await self.recv(max(0.01, deadline - time.monotonic()))
            if frame.get("type") == type_:
                return frame

    async def subscribe(self, room: str, since: int | None = None, **fields: Any) -> dict[str, Any]:
        """Subscribe to ``room`` (``fields`` go into the frame, e.g. ``changes_since``);
        the ``subscribed`` frame."""
        frame: dict[str, Any] = {"type": "subscribe", "room": room, **fields}
        if since is not None:
            frame["since"] = since
        await self.send(frame)
        return await self.expect("subscribed")

    async def read_all(self) -> None:
        """Keep receiving frames into ``frames`` until cancelled or the socket closes
        (run it as a task beside the test)."""
        with contextlib.suppress(websockets.ConnectionClosed):
            while True:
                self.frames.append(orjson.loads(await self.conn.recv()))

    async def messages(self, room: str, count: int, timeout: float = 20) -> list[int]:
        """Seqs of message frames for ``room`` until ``count`` have arrived (all kept)."""
        deadline = time.monotonic() + t(timeout)
        while len(self.seqs(room)) < count:
            await self.recv(max(0.01, deadline - time.monotonic()))
        return self.seqs(room)

    def seqs(self, room: str) -> list[int]:
        return [
            f["message"]["seq"]
            for f in self.frames
            if f.get("type") == "message" and f.get("room") == room
        ]


class SSEClient:
    """A raw Server-Sent Events reader over httpx."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.comments = 0
        self._task: asyncio.Task[None] | None = None
        self.status: int | None = None
        self.ended = asyncio.Event()
        self.opened = asyncio.Event()

    async def _run(self, url: str, headers: dict[str, str]) -> None:
        try:
            async with httpx.AsyncClient(timeout=httpx.Timeout(None)) as client:
                async with client.stream("GET", url, headers=headers) as resp:
                    self.status = resp.status_code
                    self.opened.set()
                    event: dict[str, Any] = {}
                    async for line in resp.aiter_lines():
                        if line == "":
                            if event:
                                if "data" in event:
                                    event["json"] = orjson.loads(event["data"])
                                self.events.append(event)
                            event = {}
                        elif line.startswith(":"):
                            self.comments += 1
                        else:
                            key, _, value = line.partition(":")
                            value = value[1:] if value.startswith(" ") else value
                            event[key] = event.get(key, "") + value if key == "data" else value
        except (httpx.HTTPError, asyncio.CancelledError):
            pass
        finally:
            self.opened.set()
            self.ended.set()

    @classmethod
    @asynccontextmanager
    async def open(
        cls, url: str, headers: dict[str, str] | None = None
    ) -> AsyncIterator[SSEClient]:
        client = cls()
        client._task = asyncio.create_task(client._run(url, headers or {}))
        await asyncio.wait_for(client.opened.wait(), t(10))
        try:
            yield client
        finally:
            client._task.cancel()
            await asyncio.gather(client._task, return_exceptions=True)

    def seqs(self) -> list[int]:
        return [int(e["id"]) for e in self.events if e.get("event") == "message"]

    async def wait_for(self, count: int, timeout: float = 20) -> list[int]:
        deadline = time.monotonic() + t(timeout)
        while len(self.seqs()) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"SSE got {len(self.seqs())} of {count}: {self.seqs()}")
            if self.ended.is_set() and len(self.seqs()) < count:
                raise AssertionError(f"SSE stream ended (status {self.status}) after {self.seqs()}")
            await asyncio.sleep(0.02)
        return self.seqs()


async def post(
    client: httpx.AsyncClient,
    base: str,
    room: str,
    text: str,
    author: str = "tester",
    **kwargs: Any,
) -> httpx.Response:
    return await client.post(
        f"{base}/v1/rooms/{room}/messages", json={"text": text, "author": author}, **kwargs
    )


async def eventually(check: Any, timeout: float = 10, interval: float = 0.05) -> Any:
    """Poll an async or sync ``check`` until it returns a truthy value."""
    deadline = time.monotonic() + t(timeout)
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s (last: {last!r})")


class RawWebSocket:
    """A WebSocket client on a bare socket that reads only when told to: it can
    stall (a slow consumer) or ignore pings (a dead peer), which library clients
    that read in the background cannot."""

    def __init__(self, port: int, path: str = "/v1/ws", rcvbuf: int = 4096) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect(("127.0.0.1", port))
        self.sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            if not chunk:
                raise ConnectionError("closed during handshake")
            head += chunk
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(head.decode(errors="replace"))

    def send_json(self, obj: Any) -> None:
        payload = orjson.dumps(obj)
        n = len(payload)
        header = bytes([0x81])
        if n < 126:
            header += bytes([0x80 | n])
        else:
            header += bytes([0x80 | 126]) + n.to_bytes(2, "big")
        self.sock.sendall(header + b"\0\0\0\0" + payload)  # all-zero mask key

    def closed_by_server(self, timeout: float = 10) -> bool:
        """Read until the server closes the TCP connection; True if it did."""
        self.sock.settimeout(t(timeout))
        try:
            while self.sock.recv(65536):
                pass
            return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


async def metric(base: str, name: str, **labels: str) -> float:
    """The sum of an instance's /metrics samples ``name`` whose labels include ``labels``."""
    async with httpx.AsyncClient() as client:
        text = (await client.get(base + "/metrics")).text
    return total(text, name, **labels)


def ws_stream_order(frames: list[dict[str, Any]], room: str, kinds: Any) -> list[tuple[str, int]]:
    """The room's WebSocket frames of ``kinds`` in arrival order, each as (type, its
    message's seq for a ``message``, else its change number): to compare a stream's
    order of messages and changes with the one expected."""
    return [
        (f["type"], f["message"]["seq"] if f["type"] == "message" else f["change"])
        for f in frames
        if f.get("room") == room and f["type"] in kinds
    ]


def sse_stream_order(events: list[dict[str, Any]], kinds: Any) -> list[tuple[str, int]]:
    """The SSE events of ``kinds`` in arrival order, as ``ws_stream_order`` gives them
    (a message's seq is its event id)."""
    return [
        (e["event"], int(e["id"]) if e["event"] == "message" else e["json"]["change"])
        for e in events
        if e.get("event") in kinds
    ]


async def carried_in_order(
    ws: WSClient,
    sse: SSEClient,
    room: str,
    expected: list[tuple[str, int]],
    reader: asyncio.Task[Any],
) -> None:
    """Wait until ``ws`` (read by the task ``reader``) and ``sse`` both carry the
    room's ``expected`` messages and changes, stop ``reader``, then check that each
    carried exactly those, in that order (``ws_stream_order``)."""
    kinds = dict(expected)
    await eventually(lambda: len(ws_stream_order(ws.frames, room, kinds)) >= len(expected), 20)
    await eventually(lambda: len(sse_stream_order(sse.events, kinds)) >= len(expected), 20)
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)
    assert ws_stream_order(ws.frames, room, kinds) == expected, ws.frames
    assert sse_stream_order(sse.events, kinds) == expected, sse.events


# The JWT secret of the chat tests' gateways (AUTH_SECRET), and a user's token for them.
CHAT_SECRET = "chat-test-secret-" + "0123456789abcdef" * 4


def signed(sub: str, secret: str, **claims: Any) -> str:
    """A user's JWT for ``sub`` (with ``claims``), signed with ``secret``, valid for ten
    minutes."""
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 600, **claims}, secret, "HS256")


def chat_bearer(sub: str, **claims: Any) -> dict[str, str]:
    """Authorization headers for ``sub`` (with ``claims``), signed with CHAT_SECRET."""
    return {"Authorization": f"Bearer {signed(sub, CHAT_SECRET, **claims)}"}


def namespaces_env(
    base: dict[str, str], tmp_path: Path, namespaces: str, secret: str, key: str
) -> dict[str, str]:
    """``base`` with the ``namespaces`` TOML as its NAMESPACES_FILE, users' tokens
    signed with ``secret``, backend key ``key`` and presence announced at once."""
    path = tmp_path / "namespaces.toml"
    path.write_text(namespaces)
    return {
        **base,
        "NAMESPACES_FILE": str(path),
        "AUTH_SECRET": secret,
        "API_KEYS": key,
        "PRESENCE_DEBOUNCE": "0",
    }
