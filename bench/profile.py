"""Optional sampling profiles of the servers during a measured window (py-spy).

``--profile DIR`` records each server process while the scenario measures and
writes collapsed stacks (``DIR/<server>.txt``, for flame-graph tools) plus the
functions with the most samples on top of the stack and anywhere on it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from bench.procs import Server


class Profiler:
    def __init__(self, outdir: Path | None) -> None:
        self.outdir = outdir
        self.procs: list[tuple[Server, Path, subprocess.Popen[bytes]]] = []

    def start(self, servers: list[Server], seconds: float) -> None:
        if self.outdir is None:
            return
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self.outdir.mkdir(parents=True, exist_ok=True)
        for s in servers:
            out = self.outdir / f"{s.name}.txt"
            proc = subprocess.Popen(
                [
                    exe,
                    "record",
                    "--pid",
                    str(s.pid),
                    "--duration",
                    str(max(1, int(seconds))),
                    "--rate",
                    "200",
                    "--format",
                    "raw",
                    "--nonblocking",
                    "-o",
                    str(out),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            self.procs.append((s, out, proc))

    def finish(self, top: int = 25) -> None:
        for server, out, proc in self.procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
            if out.exists():
                (self.outdir / f"{server.name}.top.txt").write_text(summarize(out, top))  # type: ignore[operator]
        self.procs = []


def summarize(path: Path, top: int) -> str:
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames):
            total[frame] += n
    lines = [f"{samples} samples", "", "self:"]
    lines += [f"{100 * n / samples:6.2f}%  {f}" for f, n in own.most_common(top)]
    lines += ["", "total (inclusive):"]
    lines += [f"{100 * n / samples:6.2f}%  {f}" for f, n in total.most_common(top)]
    return "\n".join(lines) + "\n"
