"""LLMux: an OpenAI-compatible LLM gateway built from Envoy and a Python ext_proc server."""

__version__ = "0.1.0"
