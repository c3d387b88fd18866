"""llama.cpp's server routes besides generation: ``/tokenize``, ``/detokenize``,
``/apply-template``, ``/props`` and ``/slots``.

Each takes an optional ``model`` (``?model=`` for the GET routes) and answers for the default
model otherwise, loading it if need be, as llama.cpp's server answers for the one it serves.
``/slots`` is read-only and says only whether each slot is busy: a slot's prompt belongs to
whoever sent it, so it is never shown (llama.cpp shows it unless started with ``--no-slots``).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from shimmy import __version__
from shimmy.api.context import registry_of, settings_of
from shimmy.api.keepalive import wants_to_wait
from shimmy.api.llamacpp.protocol import ApplyTemplateRequest, DetokenizeRequest, TokenizeRequest
from shimmy.api.llamacpp.results import RANDOM_SEED
from shimmy.api.protocol.common import parse_body
from shimmy.engine.protocol import Engine
from shimmy.serving.defaults import DEFAULTS, Dialect
from shimmy.serving.prepare import prepare


async def _engine(request: Request, model: str | None) -> Engine:
    return await registry_of(request).get_engine(model, wait=wants_to_wait(request))


async def tokenize(request: Request) -> Response:
    body = parse_body(TokenizeRequest, await request.body())
    engine = await _engine(request, body.model)
    if body.parse_special:
        ids = await engine.tokenize(body.content, add_special=body.add_special)
    else:
        [ids] = await engine.tokenize_literal([body.content])
    if not body.with_pieces:
        return JSONResponse({"tokens": ids})
    pieces = await asyncio.gather(*(engine.detokenize([token]) for token in ids))
    # A token that is only part of a character reads U+FFFD here (llama.cpp gives its bytes:
    # the Engine protocol has no call for a token's raw bytes).
    tokens = [{"id": token, "piece": p} for token, p in zip(ids, pieces, strict=True)]
    return JSONResponse({"tokens": tokens})


async def detokenize(request: Request) -> Response:
    body = parse_body(DetokenizeRequest, await request.body())
    engine = await _engine(request, body.model)
    return JSONResponse({"content": await engine.detokenize(body.tokens)})


async def apply_template(request: Request) -> Response:
    """The prompt a chat request would be decoded from: rendered by the one pipeline that
    renders every chat (``prepare``), tool instructions included."""
    body = parse_body(ApplyTemplateRequest, await request.body())
    engine = await _engine(request, body.model)
    given = body.to_input()
    given.add_generation_prompt = body.add_generation_prompt
    prepared = await prepare(engine, given, Dialect.LLAMACPP, settings_of(request))
    prompt = prepared.request.prompt
    if not isinstance(prompt, str):
        prompt = await engine.detokenize(prompt)
    return JSONResponse({"prompt": prompt})


# The model config's sampling fields under llama.cpp's names.
_LLAMACPP_NAMES = {"max_tokens": "n_predict", "repetition_penalty": "repeat_penalty"}


def default_params(engine: Engine) -> dict[str, Any]:
    """What a /completion that sets nothing runs with: the model's configured defaults over
    the dialect's row."""
    row = DEFAULTS[Dialect.LLAMACPP]
    configured = engine.options.sampling.values()
    return {
        "n_predict": -1,
        "seed": RANDOM_SEED,
        "temperature": row.temperature,
        "top_k": row.top_k,
        "top_p": row.top_p,
        "min_p": row.min_p,
        "repeat_penalty": row.repetition_penalty,
        **{_LLAMACPP_NAMES.get(k, k): v for k, v in configured.items()},
    }


def _build_info() -> str:
    try:
        llama = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        llama = "unknown"
    return f"shimmy {__version__} (llama-cpp-python {llama})"


async def props(request: Request) -> Response:
    engine = await _engine(request, request.query_params.get("model"))
    entry = engine.entry
    return JSONResponse(
        {
            "default_generation_settings": {
                "id": 0,
                "n_ctx": engine.n_ctx,
                "is_processing": False,
                "params": default_params(engine),
            },
            "total_slots": engine.n_parallel,
            "model_alias": entry.id,
            "model_path": str(entry.path),
            "chat_template": entry.chat_template or "",
            "bos_token": entry.bos_token or "",
            "eos_token": entry.eos_token or "",
            "modalities": {"vision": False, "audio": False},
            "build_info": _build_info(),
            "is_sleeping": False,
        }
    )


async def slots(request: Request) -> Response:
    engine = await _engine(request, request.query_params.get("model"))
    busy = int(engine.stats().get("busy", 0))
    return JSONResponse(
        [
            {"id": i, "n_ctx": engine.n_ctx, "is_processing": i < busy}
            for i in range(engine.n_parallel)
        ]
    )
