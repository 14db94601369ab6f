"""config.json shape keys of the real models the configs in configs/ name, with their published parameter counts.

Used to check the memory estimator against real numbers and to check that each config fits the GPUs its
comments promise, without any weights on this machine.
"""

from __future__ import annotations

_LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
    "max_position_embeddings": 4096, "tie_word_embeddings": False, "torch_dtype": "float16",
}
_LLAMA2_70B = {
    **_LLAMA2_7B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
    "num_attention_heads": 64, "num_key_value_heads": 8,
}
_LLAMA31_8B = {
    **_LLAMA2_7B, "intermediate_size": 14336, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 131072, "torch_dtype": "bfloat16",
}
_LLAMA31_70B = {**_LLAMA2_70B, "vocab_size": 128256, "max_position_embeddings": 131072, "torch_dtype": "bfloat16"}
_QWEN25_72B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 8192, "intermediate_size": 29568,
    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 152064,
    "max_position_embeddings": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}
_QWEN25_05B = {
    **_QWEN25_72B, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
    "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768,
    "tie_word_embeddings": True,
}
_CODELLAMA_7B = {**_LLAMA2_7B, "vocab_size": 32016, "max_position_embeddings": 16384, "torch_dtype": "bfloat16"}
_CODELLAMA_7B_PYTHON = {**_CODELLAMA_7B, "vocab_size": 32000}

# hub id -> (config.json keys, published parameter count)
KNOWN_MODELS: dict[str, tuple[dict, int]] = {
    "meta-llama/Llama-2-7b-hf": (_LLAMA2_7B, 6_738_415_616),
    "meta-llama/Llama-2-7b-chat-hf": (_LLAMA2_7B, 6_738_415_616),
    "meta-llama/Llama-2-70b-hf": (_LLAMA2_70B, 68_976_648_192),
    "meta-llama/Llama-3.1-8B": (_LLAMA31_8B, 8_030_261_248),
    "meta-llama/Llama-3.1-8B-Instruct": (_LLAMA31_8B, 8_030_261_248),
    "meta-llama/Llama-3.1-70B": (_LLAMA31_70B, 70_553_706_496),
    "Qwen/Qwen2.5-72B": (_QWEN25_72B, 72_706_203_648),
    "Qwen/Qwen2.5-0.5B": (_QWEN25_05B, 494_032_768),
    "Qwen/Qwen2.5-0.5B-Instruct": (_QWEN25_05B, 494_032_768),
    "codellama/CodeLlama-7b-hf": (_CODELLAMA_7B, 6_738_546_688),
    "codellama/CodeLlama-7b-Python-hf": (_CODELLAMA_7B_PYTHON, 6_738_415_616),
}
