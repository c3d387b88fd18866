"""Who may talk to the server: Host check, browser Origin / CORS, and API keys.

Two pure ASGI middlewares, so they cover plain HTTP, streamed responses and the WebSocket
handshake alike (``BaseHTTPMiddleware`` would see neither streams nor WebSockets properly):

- ``HostOriginMiddleware`` stops browsers from being used against a local server. The Host check
  defeats DNS rebinding (a page on ``evil.example`` whose name is re-pointed at 127.0.0.1 still
  sends ``Host: evil.example``); the Origin check refuses any cross-origin browser request that
  is not on the allowlist, even simple ones that CORS alone would let through (the browser only
  hides the *answer* of those, after the server has acted). Allowed origins get CORS headers.
- ``ApiKeyMiddleware`` requires ``Authorization: Bearer <key>`` (or ``X-Api-Key``) on everything
  but the routes declared ``public`` (``shimmy.api.routing``), when keys are configured: the
  health checks (monitors have no secrets), the API description (it reveals nothing the open
  source server does not) and the chat page's files (the page must load to ask for the key).

Rejections are rendered by ``shimmy.api.errors`` in the dialect of the path; a refused
WebSocket handshake gets a real HTTP response where the server supports the ASGI denial
extension, and a close (1008) before accept otherwise.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import HTTPConnection
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shimmy.api.errors import error_response
from shimmy.api.routing import RouteAccess
from shimmy.errors import Forbidden, InvalidRequest, ShimmyError, Unauthorized
from shimmy.settings import Settings

POLICY_VIOLATION = 1008

CORS_ALLOW_METHODS = "GET, POST, DELETE, OPTIONS"
# The Anthropic SDK sends its version headers from browsers too (with direct browser access on);
# X-Client-Id is code completion's cancel-and-replace key.
CORS_ALLOW_HEADERS = (
    "Authorization, Content-Type, X-Api-Key, X-Shimmy-Wait, Anthropic-Version, Anthropic-Beta, "
    "Anthropic-Dangerous-Direct-Browser-Access, X-Client-Id"
)
# Browser scripts may only read response headers they are told about.
CORS_EXPOSE_HEADERS = "Retry-After, RateLimit-Limit, RateLimit-Remaining, RateLimit-Reset"
CORS_MAX_AGE_SECONDS = 600

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD_BINDS = frozenset({"", "0.0.0.0", "::"})

_HOST_HEADER = re.compile(
    r"^(?:\[(?P<ipv6>[0-9a-f:.]+)\]|(?P<name>[a-z0-9_.-]+))(?::(?P<port>[0-9]{1,5}))?$"
)


# --- host names -------------------------------------------------------------------------------


def parse_host(value: str) -> str | None:
    """The host part of a Host header (or of an allowlist entry): lowercased, port and IPv6
    brackets dropped, one trailing dot removed. None for anything that is not a plain host:
    user info, paths and odd characters have no business in a Host header."""
    match = _HOST_HEADER.match(value.strip().lower())
    if match is None:
        return None
    host = match["ipv6"] if match["ipv6"] is not None else match["name"]
    return host.removesuffix(".") or None


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_loopback_host(host: str) -> bool:
    """True for names and addresses that only this machine can reach."""
    host = host.strip().lower().removeprefix("[").removesuffix("]").removesuffix(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class HostPolicy:
    """Which Host headers the server answers.

    Always allowed: loopback names, ``*.localhost``, any IP literal and the bind address (a
    rebinding attack needs a DNS name the attacker controls, so a literal address is safe and
    keeps LAN access by IP working), and for a non-loopback bind the machine's own host name.
    ``allowed_hosts`` adds names: exact, ``.example.com`` (it and its subdomains),
    ``*.example.com`` (subdomains only), or ``*`` to turn the check off.
    """

    exact: frozenset[str]
    suffixes: tuple[str, ...]
    allow_any: bool

    @classmethod
    def from_settings(cls, settings: Settings) -> HostPolicy:
        exact = set(LOOPBACK_NAMES)
        suffixes = [".localhost"]
        bind = settings.host.strip().lower().removeprefix("[").removesuffix("]")
        if bind not in WILDCARD_BINDS:
            exact.add(bind)
        if not is_loopback_host(bind):
            machine = socket.gethostname().lower()
            exact.update({machine, f"{machine}.local"} if "." not in machine else {machine})
        allow_any = False
        for entry in settings.allowed_hosts:
            entry = entry.strip().lower()
            if entry == "*":
                allow_any = True
            elif entry.startswith("*."):
                suffixes.append(entry[1:])
            elif entry.startswith("."):
                suffixes.append(entry)
                exact.add(entry[1:])
            elif (host := parse_host(entry)) is not None:
                exact.add(host)
        return cls(frozenset(exact), tuple(suffixes), allow_any)

    def allows(self, host_header: str | None) -> bool:
        if self.allow_any or host_header is None:
            # No Host at all is HTTP/1.0 from a non-browser client: not a rebinding attempt.
            return True
        host = parse_host(host_header)
        if host is None:
            return False
        return host in self.exact or host.endswith(self.suffixes) or is_ip_literal(host)


# --- origins ----------------------------------------------------------------------------------


def normalize_origin(origin: str) -> str:
    return origin.strip().lower().removesuffix("/")


def is_loopback_origin(origin: str) -> bool:
    scheme, sep, rest = origin.partition("://")
    if not sep or scheme not in ("http", "https"):
        return False
    host = parse_host(rest)
    return host is not None and is_loopback_host(host)


def is_same_origin(origin: str, host_header: str | None) -> bool:
    """A page served from this very server (its Origin names the Host it is talking to)."""
    if host_header is None:
        return False
    scheme, sep, rest = origin.partition("://")
    return bool(sep) and scheme in ("http", "https") and rest == host_header.strip().lower()


@dataclass(frozen=True)
class OriginPolicy:
    """Browser origins allowed to use the API: an explicit list, ``*`` for any. Empty by
    default: CORS is off and cross-origin browser requests are refused."""

    origins: frozenset[str]
    allow_any: bool

    @classmethod
    def from_settings(cls, settings: Settings) -> OriginPolicy:
        origins = frozenset(normalize_origin(o) for o in settings.cors_origins if o.strip())
        return cls(origins - {"*"}, "*" in origins)

    def listed(self, origin: str) -> bool:
        return self.allow_any or normalize_origin(origin) in self.origins

    def allows_http(self, origin: str, host_header: str | None) -> bool:
        return self.listed(origin) or is_same_origin(normalize_origin(origin), host_header)

    def allows_websocket(self, origin: str, host_header: str | None) -> bool:
        # Browsers apply no CORS to WebSockets, so this check is the only protection there.
        # Pages on this machine are trusted: local code can reach the server anyway.
        return self.allows_http(origin, host_header) or is_loopback_origin(normalize_origin(origin))


# --- API keys ---------------------------------------------------------------------------------


def read_key_file(path: Path) -> list[str]:
    """Keys of a key file: one per line; blank lines and ``#`` comment lines are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequest(
            f"cannot read the API key file {path}: {exc}", param="api_key_file"
        ) from None
    keys = [line.strip() for line in text.splitlines()]
    keys = [key for key in keys if key and not key.startswith("#")]
    if not keys:
        # Silently serving without auth because of an empty file would be the worst outcome.
        raise InvalidRequest(f"the API key file {path} holds no key", param="api_key_file")
    return keys


def load_api_keys(settings: Settings) -> tuple[str, ...]:
    """Every accepted key: ``api_keys``, ``api_key`` and the lines of ``api_key_file``."""
    keys = [*settings.api_keys]
    if settings.api_key is not None:
        keys.append(settings.api_key)
    if settings.api_key_file is not None:
        keys += read_key_file(settings.api_key_file)
    unique = dict.fromkeys(key.strip() for key in keys)
    return tuple(key for key in unique if key)


def keys_configured(settings: Settings) -> bool:
    """Whether API keys are required (without reading the key file)."""
    return bool(
        any(key.strip() for key in settings.api_keys)
        or (settings.api_key or "").strip()
        or settings.api_key_file is not None
    )


def presented_credentials(headers: Headers) -> list[str]:
    """What the client sent as a key: the Bearer token and/or the X-Api-Key header."""
    found: list[str] = []
    scheme, _, token = headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        found.append(token.strip())
    api_key = headers.get("x-api-key", "").strip()
    if api_key:
        found.append(api_key)
    return found


def _digest(value: str) -> bytes:
    # Comparing fixed-size digests keeps even the key's length out of the timing.
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


@dataclass(frozen=True)
class KeyChecker:
    digests: tuple[bytes, ...]

    @classmethod
    def for_keys(cls, keys: Iterable[str]) -> KeyChecker:
        return cls(tuple(_digest(key) for key in keys))

    @property
    def enabled(self) -> bool:
        return bool(self.digests)

    def accepts(self, credentials: Sequence[str]) -> bool:
        """Constant time in which key matched: every credential is compared with every key,
        without stopping at the first match."""
        matched = False
        for credential in credentials:
            presented = _digest(credential)
            for digest in self.digests:
                matched |= hmac.compare_digest(presented, digest)
        return matched


def insecure_bind_warning(settings: Settings) -> str | None:
    """The warning to print when the server listens beyond this machine without any API key;
    None when the setup is safe."""
    if is_loopback_host(settings.host) or load_api_keys(settings):
        return None
    return (
        f"{settings.host} is not a loopback address and no API key is set: anyone who can "
        "reach this machine can use shimmy (set --api-key, SHIMMY_API_KEY or --api-key-file)"
    )


# --- rejecting ----------------------------------------------------------------------------------


async def reject(
    err: ShimmyError,
    scope: Scope,
    receive: Receive,
    send: Send,
    headers: dict[str, str] | None = None,
) -> None:
    """Refuse an HTTP request or a WebSocket handshake with ``err``."""
    response = error_response(err, HTTPConnection(scope), headers)
    if scope["type"] == "http":
        await response(scope, receive, send)
        return
    await receive()  # the websocket.connect message
    if "websocket.http.response" in scope.get("extensions", {}):
        await response(scope, receive, send)  # Starlette sends it as websocket.http.response.*
    else:
        await send({"type": "websocket.close", "code": POLICY_VIOLATION})


# --- middleware -------------------------------------------------------------------------------


class HostOriginMiddleware:
    """Host allowlist, Origin allowlist, CORS preflights and CORS response headers."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.hosts = HostPolicy.from_settings(settings)
        self.origins = OriginPolicy.from_settings(settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host = headers.get("host")
        # Every Host header counts: a second one must not slip past behind an allowed first.
        hosts: list[str | None] = [*headers.getlist("host")] or [None]
        if not all(self.hosts.allows(value) for value in hosts):
            refused = Forbidden("The Host header names a host this server does not serve")
            await reject(refused, scope, receive, send)
            return
        origin = headers.get("origin")
        if origin is None:
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            if not self.origins.allows_websocket(origin, host):
                await reject(self._origin_refused(), scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        if not self.origins.allows_http(origin, host):
            await reject(self._origin_refused(), scope, receive, send)
            return
        if not self.origins.listed(origin):  # same-origin: no CORS involved
            await self.app(scope, receive, send)
            return
        if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            await self._preflight(origin)(scope, receive, send)
            return
        await self.app(scope, receive, self._with_cors_headers(send, origin))

    @staticmethod
    def _origin_refused() -> Forbidden:
        return Forbidden(
            "Requests from this browser origin are not allowed (see --cors-origin)",
        )

    @staticmethod
    def _preflight(origin: str) -> Response:
        return Response(
            status_code=204,
            headers={
                "Access-Control-Allow-Origin": origin,
                "Access-Control-Allow-Methods": CORS_ALLOW_METHODS,
                "Access-Control-Allow-Headers": CORS_ALLOW_HEADERS,
                "Access-Control-Max-Age": str(CORS_MAX_AGE_SECONDS),
                "Vary": "Origin",
            },
        )

    @staticmethod
    def _with_cors_headers(send: Send, origin: str) -> Send:
        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["Access-Control-Allow-Origin"] = origin
                headers["Access-Control-Expose-Headers"] = CORS_EXPOSE_HEADERS
                headers.append("Vary", "Origin")
            await send(message)

        return send_with_cors


class ApiKeyMiddleware:
    """Require an API key, when keys are configured, on every request but those ``access``
    says are public (by default none: ``create_app`` passes its route table's)."""

    def __init__(
        self, app: ASGIApp, settings: Settings, *, access: RouteAccess | None = None
    ) -> None:
        self.app = app
        self.keys = KeyChecker.for_keys(load_api_keys(settings))
        self.access = access if access is not None else RouteAccess()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            not self.keys.enabled
            or scope["type"] not in ("http", "websocket")
            or self.access.is_public(scope)
        ):
            await self.app(scope, receive, send)
            return
        credentials = presented_credentials(Headers(scope=scope))
        if self.keys.accepts(credentials):
            await self.app(scope, receive, send)
            return
        err = (
            Unauthorized("The API key is not valid")
            if credentials
            else Unauthorized("Send the API key as 'Authorization: Bearer <key>'")
        )
        await reject(err, scope, receive, send, {"WWW-Authenticate": 'Bearer realm="shimmy"'})
