"""The model: Qwen2 in Flax NNX with a KV cache, Hugging Face interop, checkpoint files."""
