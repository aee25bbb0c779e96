"""The client libraries installed as their users install them, outside the
repository, each running its README's newcomer program against a real gateway.

- JavaScript: ``npm pack`` makes the tarball a release publishes; a scratch app
  installs it with ``ws`` from the npm registry (a copy, not a symlink into the
  checkout, so ``import("ws")`` finds the app's own ``ws``).
- Python: setuptools' build backend (what ``python -m build`` calls) makes the
  wheel and the sdist; each goes into a fresh virtual environment with its
  dependencies from the package index.

Both need the network (npm's registry, PyPI) as a user's install does.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import ROOT, instances, t

JS = ROOT / "clients" / "js"
PY = ROOT / "clients" / "python"
README_URL = "http://127.0.0.1:8000"


def newcomer_program(readme: Path, lang: str) -> str:
    """The fenced block after the README's ``<!-- newcomer -->`` marker."""
    m = re.search(rf"<!-- newcomer -->\s*```{lang}\n(.*?)```", readme.read_text(), re.S)
    assert m, f"{readme} has no newcomer program"
    program = m.group(1)
    assert len([x for x in program.splitlines() if x.strip()]) <= 13, (
        "a newcomer program stays short"
    )
    return program


def run(cmd: list[str], cwd: Path, timeout: float = 300, **env: str) -> str:
    done = subprocess.run(
        cmd,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=t(timeout),
        env={**os.environ, **env},
    )
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def fresh_venv(where: Path) -> Path:
    # a venv of the interpreter itself, not of this test's venv: nothing of the
    # repository's environment leaks in
    base = Path(getattr(sys, "_base_executable", sys.executable))
    subprocess.run([str(base), "-m", "venv", str(where)], check=True, timeout=t(120))
    return where / "bin" / "python"


@pytest.fixture
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("client-install")
    assert ROOT not in path.parents
    return path


@pytest.mark.timeout(600)  # fresh venvs and installs from the registries
async def test_the_npm_tarball_installs_into_an_app_and_runs_the_readme_program(
    gateway_env: dict[str, str], scratch: Path
) -> None:
    if shutil.which("npm") is None:
        raise RuntimeError("npm is not on PATH: install Node 20+ with npm")
    out = run(["npm", "pack", "--pack-destination", str(scratch)], JS)
    tarball = scratch / out.strip().splitlines()[-1]
    assert tarball.exists(), out
    app = scratch / "app"
    app.mkdir()
    (app / "package.json").write_text('{"name": "newcomer", "private": true, "type": "module"}')
    run(["npm", "install", "--no-audit", "--no-fund", str(tarball), "ws"], app)
    installed = app / "node_modules" / "@chat-gateway" / "client"
    assert installed.is_dir() and not installed.is_symlink()
    assert (installed / "src" / "index.d.ts").exists() and (
        installed / "src" / "worker.js"
    ).exists()
    async with instances(1, gateway_env) as (gw,):
        program = newcomer_program(JS / "README.md", "js").replace(README_URL, gw.url)
        (app / "newcomer.mjs").write_text(program)
        output = run(["node", "newcomer.mjs"], app, timeout=60)
    assert output.splitlines() == ["#1 ana: helo", "#1 updated: hello (v2)"], output


@pytest.mark.timeout(600)  # fresh venvs and installs from the registries
async def test_the_python_wheel_and_sdist_install_into_fresh_venvs_and_run_the_readme_program(
    gateway_env: dict[str, str], scratch: Path
) -> None:
    builder = fresh_venv(scratch / "build-env")
    run([str(builder), "-m", "pip", "install", "-q", "setuptools>=77"], scratch)
    dist = scratch / "dist"
    dist.mkdir()
    # the PEP 517 hooks `python -m build` calls, on a copy (a build writes egg-info)
    source = scratch / "source"
    shutil.copytree(PY, source, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for hook in ("build_sdist", "build_wheel"):  # one process each, as `build` runs them
        call = f"import sys; from setuptools import build_meta as b; b.{hook}(sys.argv[1])"
        run([str(builder), "-c", call, str(dist)], source)
    built = sorted(p.name for p in dist.iterdir())
    sdist = next(iter(dist.glob("chat_gateway_client-*.tar.gz")), None)
    wheel = next(iter(dist.glob("chat_gateway_client-*.whl")), None)
    assert sdist and wheel, built
    async with instances(1, gateway_env) as (gw,):
        program = newcomer_program(PY / "README.md", "python").replace(README_URL, gw.url)
        for artifact in (wheel, sdist):
            where = scratch / f"venv-{artifact.suffix.strip('.')}"
            python = fresh_venv(where)
            run([str(python), "-m", "pip", "install", "-q", str(artifact)], scratch)
            (scratch / "newcomer.py").write_text(program)
            output = run([str(python), "newcomer.py"], scratch, timeout=60)
            # each run posts one more message to the room, and stops at its own
            first = re.fullmatch(
                r"#(\d+) v2 bob: hi from Python \(edited\)", output.splitlines()[0]
            )
            assert first, output
            assert output.splitlines()[-1] == f"#{first.group(1)} bob: hi from Python (edited)"


def test_the_python_clients_test_command_in_its_readme_is_the_one_ci_runs() -> None:
    readme = (PY / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().replace(" --quiet", "")
    for line in (
        "python -m pip install --no-require-hashes -c constraints.txt -e clients/python",
        "python -m pytest clients/python/tests",
    ):
        assert line in readme and line in ci, line
