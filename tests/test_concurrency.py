"""Concurrent serving through real HTTP: no cross-talk, bounded queue, prefix reuse."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import isolated_settings

from shimmy.settings import Settings


async def stream_generate(
    client: httpx.AsyncClient, url: str, body: dict[str, Any]
) -> dict[str, Any]:
    """POST /api/generate with stream=true; return the joined text, final event and chunk count."""
    pieces: list[str] = []
    final: dict[str, Any] = {}
    async with client.stream("POST", f"{url}/api/generate", json={**body, "stream": True}) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: ") :])
            choice = event["choices"][0]
            pieces.append(choice["text"])
            if choice["finish_reason"] is not None:
                final = event
    return {"text": "".join(pieces), "final": final, "chunks": len(pieces)}


async def test_simultaneous_streams_each_get_their_own_answer(tiny_server: str) -> None:
    """Eight different requests streamed at once equal the same requests run one by one.

    With the F32 tiny model llama.cpp's CPU kernels are batch-invariant, so this is an exact
    check: any mix-up of sequences, logits rows or sampler state would change some text.
    """
    bodies = [
        {
            "model": "tiny",
            "prompt": f"client {i} says " * (i + 1),
            "max_tokens": 40,
            "temperature": 0.8,
            "seed": 1000 + i,
        }
        for i in range(8)
    ]
    async with httpx.AsyncClient(timeout=60) as client:
        alone = []
        for body in bodies:
            resp = await client.post(f"{tiny_server}/api/generate", json=body)
            assert resp.status_code == 200
            alone.append(resp.json()["choices"][0]["text"])
        together = await asyncio.gather(*(stream_generate(client, tiny_server, b) for b in bodies))
    assert [t["text"] for t in together] == alone
    assert all(t["final"]["choices"][0]["finish_reason"] == "length" for t in together)
    assert len(set(alone)) == len(alone)


async def test_queue_overflow_gets_503_with_retry_after(
    tiny_model_dir: Path, tmp_path: Path, server_factory: Callable[[Settings], str]
) -> None:
    url = server_factory(isolated_settings(tiny_model_dir, tmp_path, parallel=1, max_queue=0))
    body = {"model": "tiny", "prompt": "hold the slot", "max_tokens": 100_000, "stream": True}
    async with httpx.AsyncClient(timeout=60) as client:
        async with client.stream("POST", f"{url}/api/generate", json=body) as holder:
            assert holder.status_code == 200
            lines = holder.aiter_lines()
            assert (await anext(lines)).startswith("data: ")
            refused = await client.post(
                f"{url}/api/generate", json={"model": "tiny", "prompt": "x", "max_tokens": 1}
            )
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "server_busy"
            assert int(refused.headers["Retry-After"]) >= 1
        # The holder disconnected: its slot frees and the server serves again.
        for _ in range(200):
            ok = await client.post(
                f"{url}/api/generate", json={"model": "tiny", "prompt": "x", "max_tokens": 1}
            )
            if ok.status_code == 200:
                break
        assert ok.status_code == 200


async def test_every_queued_request_completes(
    tiny_model_dir: Path, tmp_path: Path, server_factory: Callable[[Settings], str]
) -> None:
    """With one slot, queued requests all complete (none waits forever) and none is lost."""
    url = server_factory(isolated_settings(tiny_model_dir, tmp_path, parallel=1, max_queue=16))
    bodies = [{"model": "tiny", "prompt": f"q{i}", "max_tokens": 20} for i in range(10)]
    async with httpx.AsyncClient(timeout=60) as client:
        results = await asyncio.gather(*(stream_generate(client, url, b) for b in bodies))
    assert all(r["final"]["usage"]["completion_tokens"] == 20 for r in results)


@pytest.mark.starter
async def test_starter_twins_in_one_batch_answer_identically(
    starter_model_path: Path, tmp_path: Path, server_factory: Callable[..., str]
) -> None:
    """No cross-talk on the real model.

    Quantized kernels are not batch-invariant (a greedy answer computed in a batch can differ
    from the same request alone at a near-tie), so "equal to solo" is not a sound check here.
    Instead two different prompts are each sent twice in one /v1/completions call, so all four
    start in the same batch step: twins then see identical arithmetic at every step and must
    produce identical text, while the two pairs differ. Any leak of positions, logits rows or
    sampler state between sequences of the batch breaks a pair.

    Where a sequence's KV cells sit in its cache also moves the arithmetic (the order
    attention sums them in), and that depends on what the slot held before: the twins must
    start from the same cache state, so the test has a server of its own, with empty slots.
    """
    settings = isolated_settings(starter_model_path.parent, tmp_path, ctx_size=2048, parallel=4)
    url = server_factory(settings.model_copy(update={"model_paths": [starter_model_path]}))
    prompts = ["Once upon a time", "The first man on the moon was"]
    body = {
        "model": "default",
        "prompt": prompts + prompts,
        "max_tokens": 48,
        "temperature": 0.8,
        "seed": 7,
    }
    async with httpx.AsyncClient(timeout=120) as client:
        resp = await client.post(f"{url}/v1/completions", json=body)
    assert resp.status_code == 200, resp.text
    choices = sorted(resp.json()["choices"], key=lambda c: c["index"])
    texts = [c["text"] for c in choices]
    assert texts[:2] == texts[2:]
    assert texts[0] != texts[1]
    assert all(t.strip() for t in texts)
