"""The store's pure parts (chat_gateway.storage.base): ids, timestamps, and database URLs
printed without their password."""

from __future__ import annotations

from chat_gateway.storage.base import format_ts, new_id, parse_ts


def test_ids_are_ulids_ordered_by_time_and_timestamps_round_trip():
    # A ULID's first 10 digits are the milliseconds; the rest are random.
    assert new_id(0)[:10] == "0000000000"
    assert new_id(2**48 - 1)[:10] == "7ZZZZZZZZZ"
    ids = [new_id(ms) for ms in (1, 31, 32, 10**12, 1_763_700_000_000, 2**48 - 1)]
    assert ids == sorted(ids) and all(len(i) == 26 for i in ids)
    assert all(set(i) <= set("0123456789ABCDEFGHJKMNPQRSTVWXYZ") for i in ids)
    assert len({new_id(5) for _ in range(1000)}) == 1000
    assert format_ts(0) == "1970-01-01T00:00:00.000Z"
    assert format_ts(1_763_766_000_007) == "2025-11-21T23:00:00.007Z"
    for ms in (0, 999, 1000, 1_763_766_000_007, 1_763_766_001_999, 4_102_444_799_999):
        assert parse_ts(format_ts(ms)) == ms


def test_a_printed_database_url_has_no_password():
    from chat_gateway.storage.base import display_url

    assert display_url(
        "postgresql://chat:s3cret@h1:5432,h2:5432/chat?target_session_attrs=read-write"
    ) == ("postgresql://chat:***@h1:5432,h2:5432/chat?target_session_attrs=read-write")
    assert (
        display_url("postgresql://h/chat?user=chat&password=s3cret")
        == "postgresql://h/chat?user=chat&password=***"
    )
    assert display_url("postgresql://chat@h/chat") == "postgresql://chat@h/chat"
    assert display_url("sqlite:///./chat-gateway.db") == "sqlite:///./chat-gateway.db"
