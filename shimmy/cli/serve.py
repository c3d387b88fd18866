"""``shimmy serve``: bind, print the banner, run uvicorn until Ctrl-C or SIGTERM."""

from __future__ import annotations

import signal
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from shimmy import __version__
from shimmy.api.admin.gate import model_admin_refusal
from shimmy.api.security import insecure_bind_warning, keys_configured, load_api_keys
from shimmy.cli.options import (
    CommonOptions,
    build_settings,
    discovered_registry,
    with_common_options,
)
from shimmy.cli.output import tell
from shimmy.diag import searched_folders
from shimmy.errors import InvalidRequest, ServerError
from shimmy.settings import Settings

if TYPE_CHECKING:
    from shimmy.registry import ModelRegistry

# Open connections (a long stream, an idle WebSocket) must not keep Ctrl-C waiting forever.
GRACEFUL_SHUTDOWN_SECONDS = 5
# Where Ollama's clients look when they are not told otherwise.
OLLAMA_ADDRESS = "127.0.0.1:11434"


def parse_bind(value: str, flag: str = "--bind") -> tuple[str | None, int | None]:
    """``HOST:PORT``, ``HOST``, ``:PORT``, ``[IPv6]:PORT``, ``[IPv6]`` or a bare IPv6 address
    (``flag`` names the option in errors)."""
    value = value.strip()
    host: str | None
    port_text: str | None = None
    if value.startswith("["):
        inside, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise InvalidRequest(f"cannot parse {flag} '{value}': expected [ADDRESS]:PORT")
        host, port_text = inside, rest[1:] or None
    elif value.count(":") == 1:
        host, port_text = value.split(":")
    else:
        host = value  # a hostname, an IPv4 address, or a bare IPv6 address
    if port_text is None:
        return host or None, None
    if not port_text.isdigit() or int(port_text) > 65535:
        raise InvalidRequest(f"cannot parse {flag} '{value}': bad port '{port_text}'")
    return host or None, int(port_text)


def _listen(host: str, port: int) -> socket.socket:
    """Bind and listen before the server starts: the real port is known (port 0) for the
    banner, and clients that connect right away are queued by the kernel, not refused."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as err:
        raise ServerError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    try:
        if port != 0:  # restart at once on a fixed port whose old connections linger
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as err:
        sock.close()
        raise ServerError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _ollama_address(value: str) -> tuple[str, int]:
    """``--ollama``'s HOST:PORT; a part left out is Ollama's own (127.0.0.1, 11434)."""
    host, port = parse_bind(value, "--ollama")
    default_host, _, default_port = OLLAMA_ADDRESS.partition(":")
    return host or default_host, int(default_port) if port is None else port


def _banner(settings: Settings, registry: ModelRegistry) -> list[str]:
    from shimmy.engine.llama import gpu_offload_supported

    folders = ", ".join(
        str(path) + ("" if path.exists() else " (missing)")
        for _, path in searched_folders(settings)
    )
    if gpu_offload_supported():
        layers = "all" if settings.n_gpu_layers in (None, -1) else str(settings.n_gpu_layers)
        backend = f"llama.cpp with GPU offload ({layers} layers)"
    else:
        backend = "llama.cpp on CPU (this build has no GPU offload)"
    lines = [
        f"shimmy {__version__} listening on {settings.base_url}",
        f"  model folders: {folders}",
        f"  models found:  {len(registry.entries)}, default: {registry.default_id or 'none'}",
        f"  backend:       {backend}",
    ]
    url = settings.base_url
    websocket = url.replace("http", "ws", 1)
    lines.append(f"  native API:    {url}/api  (WebSocket: {websocket}/ws/generate)")
    lines.append(f"  OpenAI API:    {url}/v1")
    if settings.ollama:
        lines.append(f"  Ollama API:    http://{settings.ollama}  (and {url}/ollama)")
    else:
        lines.append(f"  Ollama API:    {url}/ollama  (on Ollama's own port with --ollama)")
    lines.append(f"  RKLLama API:   {url}/rkllama")
    if settings.web_ui:
        lines.append(f"  chat page:     {url}/")
    auth = ' -H "Authorization: Bearer $KEY"' if keys_configured(settings) else ""
    lines.append(f'  try:           curl{auth} {url}/api/generate -d \'{{"prompt": "Hello"}}\'')
    return lines


@with_common_options
def serve(
    common: CommonOptions,
    bind: Annotated[
        str | None,
        typer.Option(
            "--bind", metavar="HOST:PORT", help="Address to listen on ([::1]:PORT for IPv6)"
        ),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option("--port", "-p", help="Port (overrides the port of --bind; 0 = any free)"),
    ] = None,
    cors_origin: Annotated[
        list[str] | None,
        typer.Option("--cors-origin", metavar="ORIGIN", help="Allowed browser origin (repeatable)"),
    ] = None,
    keep_alive: Annotated[
        float | None,
        typer.Option("--keep-alive", help="Idle seconds before a model is unloaded; -1 = never"),
    ] = None,
    max_loaded_models: Annotated[
        int | None, typer.Option("--max-loaded-models", help="Models kept in memory at once")
    ] = None,
    api_key_file: Annotated[
        Path | None,
        typer.Option("--api-key-file", help="File with accepted API keys, one per line"),
    ] = None,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allowed-host", metavar="HOST", help="Extra Host header to accept (repeatable)"
        ),
    ] = None,
    rate_limit: Annotated[
        float | None,
        typer.Option("--rate-limit", help="Requests per minute per client (default: off)"),
    ] = None,
    rate_burst: Annotated[
        int | None, typer.Option("--rate-burst", help="Requests a client may burst")
    ] = None,
    no_web_ui: Annotated[
        bool, typer.Option("--no-web-ui", help="Do not serve the chat page at /")
    ] = False,
    forwarded_allow_ips: Annotated[
        list[str] | None,
        typer.Option(
            "--forwarded-allow-ips",
            metavar="ADDRESS",
            help="Proxy whose X-Forwarded-For is believed (repeatable; default: none)",
        ),
    ] = None,
    allow_private_pull: Annotated[
        bool,
        typer.Option(
            "--allow-private-pull",
            help="Let /api/pull reach loopback, private and link-local addresses",
        ),
    ] = False,
    open_model_admin: Annotated[
        bool,
        typer.Option(
            "--open-model-admin",
            help="Serve /api/pull and DELETE /api/models on a public bind without a key",
        ),
    ] = False,
    max_connections: Annotated[
        int | None, typer.Option("--max-connections", help="Open connections at most")
    ] = None,
    ws_max_queued_bytes: Annotated[
        int | None,
        typer.Option(
            "--ws-max-queued-bytes",
            help="Bytes of unanswered request frames per WebSocket connection",
        ),
    ] = None,
    ollama: Annotated[
        str | None,
        typer.Option(
            "--ollama",
            metavar="[HOST:PORT]",
            is_flag=False,
            flag_value=OLLAMA_ADDRESS,
            help=f"Also serve Ollama's API on a port of its own (alone: {OLLAMA_ADDRESS})",
        ),
    ] = None,
    in_process: Annotated[
        bool,
        typer.Option(
            "--in-process",
            help="Load models in the server's own process: no worker isolation, so a model "
            "that crashes llama.cpp takes the server down",
        ),
    ] = False,
    graceful_timeout: Annotated[
        int,
        typer.Option(
            "--graceful-timeout", help="Seconds in-flight requests get to finish on shutdown"
        ),
    ] = GRACEFUL_SHUTDOWN_SECONDS,
) -> None:
    """Run the HTTP + WebSocket server (native /api, OpenAI-compatible /v1, Ollama's API under
    /ollama, RKLLama's under /rkllama)."""
    host, bind_port = parse_bind(bind) if bind is not None else (None, None)
    settings = build_settings(
        common,
        quiet=False,
        host=host,
        port=port if port is not None else bind_port,
        cors_origins=cors_origin or None,
        keep_alive=keep_alive,
        max_loaded_models=max_loaded_models,
        api_key_file=api_key_file,
        allowed_hosts=allowed_host or None,
        rate_limit=rate_limit,
        rate_burst=rate_burst,
        web_ui=False if no_web_ui else None,
        forwarded_allow_ips=forwarded_allow_ips or None,
        allow_private_pull=True if allow_private_pull else None,
        open_model_admin=True if open_model_admin else None,
        max_connections=max_connections,
        ws_max_queued_bytes=ws_max_queued_bytes,
        ollama=ollama,
        model_workers=False if in_process else None,
    )
    load_api_keys(settings)  # an unreadable or empty key file stops here, with one line
    if settings.ollama:
        _ollama_address(settings.ollama)  # a bad address stops here, before the models load
    registry = discovered_registry(settings)
    if settings.default_model:
        registry.resolve(None)  # fail here, before listening, on an unusable --model
    sockets = [_listen(settings.host, settings.port)]
    settings = settings.model_copy(update={"port": sockets[0].getsockname()[1]})
    hosts = [settings.host]
    if settings.ollama:
        ollama_host, ollama_port = _ollama_address(settings.ollama)
        sockets.append(_listen(ollama_host, ollama_port))
        ollama_port = sockets[1].getsockname()[1]
        if ollama_port == settings.port:
            for sock in sockets:
                sock.close()
            raise InvalidRequest("--ollama needs a port other than the main one")
        settings = settings.model_copy(update={"ollama": _address(ollama_host, ollama_port)})
        hosts.append(ollama_host)
    for line in _banner(settings, registry):
        tell(line)
    for host in dict.fromkeys(hosts):
        warning = insecure_bind_warning(settings.model_copy(update={"host": host}))
        if warning:
            tell(f"warning: {warning}")
    refusal = model_admin_refusal(settings)
    if refusal is not None:
        tell(f"note: {refusal.details}")
    from shimmy.api.app import create_app
    from shimmy.api.ollama.listener import OllamaListener
    from shimmy.server.config import server_config

    app = create_app(settings, registry)
    ports = [sock.getsockname()[1] for sock in sockets[1:]]
    config = server_config(
        OllamaListener(app, ports) if ports else app,
        settings,
        log_config=None,  # keep our stderr handler and format for uvicorn's loggers too
        log_level=settings.log_level,
        lifespan="on",
        access_log=False,  # shimmy.access logs one line per request, with model and tokens
        timeout_graceful_shutdown=graceful_timeout,
    )
    from shimmy.server.shutdown import DrainingServer

    server = DrainingServer(config)

    def terminated(signum: int, frame: object) -> None:
        # uvicorn drains in-flight requests on SIGTERM, then re-raises the signal, which would
        # end the process with -15; as an interrupt it ends like Ctrl-C, with exit code 0.
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminated)
    try:
        # One server on both ports: one lifespan, one graceful drain, one signal handler.
        server.run(sockets=sockets)
    except KeyboardInterrupt:
        pass  # uvicorn has shut down gracefully and re-raised the Ctrl-C: a normal exit
    finally:
        for sock in sockets:
            sock.close()
    if not server.started:
        raise ServerError("the server did not start (see the log above)")
