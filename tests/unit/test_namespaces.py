"""Room kinds by namespace (chat_gateway.core.namespaces): the file's rules, parsed
and looked up, with no server."""

from __future__ import annotations

import pytest

from chat_gateway.config import ConfigError, Rate, Settings
from chat_gateway.core.namespaces import (
    DEFAULT,
    NamespaceError,
    Namespaces,
    RoomKind,
    namespace_of,
    parse,
)


def rules(data: dict) -> Namespaces:
    return Namespaces("ns.toml", parse(data, Rate.parse, where="NAMESPACES_FILE='ns.toml'"))


def test_a_rooms_namespace_is_the_part_before_its_first_colon() -> None:
    assert namespace_of("ticker:btc") == "ticker"
    assert namespace_of("ticker:btc:usd") == "ticker"
    assert namespace_of("lobby") == ""


def test_lookup_gives_the_namespaces_rules_and_v1_defaults_elsewhere() -> None:
    ns = rules(
        {
            "namespaces": {
                "ticker": {"kind": "ephemeral", "client_publish": False, "presence": False},
                "chat": {"rate_limit": "5/1s", "conflate_ms": 250},
            }
        }
    )
    ticker = ns.of("ticker:btc")
    assert ticker.kind is RoomKind.EPHEMERAL and not ticker.stored
    assert (ticker.client_publish, ticker.presence, ticker.rate_limit) == (False, False, None)
    chat = ns.of("chat:general")
    assert chat.stored and chat.rate_limit == "5/1s" and chat.conflate_ms == 250
    # a room outside every configured namespace, and one whose name only starts alike
    assert ns.of("lobby") is DEFAULT and ns.of("tickers:x") is DEFAULT
    assert ns.of("ticker") is DEFAULT, "no colon: the default namespace"
    assert Namespaces().of("ticker:btc") is DEFAULT
    assert str(Namespaces()) == "unset" and str(ns) == "ns.toml"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"rooms": {}}, "unknown table 'rooms'"),
        ({"namespaces": {"x": {"colour": "red"}}}, "unknown option 'colour'"),
        ({"namespaces": {"x": {"kind": "fleeting"}}}, "kind='fleeting'"),
        ({"namespaces": {"x": {"presence": 1}}}, "presence must be a TOML bool"),
        ({"namespaces": {"x": {"conflate_ms": True}}}, "conflate_ms must be a TOML int"),
        ({"namespaces": {"x": {"conflate_ms": 60_001}}}, "conflate_ms must be 0..60000"),
        ({"namespaces": {"x": {"rate_limit": "0/1s"}}}, "rate_limit='0/1s'"),
        ({"namespaces": {"a:b": {}}}, "without ':'"),
        ({"namespaces": {"x": "ephemeral"}}, "[namespaces.x] must be a table"),
    ],
)
def test_a_bad_rule_is_one_line_naming_where(data: dict, expected: str) -> None:
    with pytest.raises(NamespaceError) as err:
        rules(data)
    assert expected in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith("NAMESPACES_FILE='ns.toml'")


def test_settings_read_the_file_and_refuse_a_bad_one(tmp_path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[namespaces.live]\nkind = "ephemeral"\nrate_limit = "3/1m"\n')
    settings = Settings.from_env({"NAMESPACES_FILE": str(good)})
    assert settings.namespaces_file.of("live:1").kind is RoomKind.EPHEMERAL
    bad = tmp_path / "bad.toml"
    bad.write_text("[namespaces.live\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        Settings.from_env({"NAMESPACES_FILE": str(bad)})
    assert Settings.from_env({}).namespaces_file.of("live:1") is DEFAULT
