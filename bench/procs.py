"""Server processes under measurement, and the throwaway resources they use.

CPU time and resident memory come from /proc, so a figure counts the work of
the server processes only, whatever else the machine is doing.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests import harness
from tests.harness import free_port

ROOT = Path(__file__).resolve().parent.parent
PEERS = Path(__file__).resolve().parent / "peers"
PG_ADMIN_URL = os.environ.get("BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
_TICK = os.sysconf("SC_CLK_TCK")


def raise_open_files() -> int:
    """Raise this process's open-files limit to its hard limit (servers inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def cpu_seconds(pid: int, *, children: bool = False) -> float:
    """User + system CPU seconds of a process so far; with ``children``, plus those
    of its children that have exited (a Postgres server's ended backends)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / _TICK


def _comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _children(pid: int) -> list[int]:
    """The processes ``pid`` started that are still there (ended ones are in its
    children's CPU once reaped)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if _parent(int(entry)) == pid:
                    out.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return out


class MachineMeter:
    """The CPU a run cost the rest of the machine: the Postgres server the bench
    uses (its postmaster and every process it started, ended backends included;
    not another cluster on the machine, whose processes may end mid-run), the
    Redis server the bench uses, and the share of the machine's time the
    hypervisor took (steal).

    With these beside the gateway's and the load generator's own CPU, a run says
    how many cores its work takes per post, whatever the load it reached."""

    def __init__(self) -> None:
        self.redis_pid: int | None = None
        self.postmaster_pid: int | None = None
        self._start: dict[str, float] = {}

    async def find(self) -> None:
        """Find the Redis server's and the Postgres postmaster's processes (None
        when not on this machine)."""
        import asyncpg
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            pid = int((await client.info("server"))["process_id"])
            self.redis_pid = pid if os.path.exists(f"/proc/{pid}") else None  # not local
        finally:
            await client.aclose()
        conn = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
        try:
            backend = int(await conn.fetchval("SELECT pg_backend_pid()"))
            # a backend's parent is its postmaster; a backend not on this machine
            # (or in another PID namespace) is not in /proc as one
            self.postmaster_pid = _parent(backend) if _comm(backend) == "postgres" else None
        except OSError:
            self.postmaster_pid = None
        finally:
            await conn.close()

    def mark(self) -> None:
        self._start = self.read()

    def read(self) -> dict[str, float]:
        figures: dict[str, float] = {}
        if self.postmaster_pid is not None:
            postgres = 0.0
            for pid in [self.postmaster_pid, *_children(self.postmaster_pid)]:
                try:
                    postgres += cpu_seconds(pid, children=True)
                except OSError:  # a backend that ended between the listing and the read
                    continue
            figures["postgres"] = postgres
        if self.redis_pid is not None:
            figures["redis"] = cpu_seconds(self.redis_pid)
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]
        figures["steal"], figures["all"] = ticks[7] / _TICK, sum(ticks) / _TICK
        return figures

    def since_mark(self) -> dict[str, float | None]:
        now = self.read()
        d = {k: now[k] - self._start[k] for k in now if k in self._start}
        return {
            "postgres_cpu_s": d.get("postgres"),
            "redis_cpu_s": d.get("redis"),
            "steal_pct": round(d["steal"] / d["all"] * 100, 1) if d["all"] else None,
        }


def _proc_number(pid: int, name: str, label: str, column: int) -> int:
    """The number in ``column`` of the line starting with ``label`` in /proc/PID/NAME."""
    with open(f"/proc/{pid}/{name}") as f:
        for line in f:
            if line.startswith(label):
                return int(line.split()[column])
    return 0


def rss_kib(pid: int) -> int:
    return _proc_number(pid, "status", "VmRSS:", 1)


def open_files_limit(pid: int) -> int:
    return _proc_number(pid, "limits", "Max open files", 3)


class Server:
    """One server process on a free loopback port."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.port = free_port()
        self.argv = [a.replace("{port}", str(self.port)) for a in argv]
        self.env = {**os.environ, **env, "PORT": str(self.port), "HOST": "127.0.0.1"}
        self.log = tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".log", delete=False)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Server:
        self.proc = subprocess.Popen(
            self.argv, env=self.env, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT
        )
        return self

    async def wait_ready(self, path: str = "/", timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start:\n{self.tail()}")
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                line = await asyncio.wait_for(reader.readline(), 5)
                writer.close()
                if line and b" 5" not in line[8:11]:
                    return
            except OSError:
                pass
            await asyncio.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready after {timeout} s:\n{self.tail()}")

    def tail(self, n: int = 3000) -> str:
        with open(self.log.name, "rb") as f:
            return f.read()[-n:].decode(errors="replace")

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def rss(self) -> int:
        return rss_kib(self.pid)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        os.unlink(self.log.name)


async def create_database() -> str:
    return await harness.create_database(PG_ADMIN_URL, tag="bench")


async def drop_database(url: str) -> None:
    await harness.drop_database(url, PG_ADMIN_URL)


def new_prefix() -> str:
    return harness.new_prefix("bench")


async def delete_prefix(prefix: str) -> None:
    await harness.delete_prefix(prefix, REDIS_URL)


def peers_python(venv: Path | None = None) -> str:
    """The interpreter of the peers' own virtual environment, built from
    bench/peers/requirements.txt when missing or when the file changed."""
    venv = venv or Path(os.environ.get("BENCH_PEERS_VENV", PEERS / ".venv"))
    python = venv / "bin" / "python"
    req = PEERS / "requirements.txt"
    digest = hashlib.sha256(req.read_bytes()).hexdigest()
    stamp = venv / ".requirements.sha256"
    if python.exists() and stamp.exists() and stamp.read_text() == digest:
        return str(python)
    print(f"bench: building the peers' environment in {venv} ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", str(req)], check=True)
    stamp.write_text(digest)
    return str(python)


NODE_PEER = PEERS / "node_socketio"


def node_peer(folder: Path = NODE_PEER) -> Path:
    """The Node peer's folder with its packages installed: ``npm ci`` from the
    committed package-lock.json into its own node_modules on first use, and again
    when the lock changed."""
    lock = folder / "package-lock.json"
    digest = hashlib.sha256(lock.read_bytes()).hexdigest()
    stamp = folder / "node_modules" / ".bench-lock.sha256"
    # One install into the folder at a time: two runs at once (parallel test workers,
    # two benches) would each empty node_modules under the other.
    name = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"chat-gateway-npm-{name}.lock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        if stamp.exists() and stamp.read_text() == digest:
            return folder
        print(f"bench: installing the Node peer's packages in {folder} ...", file=sys.stderr)
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=folder, check=True
        )
        stamp.write_text(digest)
    return folder
