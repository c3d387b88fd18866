"""What the source says about each file of a pull, before any byte is downloaded: its size,
published sha256 and the URL to fetch (for the Hugging Face Hub, pinned to one commit), and
where it will lie in the models folder."""

from __future__ import annotations

import asyncio
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from shimmy.errors import Forbidden, ShimmyError, UpstreamFailed
from shimmy.models.pull_events import HubOffline, SourceNotFound
from shimmy.models.pull_policy import check_scheme, resolve_checked
from shimmy.models.pull_records import RESUME_SUFFIX, Validators
from shimmy.models.pull_source import PullSource
from shimmy.models.safepath import resolve_inside

logger = logging.getLogger(__name__)
HF_DEFAULT_ENDPOINT = "https://huggingface.co"

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
    resume: Path  # the validators of what ``partial`` holds
    url: str = ""  # what to GET
    headers: dict[str, str] = field(default_factory=dict)
    size: int | None = None
    sha256: str | None = None  # the published one
    current: Validators | None = None  # what a HEAD said just now
    immutable: bool = False  # pinned to a commit and its checksum: safe to continue as it is
    present: bool = False  # an identical file is already in place


async def describe(
    client: httpx.AsyncClient, source: PullSource, models_dir: Path, *, allow_private: bool
) -> RemoteFile:
    """Where the file goes, and what the source says about it (size, checksum, final URL)."""
    remote = RemoteFile(
        source=source,
        target=resolve_inside(models_dir, source.filename, param="model"),
        partial=side_path(models_dir, source.filename, PARTIAL_SUFFIX),
        verified=side_path(models_dir, source.filename, VERIFIED_SUFFIX),
        resume=side_path(models_dir, source.filename, RESUME_SUFFIX),
        sha256=source.sha256,
    )
    if source.kind == "hf":
        await asyncio.to_thread(_describe_hf_file, remote, allow_private)
    else:
        remote.url = source.url
        await _describe_url(client, remote)
    return remote


def _describe_hf_file(remote: RemoteFile, allow_private: bool) -> None:
    # Imported here: huggingface_hub is slow to import and only pulls need it.
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    # Exported lazily, which mypy's no-implicit-reexport does not see.
    from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]

    source = remote.source
    # huggingface_hub reads HF_ENDPOINT once, at import; reading it per pull honours a mirror
    # configured later in the process too.
    endpoint = os.environ.get("HF_ENDPOINT", "").rstrip("/") or None
    # huggingface_hub asks the endpoint with its own HTTP client: the policy is checked here;
    # the download itself goes through the pull's guarded client, redirects and all.
    hub = urlsplit(endpoint or HF_DEFAULT_ENDPOINT)
    check_scheme(hub.geturl(), allow_private=allow_private)
    resolve_checked(hub.hostname or "", hub.port or 443, allow_private=allow_private)
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
        logger.info("cannot reach the Hugging Face Hub: %s", exc)
        raise UpstreamFailed("cannot reach the Hugging Face Hub") from exc
    remote.size = metadata.size
    etag = (metadata.etag or "").lower()
    # LFS files (every real GGUF) have their sha256 as ETag; small git files a sha1, no use here.
    if _SHA256_HEX.fullmatch(etag):
        remote.sha256 = etag
    # Download exactly the commit the metadata describes, even if the branch moves meanwhile.
    pinned = metadata.commit_hash or revision
    remote.url = hf_hub_url(source.repo_id, source.path_in_repo, revision=pinned, endpoint=endpoint)
    # A file at a commit, checked against its sha256 at the end, cannot change under a resume.
    remote.immutable = metadata.commit_hash is not None and remote.sha256 is not None
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
        # Refused, reset, timed out, not HTTP: one answer, so a pull cannot map open ports.
        logger.info("cannot reach %s: %s", host(remote.url), exc)
        raise UpstreamFailed(f"cannot download from {host(remote.url)}") from exc
    if response.status_code in (401, 403, 404, 410):
        raise http_failure(remote, response.status_code)
    if response.is_success:
        remote.size = int_header(response, "Content-Length")
        remote.current = Validators.of(remote.url, response)
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
