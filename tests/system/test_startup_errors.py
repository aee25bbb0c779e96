"""A database that cannot be opened at start is told in one line, with a hint;
an unreachable Redis at start is a warning naming it. The real command, spawned."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from chat_gateway.config import ConfigError, Settings
from tests import harness
from tests.harness import Instance, embedded_env, t
from tests.unit.test_egress import EMBEDDED_PRIVATE

COMMAND = str(Path(sys.executable).parent / "chat-gateway")


def run(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [COMMAND, *args],
        env={**os.environ, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=harness.t(30),
    )


def assert_one_line(proc: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr and 'File "' not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("chat-gateway: ")]
    assert len(lines) == 1, proc.stderr
    for part in expected:
        assert part in lines[0], lines[0]
    assert "Hint: " in lines[0]
    assert "s3cret" not in proc.stderr, "the password is never printed"


@pytest.mark.parametrize("command", ["serve", "migrate"])
def test_unreachable_postgres(command, tmp_path):
    port = harness.free_port()
    url = f"postgresql://chat:s3cret@127.0.0.1:{port}/chat"
    proc = run(command, env={"DATABASE_URL": url, "DB_CONNECT_TIMEOUT": "2"}, cwd=tmp_path)
    assert_one_line(
        proc,
        f"cannot connect to Postgres at postgresql://chat:***@127.0.0.1:{port}/chat",
        "Postgres runs",
    )


@pytest.mark.parametrize("command", ["serve", "migrate"])
def test_missing_postgres_database(command, tmp_path, pg_url):
    name = f"cgtest_missing_{uuid.uuid4().hex[:8]}"  # on the server pg_url is on
    proc = run(command, env={"DATABASE_URL": f"{pg_url.rsplit('/', 1)[0]}/{name}"}, cwd=tmp_path)
    assert_one_line(proc, f'database "{name}" does not exist', "createdb")


@pytest.mark.parametrize("command", ["serve", "migrate"])
def test_unwritable_sqlite_path(command, tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    # Under a regular file no directory can be made; a directory is no database file.
    for path in (tmp_path / "a-file" / "chat.db", tmp_path):
        proc = run(command, env={"DATABASE_URL": f"sqlite:///{path}"}, cwd=tmp_path)
        assert_one_line(proc, f"cannot open SQLite file {path}", "writ")


@pytest.mark.parametrize("scheme", ["redis", "redis+cluster"])
def test_unreachable_redis_is_a_warning_naming_it(scheme, tmp_path):
    port = harness.free_port()
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{tmp_path}/chat.db",
        "REDIS_URL": f"{scheme}://127.0.0.1:{port}",
        "PORT": str(harness.free_port()),
    }
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [COMMAND, "serve"], env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + harness.t(20)

        def warned() -> str | None:
            # the start line names the broker too; the warning is the line that says why
            lines = log.read_text().splitlines()
            return next(
                (x for x in lines if f"127.0.0.1:{port}" in x and '"level":"warning"' in x),
                None,
            )

        while warned() is None:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        line = warned()
        assert line is not None
        assert '"level":"warning"' in line and "unreachable" in line, line
        assert proc.poll() is None, "degraded, the instance keeps serving"
    finally:
        proc.terminate()
        assert proc.wait(harness.t(20)) == 0
    assert "Traceback" not in log.read_text()


def test_a_receiver_url_with_an_embedded_private_address_is_refused_at_start(tmp_path):
    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    for address in EMBEDDED_PRIVATE:
        with pytest.raises(ConfigError, match="WEBHOOK_ALLOW_PRIVATE"):
            Settings(
                webhook_urls=(f"http://[{address}]:8080/in",), webhook_secret=secret
            ).validated()
    env = embedded_env(
        tmp_path, WEBHOOK_URLS="http://[64:ff9b::7f00:1]:8080/in", WEBHOOK_SECRET=secret
    )
    gw = Instance(env).start()
    assert gw.proc is not None
    try:
        assert gw.proc.wait(t(30)) != 0
    finally:
        gw.kill()
    assert "WEBHOOK_ALLOW_PRIVATE" in gw.log()
