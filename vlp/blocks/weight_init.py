"""Weight init shared by the blocks: ``module.apply(init_weights)`` at the end of ``__init__``."""

from __future__ import annotations

from torch import nn


def init_weights(module: nn.Module) -> None:
    """Truncated-normal (std .02) Linear weights, zero biases, unit/zero LayerNorm (ViT, BERT)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
