"""A pytest plugin for the shimmy run of llama.cpp's server tests (``-p suite_plugin``).

The suite's session fixture starts every server preset once to download its model; here every
preset is the local model, so that warm-up is skipped (it would only start shimmy eight times).
"""

from __future__ import annotations

import sys

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    utils = sys.modules.get("utils")
    if utils is not None:
        utils.ServerPreset.load_all = staticmethod(lambda: None)
