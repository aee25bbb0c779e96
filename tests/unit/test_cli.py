"""The command a newcomer meets first: --help, --version, and the README's first screen."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from chat_gateway.config import env_names
from tests.harness import ROOT, t

COMMAND = str(Path(sys.executable).parent / "chat-gateway")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([COMMAND, *args], capture_output=True, text=True, timeout=t(30))


def test_help_lists_the_commands_and_every_variable_with_its_meaning():
    proc = run("--help")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for command in ("serve", "migrate"):
        assert re.search(rf"^\s+{command}\s+\S", out, re.M), f"{command} is not listed"
    environment = out[out.index("\nenvironment") :]
    listed = set(re.findall(r"^  ([A-Z][A-Z0-9_]*(?:, [A-Z][A-Z0-9_]*)*)$", environment, re.M))
    names = {n for group in listed for n in group.split(", ")}
    assert names == {n for n in env_names() if not n.startswith("FAULT_")}
    # Each name (or group) is followed by its meaning and default, from the README's table.
    block = out[out.index("  DATABASE_URL\n") :]
    assert (
        block.splitlines()[1].strip()
        == "postgresql://… or sqlite:///PATH [default: sqlite:///./chat-gateway.db]"
    )
    assert "  RATE_LIMIT\n      message posts per identity [default: 20/60s]" in out
    assert "  HOST, PORT\n      where serve listens [default: 127.0.0.1, 8000]" in out
    assert "--version" in out


def test_version_is_the_installed_package_version():
    proc = run("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"chat-gateway {metadata.version('chat-gateway')}"


def test_a_missing_command_is_a_usage_error():
    proc = run()
    assert proc.returncode == 2
    assert "usage: chat-gateway" in proc.stderr and "Traceback" not in proc.stderr


def test_readme_first_screen_says_the_python_version_and_the_venv_step_first():
    lines = (ROOT / "README.md").read_text().splitlines()[:40]
    screen = "\n".join(lines)
    minimum = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert minimum == ">=3.11"
    assert "Python 3.11+" in screen
    venv = screen.index("python3 -m venv .venv && . .venv/bin/activate")
    run_it = screen.index("pip install -e . && chat-gateway serve")
    test_it = screen.index("pip install -e '.[test,otel,sentry]' && python -m pytest")
    assert venv < run_it < test_it


def test_help_lists_the_new_variables():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "chat_gateway", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in ("METRICS_KEY", "AUTH_JWKS_ALLOW_HTTP", "READ_RATE_LIMIT"):
        assert name in out, name
