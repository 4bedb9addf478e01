"""The policy: a pure-functional Qwen3/Llama/Qwen2 transformer, its HF and GGUF checkpoint mappings, tokenizer and chat template."""
