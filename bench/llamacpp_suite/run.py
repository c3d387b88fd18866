"""Run llama.cpp's own server tests (tools/server/tests/unit) against shimmy and count what
passes, per file.

    .venv/bin/python bench/llamacpp_suite/run.py [--suite DIR] [--model GGUF] [FILE ...]

``--suite`` is a ``tools/server/tests`` folder; without it the llama-cpp-python sdist of the
installed version is fetched with pip (once, into shimmy's cache) and its vendored suite used.
The model defaults to the starter model. Each test starts its server through the shim
(``llama-server`` here, see ``shim.py``), so it runs shimmy exactly as a user would.
Not part of ``make test``: it needs the suite, and it takes minutes.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
SUITE_IN_SDIST = "vendor/llama.cpp/tools/server/tests/"
# The files worth running against one local text model, most routes first.
DEFAULT_FILES = (
    "test_basic.py",
    "test_completion.py",
    "test_tokenize.py",
    "test_chat_completion.py",
    "test_template.py",
    "test_embedding.py",
    "test_infill.py",
    "test_stream.py",
    "test_ignore_eos.py",
    "test_security.py",
    "test_ctx_shift.py",
    "test_metrics.py",
    "test_tool_call.py",
    "test_compat_anthropic.py",
    "test_compat_oai_responses.py",
)


def fetched_suite() -> Path:
    """The suite vendored in the installed llama-cpp-python's sdist, unpacked once."""
    from shimmy.settings import default_cache_dir

    version = importlib.metadata.version("llama-cpp-python")
    target = default_cache_dir() / "llamacpp-suite" / version
    tests = target / "tests"
    if (tests / "utils.py").is_file():
        return tests
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                "-d",
                tmp,
                f"llama-cpp-python=={version}",
            ],
            check=True,
        )
        [sdist] = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        with tarfile.open(sdist) as archive:
            for member in archive.getmembers():
                name = member.name.split("/", 1)[-1]
                if name.startswith(SUITE_IN_SDIST) and (member.isfile() or member.isdir()):
                    member.name = "tests/" + name[len(SUITE_IN_SDIST) :]
                    archive.extract(member, target, filter="data")
    return tests


def starter_model() -> Path:
    from shimmy.models.starter import ensure_starter_model
    from shimmy.settings import Settings

    path = ensure_starter_model(Settings())
    if path is None:
        sys.exit("no starter model: pass --model PATH")
    return path


def run_file(suite: Path, name: str, model: Path, extra: list[str]) -> dict[str, int]:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        env = {
            **os.environ,
            "LLAMA_SERVER_BIN_PATH": str(HERE / "llama-server"),
            "SHIMMY_SUITE_PYTHON": sys.executable,
            "SHIMMY_SUITE_MODEL": str(model),
            # This checkout's shimmy, whichever one the interpreter has installed.
            "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE / "stubs"), str(REPO)]),
        }
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "suite_plugin",
                "-p",
                "no:cacheprovider",
                f"--junitxml={report}",
                f"unit/{name}",
                *extra,
            ],
            cwd=suite,
            env=env,
            check=False,
        )
        if not report.is_file():
            return {"passed": 0, "failed": 0, "skipped": 0, "errors": 1}
        suite_node = ET.parse(report).getroot().find("testsuite")
        assert suite_node is not None
        counts = {
            k: int(suite_node.get(k, "0")) for k in ("tests", "failures", "errors", "skipped")
        }
    return {
        "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
        "failed": counts["failures"],
        "errors": counts["errors"],
        "skipped": counts["skipped"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", default=list(DEFAULT_FILES))
    parser.add_argument("--suite", type=Path, help="a tools/server/tests folder")
    parser.add_argument("--model", type=Path, help="the GGUF every test gets")
    parser.add_argument("--json", type=Path, help="write the counts here too")
    parser.add_argument("--pytest-args", default="", help="more pytest arguments (-x, -k ...)")
    args = parser.parse_args()
    suite = (args.suite or fetched_suite()).resolve()
    model = (args.model or starter_model()).resolve()
    results = {name: run_file(suite, name, model, args.pytest_args.split()) for name in args.files}
    print(f"\n{'file':32} passed failed errors skipped")
    for name, c in results.items():
        print(f"{name:32} {c['passed']:6} {c['failed']:6} {c['errors']:6} {c['skipped']:7}")
    total = {k: sum(c[k] for c in results.values()) for k in ("passed", "failed", "errors")}
    print(f"{'total':32} {total['passed']:6} {total['failed']:6} {total['errors']:6}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
