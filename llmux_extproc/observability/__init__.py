"""Metrics (and, later, tracing)."""
