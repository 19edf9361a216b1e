"""The SSRF guard's address and URL rules (no network: literal addresses and names that cannot be encoded)."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from exchange.webhooks.ssrf import UnsafeWebhookUrlError, check_url_async, forbidden_reason, resolve_destination


@pytest.mark.parametrize(
    "address",
    [
        "169.254.169.254",
        "::ffff:169.254.169.254",  # IPv4-mapped
        "2002:a9fe:a9fe::1",  # 6to4
        "64:ff9b::a9fe:a9fe",  # NAT64 well-known prefix -> 169.254.169.254
        "64:ff9b::7f00:1",  # -> 127.0.0.1
        "64:ff9b::a00:1",  # -> 10.0.0.1
        "64:ff9b::6440:1",  # -> 100.64.0.1 (CGNAT)
        "64:ff9b:1::808:808",  # local-use NAT64: refused whatever it embeds
        "::808:808",  # IPv4-compatible (deprecated): refused whatever it embeds
        "::a9fe:a9fe",
        "::",
        "::1",
        "fc00::1",
        "fe80::1",
        "fec0::1",  # site-local (deprecated, RFC 3879): not globally routable, yet "global" to Python 3.11's ipaddress
        "192.0.0.8",  # IETF protocol assignments (RFC 6890): not global; Python 3.11.7 knows only its first /29
        "3fff::1",  # documentation (RFC 9637), unknown to Python 3.11's ipaddress
    ],
)
def test_forbidden_addresses(address: str) -> None:
    assert forbidden_reason(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize("address", ["8.8.8.8", "::ffff:8.8.8.8", "2002:808:808::1", "64:ff9b::808:808", "2606::1"])
def test_public_addresses_are_allowed(address: str) -> None:
    assert forbidden_reason(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize("allow_private", [False, True])
@pytest.mark.parametrize("url", ["http://a..example.com/", "http://" + "a" * 64 + ".example.com/", "http://.a/"])
def test_a_host_the_idna_codec_cannot_encode_is_refused_not_a_unicode_error(url: str, allow_private: bool) -> None:
    with pytest.raises(UnsafeWebhookUrlError):
        resolve_destination(url, allow_private)
    with pytest.raises(UnsafeWebhookUrlError):
        asyncio.run(check_url_async(url, allow_private))
