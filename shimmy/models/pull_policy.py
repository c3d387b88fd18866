"""Where a pull may go: https (and hf://) to public addresses, unless ``allow_private_pull``.

``POST /api/pull`` makes the server fetch a URL its client chose, from inside the network the
server sits in. By default a pull may therefore only reach addresses that are public: not
loopback, private (10/8, 172.16/12, 192.168/16, fc00::/7), link-local (169.254/16, where cloud
metadata services answer; fe80::/10), shared, multicast or reserved ones. Plain http is refused
too: a public mirror has https, and a local mirror is what ``--allow-private-pull`` is for.

The check is made where the connection is made (``GuardedTransport``), for every request of a
pull, redirects included, and the connection goes to the very address that was checked (the
host name stays in the Host header and TLS's SNI), so a name that resolves to a public address
for the check and to 127.0.0.1 for the connection (DNS rebinding) gets nowhere. A refused
target is refused before any connection, so the answer is the same for open and closed ports.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

import httpx

from shimmy.errors import Forbidden

ALLOW_FLAG = "--allow-private-pull"


def address_allowed(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone says nothing here
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def _refused(host: str, why: str) -> Forbidden:
    return Forbidden(f"pulls may not reach {host} ({why}); start the server with {ALLOW_FLAG}")


def check_scheme(url: str, *, allow_private: bool) -> None:
    scheme = urlsplit(url).scheme.lower()
    if scheme == "https" or (scheme == "http" and allow_private):
        return
    raise _refused(urlsplit(url).hostname or url, f"{scheme}:// is not https://")


def _addresses(infos: list[tuple[object, ...]]) -> list[str]:
    return list(dict.fromkeys(str(info[4][0]) for info in infos))  # type: ignore[index]


def _check(host: str, addresses: list[str], allow_private: bool) -> str:
    if not addresses:
        raise _refused(host, "it has no address")
    if not allow_private:
        # Every address must be public: which one a connection would use is not ours to say.
        for address in addresses:
            if not address_allowed(address):
                raise _refused(host, f"{address} is not a public address")
    return addresses[0]


def resolve_checked(host: str, port: int, *, allow_private: bool) -> str:
    """The address to connect to for ``host``, checked; blocking (for threads)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        raise _refused(host, "its name does not resolve") from None
    return _check(host, _addresses(list(infos)), allow_private)


async def _resolve_checked_async(host: str, port: int, *, allow_private: bool) -> str:
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        raise _refused(host, "its name does not resolve") from None
    return _check(host, _addresses(list(infos)), allow_private)


class GuardedTransport(httpx.AsyncBaseTransport):
    """httpx's transport, sending each request to the checked address of its host."""

    def __init__(self, *, allow_private: bool) -> None:
        self.allow_private = allow_private
        self._inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        check_scheme(str(url), allow_private=self.allow_private)
        host = url.host
        port = url.port or (443 if url.scheme == "https" else 80)
        address = await _resolve_checked_async(host, port, allow_private=self.allow_private)
        if address != host:
            request.url = url.copy_with(host=address)
            if url.scheme == "https":
                request.extensions = {**request.extensions, "sni_hostname": host}
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()
