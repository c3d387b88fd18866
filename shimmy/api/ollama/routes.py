"""Ollama's API, mounted at ``/ollama`` on the main port and served at the root of the port
``shimmy serve --ollama`` opens (``shimmy.api.ollama.listener``). Errors there are Ollama's
``{"error": "message"}`` (``shimmy.api.errors``)."""

from __future__ import annotations

from starlette.routing import BaseRoute

from shimmy.api.ollama import generation, models, pull
from shimmy.api.ollama.protocol import (
    OllamaChatRequest,
    OllamaCopyRequest,
    OllamaEmbeddingsRequest,
    OllamaEmbedRequest,
    OllamaGenerateRequest,
    OllamaModelRequest,
    OllamaPullRequest,
)
from shimmy.api.ollama.responses import (
    OllamaChatResponse,
    OllamaEmbeddingsResponse,
    OllamaEmbedResponse,
    OllamaGenerateResponse,
    OllamaProgressResponse,
    OllamaPsResponse,
    OllamaShowResponse,
    OllamaTagsResponse,
    OllamaVersionResponse,
)
from shimmy.api.routing import BAD_REQUEST, GENERATION_ERRORS, MODEL_ERRORS, NDJSON, api_route

TAGS = ["ollama"]
NOT_FOUND = {404: "No such model"}

routes: list[BaseRoute] = [
    api_route(
        "/",
        models.root,
        methods=["GET"],
        summary="Ollama is running",
        texts=["text/plain"],
        response_description="The text `Ollama is running`",
        tags=TAGS,
    ),
    api_route(
        "/api/version",
        models.version,
        methods=["GET"],
        summary="The Ollama API version served (Ollama)",
        response=OllamaVersionResponse,
        tags=TAGS,
    ),
    api_route(
        "/api/tags",
        models.tags,
        methods=["GET"],
        summary="List the models (Ollama)",
        response=OllamaTagsResponse,
        response_description="The models",
        tags=TAGS,
    ),
    api_route(
        "/api/show",
        models.show,
        methods=["POST"],
        summary="Details of a model (Ollama)",
        body=OllamaModelRequest,
        response=OllamaShowResponse,
        response_description="The model",
        errors={**BAD_REQUEST, **NOT_FOUND, 422: "The model file cannot be loaded"},
        tags=TAGS,
    ),
    api_route(
        "/api/ps",
        models.ps,
        methods=["GET"],
        summary="Models in memory (Ollama)",
        response=OllamaPsResponse,
        response_description="Loaded models",
        tags=TAGS,
    ),
    api_route(
        "/api/generate",
        generation.generate,
        methods=["POST"],
        summary="Generate a response (Ollama)",
        description="Streamed unless `stream` is false: one JSON object per line, the last "
        "with `done: true`, the counts, durations (ns) and `context`.",
        body=OllamaGenerateRequest,
        response=OllamaGenerateResponse,
        streams=[NDJSON],
        response_description="The response, or its chunks",
        errors=GENERATION_ERRORS,
        tags=TAGS,
    ),
    api_route(
        "/api/chat",
        generation.chat,
        methods=["POST"],
        summary="Chat (Ollama)",
        description="Streamed unless `stream` is false: one JSON object per line, the last "
        "with `done: true`, the counts and durations (ns). Tool calls come in "
        "`message.tool_calls`.",
        body=OllamaChatRequest,
        response=OllamaChatResponse,
        streams=[NDJSON],
        response_description="The reply, or its chunks",
        errors=GENERATION_ERRORS,
        tags=TAGS,
    ),
    api_route(
        "/api/embed",
        models.embed,
        methods=["POST"],
        summary="Embeddings (Ollama)",
        body=OllamaEmbedRequest,
        response=OllamaEmbedResponse,
        response_description="One vector per input",
        errors=GENERATION_ERRORS,
        tags=TAGS,
    ),
    api_route(
        "/api/embeddings",
        models.embeddings,
        methods=["POST"],
        summary="Embedding of one text (Ollama, older form)",
        body=OllamaEmbeddingsRequest,
        response=OllamaEmbeddingsResponse,
        response_description="The vector",
        errors=GENERATION_ERRORS,
        tags=TAGS,
    ),
    api_route(
        "/api/pull",
        pull.pull,
        methods=["POST"],
        summary="Download a model (Ollama)",
        description="`hf.co/OWNER/REPO[:QUANT]` or any source `shimmy pull` takes. Streamed "
        "unless `stream` is false: Ollama's progress objects, one per line.",
        body=OllamaPullRequest,
        response=OllamaProgressResponse,
        streams=[NDJSON],
        response_description="Progress, or `success` when stream is false",
        errors={
            **BAD_REQUEST,
            403: "The source is refused",
            404: "No such file at the source",
            409: "A different file of that name exists",
            422: "The download is not a usable model",
            502: "The download failed",
            507: "Not enough disk space",
        },
        tags=TAGS,
    ),
    api_route(
        "/api/copy",
        models.copy,
        methods=["POST"],
        summary="Copy a model under a new name (Ollama)",
        body=OllamaCopyRequest,
        response_description="Copied (no body)",
        errors={**BAD_REQUEST, **NOT_FOUND, 409: "The destination exists", **MODEL_ERRORS},
        tags=TAGS,
    ),
    api_route(
        "/api/delete",
        models.delete,
        methods=["DELETE"],
        summary="Delete a model from shimmy's own models folder (Ollama)",
        body=OllamaModelRequest,
        response_description="Deleted (no body)",
        errors={**BAD_REQUEST, 403: "Not shimmy's own file", **NOT_FOUND, **MODEL_ERRORS},
        tags=TAGS,
    ),
]
