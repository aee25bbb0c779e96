"""The chat page as a chat app, in Chromium against real gateways: the room list
(joined rooms kept across reloads, unread badges, one socket for all), the join
dialog, messages grouped by author under day separators, links made safely,
the actions on a message (react, edit, delete; hover, keyboard, long press),
the message box on screen at three sizes, dark mode, and a refused post kept
apart from the next one."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
from playwright.async_api import Page, expect

from tests.browser.chat_page import connected, item, shown_up_to
from tests.browser.conftest import PHONE
from tests.harness import Instance, eventually, instances, post, t
from tests.system.test_publish_hook import hook_env
from tests.system.test_webhooks import Answer, Hit, Receiver, new_secret

REASON = "please keep it civil"


def room_button(page: Page, room: str):
    return page.locator(f'#rooms button[data-room="{room}"]')


async def say(page: Page, text: str) -> None:
    await page.locator("#text").fill(text)
    await page.locator("#text").press("Enter")
    await expect(page.locator("#text")).to_have_value("")


async def history(http: httpx.AsyncClient, base: str, room: str) -> list[dict]:
    r = await http.get(f"{base}/v1/rooms/{room}/messages")
    assert r.status_code == 200, r.text
    return list(r.json()["messages"])


async def test_joined_rooms_are_listed_with_unread_badges_on_one_socket_and_kept(
    gateway_env, browser
):
    async with instances(1, gateway_env) as (gw,), httpx.AsyncClient() as http:
        for i in (1, 2):
            assert (await post(http, gw.url, "room.a", f"a{i}", author="bob")).status_code == 201
        page = await browser.open("about:blank", "ana")
        sockets: list[str] = []
        page.on("websocket", lambda ws: sockets.append(ws.url))
        await page.goto(f"{gw.url}/?room=room.a&name=ana")
        await connected(page)
        await shown_up_to(page, 2)
        await expect(room_button(page, "room.a")).to_have_attribute("aria-current", "page")

        # Joining is a dialog: it opens on "+", takes the focus, and Escape gives it back.
        add = page.locator("#add-room")
        await add.click()
        dialog = page.locator("#join-dialog")
        await expect(dialog).to_be_visible()
        await expect(page.locator("#room")).to_be_focused()
        await page.keyboard.press("Escape")
        await expect(dialog).to_be_hidden()
        await expect(add).to_be_focused()
        await add.press("Enter")
        await expect(page.locator("#room")).to_be_focused()
        await page.keyboard.type("room.b")
        await page.keyboard.press("Enter")
        await expect(dialog).to_be_hidden()
        await connected(page)
        await expect(page.locator("#room-title")).to_contain_text("# room.b")
        await expect(room_button(page, "room.b")).to_have_attribute("aria-current", "page")
        await expect(page.locator("#text")).to_be_focused()

        # room.a, not shown, counts what comes after what ana read there.
        async def read_a() -> bool:
            r = await http.get(f"{gw.url}/v1/rooms/room.a/read", params={"user": "ana"})
            return int(r.json()["seq"]) == 2

        await expect(room_button(page, "room.a")).to_have_attribute("data-unread", "0")
        await eventually(read_a)
        # (a keyboard's focus on the list stays put while the counts change)
        await room_button(page, "room.a").focus()
        for i in (3, 4, 5):
            assert (await post(http, gw.url, "room.a", f"a{i}", author="bob")).status_code == 201
        badge = room_button(page, "room.a").locator(".badge.unread")
        await expect(badge).to_have_text("3")
        await expect(room_button(page, "room.a")).to_be_focused()
        # a phone's menu button, which hides the list, says so too
        menu = page.locator("#open-rooms")
        await expect(menu).to_have_attribute("data-news", "unread")
        await expect(menu).to_have_attribute("aria-label", "Rooms, 3 unread elsewhere")
        await expect(room_button(page, "room.a")).to_have_attribute(
            "aria-label", "room.a, 3 unread"
        )
        assert await page.title() == "(3) # room.b · chat-gateway"
        # the room shown counts nothing: what arrives there is read
        assert (await post(http, gw.url, "room.b", "b1", author="bob")).status_code == 201
        await shown_up_to(page, 1)
        await expect(room_button(page, "room.b")).to_have_attribute("data-unread", "0")

        # Opening room.a shows its messages, marks where the new ones begin, and reads them.
        await room_button(page, "room.a").click()
        await shown_up_to(page, 5)
        line = page.locator("#messages li.new-line")
        await expect(line).to_have_count(1)
        assert await line.evaluate("e => e.nextElementSibling.dataset.seq") == "3"
        await expect(room_button(page, "room.a")).to_have_attribute("data-unread", "0")
        await expect(badge).to_be_hidden()
        await expect(menu).to_have_attribute("data-news", "")
        assert page.url.endswith("?room=room.a&name=ana")
        assert len(sockets) == 1, "every room on one socket"

        # The list survives a reload; leaving a room takes it off for good.
        await page.reload()
        await connected(page)
        await expect(page.locator("#rooms button[data-room]")).to_have_count(2)
        await room_button(page, "room.b").click()
        await connected(page)
        await page.locator("#leave").click()
        await expect(page.locator("#rooms button[data-room]")).to_have_count(1)
        await expect(room_button(page, "room.a")).to_have_attribute("aria-current", "page")
        await page.reload()
        await connected(page)
        await expect(page.locator("#rooms button[data-room]")).to_have_count(1)
        assert browser.errors == []


async def test_messages_grouped_by_author_under_day_separators_with_safe_links(
    gateway_env, pg_url, browser
):
    room = "days"
    now = datetime.now(UTC)
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    two_days_ago = today - timedelta(days=2) + timedelta(hours=10)
    yesterday = today - timedelta(days=1) + timedelta(hours=9)
    times = {
        1: two_days_ago,
        2: two_days_ago + timedelta(minutes=2),  # bob again within minutes: same group
        3: two_days_ago + timedelta(minutes=20),  # bob after 18 minutes: a new group
        4: yesterday,  # a new day, cy
        5: yesterday + timedelta(minutes=1),
    }
    link_text = (
        "docs at https://example.com/a?b=1, and (see http://x.test/(y)). "
        '<img src=x onerror="window.pwned=1"> javascript:alert(1) ftp://nope.test'
    )
    posts = [
        ("bob", "two days ago"),
        ("bob", "still two days ago"),
        ("bob", "later that day"),
        ("cy", "yesterday"),
        ("cy", "yesterday again"),
        ("bob", "today"),
        ("bob", "today again"),
        ("cy", link_text),
    ]
    async with instances(1, gateway_env) as (gw,), httpx.AsyncClient() as http:
        for author, text in posts:
            assert (await post(http, gw.url, room, text, author=author)).status_code == 201
        # The store keeps each post's time; these are moved back, before any page
        # is loaded, as if they had been written days ago.
        conn = await asyncpg.connect(pg_url)
        try:
            for seq, when in times.items():
                await conn.execute(
                    "UPDATE messages SET created_at = $1 WHERE room = $2 AND seq = $3",
                    when,
                    room,
                    seq,
                )
        finally:
            await conn.close()

        page = await browser.open(
            f"{gw.url}/?room={room}&name=ana", "ana", timezone_id="UTC", locale="en-US"
        )
        await connected(page)
        await shown_up_to(page, 8)
        days = page.locator("#messages li.day")
        await expect(days).to_have_count(3)
        expected_first = two_days_ago.strftime("%A, %B %-d")
        if two_days_ago.year != now.year:
            expected_first += two_days_ago.strftime(", %Y")
        await expect(days).to_have_text([expected_first, "Yesterday", "Today"])
        # a separator comes right before each day's first message
        order = await page.eval_on_selector_all(
            "#messages li", "els => els.map(e => e.dataset.seq || 'day')"
        )
        assert order == ["day", "1", "2", "3", "day", "4", "5", "day", "6", "7", "8"]
        grouped = await page.eval_on_selector_all(
            "#messages li.msg.cont", "els => els.map(e => Number(e.dataset.seq))"
        )
        assert grouped == [2, 5, 7]
        await expect(item(page, 1).locator(".avatar")).to_have_text("BO")
        await expect(item(page, 4).locator(".avatar")).to_have_text("CY")
        await expect(item(page, 2).locator(".avatar")).to_have_count(0)
        await expect(item(page, 2).locator(".author")).to_have_text("bob")  # said, not shown
        hidden = await item(page, 2).locator(".meta").bounding_box()
        assert hidden is not None and hidden["width"] <= 1 and hidden["height"] <= 1

        # Links: http(s) addresses only, without the punctuation after them, opened
        # apart from the page; the rest of the text stays text.
        text = item(page, 8).locator(".text")
        await expect(text).to_have_text(link_text)
        links = text.locator("a")
        await expect(links).to_have_count(2)
        assert [await a.get_attribute("href") for a in await links.all()] == [
            "https://example.com/a?b=1",
            "http://x.test/(y)",
        ]
        for a in await links.all():
            assert await a.get_attribute("rel") == "noopener noreferrer"
            assert await a.get_attribute("target") == "_blank"
        assert await page.locator("#messages img").count() == 0
        assert await page.evaluate("window.pwned") is None

        # Live: cy again within minutes joins her group; bob starts a new one.
        assert (await post(http, gw.url, room, "and live", author="cy")).status_code == 201
        assert (await post(http, gw.url, room, "me too", author="bob")).status_code == 201
        await shown_up_to(page, 10)
        await expect(item(page, 9)).to_have_class(re.compile(r"\bcont\b"))
        await expect(item(page, 10)).not_to_have_class(re.compile(r"\bcont\b"))
        await expect(item(page, 10).locator(".avatar")).to_have_text("BO")
        await expect(days).to_have_count(3)
        assert browser.errors == []


async def test_message_actions_by_mouse_keyboard_and_long_press(gateway_env, browser):
    room = "actions"
    async with instances(1, gateway_env) as (gw,), httpx.AsyncClient() as http:
        assert (await post(http, gw.url, room, "hello ana", author="bob")).status_code == 201
        page = await browser.open(f"{gw.url}/?room={room}&name=ana", "ana")
        await connected(page)
        await say(page, "my message")
        await shown_up_to(page, 2)
        theirs, mine = item(page, 1), item(page, 2)

        # Hover shows the actions; only one's own message can be edited or deleted.
        bar = theirs.locator(".actions")
        await expect(bar).to_have_css("opacity", "0")
        await theirs.hover()
        await expect(bar).to_have_css("opacity", "1")
        await expect(bar.locator("button[data-action]")).to_have_count(2)
        await expect(bar.locator('[data-action="edit"], [data-action="delete"]')).to_have_count(0)
        await expect(mine.locator('[data-action="edit"]')).to_have_count(1)
        await expect(mine.locator('[data-action="delete"]')).to_have_count(1)

        # React from the picker; the chip counts it, pressed; pressing it again takes it back.
        await bar.locator('[data-action="react"]').click()
        await bar.get_by_role("button", name="React with 👍").click()
        chip = theirs.locator('.reaction[data-reaction="👍"]')
        await expect(chip).to_have_text("👍1")
        await expect(chip).to_have_attribute("aria-pressed", "true")
        stored = (await history(http, gw.url, room))[0]
        assert stored["reactions"] == {"👍": {"count": 1, "users": ["ana"]}}
        # someone else's reaction arrives live
        r = await http.post(
            f"{gw.url}/v1/rooms/{room}/messages/1/reactions", json={"reaction": "👍", "user": "cy"}
        )
        assert r.status_code == 200, r.text
        await expect(chip).to_have_text("👍2")
        await chip.click()
        await expect(chip).to_have_text("👍1")
        await expect(chip).to_have_attribute("aria-pressed", "false")
        stored = (await history(http, gw.url, room))[0]
        assert stored["reactions"] == {"👍": {"count": 1, "users": ["cy"]}}

        # Keyboard: the actions are reachable by Tab from the message before them.
        await theirs.locator('.reaction[data-reaction="👍"]').focus()
        for _ in range(5):  # bob's react and reply, then ana's react, reply and edit
            await page.keyboard.press("Tab")
        await expect(mine.locator('[data-action="edit"]')).to_be_focused()
        await expect(mine.locator(".actions")).to_have_css("opacity", "1")
        await page.keyboard.press("Enter")
        box = mine.locator("textarea.edit-text")
        await expect(box).to_be_focused()
        await expect(box).to_have_value("my message")
        # Escape puts the message back as it was
        await page.keyboard.type(" (not this)")
        await page.keyboard.press("Escape")
        await expect(box).to_have_count(0)
        await expect(mine.locator(".text")).to_have_text("my message")
        await expect(mine.locator('[data-action="edit"]')).to_be_focused()
        # Enter saves
        await page.keyboard.press("Enter")
        await page.keyboard.press("Control+A")
        await page.keyboard.type("my edited message")
        await page.keyboard.press("Enter")
        await expect(mine.locator(".text")).to_have_text("my edited message")
        await expect(mine).to_have_class(re.compile(r"\bedited\b"))
        assert (await history(http, gw.url, room))[1]["text"] == "my edited message"

        # Delete asks once more before it deletes.
        await mine.hover()
        delete = mine.locator('[data-action="delete"]')
        await delete.click()
        await expect(delete).to_have_attribute("data-confirm", "true")
        await expect(delete).to_have_accessible_name("Confirm: delete this message")
        assert (await history(http, gw.url, room))[1]["deleted_at"] is None
        await delete.click()
        await expect(mine).to_have_class(re.compile(r"\bdeleted\b"))
        await expect(mine.locator(".text")).to_have_text("This message was deleted.")
        await expect(mine.locator(".actions")).to_have_count(0)
        assert (await history(http, gw.url, room))[1]["deleted_at"] is not None

        # A phone: a long press shows a message's actions; a touch elsewhere hides them.
        phone = await browser.open(
            f"{gw.url}/?room={room}&name=dee", "phone", viewport=PHONE, has_touch=True
        )
        await connected(phone)
        line = item(phone, 1)
        await expect(line.locator(".actions")).to_have_css("opacity", "0")
        await line.locator(".text").dispatch_event("pointerdown", {"pointerType": "touch"})
        await expect(line).to_have_class(re.compile(r"\bactions-open\b"))
        await expect(line.locator(".actions")).to_have_css("opacity", "1")
        await line.locator('[data-action="react"]').tap()
        await line.get_by_role("button", name="React with 🎉").tap()
        await expect(line.locator('.reaction[data-reaction="🎉"]')).to_have_text("🎉1")
        await phone.locator("#room-title").dispatch_event("pointerdown", {"pointerType": "touch"})
        await expect(line).not_to_have_class(re.compile(r"\bactions-open\b"))
        assert browser.errors == []


VIEWPORTS = [
    ("laptop", {"width": 1280, "height": 800}),
    ("small-laptop", {"width": 1366, "height": 768}),
    ("phone", {"width": 390, "height": 844}),
]


async def test_the_message_box_is_on_screen_at_three_sizes_and_dark_mode(gateway_env, browser):
    room = "long"
    async with instances(1, gateway_env) as (gw,), httpx.AsyncClient() as http:
        for i in range(1, 61):
            text = f"message {i} " + "words " * (i % 7 * 6)
            assert (await post(http, gw.url, room, text, author="bob")).status_code == 201
        for label, viewport in VIEWPORTS:
            page = await browser.open(f"{gw.url}/?room={room}&name=ana", label, viewport=viewport)
            await connected(page)
            await shown_up_to(page, 60)
            for selector in ("#compose", "#text", "#send"):
                box = await page.locator(selector).bounding_box()
                assert box is not None, selector
                assert box["y"] >= 0, (label, selector, box)
                assert box["y"] + box["height"] <= viewport["height"], (label, selector, box)
                assert box["x"] + box["width"] <= viewport["width"], (label, selector, box)
            # the newest message is in view above the box, and the page itself never scrolls
            last = await item(page, 60).bounding_box()
            compose = await page.locator("#compose").bounding_box()
            assert last is not None and compose is not None
            assert last["y"] + last["height"] <= compose["y"] + 1, label
            scroll = await page.evaluate(
                "[document.documentElement.scrollHeight - innerHeight,"
                " document.documentElement.scrollWidth - innerWidth]"
            )
            assert scroll == [0, 0], (label, scroll)
            await expect(page.locator("#text")).to_be_editable()

        # Dark mode: the system's choice, and the theme button's over it, kept.
        light_bg, dark_bg = "rgb(247, 247, 248)", "rgb(26, 27, 30)"
        dark = await browser.open(f"{gw.url}/?room={room}&name=ana", "dark", color_scheme="dark")
        await connected(dark)
        await expect(dark.locator("body")).to_have_css("background-color", dark_bg)
        await expect(dark.locator(".room-view")).to_have_css("color", "rgb(236, 236, 241)")
        light = await browser.open(f"{gw.url}/?room={room}&name=ana", "light", color_scheme="light")
        await connected(light)
        await expect(light.locator("body")).to_have_css("background-color", light_bg)
        theme = light.locator("#theme")
        await expect(theme).to_have_accessible_name("Colour theme: system")
        await theme.click()
        await expect(theme).to_have_accessible_name("Colour theme: dark")
        await expect(light.locator("body")).to_have_css("background-color", dark_bg)
        await light.reload()
        await connected(light)
        await expect(light.locator("body")).to_have_css("background-color", dark_bg)
        await light.locator("#theme").click()
        await expect(light.locator("body")).to_have_css("background-color", light_bg)

        # Reduced motion: the phone's room drawer opens without sliding.
        still = await browser.open(
            f"{gw.url}/?room={room}&name=ana", "still", viewport=PHONE, reduced_motion="reduce"
        )
        await connected(still)
        await expect(still.locator("#sidebar")).to_have_css("transition-duration", "0s")
        await still.locator("#open-rooms").click()
        await expect(still.locator("#sidebar")).to_be_visible()
        await expect(still.locator(f'#rooms button[data-room="{room}"]')).to_be_focused()
        await still.keyboard.press("Escape")
        await expect(still.locator("#sidebar")).to_be_hidden()
        assert browser.errors == []


def screen(hit: Hit) -> bytes:
    text = hit.payload["text"]
    if "darn" in text:
        return b'{"action": "reject", "reason": "' + REASON.encode() + b'"}'
    return b'{"action": "accept"}'


def slow(hit: Hit) -> Answer:
    # a post with "slow" waits at the hook: the page's post is in flight meanwhile
    return 200, {"content-type": "application/json"}, t(2) if "slow" in hit.payload["text"] else 0


async def test_a_refused_post_stays_in_the_box_and_is_never_merged_with_the_next(
    gateway_env, browser
):
    room = "screened"
    receiver = await Receiver([new_secret()], reply=screen, answer=slow).start()
    gw = Instance(hook_env(gateway_env, receiver, PUBLISH_HOOK_TIMEOUT=str(t(10)))).start()
    try:
        await gw.wait_ready()
        async with httpx.AsyncClient() as http:
            page = await browser.open(f"{gw.url}/?room={room}&name=ana", "ana")
            await connected(page)
            text = page.locator("#text")

            # Refused by the publish hook: the text stays, marked, with the reason.
            await text.fill("well darn it")
            await text.press("Enter")
            await expect(page.locator("#notice")).to_contain_text(REASON)
            await expect(page.locator("#notice")).to_have_attribute("data-kind", "error")
            await expect(text).to_have_value("well darn it")
            await expect(text).to_have_attribute("data-refused", "rejected")
            await expect(text).to_be_editable()
            assert await history(http, gw.url, room) == []

            # While a post is in flight the box takes no typing: nothing can be
            # merged into a text that may yet come back.
            await text.fill("a slow one")
            await text.press("Enter")
            await expect(text).to_have_js_property("readOnly", True)
            await expect(page.locator("#send")).to_be_disabled()
            await page.keyboard.type(" and more")
            await expect(text).to_have_value("a slow one")
            await expect(text).to_have_value("", timeout=t(20) * 1000)
            await expect(text).to_have_js_property("readOnly", False)
            await expect(text).not_to_have_attribute("data-refused", re.compile(".*"))
            await expect(page.locator("#notice")).to_be_hidden()
            await say(page, "and the next")
            await shown_up_to(page, 2)
            assert [m["text"] for m in await history(http, gw.url, room)] == [
                "a slow one",
                "and the next",
            ]
            assert browser.errors == []
    finally:
        gw.stop()
        await receiver.stop()
