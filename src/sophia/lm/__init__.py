"""The language-model harness: GPT model, data, presets and the training loop behind ``sophia train``."""
