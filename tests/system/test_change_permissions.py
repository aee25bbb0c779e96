"""Who may edit or delete a message: its author, an API key, a moderator of its room."""

from __future__ import annotations

import asyncio

import httpx

from tests.harness import CHAT_SECRET as SECRET
from tests.harness import WSClient, instances
from tests.harness import chat_bearer as token


async def test_only_the_author_or_an_api_key_changes_a_message(gateway_env):
    room = "chat.auth"
    env = {**gateway_env, "AUTH_SECRET": SECRET, "API_KEYS": "key-one"}
    async with instances(1, env) as (gw,), httpx.AsyncClient(timeout=10) as http:
        url = f"{gw.url}/v1/rooms/{room}/messages"
        for text in ("one", "two", "three"):
            r = await http.post(url, json={"text": text}, headers=token("ana"))
            assert r.status_code == 201
        r = await http.patch(f"{url}/1", json={"text": "bo was here"}, headers=token("bo"))
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        r = await http.request("DELETE", f"{url}/1", headers=token("bo"))
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        r = await http.patch(f"{url}/1", json={"text": "one"})
        assert r.status_code == 401
        r = await http.patch(f"{url}/1", json={"text": "uno"}, headers=token("ana"))
        assert r.status_code == 200 and r.json()["text"] == "uno" and r.json()["version"] == 2
        assert "RateLimit-Remaining" in r.headers, "rate-limited with posts"
        r = await http.patch(
            f"{url}/2", json={"text": "moderated"}, headers={"Authorization": "Bearer key-one"}
        )
        assert r.status_code == 200 and r.json()["author"] == "ana"
        r = await http.request("DELETE", f"{url}/3", headers={"Authorization": "Bearer key-one"})
        assert r.status_code == 200 and r.json()["text"] == "" and r.json()["deleted_at"]
        r = await http.request("DELETE", f"{url}/3", headers={"Authorization": "Bearer key-one"})
        assert r.status_code == 200 and r.json()["version"] == 2, "a repeated delete is a no-op"
        # Bad input: 422 (or 404 for no such message), and nothing changes.
        bad = [
            ("PATCH", "1", {"text": ""}),
            ("PATCH", "1", {"text": 5}),
            ("PATCH", "1", {"text": "x", "extra": True}),
            ("PATCH", "0", {"text": "x"}),
            ("PATCH", "abc", {"text": "x"}),
            ("PATCH", "1", {}),
            ("DELETE", "-1", None),
            ("PATCH", "99", {"text": "x"}),
            ("DELETE", "99", None),
            ("PATCH", "3", {"text": "back from the dead"}),
        ]
        for method, seq, body in bad:
            r = await http.request(method, f"{url}/{seq}", json=body, headers=token("ana"))
            expected = 404 if seq in ("99", "3") else 422
            assert r.status_code == expected, (method, seq, body, r.text)
            assert r.json()["error"]["code"] == (
                "not_found" if expected == 404 else "invalid_request"
            )
        r = await http.patch(
            f"{gw.url}/v1/rooms/bad%20room/messages/1", json={"text": "x"}, headers=token("ana")
        )
        assert r.status_code == 422
        page = (await http.get(url, headers=token("ana"))).json()["messages"]
        assert [(m["text"], m.get("version", 1)) for m in page] == [
            ("uno", 2),
            ("moderated", 2),
            ("", 2),
        ]
        # Over WS: the token's sub decides, answered like a publish.
        async with (
            WSClient.connect(gw.ws_url + "?token=" + token("bo")["Authorization"][7:]) as bo,
            WSClient.connect(gw.ws_url + "?token=" + token("ana")["Authorization"][7:]) as ana,
        ):
            await bo.subscribe(room)
            await bo.send({"type": "edit", "room": room, "seq": 1, "text": "mine", "ref": "e1"})
            err = await bo.expect("error")
            assert (err["ref"], err["code"]) == ("e1", "forbidden")
            await ana.send({"type": "edit", "room": room, "seq": 1, "text": "ana's", "ref": 1})
            ack = await ana.expect("ack")
            assert ack["ref"] == 1 and ack["message"]["version"] == 3
            await ana.send({"type": "delete", "room": room, "seq": 1, "ref": 2})
            ack = await ana.expect("ack")
            assert ack["ref"] == 2 and ack["message"]["deleted_at"]
            updated = await bo.expect("message_updated")
            assert updated["message"]["text"] == "ana's" and updated["change"] == 4
            assert (await bo.expect("message_deleted"))["change"] == 5


async def test_a_moderator_claim_edits_and_deletes_anyones_message_in_its_rooms(gateway_env):
    room = "mod.lobby"
    env = {**gateway_env, "AUTH_SECRET": SECRET}
    mod = token("mia", moderate=["mod.*"])
    async with instances(1, env) as (gw,), httpx.AsyncClient(timeout=10) as http:
        url = f"{gw.url}/v1/rooms/{room}/messages"
        for text in ("one", "two", "three", "four"):
            r = await http.post(url, json={"text": text}, headers=token("ana"))
            assert r.status_code == 201
        other = f"{gw.url}/v1/rooms/elsewhere/messages"
        assert (
            await http.post(other, json={"text": "hi"}, headers=token("ana"))
        ).status_code == 201
        async with WSClient.connect(
            gw.ws_url + "?token=" + token("ana")["Authorization"][7:]
        ) as ana:
            await ana.subscribe(room)
            r = await http.patch(f"{url}/1", json={"text": "moderated"}, headers=mod)
            assert r.status_code == 200, r.text
            assert (r.json()["author"], r.json()["text"]) == ("ana", "moderated")
            r = await http.request("DELETE", f"{url}/2", headers=mod)
            assert r.status_code == 200 and r.json()["deleted_at"], r.text
            updated = await ana.expect("message_updated")
            assert updated["message"]["seq"] == 1 and updated["message"]["text"] == "moderated"
            deleted = await ana.expect("message_deleted")
            assert deleted["message"]["seq"] == 2
            # Over WS too.
            async with WSClient.connect(gw.ws_url + "?token=" + mod["Authorization"][7:]) as ws:
                await ws.send(
                    {"type": "edit", "room": room, "seq": 3, "text": "tidied", "ref": "m1"}
                )
                ack = await ws.expect("ack")
                assert ack["ref"] == "m1" and ack["message"]["text"] == "tidied"
                await ws.send({"type": "delete", "room": room, "seq": 4, "ref": "m2"})
                ack = await ws.expect("ack")
                assert ack["ref"] == "m2" and ack["message"]["deleted_at"]
                await ws.send({"type": "delete", "room": "elsewhere", "seq": 1, "ref": "m3"})
                err = await ws.expect("error")
                assert (err["ref"], err["code"]) == ("m3", "forbidden")
            assert (await ana.expect("message_updated"))["message"]["text"] == "tidied"
            assert (await ana.expect("message_deleted"))["message"]["seq"] == 4
        # Outside the claim's rooms, or without the claim, or without read access: 403.
        refused = [
            (mod, other),
            (token("bo"), url),
            (token("bo", moderate=[]), url),
            (token("mia", moderate=["mod.*"], rooms=["other.*"]), url),
        ]
        for headers, target in refused:
            r = await http.patch(f"{target}/1", json={"text": "x"}, headers=headers)
            assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", r.text
            r = await http.request("DELETE", f"{target}/1", headers=headers)
            assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", r.text
        r = await http.patch(f"{url}/1", json={"text": "x"}, headers=token("mia", moderate="mod.*"))
        assert r.status_code == 401, "the claim is a list of strings"
        page = (await http.get(url, headers=token("ana"))).json()["messages"]
        assert [m["text"] for m in page] == ["moderated", "", "tidied", ""]
        assert (await http.get(other, headers=token("ana"))).json()["messages"][0]["text"] == "hi"


async def test_a_read_only_grant_neither_changes_messages_nor_types(gateway_env):
    """``read_rooms`` grants reading: a PATCH or DELETE of the holder's own message,
    a WS edit, delete or typing frame is refused like a post (403 / error frame
    ``forbidden``, "read-only"), nothing changes and nobody is told; marking read
    stays allowed."""
    room = "ro.lobby"
    env = {**gateway_env, "AUTH_SECRET": SECRET}
    writer = token("ana")
    reader = token("ana", read_rooms=[room])  # the same sub, once it may only read
    async with instances(1, env) as (gw,), httpx.AsyncClient(timeout=10) as http:
        url = f"{gw.url}/v1/rooms/{room}/messages"
        for text in ("one", "two"):
            assert (await http.post(url, json={"text": text}, headers=writer)).status_code == 201

        def read_only(r: httpx.Response) -> None:
            assert r.status_code == 403, r.text
            error = r.json()["error"]
            assert error["code"] == "forbidden" and "read-only" in error["message"], error

        read_only(await http.post(url, json={"text": "three"}, headers=reader))
        read_only(await http.patch(f"{url}/1", json={"text": "changed"}, headers=reader))
        read_only(await http.request("DELETE", f"{url}/2", headers=reader))
        r = await http.post(f"{gw.url}/v1/rooms/{room}/read", json={"seq": 2}, headers=reader)
        assert r.status_code == 200 and r.json()["seq"] == 2, r.text

        async with (
            WSClient.connect(gw.ws_url + "?token=" + reader["Authorization"][7:]) as ro,
            WSClient.connect(gw.ws_url + "?token=" + token("bo")["Authorization"][7:]) as bo,
        ):
            await ro.subscribe(room)
            await bo.subscribe(room)
            frames = [
                {"type": "edit", "room": room, "seq": 1, "text": "changed", "ref": "e"},
                {"type": "delete", "room": room, "seq": 2, "ref": "d"},
                {"type": "typing", "room": room},
            ]
            for frame in frames:
                await ro.send(frame)
                err = await ro.expect("error")
                assert (err.get("ref"), err["code"]) == (frame.get("ref"), "forbidden"), err
                assert "read-only" in err["message"]
            await ro.send({"type": "read", "room": room, "seq": 1, "ref": "r"})
            assert (await ro.expect("ack"))["ref"] == "r"
            # bo's own typing and a post are the markers: nothing of ro came before them.
            await bo.send({"type": "typing", "room": room})
            assert (await http.post(url, json={"text": "three"}, headers=writer)).status_code == 201
            await bo.expect("message")
            await asyncio.sleep(0.3)
            kinds = [f.get("type") for f in bo.frames]
            assert "typing" not in kinds and "message_updated" not in kinds, bo.frames
            assert "message_deleted" not in kinds, bo.frames
        page = (await http.get(url, headers=reader)).json()["messages"]
        assert [(m["text"], m.get("version", 1)) for m in page] == [
            ("one", 1),
            ("two", 1),
            ("three", 1),
        ]
