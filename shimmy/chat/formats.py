"""Builtin prompt formats, for GGUF files without a template, and the shape every format has.

None writes BOS: the engine adds it when it tokenizes the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


class PromptFormat(Protocol):
    """What turns checked messages into prompt text: a builtin format or a sandboxed template."""

    def __call__(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        tools: list[Any] | None,
    ) -> str: ...


@dataclass(frozen=True)
class BuiltinFormat:
    render: PromptFormat
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


def render_plain(
    messages: list[dict[str, Any]], add_generation_prompt: bool, tools: list[Any] | None
) -> str:
    lines = [f"{_PLAIN_LABELS[message['role']]}: {message['content']}" for message in messages]
    if add_generation_prompt:
        lines.append("Assistant:")
    return "\n".join(lines)


_GEMMA = BuiltinFormat(_render_gemma, ("<end_of_turn>",))
_CHATML = BuiltinFormat(_render_chatml, ("<|im_end|>",))
BUILTIN_FORMATS: dict[str, BuiltinFormat] = {
    "gemma": _GEMMA,
    "gemma2": _GEMMA,
    "gemma3": _GEMMA,
    "qwen2": _CHATML,
    "qwen2moe": _CHATML,
    "qwen3": _CHATML,
    "qwen3moe": _CHATML,
    "phi3": BuiltinFormat(_render_phi3, ("<|end|>",)),
}
