"""HTTP and WebSocket transports: the native Shimmy API, OpenAI's /v1 and /ws."""
