"""OpenAI's Responses API, mounted at ``/v1``: ``POST /v1/responses``, ``GET`` and ``DELETE
/v1/responses/{id}``.

A response is stored (unless ``store`` is false) in the app's bounded in-memory store with the
conversation it ends, so ``previous_response_id`` continues that conversation: the earlier
input and output, then the new input. Instructions are not carried over, as in OpenAI's API.
Function tools, ``tool_choice`` and ``text.format`` (JSON schema through a grammar) work as in
chat completions; errors have OpenAI's shape, as everywhere under ``/v1``.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from shimmy.api.access_log import annotate
from shimmy.api.context import client_gone, registry_of, settings_of
from shimmy.api.keepalive import wants_to_wait
from shimmy.api.protocol.common import parse_body, validate_body
from shimmy.api.responses.protocol import (
    DeletedResponse,
    InputItemList,
    InputItemsQuery,
    ResponseObject,
    ResponsesRequest,
)
from shimmy.api.responses.render import ResponseDraft, ResponseEvents
from shimmy.api.responses.store import StoredResponse, store_of
from shimmy.api.routing import GENERATION_ERRORS, SSE, api_route
from shimmy.api.sse import EventStreamResponse
from shimmy.errors import InvalidRequest, NotFound
from shimmy.serving.chat import Message
from shimmy.serving.defaults import Dialect
from shimmy.serving.prepare import prepare
from shimmy.serving.replies import read_reply
from shimmy.serving.run import collect_one, frames, start


def _not_found(response_id: str, param: str | None = None) -> NotFound:
    return NotFound(
        f"no stored response has the id {response_id[:100]!r} (responses are kept in memory, "
        "a bounded number of them)",
        message="Response not found",
        param=param,
    )


async def create_response(request: Request) -> Response:
    body = parse_body(ResponsesRequest, await request.body())
    store = store_of(request)
    history: list[Message] = []
    if body.previous_response_id is not None:
        previous = store.get(body.previous_response_id)
        if previous is None:
            raise _not_found(body.previous_response_id, "previous_response_id")
        history = list(previous.history)
    engine = await registry_of(request).get_engine(body.model, wait=wants_to_wait(request))
    annotate(request, model=engine.entry.id)
    given = body.to_input(history)
    prepared = await prepare(
        engine, given, Dialect.OPENAI_RESPONSES, settings_of(request), prompt_param="input"
    )
    assert given.messages is not None
    draft = ResponseDraft(engine.entry.id, body.echo(), given.messages)
    keep = body.store is not False
    inputs = tuple(body.input_items()) if keep else ()

    def done(response: dict[str, Any], conversation: tuple[Message, ...]) -> None:
        if keep:
            store.put(response["id"], StoredResponse(response, conversation, inputs))

    if body.stream:
        started = await start(engine, prepared)
        return EventStreamResponse(frames(started, ResponseEvents(draft, prepared, done)))
    result = await collect_one(engine, prepared, until=client_gone(request))
    reply = read_reply(result.text, result.finished, prepared.tools)
    text = reply.text or ""
    calls = draft.call_items(reply)
    response = draft.final(reply, text, result.finished.usage, calls)
    done(response, draft.history(text, calls))
    return JSONResponse(response)


async def retrieve_response(request: Request) -> Response:
    response_id = request.path_params["response_id"]
    stored = store_of(request).get(response_id)
    if stored is None:
        raise _not_found(response_id)
    return JSONResponse(stored.body)


async def list_input_items(request: Request) -> Response:
    response_id = request.path_params["response_id"]
    stored = store_of(request).get(response_id)
    if stored is None:
        raise _not_found(response_id)
    query = validate_body(InputItemsQuery, dict(request.query_params))
    items = list(stored.input_items)
    if query.order == "desc":
        items.reverse()
    ids = [item["id"] for item in items]
    for name, cursor in (("after", query.after), ("before", query.before)):
        if cursor is None:
            continue
        if cursor not in ids:
            raise InvalidRequest(f"no input item has the id {cursor[:100]!r}", param=name)
        keep_after = name == "after"
        at = ids.index(cursor)
        items, ids = (items[at + 1 :], ids[at + 1 :]) if keep_after else (items[:at], ids[:at])
    page = items[: query.limit]
    return JSONResponse(
        {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(items) > len(page),
        }
    )


async def delete_response(request: Request) -> Response:
    response_id = request.path_params["response_id"]
    if not store_of(request).delete(response_id):
        raise _not_found(response_id)
    return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})


TAGS = ["openai"]

# Mounted at /v1: errors are OpenAI's error body there (shimmy.api.errors).
routes: list[BaseRoute] = [
    api_route(
        "/responses",
        create_response,
        methods=["POST"],
        summary="Create a response (OpenAI Responses API)",
        description="Streamed: `response.created` ... `response.output_text.delta` ... "
        "`response.completed`, as OpenAI sends them.",
        body=ResponsesRequest,
        response=ResponseObject,
        streams=[SSE],
        response_description="The response, or its events",
        errors={**GENERATION_ERRORS, 404: "No such model, or no such previous response"},
        tags=TAGS,
    ),
    api_route(
        "/responses/{response_id}",
        retrieve_response,
        methods=["GET"],
        summary="A stored response (OpenAI Responses API)",
        response=ResponseObject,
        response_description="The response",
        errors={404: "No such response (never stored, deleted, or dropped from the store)"},
        tags=TAGS,
    ),
    api_route(
        "/responses/{response_id}/input_items",
        list_input_items,
        methods=["GET"],
        summary="The input items of a stored response (OpenAI Responses API)",
        description="This response's own input (not the conversation before it), newest first "
        "unless `order=asc`; `limit` (1-100, default 20), `after` and `before` page by item id.",
        response=InputItemList,
        response_description="A page of input items",
        errors={404: "No such response", 400: "A bad query parameter"},
        tags=TAGS,
    ),
    api_route(
        "/responses/{response_id}",
        delete_response,
        methods=["DELETE"],
        summary="Delete a stored response (OpenAI Responses API)",
        response=DeletedResponse,
        response_description="The response is deleted",
        errors={404: "No such response"},
        tags=TAGS,
    ),
]
