"""GET /api/system on a real server."""

from __future__ import annotations

from typing import Any

import httpx

from shimmy import __version__
from shimmy.api.admin.system import DEVICE_TYPES


def system(client: httpx.Client) -> dict[str, Any]:
    response = client.get("/api/system")
    assert response.status_code == 200
    data: dict[str, Any] = response.json()
    return data


def test_system_reports_hardware_build_and_versions(client: httpx.Client) -> None:
    data = system(client)
    assert data["versions"]["shimmy"] == __version__
    assert isinstance(data["versions"]["python"], str)
    assert isinstance(data["versions"]["llama_cpp_python"], str)

    cpu = data["cpu"]
    assert isinstance(cpu["logical_cores"], int) and cpu["logical_cores"] >= 1
    assert cpu["threads"] == 2  # the tiny server's setting
    assert isinstance(cpu["threads_batch"], int)
    assert isinstance(cpu["features"], list)

    memory = data["memory"]
    assert memory["total_bytes"] >= memory["available_bytes"] > 0
    assert memory["process_rss_bytes"] > 0

    llama = data["llama_cpp"]
    assert isinstance(llama["system_info"], str) and llama["system_info"]
    assert isinstance(llama["gpu_offload"], bool)

    gpu = data["gpu"]
    assert gpu["offload_supported"] is llama["gpu_offload"]
    assert gpu["n_gpu_layers_setting"] is None
    devices = gpu["devices"]
    assert any(device["type"] == "cpu" for device in devices)  # ggml always has a CPU backend
    if any(device["type"] in ("gpu", "igpu") for device in devices):
        assert gpu["offload_supported"]
    for device in devices:
        assert device["type"] in (*DEVICE_TYPES, "other")
        assert isinstance(device["name"], str) and device["name"]
        assert isinstance(device["memory_total_bytes"], int)
        assert isinstance(device["memory_free_bytes"], int)


def test_system_reports_live_state(client: httpx.Client) -> None:
    first = system(client)
    assert isinstance(first["uptime_seconds"], float | int) and first["uptime_seconds"] >= 0
    assert first["models"]["available"] == 1
    assert first["models"]["default"] == "tiny"
    assert first["models"]["loaded"] == []
    assert first["models"]["loading"] == []
    assert isinstance(first["models"]["folders"], list)

    generated = client.post("/api/generate", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
    assert generated.status_code == 200
    second = system(client)
    assert second["requests_total"] == first["requests_total"] + 2
    [loaded] = second["models"]["loaded"]
    assert loaded["id"] == "tiny"
    assert loaded["slots"] == 4
    assert loaded["busy"] == 0
    assert loaded["n_ctx"] == 1024
    assert loaded["tokens_generated"] == generated.json()["usage"]["completion_tokens"]
    assert loaded["load_seconds"] >= 0
    assert loaded["memory_bytes"] > 0
