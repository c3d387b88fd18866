"""Ollama's ``/api/pull``: Ollama's progress objects over shimmy's verified, resumable pull.

The model may be named the way Ollama names Hub models, ``hf.co/OWNER/REPO[:QUANT]``, or be
any source ``shimmy pull`` takes (``hf://OWNER/REPO/FILE.gguf``, ``https://.../FILE.gguf``).
Ollama's library names (``llama3.2``) cannot be pulled: shimmy does not talk to Ollama's
registry, and says so.

Streamed (the default), each line is one of Ollama's progress objects: ``pulling manifest``,
``pulling FILE`` with ``total`` and ``completed`` bytes, ``verifying sha256 digest``,
``writing manifest``, then ``success``; a failure is a last line ``{"error": ...}``. Without
``stream``, the answer is ``{"status": "success"}`` or the error with its status.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from shimmy.api.context import registry_of, settings_of
from shimmy.api.errors import error_message
from shimmy.api.ollama.generation import ndjson_line
from shimmy.api.ollama.protocol import OllamaPullRequest
from shimmy.api.protocol.common import parse_body
from shimmy.api.routing import NDJSON
from shimmy.api.sse import EventStreamResponse
from shimmy.errors import InvalidRequest, ShimmyError
from shimmy.models.pull import (
    PullError,
    PullEvent,
    PullProgress,
    PullSource,
    PullSuccess,
    PullVerifying,
    PullWaiting,
    parse_source,
    pull_model,
)
from shimmy.models.pull_repo import parse_repo_name, resolve_repo_name

_FORMS = "hf.co/OWNER/REPO[:QUANT], hf://OWNER/REPO/FILE.gguf or https://.../FILE.gguf"


async def source_for(name: str) -> PullSource:
    """What an Ollama pull names, as the source ``pull_model`` takes."""
    repo = parse_repo_name(name)
    if repo is not None:
        return await resolve_repo_name(repo)
    if "://" not in name:
        raise InvalidRequest(
            f"cannot pull {name[:80]!r}: shimmy does not use Ollama's model library; "
            f"pull a GGUF as {_FORMS}",
            param="model",
        )
    return parse_source(name, param="model")


def progress(event: PullEvent) -> list[dict[str, Any]]:
    """Ollama's progress objects for one pull event."""
    if isinstance(event, PullWaiting):
        return [{"status": event.message}]
    if isinstance(event, PullProgress):
        status = {"status": f"pulling {event.file}", "completed": event.completed}
        if event.total is not None:
            status["total"] = event.total
        return [status]
    if isinstance(event, PullVerifying):
        return [{"status": "verifying sha256 digest"}]
    if isinstance(event, PullSuccess):
        return [{"status": "writing manifest"}, {"status": "success"}]
    return [{"error": event.message}]


async def pull(request: Request) -> Response:
    body = parse_body(OllamaPullRequest, await request.body())
    registry = registry_of(request)
    source = await source_for(body.model)
    events = pull_model(source, settings_of(request))
    first = await anext(events)  # an invalid source raises here, before any byte is sent
    if isinstance(first, PullError):
        await events.aclose()
        raise first.to_error()

    async def rest() -> AsyncIterator[PullEvent]:
        yield first
        async for event in events:
            if isinstance(event, PullSuccess):
                # Listed (and pullable by name) before the client hears "success".
                await asyncio.to_thread(registry.discover)
            yield event

    if body.stream is False:
        last: PullEvent = first
        try:
            async for event in rest():
                last = event
        finally:
            await events.aclose()
        if isinstance(last, PullError):
            raise last.to_error()
        return JSONResponse({"status": "success"})

    async def lines() -> AsyncGenerator[bytes, None]:
        try:
            yield ndjson_line({"status": "pulling manifest"})
            async for event in rest():
                for status in progress(event):
                    yield ndjson_line(status)
        except ShimmyError as err:
            yield ndjson_line({"error": error_message(err)})
        finally:
            # A client that hangs up stops the download; the partial file stays for a resume.
            await events.aclose()

    return EventStreamResponse(lines(), media_type=NDJSON)
