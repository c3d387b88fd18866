"""Chat templates: turning a conversation into the prompt text a model was trained on.

Where the prompt format comes from, in order: an explicit override, the Jinja template stored in
the GGUF file (``tokenizer.chat_template``), a builtin format for a few architectures, and a
plain "User: ... / Assistant:" format for everything else.

This module is the public face; the pieces live beside it: ``messages`` (checking and
normalizing the conversation), ``formats`` (the builtin formats), ``sandbox`` and ``budget``
(rendering a Jinja template safely, within limits).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from shimmy.chat.formats import BUILTIN_FORMATS, PromptFormat, render_plain
from shimmy.chat.guarded_env import MAX_TEMPLATE_CHARS, GuardedEnvironment
from shimmy.chat.messages import normalize_messages, normalize_tools
from shimmy.chat.sandbox import SandboxedJinjaFormat
from shimmy.errors import TemplateError
from shimmy.models.entry import ModelEntry

# Re-exported for code that reaches the chat package through this module: the tests patch the
# sandboxed environment and size templates against the compile limit.
__all__ = [
    "MAX_TEMPLATE_CHARS",
    "ChatTemplate",
    "GuardedEnvironment",
    "normalize_messages",
]

# Markers that end an assistant turn when a model writes them as text; added as stop strings
# when the template uses them.
_END_OF_TURN_MARKERS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>")


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
        prompt_format: PromptFormat,
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
        builtin = BUILTIN_FORMATS.get(architecture)
        if builtin is not None:
            return cls(
                source=f"builtin:{architecture}",
                prompt_format=builtin.render,
                stop_strings=list(builtin.stop_strings),
                max_chars=max_chars,
            )
        return cls(
            source="plain",
            prompt_format=render_plain,
            stop_strings=["\nUser:"],
            max_chars=max_chars,
        )

    @classmethod
    def _jinja(
        cls, text: str, source: str, entry: ModelEntry, timeout: float, max_chars: int
    ) -> ChatTemplate:
        jinja = SandboxedJinjaFormat(
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
            normalize_messages(messages), add_generation_prompt, normalize_tools(tools)
        )
        if len(prompt) > self._max_chars:
            raise TemplateError(f"the rendered prompt is longer than {self._max_chars} characters")
        return prompt
