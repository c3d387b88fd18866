"""What the source says about each file of a pull, before any byte is downloaded: its size,
published sha256 and the URL to fetch (for the Hugging Face Hub, pinned to one commit), and
where it will lie in the models folder."""

from __future__ import annotations

import asyncio
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from shimmy.errors import Forbidden, ShimmyError, UpstreamFailed
from shimmy.models.pull_events import HubOffline, SourceNotFound
from shimmy.models.pull_source import PullSource
from shimmy.models.safepath import resolve_inside

PARTIAL_SUFFIX = ".partial"
VERIFIED_SUFFIX = ".verified"

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass
class RemoteFile:
    """One file of a pull: where it comes from and where it goes."""

    source: PullSource
    target: Path  # the finished model file
    partial: Path
    verified: Path
    url: str = ""  # what to GET
    headers: dict[str, str] = field(default_factory=dict)
    size: int | None = None
    sha256: str | None = None  # the published one
    present: bool = False  # an identical file is already in place


async def describe(client: httpx.AsyncClient, source: PullSource, models_dir: Path) -> RemoteFile:
    """Where the file goes, and what the source says about it (size, checksum, final URL)."""
    remote = RemoteFile(
        source=source,
        target=resolve_inside(models_dir, source.filename, param="model"),
        partial=side_path(models_dir, source.filename, PARTIAL_SUFFIX),
        verified=side_path(models_dir, source.filename, VERIFIED_SUFFIX),
        sha256=source.sha256,
    )
    if source.kind == "hf":
        await asyncio.to_thread(_describe_hf_file, remote)
    else:
        remote.url = source.url
        await _describe_url(client, remote)
    return remote


def _describe_hf_file(remote: RemoteFile) -> None:
    # Imported here: huggingface_hub is slow to import and only pulls need it.
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    # Exported lazily, which mypy's no-implicit-reexport does not see.
    from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]

    source = remote.source
    # huggingface_hub reads HF_ENDPOINT once, at import; reading it per pull honours a mirror
    # configured later in the process too.
    endpoint = os.environ.get("HF_ENDPOINT", "").rstrip("/") or None
    revision = source.revision
    url = hf_hub_url(source.repo_id, source.path_in_repo, revision=revision, endpoint=endpoint)
    try:
        metadata = get_hf_file_metadata(url)
    except OfflineModeIsEnabled as exc:
        raise HubOffline(f"{exc} (HF_HUB_OFFLINE is set)") from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        raise _hf_http_failure(source, status) from exc
    except Exception as exc:  # network errors of huggingface_hub's own HTTP stack
        raise UpstreamFailed(f"cannot reach the Hugging Face Hub: {exc}") from exc
    remote.size = metadata.size
    etag = (metadata.etag or "").lower()
    # LFS files (every real GGUF) have their sha256 as ETag; small git files a sha1, no use here.
    if _SHA256_HEX.fullmatch(etag):
        remote.sha256 = etag
    # Download exactly the commit the metadata describes, even if the branch moves meanwhile.
    pinned = metadata.commit_hash or revision
    remote.url = hf_hub_url(source.repo_id, source.path_in_repo, revision=pinned, endpoint=endpoint)
    remote.headers = build_hf_headers(library_name="shimmy")


def _hf_http_failure(source: PullSource, status: int) -> ShimmyError:
    where = f"{source.path_in_repo} in {source.repo_id}"
    if status in (401, 403):
        return Forbidden(
            f"access to {source.repo_id} is restricted (gated or private); log in"
            " with `hf auth login` or set HF_TOKEN after accepting its terms",
        )
    if status == 404:
        return SourceNotFound(f"{where} was not found (check owner, repo, file, revision)")
    return UpstreamFailed(f"the Hub answered HTTP {status} for {where}")


async def _describe_url(client: httpx.AsyncClient, remote: RemoteFile) -> None:
    try:
        response = await client.head(remote.url, headers={"Accept-Encoding": "identity"})
    except httpx.HTTPError as exc:
        raise UpstreamFailed(f"cannot reach {host(remote.url)}: {exc}") from exc
    if response.status_code in (401, 403, 404, 410):
        raise http_failure(remote, response.status_code)
    if response.is_success:
        remote.size = int_header(response, "Content-Length")
    # Servers that refuse HEAD still get their GET; the size is then learnt from it.


def http_failure(remote: RemoteFile, status: int) -> ShimmyError:
    """The error for an HTTP status that is not worth another attempt."""
    name = remote.source.filename
    if status in (401, 403):
        return Forbidden(f"{host(remote.url)} refused access to {name}")
    if status in (404, 410):
        return SourceNotFound(f"{name} was not found at {host(remote.url)}")
    return UpstreamFailed(f"{host(remote.url)} answered HTTP {status} for {name}")


def side_path(models_dir: Path, filename: str, suffix: str) -> Path:
    return resolve_inside(models_dir, filename + suffix, param="model")


def int_header(response: httpx.Response, name: str) -> int | None:
    value = response.headers.get(name, "")
    return int(value) if value.isdigit() else None


def host(url: str) -> str:
    return urlsplit(url).netloc or url
