"""The synthetic "shapes" benchmark; it lives in :mod:`vlp.data.shapes` (this module
re-exports it, so ``from vlp.data.synth import write_shapes`` keeps working)."""

from __future__ import annotations

from vlp.data.shapes import *  # noqa: F403
from vlp.data.shapes import __all__  # noqa: F401
