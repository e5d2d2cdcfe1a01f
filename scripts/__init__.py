"""Maintenance scripts (run as `python scripts/NAME.py`); a package so tests can import them."""
