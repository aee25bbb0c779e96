"""The publish hook's settings, namespace option and throttled warning, with no
server (the hook against a real receiver: tests/system/test_publish_hook.py)."""

from __future__ import annotations

import base64
import logging

import pytest

from chat_gateway.config import ConfigError, Rate, Settings
from chat_gateway.core.namespaces import NamespaceError, Namespaces, parse
from chat_gateway.delivery.publish_hook import ThrottledLog

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()


def test_the_namespace_option_turns_the_hook_off_and_defaults_to_on() -> None:
    ns = Namespaces(
        "ns.toml", parse({"namespaces": {"free": {"publish_hook": False}}}, Rate.parse, where="ns")
    )
    assert ns.of("free:talk").publish_hook is False
    assert ns.of("lobby").publish_hook is True
    with pytest.raises(NamespaceError, match="publish_hook must be a TOML bool"):
        parse({"namespaces": {"free": {"publish_hook": "no"}}}, Rate.parse, where="ns")


def test_settings_need_a_secret_a_public_url_and_a_known_policy() -> None:
    url = "https://hooks.example.com/publish"
    ok = Settings.from_env({"PUBLISH_HOOK_URL": url, "WEBHOOK_SECRET": SECRET})
    assert (ok.publish_hook_timeout, ok.publish_hook_failure) == (2.0, "closed")
    with pytest.raises(ConfigError, match="WEBHOOK_SECRET is required when PUBLISH_HOOK_URL"):
        Settings.from_env({"PUBLISH_HOOK_URL": url})
    with pytest.raises(ConfigError, match="PUBLISH_HOOK_URL: .*private or loopback"):
        Settings.from_env({"PUBLISH_HOOK_URL": "http://127.0.0.1:9/h", "WEBHOOK_SECRET": SECRET})
    with pytest.raises(ConfigError, match="PUBLISH_HOOK_FAILURE='maybe'"):
        Settings.from_env(
            {"PUBLISH_HOOK_URL": url, "WEBHOOK_SECRET": SECRET, "PUBLISH_HOOK_FAILURE": "maybe"}
        )
    with pytest.raises(ConfigError, match="PUBLISH_HOOK_TIMEOUT must be a positive"):
        Settings.from_env({"PUBLISH_HOOK_TIMEOUT": "0"})


def test_failures_are_warned_about_once_a_minute_with_the_count_left_out(caplog) -> None:
    now = [0.0]
    throttled = ThrottledLog(60.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="gateway.publish_hook"):
        assert throttled.warning("hook failed: %s", "a")
        for _ in range(5):
            now[0] += 10
            assert not throttled.warning("hook failed: %s", "b")
        now[0] += 11
        assert throttled.warning("hook failed: %s", "c")
    assert [r.getMessage() for r in caplog.records] == [
        "hook failed: a",
        "hook failed: c (5 more such failures since the last warning)",
    ]
