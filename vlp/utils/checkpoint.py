"""Reading checkpoints safely: ``torch.load(weights_only=True)`` or safetensors, never pickle.

Checkpoints from others are untrusted. Every failure names the file.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from vlp.errors import CheckpointError
from vlp.utils.paths import resolve_path


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint file as plain data (tensors, numbers, strings, containers)."""
    path = resolve_path(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as e:
            raise CheckpointError(f"cannot read safetensors file {path}: {e}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"cannot read checkpoint {path} with weights_only=True ({type(e).__name__}: {str(e).splitlines()[0]}); "
            "it is not a checkpoint, is corrupt, or needs arbitrary code to unpickle"
        ) from None


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model state dict inside a Lightning/vlp checkpoint, or the file itself if it is one."""
    ckpt = read_checkpoint(path)
    for key in ("state_dict", "model", "module"):
        if isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
            break
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise CheckpointError(f"{path}: no state dict found (expected a 'state_dict' mapping of tensors)")
    return ckpt
