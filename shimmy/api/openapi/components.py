"""The document's schemas: those of the request and response models the routes declare.

Request schemas are generated from the pydantic models that validate the requests, so they
cannot drift; the few places where a validator accepts more than the generated schema says
(durations for ``keep_alive``, the roles the chat layer knows) are patched here to say so, and
so are the notes on LocalLab's defaults. Response schemas are the response models' own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from shimmy.chat.messages import ROLES
from shimmy.serving.defaults import DEFAULTS, Dialect

Schema = dict[str, Any]
Mode = Literal["validation", "serialization"]

REF = "#/components/schemas/{model}"
# LocalLab's request models are named after their dialect, as its clients know them.
RENAMES = {
    "GenerateBody": "LocalLabGenerateRequest",
    "ChatBody": "LocalLabChatRequest",
    "BatchBody": "LocalLabBatchRequest",
    "LoadBody": "LocalLabLoadRequest",
}


def ref(name: str) -> Schema:
    return {"$ref": REF.format(model=name)}


def _renamed(name: str) -> str:
    return RENAMES.get(name, name)


def _renamed_refs(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            key: (
                REF.format(model=_renamed(value.rsplit("/", 1)[-1]))
                if key == "$ref" and isinstance(value, str)
                else _renamed_refs(value)
            )
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_renamed_refs(item) for item in node]
    return node


def model_schemas(
    requests: Iterable[type[BaseModel]], responses: Iterable[type[BaseModel]]
) -> tuple[dict[type[BaseModel], str], dict[str, Schema]]:
    """The component name of each model, and every component schema (nested models included).

    Requests are described as they are validated, responses as they are serialized.
    """
    keyed: list[tuple[type[BaseModel], Mode]] = [
        *dict.fromkeys((model, "validation") for model in requests),
        *dict.fromkeys((model, "serialization") for model in responses),
    ]
    refs, top = models_json_schema(keyed, ref_template=REF)
    schemas: dict[str, Schema] = {
        _renamed(name): _renamed_refs(schema) for name, schema in top.get("$defs", {}).items()
    }
    # pydantic qualifies a name shared by two models with their modules (or by -Input/-Output
    # for one model described both ways): clients would see those names, so refuse them.
    clashes = sorted(
        name for name in schemas if "__" in name or name.endswith(("-Input", "-Output"))
    )
    if clashes:
        raise ValueError(f"two models would share a schema name: {', '.join(clashes)}")
    names: dict[type[BaseModel], str] = {
        model: _renamed(str(schema["$ref"]).rsplit("/", 1)[-1])
        for (model, _), schema in refs.items()
        if isinstance(model, type) and issubclass(model, BaseModel)
    }
    for name, patch in PATCHES.items():
        if name in schemas:
            patch(schemas[name])
    return names, schemas


# --- what the validators accept beyond the field types ------------------------------------------

KEEP_ALIVE: Schema = {
    "anyOf": [
        {"type": "number"},
        {"type": "string", "pattern": r"^\s*-?\d+(\.\d+)?\s*(ms|s|m|h)?\s*$"},
        {"type": "null"},
    ],
    "title": "Keep Alive",
    "description": "Seconds (or a duration like '5m') the model stays loaded when idle; "
    "0 unloads at once, a negative value keeps it",
}


def _patch_keep_alive(schema: Schema) -> None:
    schema["properties"]["keep_alive"] = dict(KEEP_ALIVE)


def _patch_generate_fields(schema: Schema) -> None:
    properties = schema["properties"]
    _patch_keep_alive(schema)
    properties["stop"]["description"] = "Text is cut before the first stop string"
    properties["repetition_penalty"]["description"] = "Also accepted as 'repeat_penalty'"


def _patch_generate_request(schema: Schema) -> None:
    _patch_generate_fields(schema)
    schema["description"] = (
        "Exactly one of 'prompt', 'messages' and 'prefix' is required; 'suffix' (with 'prompt' "
        "or 'prefix') fills in the middle"
    )


_LOCALLAB_FIELD_NOTES = {
    "model_id": "Also accepted as 'model'. Default: the current model (the last one loaded "
    "through /models/load, else the most recently used, else the default model)",
    "max_length": "Also accepted as 'max_tokens' and 'max_new_tokens'. Default: the model's "
    "configured max_tokens, else the server's open_max_tokens (2048 unless configured)",
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


def _patch_locallab_batch(schema: Schema) -> None:
    _patch_locallab_options(schema)
    schema["properties"]["stream"]["description"] = "Ignored: a batch is answered in one piece"


def _patch_locallab_load(schema: Schema) -> None:
    schema["properties"]["model_id"]["description"] = (
        "The model to load; it becomes the current model"
    )


def _patch_chat_message(schema: Schema) -> None:
    # The chat layer refuses other roles before any template runs (shimmy.chat.messages).
    schema["properties"]["role"] = {"enum": list(ROLES), "title": "Role"}


PATCHES: dict[str, Callable[[Schema], None]] = {
    "GenerateRequest": _patch_generate_request,
    "BatchRequest": _patch_generate_fields,
    "LoadRequest": _patch_keep_alive,
    "LocalLabGenerateRequest": _patch_locallab_options,
    "LocalLabChatRequest": _patch_locallab_options,
    "LocalLabBatchRequest": _patch_locallab_batch,
    "LocalLabLoadRequest": _patch_locallab_load,
    "ChatMessage": _patch_chat_message,
}
