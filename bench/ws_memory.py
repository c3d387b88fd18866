"""Server memory under big WebSocket frames: RSS before, at its peak while connections queue
frames, and after they have closed.

    python bench/ws_memory.py [--connections 4] [--frames 32] [--mib 3.9] [-- SERVE FLAGS]

Runs ``python -m shimmy serve`` (from the shimmy on ``PYTHONPATH``) on the tiny test model.
Each frame is a small request padded with JSON whitespace to its size, so what is measured is
the holding of frames, not tokenization.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from websockets.sync.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tiny_gguf import write_tiny_gguf


def _mb(process: psutil.Process) -> float:
    return process.memory_info().rss / 1e6


def _client(url: str, frames: int, frame: str, finals: list[int]) -> None:
    with connect(url, open_timeout=30, max_size=None) as ws:
        for _ in range(frames):
            ws.send(frame)
        done = 0
        while done < frames:
            answer = json.loads(ws.recv(timeout=300))
            if "token" not in answer:
                done += 1
        finals.append(done)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--mib", type=float, default=3.9)
    parser.add_argument("serve_flags", nargs="*")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_tiny_gguf(folder / "tiny.gguf")
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHIMMY_")}
        env.update(
            SHIMMY_CACHE_DIR=str(folder / "cache"),
            SHIMMY_MODELS_DIR=str(folder / "own"),
            SHIMMY_MODEL_PATHS=str(folder),
            SHIMMY_SCAN_USER_CACHES="false",
            SHIMMY_STARTER_MODEL="false",
            SHIMMY_THREADS="1",
        )
        command = [sys.executable, "-m", "shimmy", "serve", "--bind", "127.0.0.1:0"]
        server = subprocess.Popen(
            [*command, *args.serve_flags], env=env, stderr=subprocess.PIPE, text=True
        )
        assert server.stderr is not None
        url = ""
        while not url:
            line = server.stderr.readline()
            assert line, "serve exited"
            found = re.search(r"listening on http://(127\.0\.0\.1:\d+)", line)
            url = f"ws://{found.group(1)}/ws/generate" if found else ""
        threading.Thread(target=server.stderr.read, daemon=True).start()
        process = psutil.Process(server.pid)
        small = json.dumps({"model": "tiny", "prompt": "go", "max_tokens": 8})
        _client(url, 1, small, [])  # the model is loaded: that is the baseline
        baseline = _mb(process)
        frame = small + " " * int(args.mib * (1 << 20) - len(small))
        peak = baseline
        finals: list[int] = []
        clients = [
            threading.Thread(target=_client, args=(url, args.frames, frame, finals))
            for _ in range(args.connections)
        ]
        for client in clients:
            client.start()
        while any(client.is_alive() for client in clients):
            peak = max(peak, _mb(process))
            time.sleep(0.05)
        closed = _mb(process)
        time.sleep(5)
        later = _mb(process)
        server.terminate()
        server.wait(timeout=60)
        print(
            f"{args.connections} connections x {args.frames} frames of {args.mib} MiB "
            f"({sum(finals)} answered): RSS baseline {baseline:.0f} MB, peak {peak:.0f} MB, "
            f"after close {closed:.0f} MB, 5 s later {later:.0f} MB"
        )


if __name__ == "__main__":
    main()
