"""The chat page in a real browser, against real gateway processes."""

from __future__ import annotations

import json

import httpx
from playwright.async_api import Page, expect

from tests.browser.chat_page import connected, shown_up_to
from tests.browser.conftest import PHONE
from tests.harness import ROOT, Instance, instances, post, t

ROOM = "browser.room"


async def seqs(page: Page) -> list[int]:
    return await page.eval_on_selector_all(
        "#messages li[data-seq]", "els => els.map(e => Number(e.dataset.seq))"
    )


async def texts(page: Page) -> list[str]:
    return await page.eval_on_selector_all(
        "#messages li .text", "els => els.map(e => e.textContent)"
    )


async def say(page: Page, text: str) -> None:
    """Type a message and press Enter, as a person would."""
    await page.locator("#text").fill(text)
    await page.locator("#text").press("Enter")
    await expect(page.locator("#text")).to_have_value("")


async def test_two_pages_on_two_instances_chat_and_one_resumes_after_its_instance_restarts(
    gateway_env, browser
):
    async with instances(2, gateway_env) as (gw_a, gw_b), httpx.AsyncClient() as http:
        for i in range(1, 4):
            assert (await post(http, gw_a.url, ROOM, f"before {i}", author="cy")).status_code == 201

        ana = await browser.open(f"{gw_a.url}/?room={ROOM}&name=ana", "ana")
        bob = await browser.open(f"{gw_b.url}/?room={ROOM}&name=bob", "bob")
        await connected(ana)
        await connected(bob)
        assert await seqs(ana) == [1, 2, 3], "the latest history is shown on joining"

        await say(ana, "hi bob, from instance A")
        await say(bob, "hi ana, from instance B")
        for page in (ana, bob):
            await shown_up_to(page, 5)
            assert await seqs(page) == [1, 2, 3, 4, 5]
            assert (await texts(page))[3:] == ["hi bob, from instance A", "hi ana, from instance B"]

        # Instance A goes away (graceful: its sockets close with 1001) while bob keeps talking.
        gw_a.stop()
        await expect(ana.locator("#status")).not_to_have_attribute("data-state", "connected")
        for i in range(6, 11):
            await say(bob, f"while A is down {i}")
            await shown_up_to(bob, i)
        gw_a.start()
        await gw_a.wait_ready()

        await connected(ana)
        await shown_up_to(ana, 10)
        await say(bob, "after the restart")
        await shown_up_to(ana, 11)
        history = (await http.get(f"{gw_b.url}/v1/rooms/{ROOM}/messages")).json()["messages"]
        for page in (ana, bob):
            assert await seqs(page) == list(range(1, 12)), "every message once, in order"
            assert await texts(page) == [m["text"] for m in history]
        assert browser.errors == []


async def test_chat_page_keyboard_only_text_as_text_limits_and_phone_width(gateway_env, browser):
    env = {**gateway_env, "RATE_LIMIT": "3/60s"}
    inst = Instance(env).start()
    try:
        await inst.wait_ready()
        page = await browser.open(inst.url + "/", "phone", viewport=PHONE)

        # Every control has a label; a bad room name is explained, not sent.
        for label in ("Your name", "Room", "Message"):
            await expect(page.get_by_label(label, exact=True)).to_be_visible()
        await expect(page.locator("#name")).to_be_focused()
        await page.keyboard.type("dee")
        await page.keyboard.press("Tab")
        await page.keyboard.press("Control+A")
        await page.keyboard.type("no spaces allowed")
        await page.keyboard.press("Enter")
        await expect(page.locator("#join-error")).to_be_visible()
        await expect(page.locator("#status")).to_have_attribute("data-state", "idle")

        # Keyboard only: fix the room, Enter joins, focus lands in the message box.
        await page.keyboard.press("Control+A")
        await page.keyboard.type(ROOM)
        await page.keyboard.press("Enter")
        await connected(page)
        await expect(page.locator("#text")).to_be_focused()

        # A message that is too long is flagged before it is sent, and Enter sends nothing.
        await page.keyboard.insert_text("x" * 4001)
        await expect(page.locator("#counter")).to_have_attribute("data-over", "true")
        await expect(page.locator("#counter")).to_contain_text("1 character too long")
        await expect(page.locator("#send")).to_be_disabled()
        await page.keyboard.press("Enter")
        await expect(page.locator("#text")).to_have_value("x" * 4001)

        # HTML is shown as text, never run.
        evil = '<img src=x onerror="window.pwned=1"><b>bold?</b>'
        await page.locator("#text").fill("")
        await page.keyboard.type(evil)
        await page.keyboard.press("Enter")
        await shown_up_to(page, 1)
        assert await texts(page) == [evil]
        assert await page.locator("#messages img, #messages b").count() == 0
        assert await page.evaluate("window.pwned") is None

        # Bucket of 3: two more pass, the fourth is refused with a friendly wait.
        await say(page, "two")
        await say(page, "three")
        await shown_up_to(page, 3)
        await page.locator("#text").fill("four")
        await page.locator("#text").press("Enter")
        notice = page.locator("#notice")
        await expect(notice).to_be_visible()
        await expect(notice).to_have_attribute("data-kind", "rate")
        await expect(notice).to_contain_text("You can send again in")
        assert int(await notice.get_attribute("data-retry-after") or 0) >= 1
        await expect(page.locator("#text")).to_have_value("four")
        await expect(page.locator("#send")).to_be_disabled()
        assert await seqs(page) == [1, 2, 3]

        # Presence shows when the server offers it and stays out of the way when not.
        async with httpx.AsyncClient() as http:
            r = await http.get(f"{inst.url}/v1/rooms/{ROOM}/presence")
        if r.status_code == 200:
            await expect(page.locator("#presence-list")).to_contain_text("dee")
        else:
            await expect(page.locator("#presence")).to_be_hidden()

        # Readable on a phone: nothing wider than the screen.
        overflow = await page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0
        assert browser.errors == []
    finally:
        inst.stop()


# -- auth mode: tokens in the address or pasted, and refusals that stop ------------


async def requests_while(page: Page, seconds: float) -> list[str]:
    """The requests and WebSockets the page opens in the next ``seconds``."""
    seen: list[str] = []
    page.on("request", lambda req: seen.append(req.url))
    page.on("websocket", lambda ws: seen.append(ws.url))
    await page.wait_for_timeout(seconds * 1000)
    return seen


async def refused(page: Page, *words: str) -> None:
    await expect(page.locator("#status")).to_have_attribute(
        "data-state", "refused", timeout=t(30) * 1000
    )
    for word in words:
        await expect(page.locator("#notice")).to_contain_text(word)
    await expect(page.locator("#token")).to_be_focused()
    # Stopped: no more attempts (the first retry would come within a second).
    assert await requests_while(page, t(3)) == []
    await expect(page.locator("#status")).to_have_attribute("data-state", "refused")


async def test_auth_mode_joins_with_a_token_and_no_name(gateway_env, browser):
    from tests.system.test_auth import SECRET, token

    async with instances(1, {**gateway_env, "AUTH_SECRET": SECRET}) as (gw,):
        page = await browser.open(f"{gw.url}/?room={ROOM}&token={token('ana')}", "ana")
        await connected(page)
        # The name is the token's, shown and not editable; the address gains no name.
        await expect(page.locator("#name")).to_have_value("ana")
        await expect(page.locator("#name")).to_be_disabled()
        assert "name=" not in page.url
        await say(page, "signed in")
        await shown_up_to(page, 1)
        await expect(page.locator("#messages li.mine .author")).to_have_text("ana")
        assert browser.errors == []


async def test_a_token_in_the_address_is_taken_out_of_it_and_the_history(gateway_env, browser):
    from tests.system.test_auth import SECRET, token

    async with instances(1, {**gateway_env, "AUTH_SECRET": SECRET}) as (gw,):
        tok = token("ana")
        page = await browser.open(f"{gw.url}/?room={ROOM}&token={tok}", "address-token")
        await connected(page)
        assert "token=" not in page.url and tok not in page.url
        assert await page.evaluate("location.search") == f"?room={ROOM}"
        await say(page, "signed in from the address")
        await shown_up_to(page, 1)
        # A reload of the cleaned address joins again, as the same user.
        await page.reload()
        await connected(page)
        await expect(page.locator("#name")).to_have_value("ana")
        assert "token=" not in page.url
        # Nothing in the tab's history leads back to the token: the entry it was in
        # was replaced, so back is the blank page the tab started on.
        await page.go_back()
        assert tok not in page.url and "token=" not in page.url, page.url
        assert browser.errors == []


async def test_auth_mode_refusals_stop_retrying_and_a_pasted_token_joins(gateway_env, browser):
    from tests.system.test_auth import SECRET, token

    env = {**gateway_env, "AUTH_SECRET": SECRET}
    async with instances(1, env) as (gw,):
        # No token on a server that asks for one: 401, stop, ask for a token.
        page = await browser.open(f"{gw.url}/?room={ROOM}&name=ana", "no-token")
        await refused(page, "asks you to sign in", "Paste a token")
        await page.locator("#token").fill(token("ana"))
        await page.locator("#token").press("Enter")
        await connected(page)
        await expect(page.locator("#notice")).to_be_hidden()
        assert "token=" not in page.url, "a pasted token is not written into the address"

        # An expired token in the address: 401, stop.
        page = await browser.open(f"{gw.url}/?room={ROOM}&token={token('bo', exp=-60)}", "expired")
        await refused(page, "not accepted", "expired")

        # A token that does not grant the room: 403, stop; one that does, joins.
        page = await browser.open(
            f"{gw.url}/?room={ROOM}&token={token('cy', rooms=['other'])}", "forbidden"
        )
        await refused(page, "does not let you into", ROOM)
        await page.locator("#token").fill(token("cy", rooms=[ROOM]))
        await page.get_by_role("button", name="Join", exact=True).click()
        await connected(page)
        await expect(page.locator("#name")).to_have_value("cy")
        assert browser.errors == []


async def test_auth_mode_a_token_expiring_while_connected_stops_the_page(gateway_env, browser):
    from tests.system.test_auth import SECRET, token

    env = {**gateway_env, "AUTH_SECRET": SECRET, "AUTH_LEEWAY": "0"}
    async with instances(1, env) as (gw,):
        page = await browser.open(
            # long enough for the join to finish first on a busy machine
            f"{gw.url}/?room={ROOM}&token={token('ana', exp=t(8))}",
            "expiring",
        )
        await connected(page)
        # The server closes the socket at expiry (1008); the page's reconnect learns
        # over HTTP that the token is refused and stops there.
        await refused(page, "not accepted")
        assert browser.errors == []


async def test_a_page_disconnected_by_the_server_api_stops_and_says_why(gateway_env, browser):
    from tests.system.test_auth import SECRET, token

    key = "backend-key-1"
    env = {**gateway_env, "AUTH_SECRET": SECRET, "API_KEYS": key}
    async with instances(1, env) as (gw,), httpx.AsyncClient() as http:
        page = await browser.open(f"{gw.url}/?room={ROOM}&token={token('ana')}", "ana")
        await connected(page)
        r = await http.post(
            f"{gw.url}/v1/server/disconnect",
            headers={"Authorization": f"Bearer {key}"},
            json={"user": "ana", "reason": "banned for spam"},
        )
        assert r.status_code == 202, r.text
        status = page.locator("#status")
        await expect(status).to_have_attribute("data-state", "refused", timeout=t(30) * 1000)
        await expect(status).to_contain_text("banned for spam")
        await expect(page.locator("#send")).to_be_disabled()
        # final: the page does not knock again
        assert await requests_while(page, t(3)) == []
        await expect(status).to_have_attribute("data-state", "refused")
        assert browser.errors == []


# -- the page is the JavaScript client's first user ------------------------------


async def test_the_page_runs_on_the_served_js_client_and_resumes_across_an_instance_kill(
    gateway_env, browser
):
    sdk_source = (ROOT / "clients" / "js" / "src" / "index.js").read_bytes()
    async with instances(2, gateway_env) as (gw_a, gw_b), httpx.AsyncClient() as http:
        for i in range(1, 4):
            assert (await post(http, gw_b.url, ROOM, f"m{i}", author="cy")).status_code == 201
        page = await browser.open("about:blank", "ana")
        scripts: list[str] = []
        blocked: list[str] = []
        page.on(
            "request",
            lambda req: scripts.append(req.url) if req.resource_type == "script" else None,
        )
        page.on(
            "console",
            lambda msg: blocked.append(msg.text) if "Content Security Policy" in msg.text else None,
        )
        frames: list[str] = []
        page.on(
            "websocket", lambda ws: ws.on("framesent", lambda payload: frames.append(str(payload)))
        )
        async with page.expect_response(f"{gw_a.url}/sdk/chat-gateway.js") as module:
            document = await page.goto(f"{gw_a.url}/?room={ROOM}&name=ana")
        # the page's own policy: a module of its origin is a script of 'self', its
        # WebSocket a connection to 'self'
        assert document is not None
        policy = document.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "connect-src 'self'" in policy, policy
        response = await module.value
        assert response.ok
        assert response.headers["content-type"].startswith("text/javascript")
        assert await response.body() == sdk_source, "the module is clients/js/src/index.js"
        assert scripts == [f"{gw_a.url}/static/chat.js", f"{gw_a.url}/sdk/chat-gateway.js"]

        await connected(page)
        assert await seqs(page) == [1, 2, 3]

        # Typing sends one typing frame per 2 s at most; a server that refuses the
        # frame (as this one does until typing is added) leaves the page as it was.
        await page.locator("#text").press_sequentially("from the page", delay=20)
        await page.wait_for_timeout(1000)
        typing = [f for f in frames if '"typing"' in f]
        assert [json.loads(f) for f in typing] == [{"type": "typing", "room": ROOM}]
        await expect(page.locator("#notice")).to_be_hidden()
        await expect(page.locator("#status")).to_have_attribute("data-state", "connected")
        await page.locator("#text").press("Enter")
        await expect(page.locator("#text")).to_have_value("")
        for i in range(5, 21):
            assert (await post(http, gw_b.url, ROOM, f"m{i}", author="cy")).status_code == 201
        await shown_up_to(page, 20)

        # The page's instance is killed (no close frame) while the room goes on elsewhere.
        gw_a.kill()
        await expect(page.locator("#status")).not_to_have_attribute("data-state", "connected")
        for i in range(21, 41):
            assert (await post(http, gw_b.url, ROOM, f"m{i}", author="cy")).status_code == 201
        gw_a.start()
        await gw_a.wait_ready()
        await connected(page)
        await shown_up_to(page, 40)
        await say(page, "back again")
        await shown_up_to(page, 41)

        history = (await http.get(f"{gw_b.url}/v1/rooms/{ROOM}/messages")).json()["messages"]
        assert await seqs(page) == list(range(1, 42)), "every message once, in order"
        assert await texts(page) == [m["text"] for m in history]
        assert [m["text"] for m in history if m["author"] == "ana"] == [
            "from the page",
            "back again",
        ]
        assert blocked == [] and browser.errors == []
