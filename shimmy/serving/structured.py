"""Structured output for every dialect: GBNF grammars for JSON, JSON schemas and tool calls,
and recovery of tool calls from free text.

Grammars are handed to the engine as ``SamplingParams.grammar``; llama.cpp's grammar sampler
then masks every token that would leave the language, so the reply parses by construction (as
long as it is not cut off by ``max_tokens``).

Schemas are converted with llama-cpp-python's ``SchemaConverter`` (the port of llama.cpp's own
json-schema-to-grammar), adjusted in one place: its string characters allow raw control
characters, which strict JSON parsers (Python's ``json`` included) reject, so ours do not.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from llama_cpp.llama_grammar import BuiltinRule, SchemaConverter

from shimmy.errors import InvalidRequest

# JSON deeper than this is not producible by the json_object grammar. Real answers are far
# shallower; the bound keeps a badly-behaved model from nesting until it runs out of tokens.
JSON_MAX_DEPTH = 12
# Grammars are parsed by llama.cpp for every request; a schema that expands into a huge grammar
# is refused rather than slowing down the worker thread.
MAX_GRAMMAR_CHARS = 256_000
MAX_SCHEMA_DEPTH = 64

# A JSON string character: anything but a quote, a backslash or a control character, or an
# escape. ``\x7F`` (DEL) is legal JSON but excluded like llama.cpp's own JSON grammar does.
_STRICT_CHAR = (
    r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] '
    r"[0-9a-fA-F])"
)

_JSON_SCALARS = rf"""
string ::= "\"" char* "\""
char ::= {_STRICT_CHAR}
number ::= "-"? ("0" | [1-9] [0-9]{{0,15}}) ("." [0-9]{{1,16}})? ([eE] [-+]? [0-9]{{1,3}})?
literal ::= "true" | "false" | "null"
ws ::= | " " | "\n" [ \t]{{0,20}}
"""

_INVALID_RULE_CHARS = re.compile(r"[^a-zA-Z0-9-]+")

_SCHEMA_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}


def json_object_grammar(max_depth: int = JSON_MAX_DEPTH) -> str:
    """GBNF for one JSON object (any keys and values), nested at most ``max_depth`` levels.

    There is no whitespace after the closing brace, so the model must end its reply there.
    """
    lines = ["root ::= object0"]
    for depth in range(max_depth):
        inner = f"value{depth + 1}"
        lines.append(
            f'object{depth} ::= "{{" ws ( string ws ":" ws {inner} ws '
            f'( "," ws string ws ":" ws {inner} ws )* )? "}}"'
        )
        lines.append(f'array{depth} ::= "[" ws ( {inner} ws ( "," ws {inner} ws )* )? "]"')
        lines.append(f"value{depth} ::= object{depth} | array{depth} | string | number | literal")
    lines.append(f"value{max_depth} ::= string | number | literal")
    return "\n".join(lines) + "\n" + _JSON_SCALARS


class _StrictStringConverter(SchemaConverter):
    """``SchemaConverter`` whose strings cannot contain raw control characters."""

    def __init__(self) -> None:
        super().__init__(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)

    def _add_primitive(self, name: str, rule: BuiltinRule) -> str:
        if name == "char":
            rule = BuiltinRule(_STRICT_CHAR, [])
        return str(super()._add_primitive(name, rule))

    def _resolve_ref(self, ref: str) -> str:
        # Upstream names a reference's rule after its last segment only, so two tools that
        # both define "#/$defs/Choice" would share one rule; the whole reference (which
        # ``resolve_refs`` prefixed with a per-schema name) is unique.
        name = "ref-" + _INVALID_RULE_CHARS.sub("-", ref)
        if name not in self._rules and ref not in self._refs_being_resolved:
            self._refs_being_resolved.add(ref)
            name = str(self.visit(self._refs[ref], name))
            self._refs_being_resolved.remove(ref)
        return name


def _schema_problem(path: str, problem: str) -> InvalidRequest:
    where = path or "the schema's root"
    return InvalidRequest(f"invalid JSON schema at {where}: {problem}", param="response_format")


def validate_schema(schema: Any, path: str = "", depth: int = 0) -> None:
    """Check the structure of a JSON schema well enough that conversion cannot misread it.

    This is not a full meta-schema validation: it checks the keywords the grammar converter
    acts on, so that a malformed schema is a clear 400 instead of a confusing grammar.
    """
    if depth > MAX_SCHEMA_DEPTH:
        raise _schema_problem(path, f"nested deeper than {MAX_SCHEMA_DEPTH} levels")
    if not isinstance(schema, dict):
        raise _schema_problem(path, "a schema must be a JSON object")
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind is not None else []
    for one in kinds:
        if one not in _SCHEMA_TYPES:
            raise _schema_problem(path, f"unknown type {one!r}")
    if "properties" in schema:
        properties = schema["properties"]
        if not isinstance(properties, dict):
            raise _schema_problem(path, "'properties' must be an object")
        for name, sub in properties.items():
            validate_schema(sub, f"{path}/properties/{name}", depth + 1)
    if "required" in schema and not (
        isinstance(schema["required"], list) and all(isinstance(r, str) for r in schema["required"])
    ):
        raise _schema_problem(path, "'required' must be a list of strings")
    additional = schema.get("additionalProperties")
    if isinstance(additional, dict):
        validate_schema(additional, f"{path}/additionalProperties", depth + 1)
    elif additional is not None and not isinstance(additional, bool):
        raise _schema_problem(path, "'additionalProperties' must be a boolean or a schema")
    if "items" in schema:
        items = schema["items"]
        subs = items if isinstance(items, list) else [items]
        for i, sub in enumerate(subs):
            validate_schema(sub, f"{path}/items/{i}", depth + 1)
    for keyword in ("anyOf", "oneOf", "allOf", "prefixItems"):
        if keyword in schema:
            options = schema[keyword]
            if not isinstance(options, list) or not options:
                raise _schema_problem(path, f"'{keyword}' must be a non-empty list of schemas")
            for i, sub in enumerate(options):
                validate_schema(sub, f"{path}/{keyword}/{i}", depth + 1)
    if "enum" in schema and not (isinstance(schema["enum"], list) and schema["enum"]):
        raise _schema_problem(path, "'enum' must be a non-empty list")
    for keyword in ("minLength", "maxLength", "minItems", "maxItems"):
        if keyword in schema and not (
            isinstance(schema[keyword], int)
            and not isinstance(schema[keyword], bool)
            and schema[keyword] >= 0
        ):
            raise _schema_problem(path, f"'{keyword}' must be a non-negative integer")
    if "pattern" in schema and not isinstance(schema["pattern"], str):
        raise _schema_problem(path, "'pattern' must be a string")
    for keyword in ("$defs", "definitions"):
        if keyword in schema:
            defs = schema[keyword]
            if not isinstance(defs, dict):
                raise _schema_problem(path, f"'{keyword}' must be an object")
            for name, sub in defs.items():
                validate_schema(sub, f"{path}/{keyword}/{name}", depth + 1)
    ref = schema.get("$ref")
    if ref is not None and not (isinstance(ref, str) and ref.startswith("#/")):
        raise _schema_problem(path, "only local '$ref's (starting with '#/') are supported")


def _finish_grammar(converter: _StrictStringConverter, param: str) -> str:
    grammar = str(converter.format_grammar())
    if len(grammar) > MAX_GRAMMAR_CHARS:
        raise InvalidRequest("the JSON schema is too large to enforce", param=param)
    return grammar


def _convert_failure(exc: Exception, param: str) -> InvalidRequest:
    # The converter reports problems with assertions and assorted exceptions; their text is
    # the most specific explanation there is.
    reason = str(exc) or type(exc).__name__
    return InvalidRequest(f"the JSON schema cannot be enforced: {reason[:300]}", param=param)


def json_schema_grammar(schema: Any) -> str:
    """GBNF that generates exactly the JSON documents matching ``schema``."""
    validate_schema(schema)
    converter = _StrictStringConverter()
    try:
        # The converter rewrites ``$ref``s in place; the caller's schema stays untouched.
        resolved = converter.resolve_refs(copy.deepcopy(schema), "schema")
        converter.visit(resolved, "")
    except Exception as exc:
        raise _convert_failure(exc, "response_format") from None
    return _finish_grammar(converter, "response_format")


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str | None
    parameters: dict[str, Any]


def tool_call_grammar(tools: Sequence[ToolSpec]) -> str:
    """GBNF for one ``{"name": ..., "arguments": {...}}`` object calling one of ``tools``,
    with the arguments matching that tool's parameter schema."""
    if not tools:
        raise InvalidRequest("no tool can be called", param="tool_choice")
    converter = _StrictStringConverter()
    alternatives: list[str] = []
    for index, tool in enumerate(tools):
        parameters = tool.parameters or {"type": "object", "properties": {}}
        try:
            validate_schema(parameters, f"tools/{index}/function/parameters")
        except InvalidRequest as exc:
            raise exc.copy_with(param="tools") from None
        call_schema: dict[str, Any] = {
            "type": "object",
            "properties": {"name": {"const": tool.name}, "arguments": parameters},
            "required": ["name", "arguments"],
        }
        try:
            # Each tool's local ``$ref``s are resolved against its own parameters schema.
            call_schema["properties"]["arguments"] = converter.resolve_refs(
                copy.deepcopy(parameters), f"tool{index}"
            )
            alternatives.append(converter.visit(call_schema, f"call{index}"))
        except Exception as exc:
            raise _convert_failure(exc, "tools") from None
    converter._add_rule("root", " | ".join(alternatives))
    return _finish_grammar(converter, "tools")


# --- tool calls in free text ------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedToolCall:
    name: str
    arguments: str  # a JSON object, as text (OpenAI's wire format)


def _as_call(value: Any, tool_names: Iterable[str]) -> ParsedToolCall | None:
    if not isinstance(value, dict):
        return None
    function = value.get("function")
    if isinstance(function, dict) and "name" in function:
        value = function  # {"type": "function", "function": {"name", "arguments"}}
    name = value.get("name")
    if not isinstance(name, str) or name not in tool_names or "description" in value:
        return None  # a call never carries a description: that is the tool's definition
    # Llama 3.x templates teach "parameters"; OpenAI's own format says "arguments".
    arguments = value.get("arguments", value.get("parameters"))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict) or _looks_like_schema(arguments):
        return None
    return ParsedToolCall(name=name, arguments=json.dumps(arguments, ensure_ascii=False))


def _looks_like_schema(arguments: dict[str, Any]) -> bool:
    # Small models like to repeat the tool definitions they were shown; arguments that are an
    # object schema are such an echo, not a call.
    return arguments.get("type") == "object" and isinstance(arguments.get("properties"), dict)


def _as_calls(value: Any, tool_names: set[str]) -> list[ParsedToolCall]:
    items = value if isinstance(value, list) else [value]
    calls = [_as_call(item, tool_names) for item in items]
    if not calls or any(call is None for call in calls):
        return []
    return [call for call in calls if call is not None]


_WRAPPERS = re.compile(r"</?tool_call>|```(?:json)?", re.IGNORECASE)


def extract_tool_calls(
    text: str, tool_names: Iterable[str]
) -> tuple[str | None, list[ParsedToolCall]]:
    """Find tool calls in a model's reply: bare JSON, ``<tool_call>`` tags or ```json fences.

    Returns the text left once the calls (and their wrappers) are removed, ``None`` when
    nothing but whitespace is left, and the calls in order. Without any call the text is
    returned unchanged.
    """
    names = set(tool_names)
    decoder = json.JSONDecoder()
    calls: list[ParsedToolCall] = []
    kept: list[str] = []
    position = 0
    scan = 0
    while True:
        start = _next_json_start(text, scan)
        if start < 0:
            break
        try:
            value, end = decoder.raw_decode(text, start)
        except ValueError:
            scan = start + 1
            continue
        found = _as_calls(value, names)
        if found:
            calls.extend(found)
            kept.append(text[position:start])
            position = end
        scan = end
    if not calls:
        return text, []
    kept.append(text[position:])
    rest = _WRAPPERS.sub("", "".join(kept)).strip()
    return (rest or None), calls


def _next_json_start(text: str, start: int) -> int:
    brace = text.find("{", start)
    bracket = text.find("[", start)
    found = [i for i in (brace, bracket) if i >= 0]
    return min(found) if found else -1


# Where a tool call may begin in streamed text. Text before the first of these is safe to send
# as content at once; from it on, the reply is held until the end and parsed.
_CALL_MARKERS = ("{", "<tool_call>", "```")


class ToolCallStreamFilter:
    """Streams content while holding back anything that may turn out to be a tool call."""

    def __init__(self, tool_names: Iterable[str]) -> None:
        self._names = set(tool_names)
        self._pending = ""  # not yet sent; may be the start of a marker
        self._held: str | None = None  # from the first marker on
        self._sent_any = False

    def feed(self, text: str) -> str:
        """Take generated text; return the part that can be sent as content now."""
        if self._held is not None:
            self._held += text
            return ""
        self._pending += text
        markers: tuple[str, ...] = _CALL_MARKERS
        if not self._sent_any and not self._pending.strip():
            return ""
        if not self._sent_any and self._pending.lstrip().startswith("["):
            markers = (*markers, "[")  # a reply that opens with a list may be a list of calls
        starts = [i for i in (self._pending.find(m) for m in markers) if i >= 0]
        if starts:
            cut = min(starts)
            out, self._held = self._pending[:cut], self._pending[cut:]
            self._pending = ""
            if not self._sent_any and not out.strip():
                # Whitespace before a call is not worth a content delta of its own.
                out, self._held = "", out + self._held
        else:
            keep = _partial_marker_suffix(self._pending)
            cut = len(self._pending) - keep
            out, self._pending = self._pending[:cut], self._pending[cut:]
        if out:
            self._sent_any = True
        return out

    def finish(self) -> tuple[str, list[ParsedToolCall]]:
        """The content still to send, and the tool calls found in the held-back text."""
        if self._held is None:
            rest, self._pending = self._pending, ""
            return rest, []
        rest_text, calls = extract_tool_calls(self._held, self._names)
        held, self._held = self._held, None
        if not calls:
            return held, []
        return rest_text or "", calls


def _partial_marker_suffix(text: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a marker."""
    best = 0
    for marker in _CALL_MARKERS:
        for size in range(1, len(marker)):
            if text.endswith(marker[:size]):
                best = max(best, size)
    return best


# --- instructions for the model -------------------------------------------------------------


def tools_instruction(tools: Sequence[ToolSpec], forced: str | None, required: bool) -> str:
    """A system note describing the tools, for chat templates that know nothing of tools."""
    # One compact line per tool (the list costs prompt tokens on every turn), written unlike
    # a call so that a model repeating it is not mistaken for calling.
    described = [
        f"- {tool.name}"
        + (f": {_sentence(tool.description)}" if tool.description else ".")
        + " Arguments (JSON schema): "
        + json.dumps(tool.parameters or {"type": "object", "properties": {}}, ensure_ascii=False)
        for tool in tools
    ]
    lines = [
        "You can call the following tools:",
        *described,
        "To call a tool, reply with only a JSON object of the form "
        '{"name": <tool name>, "arguments": {<argument name>: <value>, ...}} and nothing else.',
    ]
    if forced is not None:
        lines.append(f"You must call the tool {forced!r} now.")
    elif required:
        lines.append("You must call one of the tools now.")
    else:
        lines.append("If no tool is needed, answer normally.")
    return "\n".join(lines)


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "!", "?")) else text + "."


def json_instruction(schema: Any | None) -> str:
    if schema is None:
        return "Respond only with a valid JSON object."
    return "Respond only with a JSON object that conforms to this JSON schema:\n" + json.dumps(
        schema, ensure_ascii=False
    )
