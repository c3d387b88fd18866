"""Sampling flags shared by ``shimmy generate`` and ``shimmy chat``.

A flag the user did not type stays None, so the model's configured defaults (the TOML
config's ``[models.ID.sampling]``) apply before shimmy's own, as they do for API requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import typer

from shimmy.cli.options import option, splice_options

if TYPE_CHECKING:
    from shimmy.serving.chat import Message
    from shimmy.serving.prepare import GenerationInput

_PANEL = "Sampling"

_SAMPLING_OPTIONS = {
    "temperature": option(float | None, "--temperature", min=0.0, max=2.0, panel=_PANEL,
                          help="0 = greedy (default 0.7)"),
    "top_p": option(float | None, "--top-p", min=0.0, max=1.0, panel=_PANEL,
                    help="Nucleus sampling (default 0.9)"),
    "top_k": option(int | None, "--top-k", min=0, panel=_PANEL, help="0 = off (default 40)"),
    "repetition_penalty": option(float | None, "--repetition-penalty", min=0.01, panel=_PANEL,
                                 help="1.0 = off (default 1.1)"),
    "seed": option(int | None, "--seed", panel=_PANEL, help="Same seed, same text"),
    "stop": option(list[str] | None, "--stop", metavar="TEXT", panel=_PANEL,
                   help="Stop before this text (repeatable)"),
}  # fmt: skip


@dataclass
class SamplingFlags:
    """What the user typed of the sampling flags; None where the model's default applies."""

    values: dict[str, Any] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)

    def input(
        self,
        *,
        prompt: str | None = None,
        messages: list[Message] | None = None,
        system: str | None = None,
        max_tokens: int | None,
    ) -> GenerationInput:
        """What ``prepare`` needs: the typed flags; the rest takes the model's defaults, then
        the command's row of the defaults table."""
        from shimmy.serving.prepare import GenerationInput

        return GenerationInput(
            prompt=prompt,
            messages=messages,
            system=system,
            sampling=dict(self.values),
            stop=list(self.stop),
            max_tokens=max_tokens,
        )


def max_tokens_option(default: int, what: str) -> Any:
    """``--max-tokens/-n``: left out (None), the model's configured default, else ``default``."""
    return typer.Option("--max-tokens", "-n", min=1, help=f"{what} at most (default {default})")


def _collect(_: typer.Context | None, flags: dict[str, Any]) -> SamplingFlags:
    stop = flags.pop("stop") or []
    return SamplingFlags({key: value for key, value in flags.items() if value is not None}, stop)


with_sampling_options = splice_options("sampling", _SAMPLING_OPTIONS, _collect)
"""Give a command the sampling flags; it receives them as ``sampling`` (``SamplingFlags``)."""
