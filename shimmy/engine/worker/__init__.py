"""Each loaded model in a process of its own, so that llama.cpp aborting (an assertion on a
hostile file, a segfault, the OOM killer) ends that model's requests and nothing else.

``WorkerEngine`` (``client``) is the server's side of a worker and implements ``Engine``;
``main`` is the worker process, which runs a ``LocalEngine``; ``wire`` is what they say.
"""

from shimmy.engine.worker.client import WorkerEngine

__all__ = ["WorkerEngine"]
