"""Moderation in the store, on Postgres and SQLite: restrictions kept on the room's
row, refused by the append and the change themselves, the log, the rooms a user
is banned from; and on Postgres, a ban racing posts."""

from __future__ import annotations

import asyncio

import pytest

from chat_gateway.storage import Message, create_store
from chat_gateway.storage.moderation import (
    BANNED,
    MUTED,
    SLOW_MODE,
    UNBANNED,
    UNMUTED,
    Action,
    Restricted,
)
from tests.harness import eventually


async def test_a_ban_refuses_the_authors_appends_until_lifted(store):
    await store.append("r", "ana", "before")
    done = await store.moderate("r", Action(BANNED, "mod", user="ana", reason="spam"))
    assert done is not None and done.action == BANNED and done.user == "ana"
    with pytest.raises(Restricted) as refused:
        await store.append("r", "ana", "after")
    assert refused.value.kind == BANNED
    with pytest.raises(Restricted):
        await store.append("r", "ana", "keyed", "key-1")
    bo, _ = await store.append("r", "bo", "others post")
    assert bo.seq == 2, "a refused post uses no seq"
    mixed = await store.append_many([("r", "bo", "x"), ("r", "ana", "y"), ("s", "ana", "z")])
    assert isinstance(mixed[0], Message) and mixed[0].seq == 3
    assert isinstance(mixed[1], Restricted) and mixed[1].kind == BANNED
    assert isinstance(mixed[2], Message) and mixed[2].room == "s", "a ban is per room"
    assert await store.banned_rooms("ana") == ["r"]
    assert await store.moderate("r", Action(UNBANNED, "mod", user="ana")) is not None
    assert await store.moderate("r", Action(UNBANNED, "mod", user="ana")) is None, (
        "lifting what is not there records nothing"
    )
    msg, created = await store.append("r", "ana", "back")
    assert created and msg.seq == 4
    assert await store.banned_rooms("ana") == []
    page = await store.history("r")
    assert [m.text for m in page.messages] == ["before", "others post", "x", "back"]


async def test_a_mute_refuses_posts_and_edits_but_not_deletes(store):
    await store.append("r", "ana", "one")
    await store.append("r", "ana", "two")
    await store.moderate("r", Action(MUTED, "mod", user="ana"))
    with pytest.raises(Restricted) as refused:
        await store.append("r", "ana", "three")
    assert refused.value.kind == MUTED
    with pytest.raises(Restricted):
        await store.change("r", 1, "edited", author="ana")
    change, _ = await store.change("r", 2, None, author="ana")
    assert change is not None, "a muted user may still delete their own message"
    change, _ = await store.change("r", 1, "by a moderator", author=None)
    assert change is not None, "a moderator's change is never refused"
    await store.moderate("r", Action(BANNED, "mod", user="ana"))
    with pytest.raises(Restricted) as refused:
        await store.change("r", 1, None, author="ana")
    assert refused.value.kind == BANNED, "a banned user may not even delete"
    await store.moderate("r", Action(UNMUTED, "mod", user="ana"))
    await store.moderate("r", Action(UNBANNED, "mod", user="ana"))
    assert (await store.change("r", 1, "mine again", author="ana"))[0] is not None


async def test_a_restriction_with_a_duration_ends_on_time_with_no_job(store):
    await store.moderate("r", Action(MUTED, "mod", user="ana", duration=1))
    state = (await store.room_moderations(["r"]))["r"]
    assert state.mutes["ana"].until_ms is not None
    with pytest.raises(Restricted):
        await store.append("r", "ana", "too soon")

    async def posts() -> bool:
        try:
            await store.append("r", "ana", "later")
        except Restricted:
            return False
        return True

    await eventually(posts, timeout=10, interval=0.2)


async def test_the_log_pages_newest_first_and_settings_are_kept(store):
    await store.moderate("r", Action(BANNED, "mod", user="ana", reason="spam", duration=60))
    await store.moderate("r", Action(MUTED, "api_key", user="bo"))
    await store.moderate("r", Action(SLOW_MODE, "mod", slow_mode=30))
    await store.moderate("other", Action(BANNED, "mod", user="cy"))
    entries = await store.moderation_log("r", limit=10)
    assert [e.action for e in entries] == [SLOW_MODE, MUTED, BANNED]
    assert entries[0].to_dict()["slow_mode"] == 30
    ban = entries[2].to_dict()
    assert ban["user"] == "ana" and ban["reason"] == "spam" and ban["by"] == "mod"
    assert ban["expires_at"] is not None
    older = await store.moderation_log("r", limit=10, before=entries[0].id)
    assert [e.action for e in older] == [MUTED, BANNED]
    state = (await store.room_moderations(["r", "unknown"]))["r"]
    assert state.slow_mode == 30 and set(state.bans) == {"ana"} and set(state.mutes) == {"bo"}
    assert (await store.room_moderations(["unknown"]))["unknown"].slow_mode == 0


async def test_restrictions_survive_a_reopened_store(tmp_path):
    url = f"sqlite:///{tmp_path}/reopen.db"
    first = create_store(url)
    await first.start()
    await first.migrate()
    await first.moderate("r", Action(BANNED, "mod", user="ana"))
    await first.close()
    again = create_store(url)
    await again.start()
    try:
        with pytest.raises(Restricted):
            await again.append("r", "ana", "after a restart")
    finally:
        await again.close()


async def test_nothing_is_stored_after_a_bans_answer_while_posts_race_it(pg_url):
    """Posts from two stores (two instances' pools) race a ban: every post the store
    accepts commits before the ban's answer, none after, grouped or keyed."""
    stores = [create_store(pg_url), create_store(pg_url)]
    for s in stores:
        await s.start()
    await stores[0].migrate()
    stop = asyncio.Event()

    async def poster(s, n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                key = f"k{n}-{i}" if i % 3 == 0 else None
                await s.append("race", "ana", f"{n}-{i}", key)
            except Restricted:
                await asyncio.sleep(0.001)

    try:
        tasks = [asyncio.create_task(poster(s, n)) for n, s in enumerate(stores * 3)]
        await eventually(lambda: stores[0].latest_seq("race"), timeout=10)
        await stores[1].moderate("race", Action(BANNED, "mod", user="ana"))
        count = (await stores[0].history("race", limit=200)).messages[-1].seq
        await asyncio.sleep(0.3)  # the posters keep trying meanwhile
        stop.set()
        await asyncio.gather(*tasks)
        assert await stores[0].latest_seq("race") == count, (
            "a post was stored after the ban's answer"
        )
    finally:
        stop.set()
        for s in stores:
            await s.close()
