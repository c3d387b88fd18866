"""Grammars for structured output and the recovery of tool calls from model text.

Grammars are checked by llama.cpp itself: a probe feeds a text token by token through
llama.cpp's grammar sampler (with the tiny model's byte-level vocabulary) and reports whether
every token, and then end-of-text, is allowed.
"""

from __future__ import annotations

import ctypes
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shimmy.engine.llama import LlamaModel
from shimmy.errors import InvalidRequest
from shimmy.serving.structured import (
    ToolCallStreamFilter,
    ToolSpec,
    extract_tool_calls,
    json_instruction,
    json_object_grammar,
    json_schema_grammar,
    tool_call_grammar,
    tools_instruction,
)


class GrammarProbe:
    def __init__(self, model: LlamaModel) -> None:
        self.model = model
        self.eos = int(llama_cpp.llama_vocab_eos(model.vocab))

    def parses(self, grammar: str) -> bool:
        sampler = llama_cpp.llama_sampler_init_grammar(self.model.vocab, grammar.encode(), b"root")
        if not sampler:
            return False
        llama_cpp.llama_sampler_free(sampler)
        return True

    def _allowed(self, sampler: Any, token: int) -> bool:
        data = (llama_cpp.llama_token_data * 1)(llama_cpp.llama_token_data(token, 0.0, 0.0))
        candidates = llama_cpp.llama_token_data_array(data, 1, -1, False)
        llama_cpp.llama_sampler_apply(sampler, ctypes.byref(candidates))
        return not math.isinf(data[0].logit)

    def accepts(self, grammar: str, text: str) -> bool:
        """Whether the grammar generates exactly ``text`` (and may then end)."""
        sampler = llama_cpp.llama_sampler_init_grammar(self.model.vocab, grammar.encode(), b"root")
        assert sampler, "the grammar does not parse"
        try:
            for token in self.model.tokenize(text, add_special=False):
                if not self._allowed(sampler, token):
                    return False
                llama_cpp.llama_sampler_accept(sampler, token)
            return self._allowed(sampler, self.eos)
        finally:
            llama_cpp.llama_sampler_free(sampler)


@pytest.fixture(scope="module")
def probe(tiny_model_path: Path) -> Iterator[GrammarProbe]:
    model = LlamaModel(tiny_model_path, n_gpu_layers=0)
    try:
        yield GrammarProbe(model)
    finally:
        model.close()


# --- json_object ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "{}",
        "{ }",
        '{"a": 1}',
        '{"a": [1, -2.5e3, {"b": null}], "c": "x\\n\\u00e9", "d": true}',
        '{\n  "name": "Zoë",\n  "list": []\n}',
    ],
)
def test_json_object_grammar_accepts_json_objects(probe: GrammarProbe, text: str) -> None:
    json.loads(text)  # the examples themselves are valid JSON
    assert probe.accepts(json_object_grammar(), text)


@pytest.mark.parametrize(
    "text",
    [
        "[1, 2]",  # not an object
        '"text"',
        '{"a": 1} trailing',
        '{"a": "raw\ncontrol character"}',
        '{"a": 01}',
        "{'a': 1}",
        '{"a": 1,}',
        '{"a" 1}',
    ],
)
def test_json_object_grammar_rejects_everything_else(probe: GrammarProbe, text: str) -> None:
    assert not probe.accepts(json_object_grammar(), text)


def test_json_object_grammar_bounds_nesting(probe: GrammarProbe) -> None:
    grammar = json_object_grammar(max_depth=2)
    assert not probe.accepts(grammar, '{"a": {"b": [1]}}')  # the list is a third level
    assert probe.accepts(grammar, '{"a": {"b": 1}, "c": [2]}')
    assert not probe.accepts(grammar, '{"a": {"b": {"c": 1}}}')


# --- json_schema ------------------------------------------------------------------------------

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer"},
        "kind": {"enum": ["cat", "dog"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
        "alive": {"type": "boolean"},
    },
    "required": ["name", "age", "kind"],
}


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "Rex", "age": 3, "kind": "dog"}',
        '{"name": "Tom", "age": -1, "kind": "cat", "tags": ["a", "b"], "alive": false}',
        '{"name": "", "age": 0, "kind": "cat", "alive": true}',
    ],
)
def test_schema_grammar_accepts_matching_documents(probe: GrammarProbe, text: str) -> None:
    assert probe.accepts(json_schema_grammar(PERSON), text)


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "Rex", "age": 3}',  # a required property is missing
        '{"name": "Rex", "age": 3, "kind": "cow"}',  # not in the enum
        '{"name": "Rex", "age": "3", "kind": "dog"}',  # wrong type
        '{"name": "Rex", "age": 3.5, "kind": "dog"}',  # not an integer
        '{"name": "Rex", "age": 3, "kind": "dog", "owner": "Al"}',  # unknown property
        '{"name": "Rex", "age": 3, "kind": "dog", "tags": ["a", "b", "c"]}',  # too many items
        '{"name": "' + "x" * 21 + '", "age": 3, "kind": "dog"}',  # too long
        '{"name": "R\tx", "age": 3, "kind": "dog"}',  # raw control character
    ],
)
def test_schema_grammar_rejects_violations(probe: GrammarProbe, text: str) -> None:
    assert not probe.accepts(json_schema_grammar(PERSON), text)


def test_schema_grammar_resolves_local_refs(probe: GrammarProbe) -> None:
    schema = {
        "$defs": {
            "Point": {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}
        },
        "type": "object",
        "properties": {"start": {"$ref": "#/$defs/Point"}, "end": {"$ref": "#/$defs/Point"}},
        "required": ["start", "end"],
    }
    original = json.dumps(schema)
    grammar = json_schema_grammar(schema)
    assert json.dumps(schema) == original  # the caller's schema is not rewritten
    assert probe.accepts(grammar, '{"start": {"x": 1}, "end": {"x": 2.5}}')
    assert not probe.accepts(grammar, '{"start": {"x": 1}, "end": {"y": 2}}')


@pytest.mark.parametrize(
    "schema",
    [
        "not a schema",
        {"type": "objekt"},
        {"type": "object", "properties": ["a"]},
        {"type": "object", "properties": {"a": 5}},
        {"type": "object", "required": "a"},
        {"type": "array", "items": {"type": "strin"}},
        {"type": "string", "maxLength": -1},
        {"anyOf": []},
        {"enum": []},
        {"$ref": "https://example.com/schema.json"},
        {"$ref": "#/$defs/Missing"},
    ],
)
def test_malformed_schemas_are_invalid_requests(schema: Any) -> None:
    with pytest.raises(InvalidRequest) as caught:
        json_schema_grammar(schema)
    assert caught.value.param == "response_format"
    assert caught.value.status == 400


def test_every_generated_grammar_is_accepted_by_llama_cpp(probe: GrammarProbe) -> None:
    assert probe.parses(json_object_grammar())
    assert probe.parses(json_schema_grammar(PERSON))
    assert probe.parses(json_schema_grammar({"type": "object"}))
    assert probe.parses(json_schema_grammar({"type": "array", "items": {"type": "number"}}))
    assert not probe.parses("root ::= undefined-rule")  # the probe can tell


# --- tool-call grammar ------------------------------------------------------------------------

WEATHER = ToolSpec(
    "get_weather",
    "Current weather of a city",
    {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"],
    },
)
NO_ARGS = ToolSpec("get_time", None, {})


def test_tool_grammar_accepts_exactly_calls_of_the_allowed_tools(probe: GrammarProbe) -> None:
    grammar = tool_call_grammar([WEATHER, NO_ARGS])
    assert probe.accepts(
        grammar, '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}'
    )
    assert probe.accepts(grammar, '{"name": "get_time", "arguments": {}}')
    assert not probe.accepts(grammar, '{"name": "get_weather", "arguments": {"city": "Oslo"}}')
    assert not probe.accepts(grammar, '{"name": "launch", "arguments": {}}')
    assert not probe.accepts(grammar, '{"arguments": {}, "name": "get_time"}')
    assert not probe.accepts(grammar, "Sure! Let me check.")


def test_tool_grammar_for_one_named_tool(probe: GrammarProbe) -> None:
    grammar = tool_call_grammar([NO_ARGS])
    assert probe.accepts(grammar, '{"name": "get_time", "arguments": {}}')
    assert not probe.accepts(
        grammar, '{"name": "get_weather", "arguments": {"city": "x", "unit": "c"}}'
    )


def test_each_tools_refs_resolve_in_its_own_schema(probe: GrammarProbe) -> None:
    def tool(name: str, values: list[str]) -> ToolSpec:
        return ToolSpec(
            name,
            None,
            {
                "$defs": {"Choice": {"enum": values}},
                "type": "object",
                "properties": {"pick": {"$ref": "#/$defs/Choice"}},
                "required": ["pick"],
            },
        )

    grammar = tool_call_grammar([tool("first", ["a"]), tool("second", ["b"])])
    assert probe.accepts(grammar, '{"name": "first", "arguments": {"pick": "a"}}')
    assert probe.accepts(grammar, '{"name": "second", "arguments": {"pick": "b"}}')
    assert not probe.accepts(grammar, '{"name": "first", "arguments": {"pick": "b"}}')


def test_tool_with_malformed_parameters_is_an_invalid_request() -> None:
    with pytest.raises(InvalidRequest) as caught:
        tool_call_grammar([ToolSpec("bad", None, {"type": "object", "properties": 3})])
    assert caught.value.param == "tools"


# --- tool calls in free text ------------------------------------------------------------------

NAMES = ["get_weather", "get_time"]
CALL = {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}


@pytest.mark.parametrize(
    "text",
    [
        json.dumps(CALL),
        "  " + json.dumps(CALL, indent=2) + "\n",
        "<tool_call>\n" + json.dumps(CALL) + "\n</tool_call>",
        "```json\n" + json.dumps(CALL) + "\n```",
        json.dumps({**CALL, "arguments": json.dumps(CALL["arguments"])}),  # arguments as text
        json.dumps({"name": "get_weather", "parameters": CALL["arguments"]}),  # Llama 3 style
        json.dumps({"type": "function", "function": CALL}),
    ],
)
def test_a_reply_that_is_a_call_is_recognised(text: str) -> None:
    content, calls = extract_tool_calls(text, NAMES)
    assert content is None
    assert len(calls) == 1
    assert calls[0].name == "get_weather"
    assert json.loads(calls[0].arguments) == CALL["arguments"]


def test_prose_around_a_call_is_kept_as_content() -> None:
    text = "Let me look that up.\n<tool_call>" + json.dumps(CALL) + "</tool_call>"
    content, calls = extract_tool_calls(text, NAMES)
    assert content == "Let me look that up."
    assert [c.name for c in calls] == ["get_weather"]


def test_several_calls_are_returned_in_order() -> None:
    time_call = {"name": "get_time", "arguments": {}}
    for text in (
        json.dumps([CALL, time_call]),
        f"<tool_call>{json.dumps(time_call)}</tool_call>\n<tool_call>{json.dumps(CALL)}</tool_call>",
    ):
        content, calls = extract_tool_calls(text, NAMES)
        assert content is None
        assert sorted(c.name for c in calls) == ["get_time", "get_weather"]
    _, calls = extract_tool_calls(json.dumps([time_call, CALL]), NAMES)
    assert [c.name for c in calls] == ["get_time", "get_weather"]


@pytest.mark.parametrize(
    "text",
    [
        "The weather in Oslo is mild.",
        json.dumps({"name": "launch_missiles", "arguments": {}}),  # not an offered tool
        json.dumps({"name": "get_weather"}),  # no arguments
        json.dumps({"name": "get_weather", "arguments": "not json"}),
        json.dumps({"city": "Oslo"}),  # JSON, but not a call
        '{"name": "get_weather", "arguments": {"city": ',  # cut off
        json.dumps([CALL, {"name": "unknown", "arguments": {}}]),  # a list with a non-call
        # a model repeating the tool definitions it was shown is not calling anything
        json.dumps({"name": "get_weather", "description": "x", "parameters": WEATHER.parameters}),
        json.dumps({"name": "get_weather", "parameters": WEATHER.parameters}),
        json.dumps({"type": "function", "function": {"name": "get_time", "description": "y"}}),
    ],
)
def test_text_without_a_valid_call_is_left_alone(text: str) -> None:
    content, calls = extract_tool_calls(text, NAMES)
    assert calls == []
    assert content == text


# --- streaming filter -------------------------------------------------------------------------


def feed_in_pieces(filt: ToolCallStreamFilter, text: str, size: int) -> list[str]:
    return [filt.feed(text[i : i + size]) for i in range(0, len(text), size)]


def test_plain_text_streams_through_at_once() -> None:
    filt = ToolCallStreamFilter(NAMES)
    assert filt.feed("Hello") == "Hello"
    assert filt.feed(", world.") == ", world."
    assert filt.finish() == ("", [])


def test_a_call_after_prose_is_held_back_and_parsed() -> None:
    filt = ToolCallStreamFilter(NAMES)
    text = "Checking now. <tool_call>" + json.dumps(CALL) + "</tool_call>"
    sent = "".join(feed_in_pieces(filt, text, 3))
    assert sent == "Checking now. "
    rest, calls = filt.finish()
    assert rest == ""
    assert [c.name for c in calls] == ["get_weather"]


def test_a_reply_that_opens_with_a_call_sends_no_content() -> None:
    filt = ToolCallStreamFilter(NAMES)
    sent = "".join(feed_in_pieces(filt, "\n" + json.dumps(CALL), 1))
    assert sent == ""
    rest, calls = filt.finish()
    assert rest == ""
    assert len(calls) == 1


def test_a_partial_marker_waits_until_it_is_decided() -> None:
    filt = ToolCallStreamFilter(NAMES)
    assert filt.feed("see <tool") == "see "
    assert filt.feed("tip> here") == "<tooltip> here"


def test_held_text_that_is_not_a_call_is_released_at_the_end() -> None:
    filt = ToolCallStreamFilter(NAMES)
    assert filt.feed("A set: ") == "A set: "
    assert filt.feed("{1, 2}") == ""
    assert filt.finish() == ("{1, 2}", [])


@given(st.text(alphabet='ab{}[]<>`tool_call \n"', max_size=60), st.integers(1, 7))
def test_without_calls_the_streamed_text_is_the_whole_reply(text: str, size: int) -> None:
    filt = ToolCallStreamFilter(NAMES)
    sent = "".join(feed_in_pieces(filt, text, size))
    rest, calls = filt.finish()
    assert calls == []
    assert sent + rest == text


# --- instructions -----------------------------------------------------------------------------


def test_instructions_describe_tools_and_schemas() -> None:
    note = tools_instruction([WEATHER, NO_ARGS], forced=None, required=False)
    assert "get_weather" in note and "get_time" in note and '"arguments"' in note
    assert "get_time" in tools_instruction([NO_ARGS], forced="get_time", required=True)
    assert "JSON" in json_instruction(None)
    assert '"maxLength": 20' in json_instruction(PERSON)


def test_a_list_of_calls_is_recognised_only_at_the_start() -> None:
    filt = ToolCallStreamFilter(NAMES)
    assert filt.feed(" [" + json.dumps(CALL)) == ""
    assert filt.feed("]") == ""
    rest, calls = filt.finish()
    assert (rest, [c.name for c in calls]) == ("", ["get_weather"])
    filt = ToolCallStreamFilter(NAMES)
    assert filt.feed("See [1] and [2].") == "See [1] and [2]."
