"""Run llama.cpp's own server tests (tools/server/tests/unit) against shimmy and count what
passes, per file.

    .venv/bin/python bench/llamacpp_suite/run.py [--suite DIR] [--model GGUF] [FILE ...]

``--suite`` is a ``tools/server/tests`` folder; without it the llama-cpp-python sdist of the
installed version is fetched with pip (once, into shimmy's cache) and its vendored suite used.
The model defaults to the starter model. Each test starts its server through the shim
(``llama-server`` here, see ``shim.py``), so it runs shimmy exactly as a user would.

The baseline is llama.cpp's server on the same model and the same tests:

    run.py --llama-server PATH --json base.json     # llama.cpp's server itself
    run.py --baseline base.json                     # shimmy, judged against it
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


def outcomes(report: Path) -> dict[str, str]:
    """Each test's outcome in a junit report: passed, failed, error or skipped."""
    found: dict[str, str] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = "passed"
        for child, label in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            if case.find(child) is not None:
                outcome = label
        found[name] = outcome
    return found


def run_file(
    suite: Path, name: str, model: Path, extra: list[str], real_server: Path | None
) -> dict[str, str]:
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
        if real_server is not None:
            env["SHIMMY_SUITE_REAL_SERVER"] = str(real_server)
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
            return {f"unit.{name}::<collection>": "error"}
        return outcomes(report)


def counts(results: dict[str, str]) -> dict[str, int]:
    return {k: sum(1 for v in results.values() if v == k) for k in OUTCOMES}


OUTCOMES = ("passed", "failed", "error", "skipped")


def compare(results: dict[str, dict[str, str]], baseline: dict[str, dict[str, str]]) -> None:
    """Of the tests llama-server passed, which shimmy passes too, per file."""
    print(f"\n{'file':32} {'llama-server passed':>20} {'shimmy passes too':>18}")
    total_base = total_both = 0
    missing: list[str] = []
    for name, cases in results.items():
        base = {t for t, v in baseline.get(name, {}).items() if v == "passed"}
        both = {t for t in base if cases.get(t) == "passed"}
        missing += sorted(base - both)
        total_base += len(base)
        total_both += len(both)
        print(f"{name:32} {len(base):20} {len(both):18}")
    share = total_both / total_base if total_base else 0.0
    print(f"{'total':32} {total_base:20} {total_both:18}  ({share:.1%})")
    if missing:
        print("\nPassed by llama-server, not by shimmy:")
        for test in missing:
            print("  " + test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", default=list(DEFAULT_FILES))
    parser.add_argument("--suite", type=Path, help="a tools/server/tests folder")
    parser.add_argument("--model", type=Path, help="the GGUF every test gets")
    parser.add_argument("--json", type=Path, help="write each test's outcome here too")
    parser.add_argument(
        "--llama-server", type=Path, help="run llama.cpp's server itself (the baseline)"
    )
    parser.add_argument("--baseline", type=Path, help="a --json of the llama-server run")
    parser.add_argument("--pytest-args", default="", help="more pytest arguments (-x, -k ...)")
    args = parser.parse_args()
    suite = (args.suite or fetched_suite()).resolve()
    model = (args.model or starter_model()).resolve()
    real = args.llama_server.resolve() if args.llama_server else None
    extra = args.pytest_args.split()
    results: dict[str, dict[str, str]] = {}
    for name in args.files:
        results[name] = run_file(suite, name, model, extra, real)
        if args.json:  # after each file: a run stopped early keeps what it measured
            args.json.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"\n{'file':32} passed failed errors skipped")
    for name, cases in results.items():
        c = counts(cases)
        print(f"{name:32} {c['passed']:6} {c['failed']:6} {c['error']:6} {c['skipped']:7}")
    total = counts({f"{n}/{t}": v for n, cases in results.items() for t, v in cases.items()})
    print(f"{'total':32} {total['passed']:6} {total['failed']:6} {total['error']:6}")
    if args.baseline:
        compare(results, json.loads(args.baseline.read_text()))


if __name__ == "__main__":
    main()
