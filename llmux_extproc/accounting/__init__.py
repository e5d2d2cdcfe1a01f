"""Tokens (offline tiktoken), prices and usage: what each answer cost."""
