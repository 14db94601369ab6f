"""proxy-eval: score base / expert / proxy-tuned / truly tuned models on a task file through any
OpenAI-compatible server and report the gap closed (see ``proxy_eval.cli``); ``proxy_eval.local`` is a naive
in-process proxy-tuning decoder used to measure a family without a server."""
