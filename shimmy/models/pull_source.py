"""Where a pull comes from: reading and checking the sources ``shimmy pull`` and ``POST
/api/pull`` accept (``hf://OWNER/REPO/FILE.gguf[@REVISION]``, ``https://.../FILE.gguf[#sha256=HEX]``,
``http://...``). Anything else is refused with ``InvalidRequest`` naming the parameter."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Literal
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from shimmy.errors import InvalidRequest
from shimmy.models.discovery import SHARD_PATTERN
from shimmy.models.safepath import safe_filename

MAX_SOURCE_CHARS = 2048
MAX_REVISION_CHARS = 255

_HF_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")
_REPO_FOLDER = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_REVISION = re.compile(r"[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)*")
_SHA256_FRAGMENT = re.compile(r"sha256=(?P<hex>[0-9a-fA-F]{64})")

SOURCE_FORMS = (
    "hf://OWNER/REPO/FILE.gguf (optionally @REVISION), https://HOST/.../FILE.gguf"
    " (optionally #sha256=HEX) or http://HOST/.../FILE.gguf"
)


@dataclass(frozen=True)
class PullSource:
    """Where one model file comes from. ``text`` is its canonical spelling, recorded next to the
    finished file so that pulling the same source again is recognized."""

    kind: Literal["hf", "url"]
    text: str
    filename: str  # the file name it will have in models_dir
    url: str = ""  # kind "url": the URL without its fragment
    repo_id: str = ""  # kind "hf": OWNER/REPO
    path_in_repo: str = ""  # kind "hf": e.g. "sub/FILE.gguf"
    revision: str | None = None  # kind "hf": branch, tag or commit; None = the default branch
    sha256: str | None = None  # published checksum, lowercase hex (kind "url": '#sha256=')

    def parts(self) -> list[PullSource]:
        """The files to fetch: every shard of a split model, in order; otherwise just this."""
        match = SHARD_PATTERN.match(self.filename)
        if match is None:
            return [self]
        count = int(match["count"])
        return [
            self.with_filename(_shard_name(self.filename, index)) for index in range(1, count + 1)
        ]

    def with_filename(self, filename: str) -> PullSource:
        if self.kind == "hf":
            folder = self.path_in_repo.rpartition("/")[0]
            path_in_repo = f"{folder}/{filename}" if folder else filename
            text = f"hf://{self.repo_id}/{path_in_repo}"
            if self.revision is not None:
                text += f"@{self.revision}"
            return replace(self, text=text, filename=filename, path_in_repo=path_in_repo)
        parts = urlsplit(self.url)
        folder = parts.path.rpartition("/")[0]
        url = urlunsplit(parts._replace(path=f"{folder}/{quote(filename)}"))
        return replace(self, text=url, filename=filename, url=url)


def parse_source(text: object, *, param: str = "model") -> PullSource:
    """Read a pull source; ``InvalidRequest`` (naming ``param``) for anything else. Accepted:
    ``hf://OWNER/REPO/[FOLDER/...]FILE.gguf[@REVISION]``, ``https://.../FILE.gguf[#sha256=HEX]``
    and ``http://...`` (a local mirror)."""
    if not isinstance(text, str):
        raise InvalidRequest("the source must be a string", param=param)
    text = text.strip()
    if not text:
        raise InvalidRequest(f"the source is empty; use {SOURCE_FORMS}", param=param)
    if len(text) > MAX_SOURCE_CHARS:
        raise InvalidRequest(
            f"the source is longer than {MAX_SOURCE_CHARS} characters", param=param
        )
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in text):
        raise InvalidRequest("the source contains control characters", param=param)
    lowered = text.lower()
    if lowered.startswith("hf://"):
        source = _parse_hf(text[len("hf://") :], param)
    elif lowered.startswith(("https://", "http://")):
        hub_path = _hub_file_path(text)
        source = _parse_hf(hub_path, param) if hub_path else _parse_url(text, param)
    else:
        raise InvalidRequest(f"unsupported source {text[:80]!r}; use {SOURCE_FORMS}", param=param)
    match = SHARD_PATTERN.match(source.filename)
    if match is not None:
        index, count = int(match["index"]), int(match["count"])
        if not 1 <= index <= count:
            raise InvalidRequest(f"{source.filename} is not a valid part name", param=param)
        if source.sha256 is not None and count > 1:
            raise InvalidRequest(
                f"#sha256= checks one file, but {source.filename} is one of {count} parts",
                param=param,
            )
    return source


# A file's page or download link as copied from the Hugging Face website:
# https://huggingface.co/OWNER/REPO/blob|resolve/REVISION/PATH.gguf[?download=true]
_HUB_FILE_URL = re.compile(
    r"https://(?:huggingface\.co|hf\.co)/(?P<repo>[^/?#]+/[^/?#]+)/(?:blob|resolve)/"
    r"(?P<revision>[^/?#]+)/(?P<path>[^?#]+\.gguf)(?:\?[^#]*)?",
    re.IGNORECASE,
)


def _hub_file_path(url: str) -> str | None:
    """``OWNER/REPO/PATH.gguf@REVISION`` for a Hugging Face file URL: pulled as ``hf://`` it
    is resumable, honours ``HF_ENDPOINT`` and is checked against the hub's checksum, where
    the ``blob`` page itself would be an HTML page, not the model."""
    match = _HUB_FILE_URL.fullmatch(url)
    if match is None:
        return None
    return f"{match['repo']}/{match['path']}@{match['revision']}"


def _parse_hf(rest: str, param: str) -> PullSource:
    path_text, revision = rest, None
    before, at, after = rest.rpartition("@")
    if at and before.lower().endswith(".gguf"):
        path_text, revision = before, after
        if (
            not revision
            or len(revision) > MAX_REVISION_CHARS
            or _REVISION.fullmatch(revision) is None
            or ".." in revision
        ):
            raise InvalidRequest(f"invalid revision {revision!r}", param=param)
    pieces = path_text.split("/")
    if len(pieces) < 3:
        raise InvalidRequest(
            "a Hugging Face source looks like hf://OWNER/REPO/FILE.gguf", param=param
        )
    owner, repo, *inner = pieces
    for name in (owner, repo):
        if _HF_NAME.fullmatch(name) is None or ".." in name or "--" in name:
            raise InvalidRequest(f"invalid Hugging Face repository name {name!r}", param=param)
    for folder in inner[:-1]:
        if _REPO_FOLDER.fullmatch(folder) is None or ".." in folder:
            raise InvalidRequest(f"invalid folder {folder!r} in the repository path", param=param)
    filename = safe_filename(inner[-1], param=param)
    repo_id, path_in_repo = f"{owner}/{repo}", "/".join(inner)
    text = f"hf://{repo_id}/{path_in_repo}" + (f"@{revision}" if revision else "")
    return PullSource(
        "hf", text, filename, repo_id=repo_id, path_in_repo=path_in_repo, revision=revision
    )


def _parse_url(text: str, param: str) -> PullSource:
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 -- raises ValueError for a malformed port
    except ValueError as exc:
        raise InvalidRequest(f"invalid URL: {exc}", param=param) from exc
    if not parts.hostname:
        raise InvalidRequest("the URL has no host", param=param)
    if parts.username is not None or parts.password is not None:
        raise InvalidRequest("credentials in the URL are not supported", param=param)
    sha256 = None
    if parts.fragment:
        match = _SHA256_FRAGMENT.fullmatch(parts.fragment)
        if match is None:
            raise InvalidRequest(
                "the only URL fragment understood is #sha256=<64 hex digits>", param=param
            )
        sha256 = match["hex"].lower()
    last = unquote(parts.path.rpartition("/")[2])
    if "/" in last or "\\" in last:
        raise InvalidRequest("the URL's file name contains an encoded path separator", param=param)
    filename = safe_filename(last, param=param)
    url = urlunsplit((parts.scheme.lower(), parts.netloc, parts.path, parts.query, ""))
    return PullSource("url", url, filename, url=url, sha256=sha256)


def _shard_name(filename: str, index: int) -> str:
    match = SHARD_PATTERN.match(filename)
    assert match is not None
    return f"{match['base']}-{index:05d}-of-{match['count']}{filename[-len('.gguf') :]}"
