"""OpenAI-compatible HTTP server for proxy-tuned models (``create_app`` and the ``proxy-serve`` command)."""
