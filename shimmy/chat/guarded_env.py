"""The guarded Jinja environment chat templates render in: Jinja's immutable sandbox plus the
hooks that enforce a render's budget (``shimmy.chat.budget``) from inside the render.

What each hook guards is noted where it is defined; ``shimmy.chat.sandbox`` explains why.
"""

from __future__ import annotations

import functools
import json
import threading
import types
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from typing import Any, NoReturn

from jinja2 import Undefined, nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError
from jinja2.ext import Extension, LoopControlExtension
from jinja2.parser import Parser
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Cycler, Joiner, Namespace, missing

from shimmy.chat.budget import (
    FILTER_CHECKS,
    BudgetScope,
    OutputBuffer,
    RenderBudget,
    check_binop,
    check_brace_format,
    check_str_method,
    is_big_number,
)
from shimmy.chat.messages import MAX_ERROR_DETAIL, clip
from shimmy.errors import TemplateError

# Real chat templates are a few kilobytes (the largest known are tens of kilobytes); compiling
# cannot be interrupted, so the source itself is bounded.
MAX_TEMPLATE_CHARS = 256 * 1024
MAX_RANGE = 100_000
MAX_FILTER_NUMBER = MAX_RANGE
MAX_JSON_INDENT = 16

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
# (those that can are checked in ``budget.check_str_method``). ``format`` is handled by the sandbox.
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
TEMPLATE_FILENAME = "<template>"


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


class GuardedEnvironment(ImmutableSandboxedEnvironment):
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
    def budget(self) -> RenderBudget:
        budget: RenderBudget | None = getattr(self._local, "budget", None)
        # Outside a render (constant folding while compiling) sizes are still checked.
        return budget if budget is not None else RenderBudget(None, self.max_chars)

    def run_with(self, budget: RenderBudget) -> BudgetScope:
        return BudgetScope(self._local, budget)

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

    def output_buffer(self) -> OutputBuffer:
        return OutputBuffer(self.budget)

    def concat_values(self, values: tuple[Any, ...]) -> str:
        budget = self.budget
        budget.tick()
        for value in values:
            budget.check_size(value, "a value joined with '~'")
        text = "".join(map(str, values))
        budget.check_size(text, "a string built with '~'")
        return text

    def concat(self, pieces: Iterable[str]) -> str:
        # Jinja joins block output (``self.blockname()``, ``super()``) with this.
        budget = self.budget
        collected = OutputBuffer(budget)
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
            check_brace_format(value.__self__, self.max_chars)
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
            if native and is_big_number(argument, budget.max_chars):
                raise TemplateError(f"{obj.__name__}() was given a number too large")
        if isinstance(getattr(obj, "__self__", None), str) and native:
            args = check_str_method(obj.__self__, obj.__name__, args, kwargs, budget)
        result = super().call(context, obj, *args, **kwargs)
        budget.check_size(result, "the result of a call")
        return result

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        budget = self.budget
        budget.tick()
        check_binop(operator, left, right, budget)
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
        check_arguments = FILTER_CHECKS.get(name)

        @functools.wraps(func)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            budget = self.budget
            budget.tick()
            value, rest = args[value_at], args[value_at + 1 :]
            for argument in (*rest, *kwargs.values()):
                # Counts and widths (batch, slice, center, indent...) are small in templates.
                if is_big_number(argument, MAX_FILTER_NUMBER):
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


# -- Hugging Face chat-template globals and filters


def _raise_exception(message: Any) -> NoReturn:
    raise TemplateError(
        f"the chat template rejected the conversation: {clip(str(message), MAX_ERROR_DETAIL)}"
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
