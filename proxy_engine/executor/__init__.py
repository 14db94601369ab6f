"""The model executor layer: how one model decodes its rows on its device (see selection.py).

``static`` (static_executor.py, on CUDA with graphs), ``fast`` (fast_decode.py, the CPU backend) and
``transformers`` (the model's own forward); ``ModelRunner`` (runner.py) owns rows and prefill and calls one.
"""

from proxy_engine.executor.selection import (
    FAST,
    KV_MEMORY_FRACTION,
    STATIC,
    TRANSFORMERS,
    choose_executor,
    running_cap,
    static_kv_plans,
    wants_static,
)

__all__ = ["FAST", "KV_MEMORY_FRACTION", "STATIC", "TRANSFORMERS", "choose_executor", "running_cap", "static_kv_plans",
           "wants_static"]
