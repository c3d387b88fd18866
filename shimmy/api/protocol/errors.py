"""The error bodies, as ``shimmy.api.errors`` renders them: native (also LocalLab's), OpenAI's
(every path under ``/v1``), Anthropic's (under ``/v1/messages``), the bare message of Ollama
and RKLLama (``/ollama``, ``/rkllama``) and llama.cpp's (its server's routes, ``/infill``)."""

from __future__ import annotations

from typing import Literal

from shimmy.api.protocol.responses import ResponseModel


class NativeErrorDetail(ResponseModel):
    code: str
    message: str
    details: str | None


class NativeError(ResponseModel):
    """``{"error": {"code", "message", "details"}}``."""

    error: NativeErrorDetail


class OpenAIErrorDetail(ResponseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(ResponseModel):
    """``{"error": {"message", "type", "param", "code"}}``, as OpenAI answers."""

    error: OpenAIErrorDetail


class FlatError(ResponseModel):
    """``{"error": "message"}``, as Ollama and RKLLama answer."""

    error: str


class AnthropicErrorDetail(ResponseModel):
    type: str
    message: str


class AnthropicError(ResponseModel):
    """``{"type": "error", "error": {"type", "message"}}``, as Anthropic answers."""

    type: Literal["error"]
    error: AnthropicErrorDetail


class LlamaCppErrorDetail(ResponseModel):
    code: int
    message: str
    type: str


class LlamaCppError(ResponseModel):
    """``{"error": {"code": <HTTP status>, "message", "type"}}``, as llama.cpp's server answers."""

    error: LlamaCppErrorDetail
