"""Instructions per post: the gateway under ``valgrind --tool=callgrind``.

``python -m bench.instructions [--posts N] [--warmup W] [--src DIR]``

Wall-clock and CPU-time figures move with whatever else the machine runs;
the count of instructions a process executes does not (to within a few
tenths of a percent), so a before/after comparison of the post path holds on
a busy machine. Two gateways run under callgrind side by side, each through
its whole life: start, W warm-up posts, then 20 posts for one and 20 + N for
the other, sent back to back over one keep-alive HTTP connection, then
shutdown. The figure is what the two runs' instruction counts differ by,
divided by N (start, warm-up and shutdown cancel out): the HTTP request,
validation, the rate decision, the commit's own work in Python, the
announcement to Redis and the answer; Postgres and Redis run in processes of
their own and are not counted (nor is the client). Caveat: what runs on
timers (presence refresh, shared figures, the rate limiter's lease sweep) is
counted by the wall time each run took under valgrind, which differs between
the two runs; at 60 posts that noise outweighed the posts (a first try gave
733,570 instructions per post for the release before leases and 949,654
after, against CPU per post falling in the posts scenario), so use
thousands of posts, or subtract an idle run of the same length. ``--src`` runs the
gateway from another source tree (an older commit's ``src``, exported with
``git archive``) for the "before" figure. Callgrind is slow: expect about
ten minutes for two hundred posts on a busy machine.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.http import HTTPConn
from bench.procs import Server, create_database, drop_database
from bench.targets import GATEWAY_ENV
from tests.harness import new_prefix

# Generous bounds: everything runs 20-50 times slower under valgrind.
SLOW_ENV = {
    "REDIS_TIMEOUT": "30",
    "DB_COMMAND_TIMEOUT": "120",
    "DB_CONNECT_TIMEOUT": "120",
    "WS_PING_INTERVAL": "600",
    "SHUTDOWN_TIMEOUT": "5",
}


def total_ir(outdir: Path) -> int:
    """Instructions (``Ir``) summed over the callgrind dumps in ``outdir``."""
    total = 0
    for path in glob.glob(str(outdir / "callgrind.out*")):
        with open(path) as f:
            for line in f:
                if line.startswith(("summary:", "totals:")):
                    total += int(line.split()[1])
                    break
    return total


async def measure(posts: int, warmup: int, src: Path | None) -> int:
    """Instructions of one gateway's whole life under callgrind: start, ``warmup``
    posts, ``posts`` more, shutdown."""
    database_url = await create_database()
    outdir = Path(tempfile.mkdtemp(prefix="bench-callgrind-"))
    env = {
        **GATEWAY_ENV,
        **SLOW_ENV,
        "DATABASE_URL": database_url,
        "KEY_PREFIX": new_prefix(),
    }
    if src is not None:
        env["PYTHONPATH"] = str(src)
    argv = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={outdir}/callgrind.out.%p",
        sys.executable,
        "-m",
        "chat_gateway",
        "serve",
    ]
    server = Server("gateway-callgrind", argv, env).start()
    conn = HTTPConn("127.0.0.1", server.port)
    stopped = False
    try:
        await server.wait_ready("/readyz", timeout=900)
        for i in range(warmup + posts):
            status, _ = await conn.request(
                "POST",
                f"/v1/rooms/r{i % 10}/messages",
                {"text": f"post number {i} of the measured run", "author": "bench"},
                timeout=120,
            )
            assert status == 201, status
        await conn.close()
        stopped = True
        await asyncio.to_thread(server.stop)  # callgrind writes its counts at exit
        ir = total_ir(outdir)
        if not ir:
            raise RuntimeError("no instructions counted")
        return ir
    finally:
        await conn.close()
        if not stopped:
            server.stop()
        try:
            await drop_database(database_url)
        except Exception as exc:  # a busy machine's slow Postgres: the count stands
            print(f"bench.instructions: {database_url} not dropped: {exc!r}", file=sys.stderr)
        shutil.rmtree(outdir, ignore_errors=True)


async def compare(few: int, many: int, warmup: int, src: Path | None) -> dict[str, Any]:
    """Two lives, ``few`` and ``many`` posts after the same warm-up, side by side:
    what they differ by is the posts' own instructions (start and shutdown cancel)."""
    a, b = await asyncio.gather(measure(few, warmup, src), measure(many, warmup, src))
    return {
        "src": str(src) if src else "this checkout",
        "warmup": warmup,
        "runs": {few: a, many: b},
        "instructions_per_post": round((b - a) / (many - few)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__)
    p.add_argument("--posts", type=int, default=200, help="posts the longer run has more")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--src", type=Path, default=None, help="run the gateway from this src/")
    args = p.parse_args(argv)
    if shutil.which("valgrind") is None:
        sys.exit("bench.instructions: valgrind is not installed (apt-get install valgrind)")
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    result = asyncio.run(compare(20, 20 + args.posts, args.warmup, args.src))
    for k, v in result.items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
