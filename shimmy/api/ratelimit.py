"""Per-client rate limiting with token buckets.

Every client address has a bucket of ``rate_burst`` tokens that refills at ``rate_limit`` tokens
per minute; when API keys are configured, each presented key has one too, so a key shared by
many machines is limited as a whole. A request takes one token from each of its buckets, or is
refused with 429 ``rate_limited``, ``Retry-After`` and the IETF ``RateLimit-*`` headers (which
every response in the limited scope carries). Loopback clients are limited like any other: a
runaway local script is the usual reason to want a limit at all.

A WebSocket handshake takes a token, and so does each request frame on the connection. A frame
that finds the bucket empty is held back until a token is due instead of being refused: the
WebSocket protocol answers requests in order, so an out-of-band refusal would be mistaken for
the answer to the request that is running. Cancel frames are never held back.

Memory is bounded: at most ``max_clients`` buckets are kept, least recently used evicted first.
An evicted bucket has usually refilled already (a full bucket is the same as a fresh one).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shimmy.api.routing import RouteAccess
from shimmy.api.security import keys_configured, presented_credentials, reject
from shimmy.errors import RateLimited
from shimmy.settings import Settings

DEFAULT_MAX_CLIENTS = 10_000
# A cancel frame is tiny (its id at most 128 characters); anything longer is not worth
# parsing to find out.
_MAX_CANCEL_FRAME_CHARS = 256

Clock = Callable[[], float]


@dataclass
class Bucket:
    tokens: float
    updated: float


@dataclass(frozen=True)
class Decision:
    """The outcome of one request against its buckets (the tightest one is reported)."""

    allowed: bool
    limit: int
    remaining: int
    reset_seconds: float  # until the bucket is full again
    retry_after: float  # until a token is due; 0 when allowed

    def headers(self) -> dict[str, str]:
        return {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(math.ceil(self.reset_seconds)),
        }


class TokenBucketLimiter:
    def __init__(
        self,
        per_minute: float,
        burst: int,
        *,
        max_clients: int = DEFAULT_MAX_CLIENTS,
        clock: Clock = time.monotonic,
    ) -> None:
        if per_minute <= 0 or burst < 1 or max_clients < 1:
            raise ValueError("the rate, the burst and the client cap must be positive")
        self.rate = per_minute / 60.0  # tokens per second
        self.burst = burst
        self.max_clients = max_clients
        self.clock = clock
        self._buckets: OrderedDict[str, Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, identities: Sequence[str]) -> Decision:
        """Take one token from every identity's bucket, all or none."""
        now = self.clock()
        buckets = [self._refilled(identity, now) for identity in identities]
        allowed = all(bucket.tokens >= 1.0 for bucket in buckets)
        if allowed:
            for bucket in buckets:
                bucket.tokens -= 1.0
        tightest = min(buckets, key=lambda bucket: bucket.tokens)
        return Decision(
            allowed=allowed,
            limit=self.burst,
            remaining=math.floor(tightest.tokens),
            reset_seconds=(self.burst - tightest.tokens) / self.rate,
            retry_after=0.0 if allowed else (1.0 - tightest.tokens) / self.rate,
        )

    def wait(self, identity: str) -> float:
        """Seconds until ``identity`` has a token; 0 when it has one now. Takes nothing, and
        keeps no bucket for an identity that has never taken a token."""
        if identity not in self._buckets:
            return 0.0
        bucket = self._refilled(identity, self.clock())
        return 0.0 if bucket.tokens >= 1.0 else (1.0 - bucket.tokens) / self.rate

    def _refilled(self, identity: str, now: float) -> Bucket:
        bucket = self._buckets.get(identity)
        if bucket is None:
            bucket = self._buckets[identity] = Bucket(float(self.burst), now)
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(identity)
            # max(): a clock that steps back must not drain the bucket.
            elapsed = max(0.0, now - bucket.updated)
            bucket.tokens = min(float(self.burst), bucket.tokens + elapsed * self.rate)
            bucket.updated = now
        return bucket


def is_cancel_frame(message: Message) -> bool:
    text = message.get("text")
    if text is None or len(text) > _MAX_CANCEL_FRAME_CHARS:
        return False
    try:
        data = json.loads(text)
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("cancel") is True


class RateLimitMiddleware:
    """Token-bucket limits for HTTP requests, WebSocket handshakes and WebSocket requests, but
    those ``access`` lets through (by default none: ``create_app`` passes its route table's,
    where the health checks and the chat page's files are not rate limited)."""

    def __init__(
        self,
        app: ASGIApp,
        settings: Settings,
        *,
        access: RouteAccess | None = None,
        clock: Clock = time.monotonic,
        max_clients: int = DEFAULT_MAX_CLIENTS,
    ) -> None:
        self.app = app
        self.access = access if access is not None else RouteAccess()
        self.limiter = (
            None
            if settings.rate_limit is None
            else TokenBucketLimiter(
                settings.rate_limit, settings.rate_burst, max_clients=max_clients, clock=clock
            )
        )
        self.per_key = keys_configured(settings)

    def identities(self, scope: Scope) -> list[str]:
        client = scope.get("client")
        found = [f"addr:{client[0] if client else 'unknown'}"]
        if self.per_key:
            # Keyed by a digest: the limiter's memory never holds a secret. Invalid keys get
            # buckets too, but the address bucket already bounds what they can do.
            for credential in presented_credentials(Headers(scope=scope))[:1]:
                found.append("key:" + hashlib.sha256(credential.encode()).hexdigest())
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limiter = self.limiter
        if (
            limiter is None
            or scope["type"] not in ("http", "websocket")
            or not self.access.is_rate_limited(scope)
        ):
            await self.app(scope, receive, send)
            return
        identities = self.identities(scope)
        decision = limiter.take(identities)
        if not decision.allowed:
            refused = RateLimited(
                f"at most {limiter.burst} requests at once and "
                f"{limiter.rate * 60:g} per minute are allowed",
                retry_after=decision.retry_after,
            )
            await reject(refused, scope, receive, send, decision.headers())
            return
        if scope["type"] == "http":
            await self.app(scope, receive, _with_headers(send, "http.response.start", decision))
            return
        await self.app(
            scope,
            self._throttled(receive, limiter, identities),
            _with_headers(send, "websocket.accept", decision),
        )

    @staticmethod
    def _throttled(receive: Receive, limiter: TokenBucketLimiter, identities: list[str]) -> Receive:
        async def receive_when_allowed() -> Message:
            message = await receive()
            if message["type"] != "websocket.receive" or is_cancel_frame(message):
                return message
            while not (decision := limiter.take(identities)).allowed:
                await asyncio.sleep(decision.retry_after)
            return message

        return receive_when_allowed


def _with_headers(send: Send, start_type: str, decision: Decision) -> Send:
    async def send_with_headers(message: Message) -> None:
        if message["type"] == start_type:
            message.setdefault("headers", [])  # websocket.accept may come without any
            headers = MutableHeaders(scope=message)
            for name, value in decision.headers().items():
                headers[name] = value
        await send(message)

    return send_with_headers
