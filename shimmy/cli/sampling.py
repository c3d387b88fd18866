"""Sampling flags shared by ``shimmy generate`` and ``shimmy chat``.

A flag the user did not type stays None, so the model's configured defaults (the TOML
config's ``[models.ID.sampling]``) apply before shimmy's own, as they do for API requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import typer

from shimmy.cli.options import option, splice_options
from shimmy.engine.types import GenerationRequest, SamplingParams

if TYPE_CHECKING:
    from shimmy.engine.protocol import Engine
    from shimmy.settings import Settings

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

    def request(
        self,
        engine: Engine,
        settings: Settings,
        prompt: str,
        *,
        max_tokens: int | None,
        default_max_tokens: int,
        extra_stop: list[str] | None = None,
    ) -> GenerationRequest:
        """A request for ``engine``: typed flags, then the model's defaults, then shimmy's."""
        defaults = engine.options.sampling.values()
        if max_tokens is None:
            max_tokens = defaults.get("max_tokens", default_max_tokens)
        chosen = {key: value for key, value in defaults.items() if key != "max_tokens"}
        chosen.update(self.values)
        stop = list(self.stop)
        stop += [marker for marker in extra_stop or [] if marker not in stop]
        return GenerationRequest(
            prompt=prompt,
            max_tokens=min(max_tokens, settings.max_tokens_cap),
            sampling=SamplingParams(**chosen),
            stop=stop,
        )


def max_tokens_option(default: int, what: str) -> Any:
    """``--max-tokens/-n``: left out (None), the model's configured default, else ``default``."""
    return typer.Option("--max-tokens", "-n", min=1, help=f"{what} at most (default {default})")


def _collect(_: typer.Context | None, flags: dict[str, Any]) -> SamplingFlags:
    stop = flags.pop("stop") or []
    return SamplingFlags({key: value for key, value in flags.items() if value is not None}, stop)


with_sampling_options = splice_options("sampling", _SAMPLING_OPTIONS, _collect)
"""Give a command the sampling flags; it receives them as ``sampling`` (``SamplingFlags``)."""
