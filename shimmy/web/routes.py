"""``GET /`` and ``/ui/*``: the chat page and its assets, straight from the package.

The page is plain files under ``static/`` (no build step, nothing fetched from elsewhere), read
once and kept in memory. It talks to the same server through ``/api/models`` and
``/v1/chat/completions``, so it needs no API of its own.

Model output is shown by the page, and generated text is untrusted: the page never puts it into
HTML, and a strict Content-Security-Policy (scripts, styles and connections only from this
origin, no inline code, no framing) limits the damage should that ever go wrong.

These routes are declared public and not rate limited (one page load fetches several files that
cost nothing like a generation): the page asks for the key itself when the API answers 401.
Only the exact paths below are public.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from shimmy.api.routing import api_route

STATIC_DIR = Path(__file__).parent / "static"

# Served files: URL path -> (file under static/, media type). Nothing else is reachable, so no
# request path ever becomes a file system path.
FILES: dict[str, tuple[str, str]] = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/ui/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/ui/sse.js": ("sse.js", "text/javascript; charset=utf-8"),
    "/ui/app.css": ("app.css", "text/css; charset=utf-8"),
    "/ui/favicon.svg": ("favicon.svg", "image/svg+xml"),
}

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)

SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # For browsers too old for frame-ancestors.
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}

# The asset names carry no content hash, so browsers must revalidate every time; the ETag
# makes that a cheap 304 while an upgraded shimmy is picked up at once.
CACHE_CONTROL = "no-cache"


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    media_type: str
    etag: str


@functools.cache
def load(path: str) -> StaticFile:
    name, media_type = FILES[path]
    body = (STATIC_DIR / name).read_bytes()
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    return StaticFile(body, media_type, etag)


def _etag_matches(if_none_match: str | None, etag: str) -> bool:
    if not if_none_match:
        return False
    candidates = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
    return "*" in candidates or etag in candidates


async def serve(request: Request) -> Response:
    static = load(request.scope["route"].path)
    headers = {**SECURITY_HEADERS, "Cache-Control": CACHE_CONTROL, "ETag": static.etag}
    if _etag_matches(request.headers.get("if-none-match"), static.etag):
        return Response(status_code=304, headers=headers)
    return Response(static.body, media_type=static.media_type, headers=headers)


routes: list[BaseRoute] = [
    api_route(
        "/",
        serve,
        methods=["GET"],
        summary="The chat page",
        description="Its scripts, styles and icon are served under /ui/ (not listed).",
        texts=["text/html"],
        response_description="The page",
        responses={304: "The held copy is current (If-None-Match)"},
        headers={"If-None-Match": "The ETag of a copy already held"},
        public=True,
        rate_limited=False,
        tags=["page"],
    ),
    # The page's own files: not an interface anyone calls, so not in /openapi.json.
    *(
        api_route(
            path,
            serve,
            methods=["GET"],
            summary=f"The chat page's {name}",
            public=True,
            rate_limited=False,
            include_in_schema=False,
        )
        for path, (name, _) in FILES.items()
        if path != "/"
    ),
]
