"""The HTTP server under the app: uvicorn, configured from ``Settings`` (``config``), with a
protocol that adds the read deadlines, connection cap and lingering close it lacks
(``protocol``)."""
