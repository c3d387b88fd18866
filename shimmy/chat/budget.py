"""The budget of one chat-template render, and the checks the sandbox's hooks make against it.

Jinja's sandbox stops escapes but not exhaustion, so every render runs under a deadline, a step
count, a cap on each value's size and one on what the template's variables hold at once. The
hooks that enforce it live in ``shimmy.chat.sandbox``; the accounting and the checks of what an
operation would build are here, apart from the Jinja wiring.
"""

from __future__ import annotations

import math
import re
import string
import threading
import time
from collections.abc import Callable, ItemsView, Iterable, KeysView, ValuesView
from typing import Any

from jinja2.utils import Namespace

from shimmy.errors import TemplateError

# A backstop to the deadline that does not depend on the clock. Real templates take tens of
# thousands of steps for a long conversation, a few million when they are quadratic in turns.
MAX_STEPS = 50_000_000
# Numbers in templates count messages and tokens; this keeps integer arithmetic cheap.
MAX_INT_BITS = 4096
# What a template's variables may hold at once, as a multiple of ``max_chars``. Real templates
# keep a few copies of the conversation (some build the whole prompt in one variable); the cap
# stops a template from filling memory with many large variables, which no single value's size
# limit prevents.
STORED_CHARS_FACTOR = 16
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0 +-]*(\*|\d+)?(?:\.(\*|\d+))?")
_DIGITS = re.compile(r"\d+")


class RenderBudget:
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


class OutputBuffer(list[str]):
    """Where macros, ``{% set %}`` blocks and filter blocks collect their output: counted as
    it grows, since a loop inside such a block otherwise builds text no hook sees."""

    def __init__(self, budget: RenderBudget) -> None:
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


class BudgetScope:
    """Makes a budget the current one of this thread for the duration of a ``with`` block."""

    def __init__(self, local: threading.local, budget: RenderBudget) -> None:
        self._local = local
        self._budget = budget
        self._previous: RenderBudget | None = None

    def __enter__(self) -> RenderBudget:
        self._previous = getattr(self._local, "budget", None)
        self._local.budget = self._budget
        return self._budget

    def __exit__(self, *exc_info: object) -> None:
        self._local.budget = self._previous


# -- checks shared by the hooks


def is_big_number(value: Any, limit: int) -> bool:
    return isinstance(value, int) and abs(value) > limit


def check_binop(operator: str, left: Any, right: Any, budget: RenderBudget) -> None:
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


def check_brace_format(text: str, limit: int) -> None:
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


def check_str_method(
    text: str,
    method: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    budget: RenderBudget,
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


def _check_join(value: Any, rest: tuple[Any, ...], kwargs: dict[str, Any], b: RenderBudget) -> Any:
    items = list(value) if not isinstance(value, str) else value
    separator = _argument(rest, kwargs, 0, "d") or ""
    size = b.size_of(items) + b.size_of(separator) * len(items)
    if size > b.max_chars:
        raise TemplateError(f"join would build a string over {b.max_chars} characters")
    return items


def _check_replace(
    value: Any, rest: tuple[Any, ...], kwargs: dict[str, Any], b: RenderBudget
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
    value: Any, rest: tuple[Any, ...], kwargs: dict[str, Any], b: RenderBudget
) -> Any:
    width = _argument(rest, kwargs, 0, "width")
    prefix = len(width) if isinstance(width, str) else width if isinstance(width, int) else 4
    lines = str(value).count("\n") + 1 if isinstance(value, str) else 1
    if b.size_of(value) + lines * max(0, prefix) > b.max_chars:
        raise TemplateError(f"indent would build a string over {b.max_chars} characters")
    return value


def _check_format(
    value: Any, rest: tuple[Any, ...], kwargs: dict[str, Any], b: RenderBudget
) -> Any:
    if isinstance(value, str):
        _check_percent_format(value, b.max_chars)
    return value


def _check_sum(value: Any, rest: tuple[Any, ...], kwargs: dict[str, Any], b: RenderBudget) -> Any:
    # Summing lists or strings is quadratic; templates only ever add numbers.
    start = _argument(rest, kwargs, 1, "start")
    if start is not None and not isinstance(start, int | float):
        raise TemplateError("the sum filter only adds numbers in chat templates")
    return value


_FilterCheck = Callable[[Any, tuple[Any, ...], dict[str, Any], RenderBudget], Any]
FILTER_CHECKS: dict[str, _FilterCheck] = {
    "join": _check_join,
    "replace": _check_replace,
    "indent": _check_indent,
    "format": _check_format,
    "sum": _check_sum,
}
