"""vlp: vision-language pretraining on PyTorch Lightning.

Subpackages are imported lazily so that `vlp data synth` and friends start fast:
``import vlp; vlp.models.CLIP`` works as usual.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"
__all__ = ["blocks", "callbacks", "convert", "data", "encoders", "eval", "models", "objectives", "utils"]


def __getattr__(name: str):
    if name in __all__:
        return importlib.import_module(f"vlp.{name}")
    raise AttributeError(f"module 'vlp' has no attribute {name!r}")
