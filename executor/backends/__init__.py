"""LLM backends: the interface, the OpenAI-compatible implementation, presets and plugins."""
