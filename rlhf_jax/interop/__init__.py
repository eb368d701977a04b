"""Hugging Face interop: `hf` (import / export), `hf_config`, `hf_weights`."""
