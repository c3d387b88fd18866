"""The Responses API's memory: the responses a client may fetch again or continue from.

Kept in the app's memory (``app.state``), never on disk: a restart forgets them, as a local
server's clients expect. The store is bounded (``Settings.responses_store_size``); when full,
the response used least recently is dropped, so a long-running agent's recent turns survive.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from shimmy.serving.chat import Message


@dataclass(frozen=True)
class StoredResponse:
    body: dict[str, Any]  # the response object, as it was answered
    # The conversation up to and including this response's output, without instructions
    # (OpenAI does not carry them over to a continuation).
    history: tuple[Message, ...]
    input_items: tuple[dict[str, Any], ...] = ()  # this request's own input, as items


class ResponseStore:
    """An LRU-bounded map of response id to ``StoredResponse``. Used on the event loop only."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: collections.OrderedDict[str, StoredResponse] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, response_id: str, stored: StoredResponse) -> None:
        if self.capacity <= 0:
            return
        self._items[response_id] = stored
        self._items.move_to_end(response_id)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        stored = self._items.get(response_id)
        if stored is not None:
            self._items.move_to_end(response_id)
        return stored

    def delete(self, response_id: str) -> bool:
        return self._items.pop(response_id, None) is not None


def store_of(request: Request) -> ResponseStore:
    store: ResponseStore = request.app.state.responses
    return store
