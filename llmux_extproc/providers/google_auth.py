"""Moved to `llmux_extproc.providers.auth.google_auth`; this alias keeps the old import path.

The module object itself is replaced by the new one, so monkeypatching either name
changes the same module.
"""

import sys

from llmux_extproc.providers.auth import google_auth as _moved
from llmux_extproc.providers.auth.google_auth import *  # noqa: F403  (the names, for type checkers)

sys.modules[__name__] = _moved
