"""``GET /openapi.json``: an OpenAPI 3.1 description of the HTTP API.

Request schemas are generated from the pydantic models that validate the requests, so they
cannot drift; the few places where a validator accepts more than the generated schema says (a
single string for ``stop``, text for ``content``, durations for ``keep_alive``) are patched to
say so. Response schemas are written by hand: they list what every response has, and allow
more, so clients are not broken by additions.

The description follows the running configuration: the security schemes and the 401 and 429
answers are only listed when API keys or a rate limit are set, and the chat page only when it is
served. The WebSocket endpoint cannot be described by OpenAPI; the API's description mentions
it. The chat page's own assets (``/ui/*``) are not listed: they are files the page loads, not
an interface anyone calls.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from shimmy import __version__
from shimmy.api.locallab.protocol import (
    UNLOADED_STATUS,
    BatchBody,
    ChatBody,
    GenerateBody,
    LoadBody,
)
from shimmy.api.native.protocol import MAX_BATCH_PROMPTS, GenerateRequest
from shimmy.api.openai.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from shimmy.api.protocol.common import MAX_STOP_STRINGS
from shimmy.api.security import keys_configured
from shimmy.chat.messages import ROLES
from shimmy.serving.defaults import DEFAULTS, Dialect
from shimmy.settings import Settings

Schema = dict[str, Any]

REF = "#/components/schemas/{model}"
# Both APIs have a ChatMessage; pydantic would name them after their modules. The LocalLab
# models are named after their dialect, as their clients know them.
_RENAMES = {
    "shimmy__api__schemas__ChatMessage": "NativeChatMessage",
    "shimmy__api__openai_schemas__ChatMessage": "OpenAIChatMessage",
    "GenerateBody": "LocalLabGenerateRequest",
    "ChatBody": "LocalLabChatRequest",
    "ChatMessageBody": "LocalLabChatMessage",
    "BatchBody": "LocalLabBatchRequest",
    "LoadBody": "LocalLabLoadRequest",
}

DESCRIPTION = """\
shimmy serves GGUF models through llama.cpp. Three dialects share one port: the native API
under `/api`, the OpenAI-compatible API under `/v1`, and LocalLab's routes (`/generate`,
`/chat`, `/generate/batch`, `/models/...`, `/system/info`, `/health`), which answer errors in
the native format. `/metrics` serves Prometheus metrics and, unless turned off, `/` a chat page
(its assets under `/ui/` are not listed here).

Streaming (`"stream": true`) answers with server-sent events (`text/event-stream`) that end
with `data: [DONE]`; a failure after the stream started is sent as an event holding the
error. LocalLab's `/generate` streams the text itself (`data: <text>`, line breaks written as
`\\n`, a failure as `data: Error: <message>`); its `/chat` streams
`{"role": "assistant", "content": ...}` chunks, each both as a `data:` line and as a bare JSON
line, and ends with a `"[DONE]"` line too.

`/ws/generate` (WebSocket, not describable here) takes `/api/generate` requests as JSON text
frames and answers `{"token": ...}` frames, then `{"done": true, "finish_reason", "usage"}` or
`{"error": {"code", "message"}}`; `{"cancel": true}` stops the running generation.
"""


def _ref(name: str) -> Schema:
    return {"$ref": REF.format(model=name)}


def _renamed_refs(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            key: (
                REF.format(model=_RENAMES.get(value.rsplit("/", 1)[-1], value.rsplit("/", 1)[-1]))
                if key == "$ref" and isinstance(value, str)
                else _renamed_refs(value)
            )
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_renamed_refs(item) for item in node]
    return node


def request_schemas() -> dict[str, Schema]:
    models: list[type[BaseModel]] = [
        GenerateRequest,
        ChatCompletionRequest,
        CompletionRequest,
        EmbeddingRequest,
        GenerateBody,
        ChatBody,
        BatchBody,
        LoadBody,
    ]
    _, top = models_json_schema([(model, "validation") for model in models], ref_template=REF)
    schemas: dict[str, Schema] = {
        _RENAMES.get(name, name): _renamed_refs(schema) for name, schema in top["$defs"].items()
    }
    _patch_generate_request(schemas["GenerateRequest"])
    schemas["BatchRequest"] = _batch_request(schemas["GenerateRequest"])
    for name in ("LocalLabGenerateRequest", "LocalLabChatRequest", "LocalLabBatchRequest"):
        _patch_locallab_options(schemas[name])
    schemas["LocalLabBatchRequest"]["properties"]["stream"]["description"] = (
        "Ignored: a batch is answered in one piece"
    )
    schemas["LocalLabLoadRequest"]["properties"]["model_id"]["description"] = (
        "The model to load; it becomes the current model"
    )
    # The chat layer refuses other roles before any template runs (shimmy.chat.messages).
    schemas["ChatMessage"]["properties"]["role"] = {"enum": list(ROLES), "title": "Role"}
    return schemas


def _patch_generate_request(schema: Schema) -> None:
    """Say what the validators accept beyond the field types."""
    properties = schema["properties"]
    properties["stop"] = {
        "anyOf": [
            {"type": "string", "minLength": 1},
            {
                "type": "array",
                "items": {"type": "string", "minLength": 1},
                "maxItems": MAX_STOP_STRINGS,
            },
            {"type": "null"},
        ],
        "title": "Stop",
        "description": "Text is cut before the first stop string",
    }
    properties["keep_alive"] = {
        "anyOf": [
            {"type": "number"},
            {"type": "string", "pattern": r"^\s*-?\d+(\.\d+)?\s*(ms|s|m|h)?\s*$"},
            {"type": "null"},
        ],
        "title": "Keep Alive",
        "description": "Seconds (or a duration like '5m') the model stays loaded when idle; "
        "0 unloads at once, a negative value keeps it",
    }
    properties["repetition_penalty"]["description"] = "Also accepted as 'repeat_penalty'"
    schema["description"] = "Exactly one of 'prompt' and 'messages' is required"


def _batch_request(generate: Schema) -> Schema:
    """``/api/generate/batch`` validates its shared options as ``GenerateRequest``."""
    shared = {
        name: copy.deepcopy(schema)
        for name, schema in generate["properties"].items()
        if name not in ("prompt", "messages", "stream")
    }
    prompts = {
        "type": "array",
        "items": {"type": "string", "minLength": 1},
        "minItems": 1,
        "maxItems": MAX_BATCH_PROMPTS,
        "title": "Prompts",
    }
    return {
        **_object({"prompts": prompts}, shared),
        "title": "BatchRequest",
        "description": "The prompts, and the fields of GenerateRequest shared by all of them "
        "('prompt' and 'messages' are refused, and so is 'stream': true)",
    }


_LOCALLAB_FIELD_NOTES = {
    "model_id": "Also accepted as 'model'. Default: the current model (the last one loaded "
    "through /models/load, else the most recently used, else the default model)",
    "max_length": "Also accepted as 'max_tokens' and 'max_new_tokens'. Default: the model's "
    "configured max_tokens, else the server's cap",
    "do_sample": "false: greedy decoding (temperature 0)",
    "max_time": "Seconds after which the generation stops; its text so far is the answer",
    "system_prompt": "A system prompt in front of the prompt or messages",
    "stream": "Answer with server-sent events",
}


def _patch_locallab_options(schema: Schema) -> None:
    properties = schema["properties"]
    for name, note in _LOCALLAB_FIELD_NOTES.items():
        properties[name]["description"] = note
    locallab = DEFAULTS[Dialect.LOCALLAB].sampling()
    for name in ("temperature", "top_p", "top_k", "repetition_penalty"):
        value = locallab[name]
        properties[name]["description"] = f"Default: {value}, unless the model's config sets one"
    schema["description"] = "LocalLab's fields; null means the default. Unknown fields are ignored"


# --- response schemas (hand-written) -------------------------------------------------------------


def _object(required: dict[str, Schema], optional: dict[str, Schema] | None = None) -> Schema:
    return {
        "type": "object",
        "required": list(required),
        "properties": {**required, **(optional or {})},
    }


_STRING: Schema = {"type": "string"}
_INT: Schema = {"type": "integer"}
_NUMBER: Schema = {"type": "number"}
_BOOL: Schema = {"type": "boolean"}
_NULLABLE_STRING: Schema = {"type": ["string", "null"]}


def response_schemas() -> dict[str, Schema]:
    usage = _object({"prompt_tokens": _INT, "completion_tokens": _INT, "total_tokens": _INT})
    model_info = _object(
        {
            "id": _STRING,
            "name": _STRING,
            "path": _STRING,
            "size_bytes": _INT,
            "loaded": _BOOL,
            "source": _STRING,
            "usable": _BOOL,
        },
        {
            "description": _NULLABLE_STRING,
            "architecture": _NULLABLE_STRING,
            "quantization": _NULLABLE_STRING,
            "parameter_count": {"type": ["integer", "null"]},
            "context_length": {"type": ["integer", "null"]},
            "has_chat_template": _BOOL,
            "error": _STRING,
        },
    )
    openai_envelope = {
        "id": _STRING,
        "created": _INT,
        "model": _STRING,
        "system_fingerprint": _STRING,
    }
    return {
        "NativeError": _object(
            {"error": _object({"code": _STRING, "message": _STRING, "details": _NULLABLE_STRING})}
        ),
        "OpenAIError": _object(
            {
                "error": _object(
                    {
                        "message": _STRING,
                        "type": _STRING,
                        "param": _NULLABLE_STRING,
                        "code": _NULLABLE_STRING,
                    }
                )
            }
        ),
        "Usage": usage,
        "GenerateResponse": _object(
            {
                "id": _STRING,
                "model": _STRING,
                "created": _INT,
                "choices": {
                    "type": "array",
                    "items": _object(
                        {
                            "text": _STRING,
                            "index": _INT,
                            "finish_reason": {"enum": ["stop", "length", "cancelled"]},
                        }
                    ),
                },
                "usage": _ref("Usage"),
            }
        ),
        "ModelInfo": model_info,
        "ModelList": _object(
            {
                "models": {"type": "array", "items": _ref("ModelInfo")},
                "default": _NULLABLE_STRING,
            }
        ),
        "Health": _object(
            {
                "status": {"const": "healthy"},
                "models_loaded": _INT,
                "memory_usage": _STRING,
                "version": _STRING,
                "uptime_seconds": _NUMBER,
            },
            {
                "requests_total": _INT,
                "slots": _object({"busy": _INT, "total": _INT, "queued": _INT}),
            },
        ),
        "LoadedModels": _object(
            {
                "models": {
                    "type": "array",
                    "items": _object(
                        {
                            "id": _STRING,
                            "loaded_at": _INT,
                            "memory_bytes": _INT,
                            "idle_seconds": _NUMBER,
                            "keep_alive": _NUMBER,
                            "expires_in": {
                                "type": ["number", "null"],
                                "description": "null: kept loaded",
                            },
                            "busy": _INT,
                            "queued": _INT,
                            "slots": _INT,
                            "context_length": _INT,
                            "n_gpu_layers": _INT,
                            "load_count": _INT,
                        }
                    ),
                },
                "loading": {"type": "array", "items": _STRING},
            }
        ),
        "LoadResult": _object(
            {
                "id": _STRING,
                "loaded": {"const": True},
                "already_loaded": _BOOL,
                "load_seconds": _NUMBER,
                "memory_bytes": _INT,
            }
        ),
        "UnloadResult": _object({"id": _STRING, "unloaded": _BOOL}),
        "DeleteResult": _object({"id": _STRING, "deleted": {"type": "array", "items": _STRING}}),
        "PullRequest": _object(
            {"model": {"type": "string", "description": "hf://OWNER/REPO/FILE.gguf or a URL"}},
            {"stream": {"type": "boolean", "default": True}},
        ),
        "PullEvent": _object(
            {"status": {"enum": ["waiting", "downloading", "verifying", "success", "error"]}}
        ),
        "LoadRequest": _object({}, {"keep_alive": {"type": ["number", "string", "null"]}}),
        "BatchResponse": _object(
            {
                "id": _STRING,
                "model": _STRING,
                "created": _INT,
                "responses": {
                    "type": "array",
                    "items": _object(
                        {
                            "index": _INT,
                            "text": _STRING,
                            "finish_reason": {"enum": ["stop", "length", "cancelled"]},
                            "usage": _ref("Usage"),
                        }
                    ),
                },
                "usage": _ref("Usage"),
            }
        ),
        "ComputeDevice": _object(
            {
                "name": _STRING,
                "description": _STRING,
                "type": {"enum": ["cpu", "gpu", "igpu", "accel", "other"]},
                "memory_total_bytes": _INT,
                "memory_free_bytes": _INT,
            }
        ),
        "SystemInfo": _object(
            {
                "versions": _object({"shimmy": _STRING, "python": _STRING}),
                "llama_cpp": _object({"gpu_offload": _BOOL}),
                "cpu": _object({"architecture": _STRING, "threads": _INT}),
                "memory": _object(
                    {"total_bytes": _INT, "available_bytes": _INT, "process_rss_bytes": _INT}
                ),
                "gpu": _object(
                    {
                        "offload_supported": _BOOL,
                        "devices": {"type": "array", "items": _ref("ComputeDevice")},
                        "n_gpu_layers_setting": {"type": ["integer", "null"]},
                    }
                ),
                "models": _object(
                    {
                        "available": _INT,
                        "default": _NULLABLE_STRING,
                        "folders": {"type": "array", "items": {"type": "object"}},
                        "loaded": {
                            "type": "array",
                            "items": _object(
                                {
                                    "id": _STRING,
                                    "load_seconds": _NUMBER,
                                    "loaded_at": _NUMBER,
                                    "memory_bytes": _INT,
                                    "n_ctx": _INT,
                                    "n_gpu_layers": _INT,
                                    "slots": _INT,
                                    "busy": _INT,
                                    "queued": _INT,
                                    "tokens_generated": _INT,
                                }
                            ),
                        },
                        "loading": {"type": "array", "items": _STRING},
                    }
                ),
                "uptime_seconds": _NUMBER,
                "requests_total": _INT,
            }
        ),
        **_locallab_response_schemas(),
        "ChatCompletion": _object(
            {
                **openai_envelope,
                "object": {"const": "chat.completion"},
                "choices": {
                    "type": "array",
                    "items": _object(
                        {
                            "index": _INT,
                            "message": _object(
                                {"role": {"const": "assistant"}, "content": _NULLABLE_STRING},
                                {"tool_calls": {"type": "array"}},
                            ),
                            "finish_reason": {"enum": ["stop", "length", "tool_calls"]},
                        },
                        {"logprobs": {"type": ["object", "null"]}},
                    ),
                },
                "usage": _ref("Usage"),
            }
        ),
        "TextCompletion": _object(
            {
                **openai_envelope,
                "object": {"const": "text_completion"},
                "choices": {
                    "type": "array",
                    "items": _object(
                        {
                            "text": _STRING,
                            "index": _INT,
                            "finish_reason": {"enum": ["stop", "length"]},
                        },
                        {"logprobs": {"type": ["object", "null"]}},
                    ),
                },
                "usage": _ref("Usage"),
            }
        ),
        "EmbeddingList": _object(
            {
                "object": {"const": "list"},
                "data": {
                    "type": "array",
                    "items": _object(
                        {
                            "object": {"const": "embedding"},
                            "index": _INT,
                            "embedding": {"anyOf": [{"type": "array", "items": _NUMBER}, _STRING]},
                        }
                    ),
                },
                "model": _STRING,
                "usage": _object({"prompt_tokens": _INT, "total_tokens": _INT}),
            }
        ),
        "OpenAIModel": _object(
            {
                "id": _STRING,
                "object": {"const": "model"},
                "created": _INT,
                "owned_by": _STRING,
            }
        ),
        "OpenAIModelList": _object(
            {"object": {"const": "list"}, "data": {"type": "array", "items": _ref("OpenAIModel")}}
        ),
    }


def _locallab_response_schemas() -> dict[str, Schema]:
    finish_reason: Schema = {"enum": ["stop", "length", "cancelled"]}
    return {
        "LocalLabGenerateResponse": _object(
            {
                "response": _STRING,
                "text": {"type": "string", "description": "The same as 'response'"},
                "model": _STRING,
                "finish_reason": finish_reason,
                "usage": _ref("Usage"),
            }
        ),
        "LocalLabChatResponse": _object(
            {
                "model": _STRING,
                "choices": {
                    "type": "array",
                    "items": _object(
                        {
                            "message": _object(
                                {"role": {"const": "assistant"}, "content": _STRING}
                            ),
                            "index": _INT,
                            "finish_reason": finish_reason,
                        }
                    ),
                },
                "usage": _ref("Usage"),
            }
        ),
        "LocalLabBatchResponse": _object(
            {
                "responses": {
                    "type": "array",
                    "items": _STRING,
                    "description": "One text per prompt, in order",
                },
                "model": _STRING,
                "usage": _ref("Usage"),
            }
        ),
        "LocalLabModelList": _object(
            {
                "models": {
                    "type": "array",
                    "items": _object(
                        {
                            "id": _STRING,
                            "name": _STRING,
                            "can_load": _BOOL,
                            "description": _NULLABLE_STRING,
                            "is_loaded": _BOOL,
                        }
                    ),
                },
                "current_model": _NULLABLE_STRING,
            }
        ),
        "LocalLabCurrentModel": _object(
            {
                "id": _STRING,
                "name": _STRING,
                "description": _NULLABLE_STRING,
                "is_loaded": _BOOL,
                "loading_progress": {"type": "number", "minimum": 0, "maximum": 1},
            }
        ),
        "LocalLabLoadResult": _object(
            {
                "status": {"const": "success"},
                "message": _STRING,
                "model_id": _STRING,
                "load_seconds": _NUMBER,
            }
        ),
        "LocalLabUnloadResult": _object(
            {
                "status": {
                    "const": UNLOADED_STATUS,
                    "description": "The same whether or not a model was loaded: LocalLab's "
                    "client reads it as success",
                },
                "message": _STRING,
                "model_id": _NULLABLE_STRING,
                "unloaded": _BOOL,
            }
        ),
        "LocalLabSystemInfo": _object(
            {
                "cpu_usage": {"type": "number", "description": "Percent"},
                "memory_usage": {"type": "number", "description": "Percent of the machine's"},
                "gpu_info": {
                    "anyOf": [
                        {"type": "array", "items": _ref("ComputeDevice"), "minItems": 1},
                        {"type": "null"},
                    ]
                },
                "active_model": _NULLABLE_STRING,
                "uptime": _NUMBER,
                "request_count": _INT,
            }
        ),
        "LocalLabHealth": _object({"status": {"const": "healthy"}}),
    }


# --- operations ---------------------------------------------------------------------------------

# No schema: OpenAPI 3.1 cannot describe the events of a stream (3.2's itemSchema can), and a
# plain string schema would be read by validators as the shape of every event.
_SSE: dict[str, Any] = {"text/event-stream": {}}


def _json(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(name)}}


class _Operations:
    """Builds operations with the error answers this configuration can give."""

    def __init__(self, settings: Settings) -> None:
        self.auth = bool(keys_configured(settings))
        self.rate_limited = settings.rate_limit is not None

    def errors(
        self, error_schema: str, statuses: dict[int, str], *, public: bool, rate_limited: bool
    ) -> Schema:
        answers = dict(statuses)
        answers[403] = "The Host or the browser Origin is not allowed"
        if self.auth and not public:
            answers[401] = "A valid API key is missing (code `unauthorized`)"
        if self.rate_limited and rate_limited:
            answers[429] = "Too many requests (code `rate_limited`); see Retry-After"
        responses: Schema = {
            str(status): {"description": text, "content": _json(error_schema)}
            for status, text in sorted(answers.items())
        }
        responses["default"] = {"description": "Any other error", "content": _json(error_schema)}
        return responses

    def operation(
        self,
        summary: str,
        ok: Schema,
        *,
        errors: dict[int, str],
        openai: bool = False,
        body: str | None = None,
        body_required: bool = True,
        params: list[Schema] | None = None,
        public: bool = False,
        rate_limited: bool = True,
    ) -> Schema:
        """``public``: no API key needed (``security.PUBLIC_PATHS``); ``rate_limited``: false
        for the paths the rate limiter lets through (health checks, the chat page)."""
        error_schema = "OpenAIError" if openai else "NativeError"
        responses = self.errors(error_schema, errors, public=public, rate_limited=rate_limited)
        operation: Schema = {"summary": summary, "responses": {"200": ok, **responses}}
        if params:
            operation["parameters"] = params
        if body is not None:
            operation["requestBody"] = {"required": body_required, "content": _json(body)}
        if public and self.auth:
            operation["security"] = []
        return operation


_BAD_REQUEST = {400: "The request is invalid (code `invalid_request` and others)"}
_MODEL_ERRORS = {
    404: "No such model (code `model_not_found`)",
    413: "The body is too large (code `payload_too_large`)",
    422: "The model file cannot be loaded (code `model_unusable`)",
    503: "Busy or loading (codes `server_busy`, `model_loading`); see Retry-After",
}


def _path_param(name: str) -> Schema:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def _ok(description: str, content: dict[str, Any]) -> Schema:
    return {"description": description, "content": content}


def _paths(settings: Settings) -> dict[str, Schema]:
    ops = _Operations(settings)
    generation_errors = {**_BAD_REQUEST, **_MODEL_ERRORS}
    return {
        "/api/generate": {
            "post": ops.operation(
                "Generate text from a prompt or messages",
                _ok(
                    "The generation, or its stream of events", {**_json("GenerateResponse"), **_SSE}
                ),
                errors=generation_errors,
                body="GenerateRequest",
            )
        },
        "/api/generate/batch": {
            "post": ops.operation(
                "Generate for several prompts at once",
                _ok("One answer per prompt, in order", _json("BatchResponse")),
                errors=generation_errors,
                body="BatchRequest",
            )
        },
        "/api/system": {
            "get": ops.operation(
                "Machine, build, GPU and model facts",
                _ok("System facts", _json("SystemInfo")),
                errors={},
            )
        },
        "/api/models": {
            "get": ops.operation(
                "List the models found", _ok("The models", _json("ModelList")), errors={}
            )
        },
        "/api/health": {
            "get": ops.operation(
                "Health and resource usage",
                _ok("The server is up", _json("Health")),
                errors={},
                public=True,
                rate_limited=False,
            )
        },
        "/api/models/loaded": {
            "get": ops.operation(
                "Models in memory", _ok("Loaded models", _json("LoadedModels")), errors={}
            )
        },
        "/api/models/discover": {
            "post": ops.operation(
                "Search the model folders again", _ok("The models", _json("ModelList")), errors={}
            )
        },
        "/api/models/{id}/load": {
            "post": ops.operation(
                "Load a model into memory",
                _ok("The model is loaded", _json("LoadResult")),
                errors={**generation_errors, 507: "Not enough memory"},
                body="LoadRequest",
                body_required=False,
                params=[_path_param("id")],
            )
        },
        "/api/models/{id}/unload": {
            "post": ops.operation(
                "Unload a model",
                _ok("Done (unloaded is false when it was not loaded)", _json("UnloadResult")),
                errors={**_BAD_REQUEST, **_MODEL_ERRORS},
                params=[_path_param("id")],
            )
        },
        "/api/models/{id}": {
            "delete": ops.operation(
                "Delete a model's files from shimmy's own models folder",
                _ok("The files removed", _json("DeleteResult")),
                errors={**_BAD_REQUEST, 404: "No such model", 403: "Not shimmy's own file"},
                params=[_path_param("id")],
            )
        },
        "/api/pull": {
            "post": ops.operation(
                "Download a model",
                _ok(
                    "Progress events (NDJSON), or the last event when stream is false",
                    {
                        "application/x-ndjson": {"schema": {"type": "string"}},
                        **_json("PullEvent"),
                    },
                ),
                errors={
                    **_BAD_REQUEST,
                    403: "The source is refused (code `forbidden`)",
                    404: "No such file at the source (code `not_found`)",
                    409: "A different file of that name exists (code `already_exists`)",
                    422: "The download is not a usable model (code `model_unusable`)",
                    502: "The download failed (codes `download_failed`, `download_corrupt`, "
                    "`offline`)",
                    507: "Not enough disk space (code `insufficient_storage`)",
                },
                body="PullRequest",
            )
        },
        "/v1/chat/completions": {
            "post": ops.operation(
                "Chat completion (OpenAI)",
                _ok("The completion, or its chunks", {**_json("ChatCompletion"), **_SSE}),
                errors=generation_errors,
                openai=True,
                body="ChatCompletionRequest",
            )
        },
        "/v1/completions": {
            "post": ops.operation(
                "Text completion (OpenAI, legacy)",
                _ok("The completion, or its chunks", {**_json("TextCompletion"), **_SSE}),
                errors=generation_errors,
                openai=True,
                body="CompletionRequest",
            )
        },
        "/v1/embeddings": {
            "post": ops.operation(
                "Embeddings (OpenAI)",
                _ok("One vector per input", _json("EmbeddingList")),
                errors=generation_errors,
                openai=True,
                body="EmbeddingRequest",
            )
        },
        "/v1/models": {
            "get": ops.operation(
                "List usable models (OpenAI)",
                _ok("The models", _json("OpenAIModelList")),
                errors={},
                openai=True,
            )
        },
        "/v1/models/{model_id}": {
            "get": ops.operation(
                "One model (OpenAI)",
                _ok("The model", _json("OpenAIModel")),
                errors={404: "No such model", 422: "The model file cannot be loaded"},
                openai=True,
                params=[_path_param("model_id")],
            )
        },
        "/openapi.json": {
            "get": ops.operation(
                "This description",
                _ok("OpenAPI 3.1", {"application/json": {"schema": {"type": "object"}}}),
                errors={},
                public=True,
            )
        },
        "/metrics": {
            "get": ops.operation(
                "Prometheus metrics",
                _ok(
                    "The text exposition format, or OpenMetrics when the Accept header asks "
                    "for application/openmetrics-text",
                    {
                        "text/plain": {"schema": _STRING},
                        "application/openmetrics-text": {"schema": _STRING},
                    },
                ),
                errors={},
            )
        },
        **_locallab_paths(ops),
        **(_page_paths(ops) if settings.web_ui else {}),
    }


def _locallab_paths(ops: _Operations) -> dict[str, Schema]:
    generation_errors = {**_BAD_REQUEST, **_MODEL_ERRORS}
    return {
        "/generate": {
            "post": ops.operation(
                "Generate text from a prompt (LocalLab)",
                _ok(
                    "The text, or its stream of events",
                    {**_json("LocalLabGenerateResponse"), **_SSE},
                ),
                errors=generation_errors,
                body="LocalLabGenerateRequest",
            )
        },
        "/chat": {
            "post": ops.operation(
                "Chat completion (LocalLab)",
                _ok(
                    "The answer, or its stream of chunks", {**_json("LocalLabChatResponse"), **_SSE}
                ),
                errors=generation_errors,
                body="LocalLabChatRequest",
            )
        },
        "/generate/batch": {
            "post": ops.operation(
                "Generate for several prompts at once (LocalLab)",
                _ok("One text per prompt, in order", _json("LocalLabBatchResponse")),
                errors=generation_errors,
                body="LocalLabBatchRequest",
            )
        },
        "/models/available": {
            "get": ops.operation(
                "List the models found (LocalLab)",
                _ok("The models", _json("LocalLabModelList")),
                errors={},
            )
        },
        "/models/current": {
            "get": ops.operation(
                "The current model (LocalLab)",
                _ok("The model", _json("LocalLabCurrentModel")),
                errors={404: "No model is current (code `not_found`)"},
            )
        },
        "/models/load": {
            "post": ops.operation(
                "Load a model and make it the current one (LocalLab)",
                _ok("The model is loaded", _json("LocalLabLoadResult")),
                errors={**generation_errors, 507: "Not enough memory"},
                body="LocalLabLoadRequest",
            )
        },
        "/models/unload": {
            "post": ops.operation(
                "Unload the current model (LocalLab)",
                _ok(
                    "Done (unloaded is false when no model was loaded)",
                    _json("LocalLabUnloadResult"),
                ),
                errors={},
            )
        },
        "/system/info": {
            "get": ops.operation(
                "Machine load and the current model (LocalLab)",
                _ok("System facts", _json("LocalLabSystemInfo")),
                errors={},
            )
        },
        "/health": {
            "get": ops.operation(
                "Health (LocalLab)",
                _ok("The server is up", _json("LocalLabHealth")),
                errors={},
                public=True,
                rate_limited=False,
            )
        },
    }


def _page_paths(ops: _Operations) -> dict[str, Schema]:
    page = ops.operation(
        "The chat page",
        _ok("The page", {"text/html": {"schema": _STRING}}),
        errors={},
        params=[
            {
                "name": "If-None-Match",
                "in": "header",
                "required": False,
                "schema": _STRING,
                "description": "The ETag of a copy already held",
            }
        ],
        public=True,
        rate_limited=False,
    )
    page["description"] = "Its scripts, styles and icon are served under /ui/ (not listed)."
    page["responses"]["304"] = {"description": "The held copy is current (If-None-Match)"}
    return {"/": {"get": page}}


def build_openapi(settings: Settings) -> Schema:
    document: Schema = {
        "openapi": "3.1.0",
        "info": {"title": "shimmy", "version": __version__, "description": DESCRIPTION},
        "paths": _paths(settings),
        "components": {"schemas": {**request_schemas(), **response_schemas()}},
    }
    if keys_configured(settings):
        document["components"]["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer"},
            "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-Api-Key"},
        }
        document["security"] = [{"bearer": []}, {"apiKeyHeader": []}]
    return document


async def openapi_json(request: Request) -> Response:
    return JSONResponse(build_openapi(request.app.state.settings))


routes: list[BaseRoute] = [Route("/openapi.json", openapi_json, methods=["GET"])]
