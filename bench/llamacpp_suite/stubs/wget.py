"""Stands in for the ``wget`` package llama.cpp's test utilities import: the suite runs against
a local model here, so a test that wants to download something fails, saying why."""


def download(url: str, *args: object, **kwargs: object) -> str:
    raise RuntimeError(f"downloads are off in the shimmy run of llama.cpp's suite: {url}")
