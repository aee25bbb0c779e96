"""Which webhook receiver addresses are refused (chat_gateway.webhooks.egress): private,
loopback and metadata IPv4 addresses in every IPv6 form that embeds one."""

from __future__ import annotations

from chat_gateway.webhooks.egress import refused

# Each is a private, loopback or metadata IPv4 address written as IPv6.
EMBEDDED_PRIVATE = (
    "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
    "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
    "2002:a00:1::1",  # 6to4 of 10.0.0.1
    "2002:7f00:1::",  # 6to4 of 127.0.0.1
    "::127.0.0.1",  # IPv4-compatible
    "::10.1.2.3",
    "::ffff:0:127.0.0.1",  # IPv4-translated
    "::ffff:0:c0a8:1",  # IPv4-translated 192.168.0.1
    "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo, client 127.0.0.1
    "64:ff9b:1::a00:1",  # local-use NAT64 (RFC 8215)
    "::ffff:127.0.0.1",  # IPv4-mapped (refused before too)
)


def test_ipv6_forms_of_private_ipv4_addresses_are_refused():
    assert [a for a in EMBEDDED_PRIVATE if not refused(a)] == []
    # the same forms of a public address stay allowed, as do plain public ones
    for public in ("64:ff9b::808:808", "2002:808:808::1", "::8.8.8.8", "2606:4700::1111"):
        assert not refused(public), public
