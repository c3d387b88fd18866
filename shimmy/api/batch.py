"""``POST /api/generate/batch``: several prompts, one set of sampling options, one answer.

The prompts are queued atomically (``engine.submit_many``): all are accepted or none, and they
start decoding in the same batch when slots are free. Answers keep the order of the prompts.
If the client hangs up, every generation of the batch is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from shimmy.api.access_log import annotate
from shimmy.api.errors import validation_error
from shimmy.api.keepalive import wants_to_wait
from shimmy.api.schemas import (
    GenerateRequest,
    NonEmptyStr,
    parse_generate_request,
    parse_json,
    to_generation,
)
from shimmy.api.sse import wait_for_disconnect
from shimmy.engine.types import Finished, GenerationRequest, Usage
from shimmy.errors import InvalidRequest, ShimmyError

if TYPE_CHECKING:
    from shimmy.engine.protocol import Engine as ModelEngine
    from shimmy.registry import ModelRegistry

MAX_BATCH_PROMPTS = 64


class BatchPrompts(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompts: Annotated[list[NonEmptyStr], Field(min_length=1, max_length=MAX_BATCH_PROMPTS)]


def parse_batch_request(data: Any) -> tuple[list[str], GenerateRequest]:
    """The prompts, and the shared options validated exactly as ``/api/generate`` validates
    them (the first prompt stands in for ``prompt``)."""
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object")
    for field in ("prompt", "messages"):
        if field in data:
            raise InvalidRequest(
                f"'{field}' is not accepted here: put the texts in 'prompts'", param=field
            )
    if data.get("stream") is True:
        raise InvalidRequest("batch generation does not stream", param="stream")
    try:
        prompts = BatchPrompts.model_validate(data).prompts
    except ValidationError as exc:
        raise validation_error(exc) from None
    return prompts, parse_generate_request({**data, "prompt": prompts[0]})


def total_usage(usages: list[Usage]) -> Usage:
    return Usage(
        prompt_tokens=sum(u.prompt_tokens for u in usages),
        completion_tokens=sum(u.completion_tokens for u in usages),
        cached_tokens=sum(u.cached_tokens for u in usages),
    )


async def run_together(
    request: Request,
    engine: ModelEngine,
    generations: list[GenerationRequest],
    *,
    max_seconds: float | None = None,
) -> list[tuple[str, Finished] | BaseException]:
    """Run ``generations`` together; each result (or its error) in their order.

    The first failure cancels the others, and so does a client that disconnects. After
    ``max_seconds`` every generation still running is cancelled and keeps its text so far.
    """
    capacity = engine.n_parallel + engine.settings.max_queue
    if len(generations) > capacity:
        raise InvalidRequest(
            f"this model takes at most {capacity} prompts at once; got {len(generations)}",
            param="prompts",
        )
    streams = engine.submit_many(generations)

    def cancel_all(_: object = None) -> None:
        for stream in streams:
            stream.cancel()

    def cancel_all_on_failure(task: asyncio.Future[Any]) -> None:
        if task.cancelled() or task.exception() is not None:
            cancel_all()

    collects = [asyncio.ensure_future(stream.collect()) for stream in streams]
    for task in collects:
        task.add_done_callback(cancel_all_on_failure)
    watch = asyncio.ensure_future(wait_for_disconnect(request.receive))
    watch.add_done_callback(cancel_all)
    timer = None
    if max_seconds is not None:
        timer = asyncio.get_running_loop().call_later(max_seconds, cancel_all)
    try:
        return await asyncio.gather(*collects, return_exceptions=True)
    finally:
        if timer is not None:
            timer.cancel()
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch
        cancel_all()


async def run_batch(
    request: Request,
    engine: ModelEngine,
    generations: list[GenerationRequest],
    *,
    max_seconds: float | None = None,
) -> list[tuple[str, Finished]]:
    """``run_together``, raising the first failure (lowest prompt index, named in it)."""
    results = await run_together(request, engine, generations, max_seconds=max_seconds)
    completed: list[tuple[str, Finished]] = []
    for index, result in enumerate(results):
        if isinstance(result, ShimmyError):
            result.details = f"prompt {index}: {result.details or result.message}"
            result.param = f"prompts.{index}"
            raise result
        if isinstance(result, BaseException):
            raise result
        completed.append(result)
    return completed


async def prepare_generations(
    shared: GenerateRequest, prompts: list[str], engine: ModelEngine, request: Request
) -> list[GenerationRequest]:
    settings = request.app.state.settings
    return [
        await to_generation(shared.model_copy(update={"prompt": prompt}), engine, settings)
        for prompt in prompts
    ]


async def generate_batch(request: Request) -> Response:
    prompts, shared = parse_batch_request(parse_json(await request.body()))
    registry: ModelRegistry = request.app.state.registry
    engine = await registry.get_engine(
        shared.model, keep_alive=shared.keep_alive, wait=wants_to_wait(request)
    )
    created = int(time.time())
    generations = await prepare_generations(shared, prompts, engine, request)
    results = await run_batch(request, engine, generations)
    totals = total_usage([finished.usage for _, finished in results])
    annotate(request, model=engine.entry.id, usage=totals)
    return JSONResponse(
        {
            "id": f"batch-{uuid.uuid4().hex}",
            "model": engine.entry.id,
            "created": created,
            "responses": [
                {
                    "index": index,
                    "text": text,
                    "finish_reason": finished.finish_reason,
                    "usage": finished.usage.as_dict(),
                }
                for index, (text, finished) in enumerate(results)
            ],
            "usage": totals.as_dict(),
        }
    )


routes: list[BaseRoute] = [Route("/api/generate/batch", generate_batch, methods=["POST"])]
