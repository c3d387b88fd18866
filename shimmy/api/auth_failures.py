"""Failed API-key checks are limited per client address, whether or not ``--rate-limit`` is on.

Without it, a key can be guessed as fast as the server answers 401. Each address may fail
``auth_failures_per_minute`` times (a bucket of that many tokens, refilling over a minute);
after that every request from it that needs a key, right or wrong, is answered 429 with
Retry-After until a token is due: were a right key let through, the answers would still tell
the guesser when it found one.

The address is the connection's peer (``scope["client"]``), which forwarded headers replace only
for the proxies in ``forwarded_allow_ips``. The middleware sits just outside
``ApiKeyMiddleware`` and counts the 401s it sends, for HTTP and WebSocket handshakes alike.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shimmy.api.ratelimit import TokenBucketLimiter
from shimmy.api.routing import RouteAccess
from shimmy.api.security import keys_configured, reject
from shimmy.errors import RateLimited
from shimmy.settings import Settings

_RESPONSE_STARTS = ("http.response.start", "websocket.http.response.start")


class AuthFailureMiddleware:
    def __init__(
        self, app: ASGIApp, settings: Settings, *, access: RouteAccess | None = None
    ) -> None:
        self.app = app
        self.access = access if access is not None else RouteAccess()
        per_minute = settings.auth_failures_per_minute
        self.failures = (
            TokenBucketLimiter(per_minute, per_minute) if keys_configured(settings) else None
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        failures = self.failures
        if (
            failures is None
            or scope["type"] not in ("http", "websocket")
            or self.access.is_public(scope)
        ):
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        address = f"addr:{client[0] if client else 'unknown'}"
        wait = failures.wait(address)
        if wait > 0:
            refused = RateLimited(
                "too many failed API-key checks from this address", retry_after=wait
            )
            await reject(refused, scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] in _RESPONSE_STARTS and message.get("status") == 401:
                failures.take([address])
            await send(message)

        await self.app(scope, receive, counting_send)
