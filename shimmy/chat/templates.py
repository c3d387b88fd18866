"""Chat templates: turning a conversation into the prompt text a model was trained on.

Where the prompt format comes from, in order: an explicit override, the Jinja template stored in
the GGUF file (``tokenizer.chat_template``), a builtin format for a few architectures, and a
plain "User: ... / Assistant:" format for everything else.

A GGUF template is code written by whoever made the file. CVE-2024-34359 was exactly such a
template escaping a non-sandboxed Jinja environment, so templates here are rendered in Jinja's
immutable sandbox, and, because the sandbox stops escapes but not exhaustion, every render also
runs under a budget: a deadline, a step count, a cap on each value's size and one on what the
template's variables hold at once. The budget is enforced from inside the render (sandbox hooks,
a code generator that routes string building, buffers, comparisons and literals through checks,
and parse-tree rewriting that counts every ``for`` loop's iterations and every assignment), so a
hostile template ends in ``TemplateError`` promptly and no thread is left burning CPU. What each
hook guards is noted where it is defined.
"""

from __future__ import annotations

import functools
import json
import math
import re
import string
import threading
import time
import types
from collections.abc import (
    Callable,
    ItemsView,
    Iterable,
    Iterator,
    KeysView,
    Mapping,
    Sequence,
    ValuesView,
)
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NoReturn, Protocol

from jinja2 import Undefined, nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError, TemplateSyntaxError, UndefinedError
from jinja2.ext import Extension, LoopControlExtension
from jinja2.parser import Parser
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Cycler, Joiner, Namespace, missing

from shimmy.errors import InvalidRequest, TemplateError
from shimmy.models.entry import ModelEntry

ROLES = ("system", "user", "assistant", "tool")

# Real chat templates are a few kilobytes (the largest known are tens of kilobytes); compiling
# cannot be interrupted, so the source itself is bounded.
MAX_TEMPLATE_CHARS = 256 * 1024
# A backstop to the deadline that does not depend on the clock. Real templates take tens of
# thousands of steps for a long conversation, a few million when they are quadratic in turns.
MAX_STEPS = 50_000_000
MAX_RANGE = 100_000
MAX_FILTER_NUMBER = MAX_RANGE
# Numbers in templates count messages and tokens; this keeps integer arithmetic cheap.
MAX_INT_BITS = 4096
# What a template's variables may hold at once, as a multiple of ``max_chars``. Real templates
# keep a few copies of the conversation (some build the whole prompt in one variable); the cap
# stops a template from filling memory with many large variables, which no single value's size
# limit prevents.
STORED_CHARS_FACTOR = 16
MAX_JSON_INDENT = 16
MAX_ERROR_DETAIL = 300

# Markers that end an assistant turn when a model writes them as text; added as stop strings
# when the template uses them.
_END_OF_TURN_MARKERS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>")

# Filters chat templates never need whose cost is not linear in their input (regex-heavy text
# filters) or whose output is not bounded by it.
_REMOVED_FILTERS = (
    "filesizeformat",
    "pprint",
    "random",
    "striptags",
    "urlencode",
    "urlize",
    "wordwrap",
    "xmlattr",
)
# Filters that turn a whole container into text; their input is measured first.
_STRINGIFYING_FILTERS = frozenset({"tojson", "string", "escape", "e", "forceescape"})
# str methods a template may call: none of them makes a string much longer than its inputs
# (those that can are checked in ``_check_str_method``). ``format`` is handled by the sandbox.
_SAFE_STR_METHODS = frozenset(
    {
        "capitalize",
        "casefold",
        "center",
        "count",
        "endswith",
        "expandtabs",
        "find",
        "format",
        "format_map",
        "index",
        "isalnum",
        "isalpha",
        "isascii",
        "isdecimal",
        "isdigit",
        "isidentifier",
        "islower",
        "isnumeric",
        "isprintable",
        "isspace",
        "istitle",
        "isupper",
        "join",
        "ljust",
        "lower",
        "lstrip",
        "partition",
        "removeprefix",
        "removesuffix",
        "replace",
        "rfind",
        "rindex",
        "rjust",
        "rpartition",
        "rsplit",
        "rstrip",
        "split",
        "splitlines",
        "startswith",
        "strip",
        "swapcase",
        "title",
        "upper",
        "zfill",
    }
)
# Internal filters the parser wraps around loops and assignments; their names cannot be written
# in template syntax.
_COUNTED_ITERATION_FILTER = "shimmy:counted-iteration"
_STORE_FILTER = "shimmy:store"
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0 +-]*(\*|\d+)?(?:\.(\*|\d+))?")
_DIGITS = re.compile(r"\d+")
_TEMPLATE_FILENAME = "<template>"


# --------------------------------------------------------------------------------------------
# Messages


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Check ``messages`` and return copies whose ``content`` is always a string.

    Content given as parts (``[{"type": "text", "text": ...}]``) is joined by newlines, as the
    API layers do. Other keys (``tool_calls``, ``tool_call_id``, ``name``, ...) are kept for
    templates that read them.
    """
    if not isinstance(messages, list | tuple):
        raise InvalidRequest("messages must be a list", param="messages")
    normalized: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidRequest(f"messages[{index}] must be an object", param="messages")
        role = message.get("role")
        if role not in ROLES:
            raise InvalidRequest(
                f"messages[{index}].role must be one of {', '.join(ROLES)}, not "
                f"{_clip(repr(role), 60)}",
                param="messages",
            )
        copy = dict(message)
        copy["content"] = _content_text(message.get("content"), index)
        normalized.append(copy)
    return normalized


def _content_text(content: Any, index: int) -> str:
    if content is None:
        return ""  # an assistant turn that only calls tools
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(
            f"messages[{index}].content must be a string or a list of text parts",
            param="messages",
        )
    texts: list[str] = []
    for part in content:
        kind = part.get("type") if isinstance(part, Mapping) else None
        text = part.get("text") if isinstance(part, Mapping) else None
        if kind not in ("text", "input_text") or not isinstance(text, str):
            raise InvalidRequest(
                f"messages[{index}].content has a part of type {_clip(repr(kind), 40)}; "
                "only text parts are supported",
                param="messages",
            )
        texts.append(text)
    return "\n".join(texts)


def _normalize_tools(tools: Any) -> list[Any] | None:
    if tools is None:
        return None
    if not isinstance(tools, list | tuple):
        raise InvalidRequest("tools must be a list", param="tools")
    return list(tools)


# --------------------------------------------------------------------------------------------
# The public face


class _PromptFormat(Protocol):
    def __call__(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        tools: list[Any] | None,
    ) -> str: ...


class ChatTemplate:
    """How one model's conversations become prompt text.

    ``source`` says where the format came from: ``"gguf"``, ``"override"``,
    ``"builtin:<arch>"`` or ``"plain"``. ``stop_strings`` are markers that end an assistant
    turn in this format, for the engine to stop on when the model writes them as text.
    """

    def __init__(
        self,
        *,
        source: str,
        prompt_format: _PromptFormat,
        stop_strings: list[str],
        max_chars: int,
    ) -> None:
        self.source = source
        self.stop_strings = stop_strings
        self._prompt_format = prompt_format
        self._max_chars = max_chars

    @classmethod
    def for_entry(
        cls,
        entry: ModelEntry,
        override: str | None = None,
        *,
        timeout: float = 2.0,
        max_chars: int = 1_000_000,
    ) -> ChatTemplate:
        """The template for ``entry``. Nothing is compiled or rendered here: a broken template
        fails each render with ``TemplateError`` instead of making the model unloadable."""
        if override is not None:
            return cls._jinja(override, "override", entry, timeout, max_chars)
        if entry.chat_template and entry.chat_template.strip():
            return cls._jinja(entry.chat_template, "gguf", entry, timeout, max_chars)
        architecture = (entry.architecture or "").lower()
        builtin = _BUILTIN_FORMATS.get(architecture)
        if builtin is not None:
            return cls(
                source=f"builtin:{architecture}",
                prompt_format=builtin.render,
                stop_strings=list(builtin.stop_strings),
                max_chars=max_chars,
            )
        return cls(
            source="plain",
            prompt_format=_render_plain,
            stop_strings=["\nUser:"],
            max_chars=max_chars,
        )

    @classmethod
    def _jinja(
        cls, text: str, source: str, entry: ModelEntry, timeout: float, max_chars: int
    ) -> ChatTemplate:
        jinja = _SandboxedJinjaFormat(
            text,
            bos_token=entry.bos_token or "",
            eos_token=entry.eos_token or "",
            timeout=timeout,
            max_chars=max_chars,
        )
        markers = [marker for marker in _END_OF_TURN_MARKERS if marker in text]
        return cls(source=source, prompt_format=jinja, stop_strings=markers, max_chars=max_chars)

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        """The prompt for ``messages``. Raises ``InvalidRequest`` for malformed messages and
        ``TemplateError`` when the template fails, misbehaves or runs past its limits.

        The prompt never starts with the BOS token's text (a GGUF template that writes it has
        it removed): the engine adds BOS when it tokenizes the prompt."""
        prompt = self._prompt_format(
            normalize_messages(messages), add_generation_prompt, _normalize_tools(tools)
        )
        if len(prompt) > self._max_chars:
            raise TemplateError(f"the rendered prompt is longer than {self._max_chars} characters")
        return prompt


# --------------------------------------------------------------------------------------------
# Builtin formats, for files without a template. None writes BOS: the engine adds it when it
# tokenizes the prompt.


@dataclass(frozen=True)
class _BuiltinFormat:
    render: _PromptFormat
    stop_strings: tuple[str, ...]


def _render_gemma(
    messages: list[dict[str, Any]], add_generation_prompt: bool, tools: list[Any] | None
) -> str:
    # Gemma has no system role: system text opens the next user turn, followed by a blank
    # line, as Gemma's own template does. Contents are trimmed, as there too.
    turns: list[str] = []
    pending_system: list[str] = []
    for message in messages:
        role, text = message["role"], message["content"].strip()
        if role == "system":
            pending_system.append(text)
            continue
        if role != "assistant" and pending_system:
            text = "\n\n".join([*pending_system, text])
            pending_system.clear()
        speaker = "model" if role == "assistant" else "user"
        turns.append(f"<start_of_turn>{speaker}\n{text}<end_of_turn>\n")
    if pending_system:  # system text with no user turn after it
        text = "\n\n".join(pending_system)
        turns.append(f"<start_of_turn>user\n{text}<end_of_turn>\n")
    if add_generation_prompt:
        turns.append("<start_of_turn>model\n")
    return "".join(turns)


def _render_chatml(
    messages: list[dict[str, Any]], add_generation_prompt: bool, tools: list[Any] | None
) -> str:
    turns = [
        f"<|im_start|>{_known_role(message['role'])}\n{message['content']}<|im_end|>\n"
        for message in messages
    ]
    if add_generation_prompt:
        turns.append("<|im_start|>assistant\n")
    return "".join(turns)


def _render_phi3(
    messages: list[dict[str, Any]], add_generation_prompt: bool, tools: list[Any] | None
) -> str:
    turns = [
        f"<|{_known_role(message['role'])}|>\n{message['content']}<|end|>\n" for message in messages
    ]
    if add_generation_prompt:
        turns.append("<|assistant|>\n")
    return "".join(turns)


def _known_role(role: str) -> str:
    # Tool results are user turns in formats without a tool role.
    return "user" if role == "tool" else role


_PLAIN_LABELS = {"system": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}


def _render_plain(
    messages: list[dict[str, Any]], add_generation_prompt: bool, tools: list[Any] | None
) -> str:
    lines = [f"{_PLAIN_LABELS[message['role']]}: {message['content']}" for message in messages]
    if add_generation_prompt:
        lines.append("Assistant:")
    return "\n".join(lines)


_GEMMA = _BuiltinFormat(_render_gemma, ("<end_of_turn>",))
_CHATML = _BuiltinFormat(_render_chatml, ("<|im_end|>",))
_BUILTIN_FORMATS: dict[str, _BuiltinFormat] = {
    "gemma": _GEMMA,
    "gemma2": _GEMMA,
    "gemma3": _GEMMA,
    "qwen2": _CHATML,
    "qwen2moe": _CHATML,
    "qwen3": _CHATML,
    "qwen3moe": _CHATML,
    "phi3": _BuiltinFormat(_render_phi3, ("<|end|>",)),
}


# --------------------------------------------------------------------------------------------
# The render budget


class _RenderBudget:
    """The limits of one render, checked by every hook of the sandbox."""

    def __init__(self, timeout: float | None, max_chars: int) -> None:
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout if timeout is not None else math.inf
        self.max_chars = max_chars
        self.steps = 0
        self.max_stored = max_chars * STORED_CHARS_FACTOR
        self._stored_total = 0
        self._stored: dict[str, int] = {}
        # Sizes of containers already measured, keyed by id; the object is kept so that its
        # id cannot be reused within the render. Containers cannot change in the immutable
        # sandbox, so a size stays true.
        self._sizes: dict[int, tuple[object, int]] = {}

    def tick(self) -> None:
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise TemplateError(f"the chat template did more than {MAX_STEPS} steps")
        if self.steps & 15 == 0 and time.monotonic() > self.deadline:
            raise TemplateError(f"the chat template took longer than {self.timeout:g} s")

    def check_size(self, value: object, what: str) -> None:
        if isinstance(value, str):
            size = len(value)
        elif value is None or isinstance(value, int | float):
            return
        else:
            size = self.size_of(value)
        if size > self.max_chars:
            raise TemplateError(f"{what} is larger than {self.max_chars} characters")

    def store(self, key: str, value: object) -> None:
        """Account for ``value`` being assigned to the variable ``key`` (a name, or a
        namespace attribute): what the variable held before no longer counts."""
        size = len(value) if isinstance(value, str) else self.size_of(value)
        self._stored_total += size - self._stored.get(key, 0)
        self._stored[key] = size
        if self._stored_total > self.max_stored:
            raise TemplateError(
                f"the chat template's variables hold more than {self.max_stored} characters"
            )

    def size_of(self, value: object) -> int:
        """Roughly how many characters ``str(value)`` would take. Counting stops past the
        limit, so the cost is bounded even for a structure that shares one big value many
        times over."""
        limit = self.max_chars
        total = 0
        pending = [value]
        while pending:
            item = pending.pop()
            if isinstance(item, str):
                total += len(item)
            elif item is None or isinstance(item, bool | float):
                total += 5
            elif isinstance(item, int):
                total += item.bit_length() // 3 + 1
            elif isinstance(item, list | tuple | dict | set | frozenset):
                known = self._sizes.get(id(item))
                if known is not None:
                    total += known[1]
                else:
                    total += 2 + 2 * len(item)  # brackets and separators
                    if total > limit:
                        return total
                    pending.extend(_children(item))
            elif isinstance(item, Namespace | KeysView | ValuesView | ItemsView):
                pending.extend(_children(item))
            else:
                total += 64  # the repr of a function, a loop, an undefined value...
            if total > limit:
                return total
        if isinstance(value, list | tuple | dict | set | frozenset):
            self._sizes[id(value)] = (value, total)
        return total


def _children(container: Any) -> Iterable[Any]:
    if isinstance(container, Namespace):
        # A namespace prints its attributes; the sandbox never lets templates reach this dict.
        return [object.__getattribute__(container, "_Namespace__attrs")]
    if isinstance(container, dict):
        return [*container.keys(), *container.values()]
    return list(container)


class _OutputBuffer(list[str]):
    """Where macros, ``{% set %}`` blocks and filter blocks collect their output: counted as
    it grows, since a loop inside such a block otherwise builds text no hook sees."""

    def __init__(self, budget: _RenderBudget) -> None:
        super().__init__()
        self._budget = budget
        self._chars = 0

    def append(self, piece: str) -> None:
        self._grow(len(piece))
        super().append(piece)

    def extend(self, pieces: Iterable[str]) -> None:
        pieces = tuple(pieces)
        self._grow(sum(len(piece) for piece in pieces))
        super().extend(pieces)

    def _grow(self, chars: int) -> None:
        self._budget.tick()
        self._chars += chars
        if self._chars > self._budget.max_chars:
            raise TemplateError(
                f"a block of the chat template grew beyond {self._budget.max_chars} characters"
            )


# --------------------------------------------------------------------------------------------
# The sandboxed Jinja environment


class _GuardedCodeGenerator(CodeGenerator):
    """Jinja's code generator, with the operations no sandbox hook sees routed through the
    environment: ``~`` concatenation, comparisons (which walk whole structures), list, tuple
    and dict literals (which can nest one value many times over), and block buffers."""

    def buffer(self, frame: Frame) -> None:
        frame.buffer = self.temporary_identifier()
        self.writeline(f"{frame.buffer} = environment.output_buffer()")

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.concat_values((")
        for item in node.nodes:
            self.visit(item, frame)
            self.write(", ")
        self.write("))")

    def visit_Compare(self, node: nodes.Compare, frame: Frame) -> None:
        self.write("environment.counted_value(")
        super().visit_Compare(node, frame)
        self.write(")")

    def visit_List(self, node: nodes.List, frame: Frame) -> None:
        self.write("environment.checked_literal(")
        super().visit_List(node, frame)
        self.write(")")

    def visit_Dict(self, node: nodes.Dict, frame: Frame) -> None:
        self.write("environment.checked_literal(")
        super().visit_Dict(node, frame)
        self.write(")")

    def visit_Tuple(self, node: nodes.Tuple, frame: Frame) -> None:
        if node.ctx != "load":  # an assignment target, not a value
            super().visit_Tuple(node, frame)
            return
        self.write("environment.checked_literal(")
        super().visit_Tuple(node, frame)
        self.write(")")


class _ChatUndefined(Undefined):
    """Lenient like Hugging Face's (tests, truthiness and iteration work), except that printing
    a name the template was never given fails: ``{{ config }}`` is a broken or probing template,
    not an empty string. A missing attribute of a message still prints as nothing."""

    __slots__ = ()

    def __str__(self) -> str:
        if self._undefined_obj is missing:
            self._fail_with_undefined_error()
        return ""


class _GenerationTag(Extension):
    """Hugging Face's ``{% generation %}`` marks assistant text for training masks; for
    rendering it is a no-op, but templates that use it must still parse."""

    tags = {"generation"}

    def parse(self, parser: Parser) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _GuardedEnvironment(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox with Hugging Face's chat-template conventions, and every hook
    checking the budget of the render running on the calling thread."""

    code_generator_class = _GuardedCodeGenerator
    # ``*`` and ``**`` can make huge strings and numbers in one step, ``+`` and ``%`` big ones.
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, max_chars: int) -> None:
        super().__init__(
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[LoopControlExtension, _GenerationTag],
            undefined=_ChatUndefined,
            finalize=self._finalize_output,
        )
        self.max_chars = max_chars
        self._local = threading.local()  # the budget of the render on each thread
        self.globals.clear()
        self.globals.update(
            range=self._bounded_range,
            dict=dict,
            namespace=Namespace,
            cycler=Cycler,
            joiner=Joiner,
            raise_exception=_raise_exception,
            strftime_now=_strftime_now,
        )
        self.filters["tojson"] = _tojson
        for name in _REMOVED_FILTERS:
            self.filters.pop(name, None)
        self.filters = {name: self._guarded_filter(name, f) for name, f in self.filters.items()}
        self.filters[_COUNTED_ITERATION_FILTER] = self._counted_iteration
        self.filters[_STORE_FILTER] = self._store
        self.tests = {name: self._guarded_test(test) for name, test in self.tests.items()}

    # -- the budget of the current render

    @property
    def budget(self) -> _RenderBudget:
        budget: _RenderBudget | None = getattr(self._local, "budget", None)
        # Outside a render (constant folding while compiling) sizes are still checked.
        return budget if budget is not None else _RenderBudget(None, self.max_chars)

    def run_with(self, budget: _RenderBudget) -> _BudgetScope:
        return _BudgetScope(self._local, budget)

    # -- parsing: every for loop iterates through a counter, every assignment is accounted

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = super()._parse(source, name, filename)
        for loop in list(tree.find_all(nodes.For)):
            loop.iter = _internal_filter(loop.iter, _COUNTED_ITERATION_FILTER, loop.lineno)
        for assign in list(tree.find_all(nodes.Assign)):
            key = _target_key(assign.target)
            assign.node = _internal_filter(assign.node, _STORE_FILTER, assign.lineno, key)
        for block in list(tree.find_all(nodes.AssignBlock)):
            # A filter over a block's output wraps the block's own filter, if any.
            key = _target_key(block.target)
            block.filter = _internal_filter(block.filter, _STORE_FILTER, block.lineno, key)
        for scope in list(tree.find_all(nodes.With)):
            scope.values = [
                _internal_filter(value, _STORE_FILTER, scope.lineno, _target_key(target))
                for target, value in zip(scope.targets, scope.values, strict=True)
            ]
        tree.set_environment(self)
        return tree

    def _counted_iteration(self, iterable: Iterable[Any]) -> Iterator[Any]:
        budget = self.budget
        for item in iterable:
            budget.tick()
            yield item

    def _store(self, value: Any, key: str) -> Any:
        self.budget.store(key, value)
        return value

    # -- hooks called by the generated code

    def output_buffer(self) -> _OutputBuffer:
        return _OutputBuffer(self.budget)

    def concat_values(self, values: tuple[Any, ...]) -> str:
        budget = self.budget
        budget.tick()
        for value in values:
            budget.check_size(value, "a value joined with '~'")
        text = "".join(map(str, values))
        budget.check_size(text, "a string built with '~'")
        return text

    def concat(self, pieces: Iterable[str]) -> str:  # type: ignore[override]
        # Jinja joins block output (``self.blockname()``, ``super()``) with this.
        budget = self.budget
        collected = _OutputBuffer(budget)
        for piece in pieces:
            collected.append(piece)
        return "".join(collected)

    def counted_value(self, value: Any) -> Any:
        self.budget.tick()
        return value

    def checked_literal(self, value: Any) -> Any:
        budget = self.budget
        budget.tick()
        budget.check_size(value, "a list or dict literal")
        return value

    def _finalize_output(self, value: Any) -> Any:
        budget = self.budget
        budget.tick()
        budget.check_size(value, "a value the template prints")
        return value

    # -- sandbox hooks

    def getattr(self, obj: Any, attribute: str) -> Any:
        self.budget.tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        self.budget.tick()
        return super().getitem(obj, argument)

    def unsafe_undefined(self, obj: Any, attribute: str) -> Undefined:
        # The sandbox's default defers the error to the value's first use, so a probe such as
        # ``{% if x.__class__ %}`` would pass silently; fail at the access instead.
        raise SecurityError(
            f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is not allowed"
        )

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        if isinstance(obj, str) and callable(value) and attr not in _SAFE_STR_METHODS:
            return False
        return super().is_safe_attribute(obj, attr, value)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:
            _check_brace_format(value.__self__, self.max_chars)
        return wrapped

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        budget = self.budget
        budget.tick()
        # Methods written in C (str.zfill, int.to_bytes, ...) allocate whatever size they are
        # asked for without passing a hook; macros and the globals here take any number.
        native = isinstance(obj, types.BuiltinMethodType)
        # Keyword arguments starting with "_" are Jinja's own (loop and block variables).
        public_kwargs = [value for key, value in kwargs.items() if not key.startswith("_")]
        for argument in (*args, *public_kwargs):
            budget.check_size(argument, "an argument")
            if native and _is_big_number(argument, budget.max_chars):
                raise TemplateError(f"{obj.__name__}() was given a number too large")
        if isinstance(getattr(obj, "__self__", None), str) and native:
            args = _check_str_method(obj.__self__, obj.__name__, args, kwargs, budget)
        result = super().call(context, obj, *args, **kwargs)
        budget.check_size(result, "the result of a call")
        return result

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        budget = self.budget
        budget.tick()
        _check_binop(operator, left, right, budget)
        result = super().call_binop(context, operator, left, right)
        budget.check_size(result, f"the result of {operator!r}")
        return result

    # -- globals, filters and tests

    def _bounded_range(self, *args: int) -> range:
        self.budget.tick()
        numbers = range(*args)
        try:
            length = len(numbers)
        except OverflowError:
            length = MAX_RANGE + 1
        if length > MAX_RANGE:
            raise TemplateError(f"range() of more than {MAX_RANGE} numbers in the chat template")
        return numbers

    def _guarded_filter(self, name: str, func: Callable[..., Any]) -> Callable[..., Any]:
        # Filters are called directly by generated code, without the ``call`` hook.
        value_at = 1 if hasattr(func, "jinja_pass_arg") else 0
        check_arguments = _FILTER_CHECKS.get(name)

        @functools.wraps(func)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            budget = self.budget
            budget.tick()
            value, rest = args[value_at], args[value_at + 1 :]
            for argument in (*rest, *kwargs.values()):
                # Counts and widths (batch, slice, center, indent...) are small in templates.
                if _is_big_number(argument, MAX_FILTER_NUMBER):
                    raise TemplateError(f"the {name!r} filter was given a number too large")
                budget.check_size(argument, f"an argument of the {name!r} filter")
            if name in _STRINGIFYING_FILTERS:
                budget.check_size(value, f"the input of the {name!r} filter")
            if check_arguments is not None:
                value = check_arguments(value, rest, kwargs, budget)
                args = (*args[:value_at], value, *rest)
            result = func(*args, **kwargs)
            budget.check_size(result, f"the result of the {name!r} filter")
            return result

        return guarded

    def _guarded_test(self, func: Any) -> Callable[..., Any]:
        @functools.wraps(func)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            self.budget.tick()
            return func(*args, **kwargs)

        return guarded


def _internal_filter(
    node: nodes.Node | None, filter_name: str, lineno: int, *arguments: str
) -> nodes.Filter:
    constants: list[nodes.Expr] = [nodes.Const(argument) for argument in arguments]
    return nodes.Filter(node, filter_name, constants, [], None, None, lineno=lineno)


def _target_key(target: nodes.Node) -> str:
    """A name for what an assignment writes to; the same variable always gets the same key."""
    if isinstance(target, nodes.NSRef):
        return f"{target.name}.{target.attr}"
    if isinstance(target, nodes.Name):
        return target.name
    if isinstance(target, nodes.Tuple):
        return ",".join(_target_key(item) for item in target.items)
    return type(target).__name__


class _BudgetScope:
    """Makes a budget the current one of this thread for the duration of a ``with`` block."""

    def __init__(self, local: threading.local, budget: _RenderBudget) -> None:
        self._local = local
        self._budget = budget
        self._previous: _RenderBudget | None = None

    def __enter__(self) -> _RenderBudget:
        self._previous = getattr(self._local, "budget", None)
        self._local.budget = self._budget
        return self._budget

    def __exit__(self, *exc_info: object) -> None:
        self._local.budget = self._previous


# -- checks shared by the hooks


def _is_big_number(value: Any, limit: int) -> bool:
    return isinstance(value, int) and abs(value) > limit


def _check_binop(operator: str, left: Any, right: Any, budget: _RenderBudget) -> None:
    limit = budget.max_chars
    if operator == "%":
        if isinstance(left, str):
            _check_percent_format(left, limit)
        return
    both_ints = isinstance(left, int) and isinstance(right, int)
    if operator == "**":
        grows = both_ints and right > 0 and abs(left) > 1
        if grows and (right > MAX_INT_BITS or left.bit_length() * right > MAX_INT_BITS):
            raise TemplateError("a number in the chat template grew too large")
    elif operator == "*" and both_ints:
        if left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise TemplateError("a number in the chat template grew too large")
    elif operator == "*":
        sequence, times = (left, right) if isinstance(right, int) else (right, left)
        repeated = isinstance(times, int) and isinstance(sequence, str | list | tuple)
        if repeated and times > 0 and budget.size_of(sequence) * min(times, limit + 1) > limit:
            raise TemplateError(f"'*' would build a value over {limit} characters")
    elif operator == "+":
        sequences = isinstance(left, str | list | tuple) and isinstance(right, str | list | tuple)
        if sequences and budget.size_of(left) + budget.size_of(right) > limit:
            raise TemplateError(f"'+' would build a value over {limit} characters")


def _check_percent_format(text: str, limit: int) -> None:
    """Refuse printf-style fields whose width or precision would make a huge string."""
    for match in _PERCENT_SPEC.finditer(text):
        for number in match.groups():
            if number == "*":
                raise TemplateError("'*' widths in % formatting are not allowed in chat templates")
            if number is not None and (len(number) > 9 or int(number) > limit):
                raise TemplateError(f"a % format width over {limit} in the chat template")


def _check_brace_format(text: str, limit: int) -> None:
    """The same for ``str.format``; nested fields in a spec are refused outright."""
    try:
        fields = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise TemplateError(f"invalid format string in the chat template: {exc}") from None
    for _literal, _field, spec, _conversion in fields:
        if not spec:
            continue
        if "{" in spec:
            raise TemplateError("nested format fields are not allowed in chat templates")
        for number in _DIGITS.findall(spec):
            if len(number) > 9 or int(number) > limit:
                raise TemplateError(f"a format width over {limit} in the chat template")


def _replaced_size(text: str, old: str, new: str, count: int) -> int:
    occurrences = text.count(old) if old else len(text) + 1
    if count >= 0:
        occurrences = min(occurrences, count)
    return len(text) + occurrences * max(0, len(new) - len(old))


def _check_str_method(
    text: str,
    method: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    budget: _RenderBudget,
) -> tuple[Any, ...]:
    """Refuse str method calls that would make a string over the size limit; returns the
    arguments (``join``'s iterable is read once here, so it is passed on as a list)."""
    limit = budget.max_chars
    size = len(text)
    if method == "replace" and len(args) >= 2 and isinstance(args[0], str):
        count = args[2] if len(args) > 2 and isinstance(args[2], int) else -1
        size = _replaced_size(text, args[0], str(args[1]), count)
    elif method == "expandtabs":
        tab = args[0] if args and isinstance(args[0], int) else kwargs.get("tabsize", 8)
        size = len(text) + text.count("\t") * max(0, int(tab))
    elif method == "join" and args:
        items = list(args[0])
        size = budget.size_of(items) + len(text) * len(items)
        args = (items, *args[1:])
    if size > limit:
        raise TemplateError(f"str.{method}() would build a string over {limit} characters")
    return args


def _argument(rest: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str) -> Any:
    if len(rest) > index:
        return rest[index]
    return kwargs.get(name)


def _check_join(value: Any, rest: tuple[Any, ...], kwargs: dict[str, Any], b: _RenderBudget) -> Any:
    items = list(value) if not isinstance(value, str) else value
    separator = _argument(rest, kwargs, 0, "d") or ""
    size = b.size_of(items) + b.size_of(separator) * len(items)
    if size > b.max_chars:
        raise TemplateError(f"join would build a string over {b.max_chars} characters")
    return items


def _check_replace(
    value: Any, rest: tuple[Any, ...], kwargs: dict[str, Any], b: _RenderBudget
) -> Any:
    old, new = _argument(rest, kwargs, 0, "old"), _argument(rest, kwargs, 1, "new")
    count = _argument(rest, kwargs, 2, "count")
    if isinstance(value, str) and isinstance(old, str) and new is not None:
        new_size = b.size_of(new)
        occurrences = value.count(old) if old else len(value) + 1
        if isinstance(count, int) and count >= 0:
            occurrences = min(occurrences, count)
        if len(value) + occurrences * new_size > b.max_chars:
            raise TemplateError(f"replace would build a string over {b.max_chars} characters")
    return value


def _check_indent(
    value: Any, rest: tuple[Any, ...], kwargs: dict[str, Any], b: _RenderBudget
) -> Any:
    width = _argument(rest, kwargs, 0, "width")
    prefix = len(width) if isinstance(width, str) else width if isinstance(width, int) else 4
    lines = str(value).count("\n") + 1 if isinstance(value, str) else 1
    if b.size_of(value) + lines * max(0, prefix) > b.max_chars:
        raise TemplateError(f"indent would build a string over {b.max_chars} characters")
    return value


def _check_format(
    value: Any, rest: tuple[Any, ...], kwargs: dict[str, Any], b: _RenderBudget
) -> Any:
    if isinstance(value, str):
        _check_percent_format(value, b.max_chars)
    return value


def _check_sum(value: Any, rest: tuple[Any, ...], kwargs: dict[str, Any], b: _RenderBudget) -> Any:
    # Summing lists or strings is quadratic; templates only ever add numbers.
    start = _argument(rest, kwargs, 1, "start")
    if start is not None and not isinstance(start, int | float):
        raise TemplateError("the sum filter only adds numbers in chat templates")
    return value


_FilterCheck = Callable[[Any, tuple[Any, ...], dict[str, Any], _RenderBudget], Any]
_FILTER_CHECKS: dict[str, _FilterCheck] = {
    "join": _check_join,
    "replace": _check_replace,
    "indent": _check_indent,
    "format": _check_format,
    "sum": _check_sum,
}


# -- Hugging Face chat-template globals and filters


def _raise_exception(message: Any) -> NoReturn:
    raise TemplateError(
        f"the chat template rejected the conversation: {_clip(str(message), MAX_ERROR_DETAIL)}"
    )


def _strftime_now(format_string: Any) -> str:
    if not isinstance(format_string, str) or len(format_string) > 256:
        raise TemplateError("strftime_now() takes a short format string")
    return datetime.now().strftime(format_string)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """``tojson`` as Hugging Face defines it for chat templates: plain ``json.dumps`` (no
    HTML escaping, non-ASCII kept, key order kept)."""
    if isinstance(indent, int) and not 0 <= indent <= MAX_JSON_INDENT:
        raise TemplateError(f"tojson indent must be between 0 and {MAX_JSON_INDENT}")
    if isinstance(indent, str) and len(indent) > MAX_JSON_INDENT:
        raise TemplateError(f"tojson indent must be at most {MAX_JSON_INDENT} characters")
    if separators is not None and any(len(str(part)) > MAX_JSON_INDENT for part in separators):
        raise TemplateError("tojson separators must be short")
    return json.dumps(
        value,
        ensure_ascii=ensure_ascii,
        indent=indent,
        separators=separators,
        sort_keys=sort_keys,
    )


# --------------------------------------------------------------------------------------------
# A template from a GGUF file or an override


class _SandboxedJinjaFormat:
    """One Jinja chat template: compiled once, on first use, rendered under a fresh budget
    each time."""

    def __init__(
        self, source: str, *, bos_token: str, eos_token: str, timeout: float, max_chars: int
    ) -> None:
        self._source = source
        self._bos_token = bos_token
        self._eos_token = eos_token
        self._timeout = timeout
        self._max_chars = max_chars
        self._environment = _GuardedEnvironment(max_chars)
        self._lock = threading.Lock()
        self._template: Any = None
        self._compile_error: str | None = None

    def __call__(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        tools: list[Any] | None,
    ) -> str:
        budget = _RenderBudget(self._timeout, self._max_chars)
        with self._environment.run_with(budget):
            template = self._compiled()
            try:
                prompt = self._generate(template, messages, add_generation_prompt, tools)
            except TemplateError as exc:
                raise TemplateError(_with_line(exc.details or exc.message, exc)) from None
            except Exception as exc:
                raise TemplateError(_describe_failure(exc)) from None
        # The engine adds BOS when it tokenizes; a template that writes it too would double it.
        if self._bos_token and prompt.startswith(self._bos_token):
            prompt = prompt[len(self._bos_token) :]
        return prompt

    def _compiled(self) -> Any:
        with self._lock:
            if self._template is None and self._compile_error is None:
                self._template, self._compile_error = self._compile()
        if self._compile_error is not None:
            raise TemplateError(self._compile_error)
        return self._template

    def _compile(self) -> tuple[Any, str | None]:
        if len(self._source) > MAX_TEMPLATE_CHARS:
            return None, f"the chat template is longer than {MAX_TEMPLATE_CHARS} characters"
        try:
            return self._environment.from_string(self._source), None
        except TemplateSyntaxError as exc:
            return None, f"the chat template has a syntax error on line {exc.lineno}: {exc.message}"
        except RecursionError:
            return None, "the chat template is nested too deeply to compile"
        except Exception as exc:  # the template cannot be compiled, whatever the reason
            return None, f"the chat template cannot be compiled: {_clip(str(exc))}"

    def _generate(
        self,
        template: Any,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        tools: list[Any] | None,
    ) -> str:
        pieces: list[str] = []
        total = 0
        stream = template.generate(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            bos_token=self._bos_token,
            eos_token=self._eos_token,
        )
        try:
            for piece in stream:
                total += len(piece)
                if total > self._max_chars:
                    raise TemplateError(
                        f"the chat template's output is longer than {self._max_chars} characters"
                    )
                pieces.append(piece)
        finally:
            stream.close()
        return "".join(pieces)


def _describe_failure(exc: BaseException) -> str:
    if isinstance(exc, SecurityError):
        text = f"the chat template tried something unsafe: {exc}"
    elif isinstance(exc, UndefinedError):
        text = f"the chat template failed: {exc.message}"
    elif isinstance(exc, RecursionError):
        text = "the chat template recursed too deeply"
    elif isinstance(exc, MemoryError):
        text = "the chat template ran out of memory"
    else:
        text = f"the chat template failed: {type(exc).__name__}: {exc}"
    return _with_line(_clip(text), exc)


def _with_line(text: str, exc: BaseException) -> str:
    """Append the template line where ``exc`` was raised (Jinja maps tracebacks onto it)."""
    line = None
    trace = exc.__traceback__
    while trace is not None:
        if trace.tb_frame.f_code.co_filename == _TEMPLATE_FILENAME:
            line = trace.tb_lineno
        trace = trace.tb_next
    return f"{text} (template line {line})" if line is not None else text


def _clip(text: str, limit: int = MAX_ERROR_DETAIL) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
