"""Screenshots of the chat page for the README: a gateway of its own (SQLite, no
Redis) on a free port, a seeded conversation over two days, and the page in
Debian's Chromium at 1280x800 (light), 1366x768 (dark) and 390x844 (a phone).

    python scripts/screenshots.py                 # docs/screenshots/*.png
    python scripts/screenshots.py --out DIR --prefix before-

The conversation is posted through the HTTP API like any other; only its times
are moved afterwards (yesterday and this morning), in the database, while the
gateway is stopped, so that the page shows day separators as it would after a
real day of chat.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from playwright.async_api import async_playwright

from chat_gateway.storage.records import format_ts

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")

# (author, text, minutes after the first message of its day)
YESTERDAY = [
    ("maya", "Morning all! Standup notes are in the doc, shout if I missed anything.", 0),
    ("leo", "Thanks Maya. I'm picking up the flaky upload test today.", 2),
    ("leo", "It only fails on the ARM runners, which is suspicious.", 3),
    ("priya", "Could be the tmpfs size, we hit that in March.", 9),
    ("maya", "Release checklist for 4.2: https://example.com/wiki/release-4.2", 95),
    ("sam", "I'll take the changelog.", 97),
]
TODAY = [
    ("priya", "Deploy of 4.2.0 to staging is green ✅", 0),
    ("priya", "Dashboards: https://grafana.example.com/d/chat?from=now-1h", 1),
    ("leo", "Nice! Upload test fixed too, it was the tmpfs after all 🙃", 6),
    ("sam", "Changelog draft is up for review, comments welcome", 14),
    ("sam", "Mostly wording. The migration notes need a second pair of eyes.", 15),
    ("maya", "@sam I'll read it after lunch.", 21),
    ("ana", "Does anyone know if the search index rebuild is part of 4.2?", 40),
    ("priya", "It is, but it runs in the background; no downtime.", 42),
    ("priya", "<b>Tip:</b> markup in a message is shown as text, never run.", 43),
]
OTHER_ROOMS = {
    "design": [
        ("kai", "New empty-state illustrations are up for review", 0),
        ("kai", "@ana could you check the copy on them before Friday?", 1),
    ],
    "random": [("leo", "Who's up for lunch at the noodle place?", 0), ("sam", "Me!", 1)],
    "releases": [("bot", "4.2.0 tagged", 0)],
}
PEOPLE = {"ana", "maya", "leo", "priya", "sam", "kai"}
REACTIONS = [(5, "🎉", ["leo", "sam", "ana"]), (7, "👍", ["maya", "sam"]), (9, "👀", ["leo"])]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "chat_gateway", "serve"],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )


def wait_ready(url: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the gateway at {url} did not get ready")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(20)


def seed(url: str) -> dict[str, list[tuple[int, int]]]:
    """Post the conversation; returns, per room, (seq, minute offset) with the day
    (0: yesterday, 1: today) folded in as day * 10000 + minutes."""
    placed: dict[str, list[tuple[int, int]]] = {}
    with httpx.Client(base_url=url, timeout=10) as http:

        def post(room: str, author: str, text: str, when: int, **extra: Any) -> int:
            named = [n for n in re.findall(r"@(\w+)", text) if n in PEOPLE]
            if named:  # servers with mentions count them for the one named
                extra["mentions"] = named
            r = http.post(
                f"/v1/rooms/{room}/messages", json={"text": text, "author": author, **extra}
            )
            if r.status_code == 422 and named:  # a server without mentions
                extra.pop("mentions")
                r = http.post(
                    f"/v1/rooms/{room}/messages", json={"text": text, "author": author, **extra}
                )
            r.raise_for_status()
            seq = int(r.json()["seq"])
            placed.setdefault(room, []).append((seq, when))
            return seq

        for author, text, minute in YESTERDAY:
            post("general", author, text, minute)
        for author, text, minute in TODAY:
            post("general", author, text, 10000 + minute)
        # a reply to the changelog message where the server keeps threads
        r = http.post(
            "/v1/rooms/general/messages",
            json={
                "text": "Left two comments on the migration part.",
                "author": "leo",
                "reply_to": 10,
            },
        )
        if r.status_code == 201 and r.json().get("reply_to") == 10:
            placed["general"].append((int(r.json()["seq"]), 10000 + 50))
        for room, lines in OTHER_ROOMS.items():
            for author, text, minute in lines:
                post(room, author, text, 10000 + minute)
        for seq, reaction, users in REACTIONS:
            for user in users:
                http.post(
                    f"/v1/rooms/general/messages/{seq}/reactions",
                    json={"reaction": reaction, "user": user},
                )
        # ana read general up to yesterday and nothing of design or random
        http.post("/v1/rooms/general/read", json={"seq": 6, "user": "ana"})
        for room in ("design", "random", "releases"):
            http.post(f"/v1/rooms/{room}/read", json={"seq": 0, "user": "ana"})
    return placed


def backdate(db: Path, placed: dict[str, list[tuple[int, int]]]) -> None:
    """Yesterday from 09:12 local time, today from 09:05."""
    now = time.localtime()
    today = time.mktime((now.tm_year, now.tm_mon, now.tm_mday, 9, 5, 0, 0, 0, -1))
    yesterday = today - 86400 + 7 * 60
    with sqlite3.connect(db) as conn:
        for room, seqs in placed.items():
            for seq, when in seqs:
                day, minute = divmod(when, 10000)
                base = today if day else yesterday
                ms = int((base + minute * 60) * 1000)
                conn.execute(
                    "UPDATE messages SET created_ms = ? WHERE room = ? AND seq = ?",
                    (ms, room, seq),
                )
        # a thread's summary names its last reply's time: the moved one
        threads = conn.execute(
            "SELECT room, seq, thread FROM messages WHERE thread IS NOT NULL"
        ).fetchall()
        for room, seq, thread in threads:
            summary = json.loads(thread)
            (last_ms,) = conn.execute(
                "SELECT created_ms FROM messages WHERE room = ? AND seq = ?",
                (room, summary["last_seq"]),
            ).fetchone()
            summary["last_at"] = format_ts(last_ms)
            conn.execute(
                "UPDATE messages SET thread = ? WHERE room = ? AND seq = ?",
                (json.dumps(summary), room, seq),
            )


async def capture(url: str, out: Path, prefix: str) -> list[Path]:
    shots = [
        ("desktop-light", {"width": 1280, "height": 800}, "light"),
        ("laptop-dark", {"width": 1366, "height": 768}, "dark"),
        ("phone", {"width": 390, "height": 844}, "light"),
    ]
    written = []
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"]
        )
        for name, viewport, scheme in shots:
            context = await browser.new_context(
                viewport=viewport,
                color_scheme=scheme,  # type: ignore[arg-type]
                device_scale_factor=1,
                is_mobile=viewport["width"] < 500,
                has_touch=viewport["width"] < 500,
            )
            # ana joined these rooms before (the page keeps the list in localStorage)
            await context.add_init_script(
                'localStorage.setItem("chat.rooms", '
                'JSON.stringify(["general", "design", "random", "releases"]));'
            )
            page = await context.new_page()
            await page.goto(f"{url}/?room=general&name=ana")
            await page.wait_for_selector('#status[data-state="connected"]', timeout=20000)
            await page.wait_for_timeout(800)
            if name == "desktop-light":  # a message's actions, as on hover
                await page.hover('#messages li[data-author="ana"] .text')
            if name == "laptop-dark":  # a thread beside the room
                link = page.locator("#messages .thread-link").first
                if await link.count():
                    await link.click()
                    await page.wait_for_selector("#thread-replies li")
                else:  # a server without replies: search results instead
                    await page.fill("#q", "4.2")
                    await page.press("#q", "Enter")
                    await page.wait_for_selector("#search-results li")
                await page.locator(":focus").blur()
                await page.mouse.move(5, 790)
            path = out / f"{prefix}{name}.png"
            await page.screenshot(path=str(path))
            written.append(path)
            await context.close()
        await browser.close()
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    parser.add_argument("--prefix", default="")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "chat.db"
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {
            "DATABASE_URL": f"sqlite:///{db}",
            "REDIS_URL": "memory://",
            "PORT": str(port),
            "HOST": "127.0.0.1",
            "RATE_LIMIT": "10000/1s",
            "LOG_LEVEL": "warning",
        }
        proc = start(env)
        try:
            wait_ready(url)
            placed = seed(url)
        finally:
            stop(proc)
        backdate(db, placed)
        proc = start(env)
        try:
            wait_ready(url)
            for path in asyncio.run(capture(url, args.out, args.prefix)):
                print(f"{path} ({path.stat().st_size // 1024} KB)")
        finally:
            stop(proc)


if __name__ == "__main__":
    main()
