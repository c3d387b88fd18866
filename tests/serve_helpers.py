"""Running ``shimmy serve`` as a real subprocess on a loopback port, with its log kept.

For tests that need what only a process of its own gives: a descriptor limit, a mount
namespace, the command line's flags, the access log on stderr.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

START_TIMEOUT = 60


@dataclass
class ServedProcess:
    process: subprocess.Popen[bytes]
    url: str
    lines: list[str] = field(default_factory=list)  # stderr, as it comes
    lock: threading.Condition = field(default_factory=threading.Condition)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def log(self) -> str:
        with self.lock:
            return "".join(self.lines)

    def wait_for_log(self, done: Callable[[str], bool], timeout: float = 30) -> str:
        """The log once ``done(log)`` holds. The access log is written after the response
        has gone out, so a client can see its answer before the line reaches stderr."""
        with self.lock:
            self.lock.wait_for(lambda: done("".join(self.lines)), timeout)
            return "".join(self.lines)


def serve_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("SHIMMY_")}
    env.update(
        {
            "SHIMMY_CACHE_DIR": str(tmp / "cache"),
            "SHIMMY_MODELS_DIR": str(tmp / "own-models"),
            "SHIMMY_SCAN_USER_CACHES": "false",
            "SHIMMY_STARTER_MODEL": "false",
            "SHIMMY_CTX_SIZE": "512",
            "SHIMMY_PARALLEL": "1",
            "SHIMMY_THREADS": "1",
        }
    )
    env.update(extra)
    return env


def _limit_descriptors(limit: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    return apply


@contextlib.contextmanager
def served(
    args: Sequence[str],
    env: dict[str, str],
    *,
    nofile: int | None = None,
    prefix: Sequence[str] = (),
) -> Iterator[ServedProcess]:
    """``[*prefix] python -m shimmy serve --bind 127.0.0.1:0 ARGS``; yields once it listens.
    ``nofile`` sets the child's descriptor limit (soft and hard)."""
    command = [*prefix, sys.executable, "-m", "shimmy", "serve", "--bind", "127.0.0.1:0", *args]
    process = subprocess.Popen(
        command,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=_limit_descriptors(nofile) if nofile is not None else None,
    )
    assert process.stderr is not None
    served_process = ServedProcess(process, "")
    try:
        while not served_process.url:  # the banner line comes once the socket listens
            line = process.stderr.readline().decode()
            assert line, "serve exited before listening: " + served_process.log()
            served_process.lines.append(line)
            found = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
            if found:
                served_process.url = found.group(1)
        stderr = process.stderr

        def keep_reading() -> None:
            for raw in stderr:
                with served_process.lock:
                    served_process.lines.append(raw.decode(errors="replace"))
                    served_process.lock.notify_all()

        reader = threading.Thread(target=keep_reading, daemon=True)
        reader.start()
        yield served_process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
