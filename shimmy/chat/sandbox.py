"""Rendering a Jinja chat template from a GGUF file or an override, sandboxed and bounded.

A GGUF template is code written by whoever made the file. CVE-2024-34359 was exactly such a
template escaping a non-sandboxed Jinja environment, so templates here are rendered in Jinja's
immutable sandbox, and, because the sandbox stops escapes but not exhaustion, every render also
runs under a budget (``shimmy.chat.budget``): a deadline, a step count, a cap on each value's
size and one on what the template's variables hold at once. The budget is enforced from inside
the render (sandbox hooks, a code generator that routes string building, buffers, comparisons
and literals through checks, and parse-tree rewriting that counts every ``for`` loop's
iterations and every assignment), so a hostile template ends in ``TemplateError`` promptly and
no thread is left burning CPU. What each hook guards is noted where it is defined.
"""

from __future__ import annotations

import threading
from typing import Any

from jinja2.exceptions import SecurityError, TemplateSyntaxError, UndefinedError

from shimmy.chat.budget import RenderBudget
from shimmy.chat.guarded_env import MAX_TEMPLATE_CHARS, TEMPLATE_FILENAME, GuardedEnvironment
from shimmy.chat.messages import clip
from shimmy.errors import TemplateError

# --------------------------------------------------------------------------------------------
# A template from a GGUF file or an override


class SandboxedJinjaFormat:
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
        self._environment = GuardedEnvironment(max_chars)
        self._lock = threading.Lock()
        self._template: Any = None
        self._compile_error: str | None = None

    def __call__(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        tools: list[Any] | None,
    ) -> str:
        budget = RenderBudget(self._timeout, self._max_chars)
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
            return None, f"the chat template cannot be compiled: {clip(str(exc))}"

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
    return _with_line(clip(text), exc)


def _with_line(text: str, exc: BaseException) -> str:
    """Append the template line where ``exc`` was raised (Jinja maps tracebacks onto it)."""
    line = None
    trace = exc.__traceback__
    while trace is not None:
        if trace.tb_frame.f_code.co_filename == TEMPLATE_FILENAME:
            line = trace.tb_lineno
        trace = trace.tb_next
    return f"{text} (template line {line})" if line is not None else text
