"""The history cache without Redis (chat_gateway.storage.cache): memory mode reads the store."""

from __future__ import annotations

from chat_gateway.storage import HistoryCache, create_store


async def test_memory_mode_reads_the_store(tmp_path):
    store = create_store(f"sqlite:///{tmp_path}/m.db")
    await store.start()
    await store.migrate()
    cache = HistoryCache(store)
    try:
        msg, _ = await store.append("r", "a", "x")
        await cache.committed(msg)
        assert (await cache.history("r")).messages == [msg]
        assert await cache.latest_seqs(["r"]) == {"r": 1}
        assert await cache.latest_seqs(["r", "none"]) == {"r": 1, "none": 0}
    finally:
        await store.close()
