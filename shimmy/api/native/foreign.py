"""Ollama's clients at shimmy's own ``/api/generate`` and ``/api/pull``.

Both APIs have these paths, with other shapes: an Ollama request answered in the native format
"succeeds" with a reply its client cannot read (``response`` missing, a JSON error on SSE). So
a request carrying a field only Ollama has, or sent by one of Ollama's official clients (their
User-Agent says so), is refused with a 400 that says where Ollama's API is.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from shimmy.errors import InvalidRequest

# Fields of Ollama's requests that shimmy's native ones do not have (``suffix`` both have: the
# native API fills in the middle too).
OLLAMA_GENERATE_FIELDS = ("options", "format", "raw", "context", "images", "template")
OLLAMA_PULL_FIELDS = ("insecure", "name")
OLLAMA_AGENTS = ("ollama-python/", "ollama-js/", "ollama/")


def _ollama_url(request: Request) -> str:
    where = f"{str(request.base_url).rstrip('/')}/ollama"
    listener = request.app.state.settings.ollama
    if listener:
        where += f" (and http://{listener})"
    return where


def refuse_ollama_requests(request: Request, body: Any, fields: tuple[str, ...]) -> None:
    found = [name for name in fields if isinstance(body, dict) and name in body]
    agent = request.headers.get("user-agent", "").lower()
    if not found and not agent.startswith(OLLAMA_AGENTS):
        return
    why = f"'{found[0]}' is a field of Ollama's API" if found else "this is an Ollama client"
    raise InvalidRequest(
        f"{why}, but {request.url.path} is shimmy's native API; Ollama's API is served at "
        f"{_ollama_url(request)}",
        param=found[0] if found else None,
    )
