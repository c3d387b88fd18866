"""``llama-server``'s command line, run as ``shimmy serve``: the argument shim that lets
llama.cpp's own server tests (tools/server/tests) start shimmy instead.

Every model the suite asks for (``--model``, ``--hf-repo``...) is the one GGUF in
``SHIMMY_SUITE_MODEL``: there is no download here, so the report counts only the tests written
for the suite's default model. Flags map as follows; a flag for a feature shimmy does not have
(speculative decoding, LoRA at startup, router mode, slot saving, multimodal projectors, MCP
tools...) ends the shim with status 2, so the test fails at once and says why.

- ``--ctx-size`` is llama.cpp's whole KV cache, shared by ``--parallel`` slots; shimmy's
  ``--ctx-size`` is one sequence's: it gets ``ctx / parallel``.
- ``--temp``, ``--seed``, ``--n-predict``, ``--alias`` and ``--chat-template-file`` become the
  model's TOML config (sampling defaults, aliases, template); ``--n-predict`` also caps
  ``max_tokens``.
- The model names the suite's requests use ("test", "gpt-3.5-turbo"...) become aliases:
  shimmy refuses a name it does not serve, where llama-server takes any.
- ``--host`` and ``--port`` become ``--bind``; ``--api-key``, ``--threads``, ``--batch-size``,
  ``--n-gpu-layers``, ``--no-ui`` have shimmy equivalents.
- Flags that change nothing observable here (``--jinja``, ``--cont-batching``, ``--embedding``,
  ``--slots``, ``--metrics``, ``-fa``...) are accepted and dropped.

With ``SHIMMY_SUITE_REAL_SERVER`` set to a llama-server binary, the shim runs that instead, with
only the model flags replaced by the same local GGUF: the baseline the shimmy run is judged by.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

UNSUPPORTED = (
    "--model-draft",
    "--spec-type",
    "--lora",
    "--models-dir",
    "--models-preset",
    "--slot-save-path",
    "--mmproj-url",
    "--media-path",
    "--sleep-idle-seconds",
    "--tools",
    "--mcp-servers-config",
    "--mcp-servers-json",
    "--grp-attn-n",
    "--context-shift",
    "--reasoning",
    "--reasoning-format",
)


SUITE_MODEL_NAMES = (
    "test",
    "gpt-3.5-turbo",
    "gpt-3.5-turbo-instruct",
    "gpt-4.1",
    "davinci-002",
    "text-embedding-3-small",
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llama-server (shimmy shim)", add_help=False)
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--temp", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--ctx-size", type=int)
    p.add_argument("--parallel", type=int, default=1)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--n-gpu-layers", type=int)
    p.add_argument("--n-predict", type=int)
    p.add_argument("--alias")
    p.add_argument("--api-key")
    p.add_argument("--chat-template-file")
    p.add_argument("--no-ui", action="store_true")
    for flag in UNSUPPORTED:
        p.add_argument(flag, dest=flag.lstrip("-").replace("-", "_") + "_unsupported")
    return p


def model_id(model: Path) -> str:
    """The id shimmy gives a GGUF file named with ``--model``."""
    from shimmy.models.discovery import entry_for_file

    return entry_for_file(model).id


def config_text(args: argparse.Namespace, model: Path) -> str:
    options: dict[str, object] = {}
    aliases = [a.strip() for a in (args.alias or "").split(",") if a.strip()]
    # llama-server answers to any model name; shimmy checks them (a deliberate difference),
    # so the names the suite's requests use are made aliases, as a user would in the config.
    options["aliases"] = list(dict.fromkeys([*aliases, *SUITE_MODEL_NAMES]))
    if args.chat_template_file:
        options["chat_template"] = Path(args.chat_template_file).read_text()
    sampling: dict[str, object] = {}
    if args.temp is not None:
        sampling["temperature"] = args.temp
    if args.seed is not None and 0 <= args.seed < 2**32:
        sampling["seed"] = args.seed
    if args.n_predict is not None and args.n_predict > 0:
        sampling["max_tokens"] = args.n_predict
    key = json.dumps(model_id(model))
    lines = [f"[models.{key}]"]
    lines += [f"{name} = {json.dumps(value)}" for name, value in options.items()]
    lines.append(f"[models.{key}.sampling]")
    lines += [f"{name} = {json.dumps(value)}" for name, value in sampling.items()]
    return "\n".join(lines) + "\n"


def command(args: argparse.Namespace, model: Path, config: Path) -> list[str]:
    parallel = max(1, args.parallel)
    host = args.host.split(",")[0].strip()
    bind = f"[{host}]:{args.port}" if ":" in host else f"{host}:{args.port}"
    argv = [sys.executable, "-m", "shimmy", "serve", "--bind", bind, "-m", str(model)]
    argv += ["--config", str(config), "--parallel", str(parallel), "--keep-alive", "-1"]
    argv += ["--no-user-caches", "--no-starter"]
    if args.ctx_size:
        argv += ["--ctx-size", str(max(64, args.ctx_size // parallel))]
    for flag, value in (
        ("--batch-size", args.batch_size),
        ("--threads", args.threads),
        ("--n-gpu-layers", args.n_gpu_layers),
        ("--api-key", args.api_key),
    ):
        if value is not None:
            argv += [flag, str(value)]
    if args.no_ui:
        argv.append("--no-web-ui")
    return argv


# llama-server's flags that name where a model comes from, each with one value.
MODEL_SOURCE_FLAGS = frozenset(
    {"-m", "--model", "-mu", "--model-url", "-hf", "-hfr", "--hf-repo", "-hff", "--hf-file"}
)


def real_server_argv(binary: str, argv: list[str], model: Path) -> list[str]:
    """llama-server's own command line with every model source replaced by ``model``."""
    kept: list[str] = []
    values = iter(argv)
    for arg in values:
        if arg in MODEL_SOURCE_FLAGS:
            next(values, None)
        elif arg != "--offline":
            kept.append(arg)
    return [binary, "--model", str(model), "--offline", *kept]


def main() -> None:
    model = Path(os.environ["SHIMMY_SUITE_MODEL"])
    real = os.environ.get("SHIMMY_SUITE_REAL_SERVER")
    if real:
        argv = real_server_argv(real, sys.argv[1:], model)
        print("shim (llama-server):", " ".join(argv), flush=True)
        os.execv(argv[0], argv)
    args, _dropped = parser().parse_known_args()
    for name, value in vars(args).items():
        if name.endswith("_unsupported") and value is not None:
            flag = "--" + name.removesuffix("_unsupported").replace("_", "-")
            sys.exit(f"shim: shimmy has no equivalent of {flag}")
    folder = Path(tempfile.mkdtemp(prefix="shimmy-suite-"))
    config = folder / "models.toml"
    config.write_text(config_text(args, model))
    env = {**os.environ, "SHIMMY_MODELS_DIR": str(folder / "models")}
    if args.n_predict is not None and args.n_predict > 0:
        env["SHIMMY_MAX_TOKENS_CAP"] = str(args.n_predict)
    argv = command(args, model, config)
    print("shim:", " ".join(argv), flush=True)
    os.execve(argv[0], argv, env)


if __name__ == "__main__":
    main()
