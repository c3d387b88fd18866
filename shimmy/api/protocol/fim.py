"""Wire types of fill-in-the-middle requests that several dialects share."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, StrictStr

from shimmy.api.protocol.common import StrictFloat, StrictInteger, WireModel
from shimmy.serving.fim import DEFAULT_FILENAME, ExtraFile

MAX_EXTRA_FILES = 256
# Indentation beyond this is not a block any editor shows; the bound keeps the value sane.
MAX_INDENT = 1024

LineCount = Annotated[StrictInteger, Field(ge=1, le=100_000)]
Indent = Annotated[StrictInteger, Field(ge=0, le=MAX_INDENT)]
Milliseconds = Annotated[StrictFloat, Field(ge=0, le=3_600_000)]


class ExtraFileChunk(WireModel):
    """Another file's text, given as context (llama.cpp's ``input_extra`` item)."""

    text: StrictStr
    filename: StrictStr = DEFAULT_FILENAME

    def to_extra(self) -> ExtraFile:
        return ExtraFile(self.text, self.filename)


ExtraFiles = Annotated[list[ExtraFileChunk], Field(max_length=MAX_EXTRA_FILES)]


def seconds(milliseconds: float | None) -> float | None:
    """A time budget in seconds; 0 (llama.cpp's "off") and None are no budget."""
    return milliseconds / 1000 if milliseconds else None
