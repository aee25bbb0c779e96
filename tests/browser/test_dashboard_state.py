"""The dashboard's state room panel in a real browser: a room's keys from the
snapshot, then live writes, conflated to the interval asked for."""

from __future__ import annotations

import httpx
from playwright.async_api import expect

from tests.harness import Instance

ROOM = "ticker:dash"


async def test_state_panel_shows_the_snapshot_then_conflated_live_updates(
    gateway_env, browser, tmp_path
):
    namespaces = tmp_path / "namespaces.toml"
    namespaces.write_text('[namespaces.ticker]\nkind = "state"\nconflate_ms = 0\n')
    inst = Instance({**gateway_env, "NAMESPACES_FILE": str(namespaces)}).start()
    try:
        await inst.wait_ready()
        async with httpx.AsyncClient(base_url=inst.url, timeout=10) as http:

            async def put(key: str, value: object) -> int:
                r = await http.put(f"/v1/rooms/{ROOM}/state/{key}", json={"value": value})
                assert r.status_code == 200, r.text
                return int(r.json()["seq"])

            await put("btc", {"usd": 97000})
            await put("eth", 3500)
            dash = await browser.open(inst.url + "/dashboard", "dashboard")
            await dash.locator("#state-room").fill(ROOM)
            await dash.locator("#state-conflate").fill("1000")
            await dash.locator("#state-form button").click()
            rows = dash.locator("#state-keys tr")
            # the snapshot: both keys, at seq 2
            await expect(rows).to_have_count(2)
            await expect(dash.locator("#state-seq")).to_have_attribute("data-value", "2")
            await expect(dash.locator("#state-snapshots")).to_have_attribute("data-value", "1")
            await expect(dash.locator('#state-keys tr[data-key="btc"] td').first).to_have_text(
                '{"usd":97000}'
            )
            await expect(dash.locator("#state-status")).to_have_attribute("data-state", "live")
            # live: 30 writes of one key, a new key, a delete
            writes = 30
            for i in range(1, writes + 1):
                last = await put("n", i)
            await put("sol", [1, 2])
            r = await http.delete(f"/v1/rooms/{ROOM}/state/eth")
            assert r.status_code == 200
            last = int(r.json()["seq"])
            await expect(dash.locator("#state-seq")).to_have_attribute("data-value", str(last))
            await expect(dash.locator('#state-keys tr[data-key="n"] td').first).to_have_text(
                str(writes)
            )
            await expect(dash.locator('#state-keys tr[data-key="n"]')).to_have_attribute(
                "data-seq", str(writes + 2)
            )
            await expect(rows).to_have_count(3)  # btc, n, sol: eth deleted
            state = (await http.get(f"/v1/rooms/{ROOM}/state")).json()
            shown = await dash.locator("#state-keys tr").evaluate_all(
                "rows => rows.map(r => [r.dataset.key, Number(r.dataset.seq)])"
            )
            assert shown == sorted([k, e["seq"]] for k, e in state["values"].items())
            updates = int(await dash.locator("#state-updates").get_attribute("data-value") or 0)
            # conflated: far fewer updates than the 32 writes (each key's newest only)
            assert 0 < updates < writes, updates
            assert await dash.locator("#state-snapshots").get_attribute("data-value") == "1"
            # a later write still arrives
            await put("btc", {"usd": 1})
            await expect(dash.locator('#state-keys tr[data-key="btc"] td').first).to_have_text(
                '{"usd":1}'
            )
    finally:
        inst.stop()
