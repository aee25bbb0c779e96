"""State rooms through the Python client against real gateways: the snapshot and
each write into a live view, conflation, HTTP writes, and a gateway killed and
restarted while keys are written elsewhere: the client ends with exactly the store's
values."""

from __future__ import annotations

import asyncio
import contextlib
import random

import pytest
from chat_gateway_client import (
    Client,
    GatewayError,
    StateSnapshot,
    StateValue,
    StateView,
    StateWrite,
)
from client_events import FAST

from tests.harness import WSClient, eventually, instances, t


@pytest.fixture
def state_env(gateway_env, tmp_path):
    namespaces = tmp_path / "namespaces.toml"
    namespaces.write_text(
        '[namespaces.ticker]\nkind = "state"\nconflate_ms = 0\n\n[namespaces.live]\nkind = "ephemeral"\n'
    )
    return {**gateway_env, "NAMESPACES_FILE": str(namespaces)}


async def stored(client: Client, room: str) -> tuple[int, dict[str, object]]:
    snap = await client.get_state(room)
    return snap.seq, {k: e.value for k, e in snap.values.items()}


async def test_snapshot_then_writes_into_the_view_and_the_http_writes(state_env):
    async with (
        instances(1, state_env) as (gw,),
        Client(gw.url, **FAST) as writer,
        Client(gw.url, **FAST) as reader,
    ):
        first = await writer.set_state("ticker:a", "btc", {"px": 1})
        assert isinstance(first, StateWrite)
        assert (first.room, first.key, first.seq, first.value) == ("ticker:a", "btc", 1, {"px": 1})
        await writer.set_state("ticker:a", "eth", 2)
        items: list[object] = []

        async def watch() -> None:
            async for ev in reader.events():
                if isinstance(ev, StateSnapshot | StateValue):
                    items.append(ev)

        watcher = asyncio.create_task(watch())
        await asyncio.sleep(0)
        view = await reader.subscribe_state("ticker:a")
        assert isinstance(view, StateView) and reader.state_of("ticker:a") is view
        assert dict(view) == {"btc": {"px": 1}, "eth": 2} and view.seq == 2
        assert view.entries["btc"].seq == 1
        writes = await writer.patch_state("ticker:a", set={"sol": [3], "btc": 4}, delete=["eth"])
        assert [(w.seq, w.key, w.deleted) for w in writes] == [
            (3, "sol", None),
            (4, "btc", None),
            (5, "eth", True),
        ]
        await eventually(lambda: view.seq == 5, t(10))
        assert dict(view) == {"sol": [3], "btc": 4}
        gone = await writer.delete_state("ticker:a", "sol")
        assert gone.deleted is True
        await eventually(lambda: "sol" not in view, t(10))
        assert (view.seq, dict(view)) == await stored(writer, "ticker:a")
        await eventually(lambda: len(items) == 5, t(10))
        assert isinstance(items[0], StateSnapshot) and items[0].seq == 2
        assert [(i.seq, i.key, i.value, i.deleted) for i in items[1:]] == [  # type: ignore[attr-defined]
            (3, "sol", [3], None),
            (4, "btc", 4, None),
            (5, "eth", None, True),
            (6, "sol", None, True),
        ]
        with pytest.raises(GatewayError) as refused:
            await writer.set_state("lobby", "k", 1)
        assert refused.value.code == "wrong_room_kind"
        with pytest.raises(GatewayError) as not_state:
            await reader.subscribe_state("lobby")
        assert not_state.value.code == "wrong_room_kind"
        assert "it is stored" in str(not_state.value)
        with pytest.raises(GatewayError) as ephemeral:  # the kind from `subscribed`
            await reader.subscribe_state("live:x")
        assert ephemeral.value.code == "wrong_room_kind" and ephemeral.value.room == "live:x"
        assert "it is ephemeral" in str(ephemeral.value)
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


async def test_conflated_subscriber_gets_the_newest_value_of_each_key(state_env):
    async with (
        instances(1, state_env) as (gw,),
        Client(gw.url, **FAST) as writer,
        Client(gw.url, **FAST) as slow,
        Client(gw.url, **FAST) as fast,
    ):
        seen: dict[str, list[int]] = {"slow": [], "fast": []}

        async def collect(client: Client, name: str, ms: int) -> None:
            async for item in client.state_updates("ticker:c", conflate_ms=ms):
                if isinstance(item, StateValue):
                    seen[name].append(item.value)

        tasks = [
            asyncio.create_task(collect(slow, "slow", 1000)),
            asyncio.create_task(collect(fast, "fast", 0)),
        ]
        await eventually(
            lambda: (
                slow.state_of("ticker:c") is not None
                and fast.state_of("ticker:c") is not None
                and slow.state_of("ticker:c").seq is not None  # type: ignore[union-attr]
                and fast.state_of("ticker:c").seq is not None
            ),  # type: ignore[union-attr]
            t(10),
        )
        for i in range(1, 41):
            await writer.set_state("ticker:c", "n", i)
        await eventually(lambda: seen["slow"][-1:] == [40] and seen["fast"][-1:] == [40], t(15))
        assert seen["fast"] == list(range(1, 41))
        assert len(seen["slow"]) < 40
        assert seen["slow"] == sorted(seen["slow"])  # never an older value after a newer
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_gateway_killed_and_restarted_while_written_ends_with_the_store(state_env):
    """The client's only gateway dies while another keeps taking writes (sets and
    deletes of a few keys), comes back on the same port, and the writes go on: once
    they stop, the client holds exactly the store's values, having resumed with
    ``since`` (no second snapshot), never an older value of a key after a newer."""
    async with instances(2, state_env) as (a, b):
        async with Client(b.url, **FAST) as writer, Client(a.url, **FAST) as reader:
            await writer.patch_state("ticker:r", set={f"k{i}": 0 for i in range(8)})
            view = await reader.subscribe_state("ticker:r")
            assert len(view) == 8
            snapshots = 0
            last_value: dict[str, int] = {}
            backwards: list[tuple[str, int, int]] = []

            async def watch() -> None:
                nonlocal snapshots
                async for ev in reader.events():
                    if isinstance(ev, StateSnapshot):
                        snapshots += 1
                    elif isinstance(ev, StateValue) and not ev.deleted:
                        if ev.value < last_value.get(ev.key, -1):
                            backwards.append((ev.key, last_value[ev.key], ev.value))
                        last_value[ev.key] = ev.value

            watcher = asyncio.create_task(watch())
            counter = 0
            rng = random.Random(7)

            async def write(n: int) -> None:
                nonlocal counter
                for _ in range(n):
                    key = f"k{rng.randrange(10)}"
                    counter += 1
                    if rng.random() < 0.2:
                        await writer.delete_state("ticker:r", key)
                    else:
                        await writer.set_state("ticker:r", key, counter)

            await write(30)
            a.kill()
            await write(60)  # while the client's gateway is down
            a.start()
            await a.wait_ready()
            await write(60)  # while it reconnects and after
            seq, values = await stored(writer, "ticker:r")
            await eventually(lambda: view.seq == seq, t(20))
            assert dict(view) == values
            assert snapshots == 0, "resumed with since, not a new snapshot"
            assert backwards == []
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


async def test_a_fresh_snapshot_on_resume_replaces_the_values(state_env):
    """Away longer than the tombstones are kept: the gateway cannot list every delete
    since the client's seq, so it sends a whole snapshot, which replaces the values:
    a key deleted while away is gone from the view too."""
    env = {**state_env, "STATE_TOMBSTONE_TTL": "1", "RETENTION_INTERVAL": "1"}
    async with instances(2, env) as (a, b):
        async with Client(b.url, **FAST) as writer, Client(a.url, **FAST) as reader:
            await writer.patch_state("ticker:p", set={"a": 1, "b": 2})
            view = await reader.subscribe_state("ticker:p")
            assert dict(view) == {"a": 1, "b": 2}
            since = view.seq
            snapshots: list[StateSnapshot] = []

            async def watch() -> None:
                async for ev in reader.events():
                    if isinstance(ev, StateSnapshot):
                        snapshots.append(ev)

            watcher = asyncio.create_task(watch())
            a.kill()
            await writer.delete_state("ticker:p", "b")
            await writer.set_state("ticker:p", "c", 3)

            async def purged() -> bool:
                # a resume from the reader's seq now gets a snapshot (b's tombstone is gone)
                async with WSClient.connect(b.ws_url) as probe:
                    await probe.subscribe("ticker:p", since=since)
                    return bool((await probe.recv())["type"] == "snapshot")

            await eventually(purged, t(20), interval=0.5)
            a.start()
            await a.wait_ready()
            seq, values = await stored(writer, "ticker:p")
            await eventually(lambda: view.seq == seq, t(20))
            assert dict(view) == values == {"a": 1, "c": 3}
            assert [s.seq for s in snapshots] == [seq]
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
