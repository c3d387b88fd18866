"""Shared plumbing for shimmy's pure-ASGI middleware."""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send


async def run_and_report(
    app: ASGIApp,
    scope: Scope,
    receive: Receive,
    send: Send,
    report: Callable[[int, bool], None],
) -> None:
    """Run ``app`` and call ``report(status, complete)`` exactly once: just before the last
    body chunk is sent (so whoever reads the response afterwards sees the report), or, if the
    response never completed, when the app returns or fails (status 500 if none was sent)."""
    status = 500
    reported = False

    async def watching_send(message: Message) -> None:
        nonlocal status, reported
        if message["type"] == "http.response.start":
            status = message["status"]
        elif (
            message["type"] == "http.response.body"
            and not message.get("more_body", False)
            and not reported
        ):
            reported = True
            report(status, True)
        await send(message)

    try:
        await app(scope, receive, watching_send)
    finally:
        if not reported:
            report(status, False)
