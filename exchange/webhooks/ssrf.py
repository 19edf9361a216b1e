"""SSRF guard: webhook URLs may only reach public addresses, unless ``EXCHANGE_WEBHOOK_ALLOW_PRIVATE=true``.

Checked twice:

* at registration / ``PUT /webhooks/endpoint`` (:func:`check_url_async`): literal IPs are checked, host names are
  resolved (bounded time) and refused when any address is forbidden; a name that does not resolve (yet) is
  accepted, because the delivery-time check is the one that counts;
* at delivery (:func:`resolve_host`, called by :class:`exchange.webhooks.delivery.Resolver`, which shares one
  lookup per host and reuses its answer for a short while): the host is resolved, refused if ANY address is
  forbidden, and the request is *pinned* to the checked address (connect to the IP, ``Host`` header and TLS SNI
  keep the name), so a DNS answer that changes between the check and the connect (rebinding) cannot redirect it.
  Kept-alive connections are pooled by checked address, never by name.

Forbidden: everything that is not globally routable (loopback, RFC 1918 private, link-local incl. the cloud
metadata address 169.254.169.254, CGNAT 100.64/10, unique-local and site-local IPv6, unspecified, reserved,
documentation ranges) plus multicast. IPv6 addresses that embed an IPv4 address are judged by their IPv4 part:
IPv4-mapped ``::ffff:0:0/96``, 6to4 ``2002::/16`` and the NAT64 well-known prefix ``64:ff9b::/96`` (RFC 6052).
The local-use NAT64 prefix ``64:ff9b:1::/48`` (RFC 8215: the embedded address may sit anywhere in it) and the
deprecated IPv4-compatible ``::/96`` are refused outright.

A host name the IDNA codec cannot encode (an empty label as in ``a..b``, a label over 63 characters) can never
resolve: both checks refuse it (:class:`UnsafeWebhookUrlError`) instead of letting the ``UnicodeError`` escape.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
REGISTRATION_RESOLVE_TIMEOUT_S = 2.0
NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")
NAT64_LOCAL_USE = ipaddress.IPv6Network("64:ff9b:1::/48")
IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
NOT_GLOBAL_UNKNOWN_TO_PYTHON = (
    ipaddress.IPv4Network("192.0.0.0/24"),  # IETF protocol assignments (RFC 6890); 3.11.7 knows only 192.0.0.0/29
    ipaddress.IPv6Network("fec0::/10"),  # site-local (RFC 3879, deprecated): is_site_local, but not private
    ipaddress.IPv6Network("3fff::/20"),  # documentation (RFC 9637, 2024)
)
"""Ranges the IANA special-purpose registries call not globally reachable that the ``ipaddress`` of the Python in
use (3.11) still calls global: its ``is_global`` is only as recent as its release."""


class UnsafeWebhookUrlError(ValueError):
    """The URL is not an http(s) URL, or its host resolves to an address deliveries must not reach."""


@dataclass(frozen=True, slots=True)
class Destination:
    """Where one delivery connects: ``address`` was checked; ``host`` goes in the Host header and TLS SNI."""

    scheme: str
    host: str
    address: IPAddress


def forbidden_reason(address: IPAddress) -> str | None:
    """Why deliveries may not reach ``address``, or None when it is a public unicast address."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in NAT64_WELL_KNOWN:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            return forbidden_reason(embedded)
        if address in NAT64_LOCAL_USE:
            return "local-use NAT64 address (may translate to any IPv4 address)"
        if address in IPV4_COMPATIBLE and not (address.is_loopback or address.is_unspecified):
            return "IPv4-compatible IPv6 address (deprecated)"
    if address.is_loopback:
        return "loopback address"
    if address.is_link_local:
        return "link-local address (includes cloud metadata endpoints)"
    if address.is_private:
        return "private address"
    if address.is_multicast:
        return "multicast address"
    if address.is_reserved:  # IPv6 reserved space is still "global" to Python 3.11's ipaddress
        return "reserved address"
    if not address.is_global or any(address in network for network in NOT_GLOBAL_UNKNOWN_TO_PYTHON):
        return "non-public address"
    return None


def split_url(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an absolute http(s) URL; raises :class:`UnsafeWebhookUrlError` otherwise."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeWebhookUrlError(f"not a valid URL: {exc}") from exc
    scheme = parts.scheme.lower()
    host = parts.hostname
    if scheme not in ("http", "https") or not host:
        raise UnsafeWebhookUrlError("must be an absolute http or https URL")
    if _literal(host) is None:
        try:
            host.encode("idna")  # what socket.getaddrinfo does with a str host
        except UnicodeError as exc:
            raise UnsafeWebhookUrlError(f"host {host!r} is not a valid host name: {exc}") from exc
    return scheme, host, port or (443 if scheme == "https" else 80)


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _check(host: str, addresses: list[IPAddress], allow_private: bool) -> None:
    if allow_private:
        return
    for address in addresses:
        reason = forbidden_reason(address)
        if reason is not None:
            raise UnsafeWebhookUrlError(f"host {host} resolves to {address}, a {reason}")


def _addresses(infos: list[tuple[object, object, object, object, tuple[object, ...]]]) -> list[IPAddress]:
    found: list[IPAddress] = []
    for info in infos:
        raw = str(info[4][0]).split("%", 1)[0]  # drop an IPv6 zone id
        address = ipaddress.ip_address(raw)
        if address not in found:
            found.append(address)
    return found


def resolve_destination(url: str, allow_private: bool) -> Destination:
    """Resolve ``url``'s host now and return the checked address to connect to (delivery time)."""
    scheme, host, _ = split_url(url)
    return Destination(scheme, host, resolve_host(host, allow_private))


def is_literal(host: str) -> bool:
    """True when ``host`` is an IP address (checking it needs no lookup)."""
    return _literal(host) is not None


def resolve_host(host: str, allow_private: bool) -> IPAddress:
    """The address deliveries to ``host`` connect to, checked: blocks on DNS unless ``host`` is a literal.
    Raises :class:`UnsafeWebhookUrlError` when it does not resolve, has no address or ANY address is forbidden."""
    literal = _literal(host)
    if literal is not None:
        return _pinned(host, [literal], allow_private)
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, ValueError) as exc:  # ValueError: UnicodeError from the IDNA codec (``a..b``), NUL
        raise UnsafeWebhookUrlError(f"cannot resolve host {host!r}: {exc}") from exc
    return _pinned(host, _addresses(infos), allow_private)  # type: ignore[arg-type]


def _pinned(host: str, addresses: list[IPAddress], allow_private: bool) -> IPAddress:
    if not addresses:
        raise UnsafeWebhookUrlError(f"host {host} has no address")
    _check(host, addresses, allow_private)
    return addresses[0]


async def check_url_async(url: str, allow_private: bool) -> None:
    """Registration-time check (see the module docstring); raises :class:`UnsafeWebhookUrlError`."""
    _, host, port = split_url(url)
    if allow_private:
        return
    literal = _literal(host)
    if literal is not None:
        _check(host, [literal], allow_private)
        return
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), REGISTRATION_RESOLVE_TIMEOUT_S
        )
    except (OSError, TimeoutError):
        return  # not resolvable now: accepted; every delivery resolves and checks again
    except ValueError as exc:  # UnicodeError from the IDNA codec: a name that can never resolve (``a..b``)
        raise UnsafeWebhookUrlError(f"host {host!r} is not a valid host name: {exc}") from exc
    _check(host, _addresses(infos), allow_private)  # type: ignore[arg-type]
