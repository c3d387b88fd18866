"""Ollama's way of naming a model on the Hugging Face Hub: ``hf.co/OWNER/REPO[:QUANT]``.

Ollama pulls the repository's GGUF file of that quantization (``Q4_K_M`` when none is named, or
the most usual one present). Here the repository's file list is read from the Hub and the name
becomes the ``hf://OWNER/REPO/FILE.gguf`` source ``shimmy pull`` takes, so the download itself
is the same verified, resumable pull. The quantization is matched in the file names, case
aside; projector files (``mmproj``) are never the model.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

from shimmy.errors import Forbidden, InvalidRequest, ShimmyError, UpstreamFailed
from shimmy.models.discovery import SHARD_PATTERN
from shimmy.models.pull_events import HubOffline, SourceNotFound
from shimmy.models.pull_source import PullSource, parse_source

_REPO_NAME = re.compile(
    r"(?:https?://)?(?:hf\.co|huggingface\.co)/(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)"
    r"(?::(?P<tag>[\w.-]+))?",
    re.IGNORECASE,
)
# The default, then the others in the order of how often repositories carry them.
PREFERRED_QUANTS = ("Q4_K_M", "Q4_K_S", "Q4_0", "Q5_K_M", "Q6_K", "Q8_0", "Q3_K_M", "IQ4_XS")


@dataclass(frozen=True)
class RepoName:
    repo_id: str  # OWNER/REPO
    quant: str | None  # None: the default choice ("latest" says the same)

    @property
    def text(self) -> str:
        return f"hf.co/{self.repo_id}" + (f":{self.quant}" if self.quant else "")


def parse_repo_name(text: str) -> RepoName | None:
    """The repository and quantization of an Ollama-style Hub name, or None for other text."""
    match = _REPO_NAME.fullmatch(text.strip())
    if match is None:
        return None
    tag = match["tag"]
    return RepoName(match["repo"], None if tag is None or tag.lower() == "latest" else tag)


def _quant_pattern(quant: str) -> re.Pattern[str]:
    # Whole quantization names only: Q4_K is not Q4_K_M, Q4_0 is not IQ4_0.
    return re.compile(
        rf"(?<![A-Za-z0-9]){re.escape(quant)}(?![A-Za-z0-9]|_[A-Za-z0-9])", re.IGNORECASE
    )


def _candidates(paths: Iterable[str]) -> list[str]:
    """The model files of a listing: GGUF, no projector, one entry per split model."""
    found = []
    for path in paths:
        name = path.rpartition("/")[2]
        if not name.lower().endswith(".gguf") or "mmproj" in name.lower():
            continue
        shard = SHARD_PATTERN.match(name)
        if shard is not None and int(shard["index"]) != 1:
            continue
        found.append(path)
    # Files at the top of the repository first, then by name: a stable, predictable choice.
    return sorted(found, key=lambda path: (path.count("/"), path.lower()))


def pick_file(paths: Iterable[str], quant: str | None) -> str | None:
    """The file ``quant`` names among ``paths`` (repository paths), or the preferred one."""
    candidates = _candidates(paths)
    wanted = [quant] if quant is not None else list(PREFERRED_QUANTS)
    for name in wanted:
        pattern = _quant_pattern(name)
        for path in candidates:
            if pattern.search(path.rpartition("/")[2].removesuffix(".gguf")):
                return path
    if quant is None and candidates:
        return candidates[0]
    return None


def _list_files(repo_id: str) -> list[str]:
    # Imported here: huggingface_hub is slow to import and only pulls need it.
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    # Read per call, like ``pull_remote``: a mirror configured later in the process counts.
    endpoint = os.environ.get("HF_ENDPOINT", "").rstrip("/") or None
    try:
        return list(HfApi(endpoint=endpoint, library_name="shimmy").list_repo_files(repo_id))
    except OfflineModeIsEnabled as exc:
        raise HubOffline(f"{exc} (HF_HUB_OFFLINE is set)") from exc
    except GatedRepoError as exc:
        raise Forbidden(
            f"access to {repo_id} is restricted (gated or private); log in with"
            " `hf auth login` or set HF_TOKEN after accepting its terms",
        ) from exc
    except RepositoryNotFoundError as exc:
        raise SourceNotFound(f"the repository {repo_id} was not found on the Hub") from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        if status == 404:
            raise SourceNotFound(f"the repository {repo_id} was not found on the Hub") from exc
        raise UpstreamFailed(f"the Hub answered HTTP {status} listing {repo_id}") from exc
    except ShimmyError:
        raise
    except Exception as exc:  # network errors of huggingface_hub's own HTTP stack
        raise UpstreamFailed(f"cannot reach the Hugging Face Hub: {exc}") from exc


async def resolve_repo_name(name: RepoName, *, param: str = "model") -> PullSource:
    """The ``hf://`` source of the file ``name`` stands for, read from the Hub's listing."""
    paths = await asyncio.to_thread(_list_files, name.repo_id)
    chosen = pick_file(paths, name.quant)
    if chosen is None:
        quants = sorted(
            {
                q
                for path in _candidates(paths)
                for q in PREFERRED_QUANTS
                if _quant_pattern(q).search(path.rpartition("/")[2])
            }
        )
        if not _candidates(paths):
            raise InvalidRequest(f"{name.repo_id} holds no GGUF model file", param=param)
        offered = f" (it has {', '.join(quants)})" if quants else ""
        raise SourceNotFound(
            f"{name.repo_id} has no GGUF file of quantization {name.quant}{offered}"
        )
    return parse_source(f"hf://{name.repo_id}/{chosen}", param=param)
