"""The one interface every tower adapter speaks.

An encoder maps its input to :class:`EncoderOutput`: a token sequence ``(B, L, dim)``,
a pooled vector ``(B, pooled_dim)`` and, for text, the padding mask. ``lock()``
freezes it (LiT-style), optionally leaving the top layers trainable; frozen parts stay
in eval mode even when Lightning calls ``model.train()``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._BatchNorm)


@dataclass
class EncoderOutput:
    tokens: torch.Tensor  # (B, L, dim)
    pooled: torch.Tensor  # (B, pooled_dim)
    mask: torch.Tensor | None = None  # (B, L) bool, True = real token; None = all real
    #: (B, L, dim) the states before a pre-norm tower's final norm (FLAVA's multimodal encoder
    #: reads them); None: the tower has none apart from ``tokens``
    hidden: torch.Tensor | None = None

    @property
    def prenorm(self) -> torch.Tensor:
        """``hidden`` where the tower gives it, else ``tokens`` (B, L, dim)."""
        return self.tokens if self.hidden is None else self.hidden


class Encoder(nn.Module):
    """Base class of tower adapters.

    Subclasses set ``self.dim`` (token width) and ``self.pooled_dim`` (defaults to ``dim``)
    and implement ``forward`` and ``layer_groups`` (bottom-to-top list of modules, used by
    ``lock(unlocked_layers=N)`` to keep the top N trainable).
    """

    dim: int
    pooled_dim: int
    #: text towers: rows of the input embedding, the largest vocabulary it reads (None: any)
    vocab_size: int | None = None
    #: text towers: the longest token sequence it takes (None: no limit)
    max_length: int | None = None

    def image_size_error(self, size: int) -> str | None:
        """Vision towers: why square images of ``size`` px cannot go in, as the end of the
        sentence "data.image_size is <size> but model.image_encoder ..."; None if they can."""
        return None

    def __init__(self) -> None:
        super().__init__()
        self._locked: list[nn.Module] = []

    def layer_groups(self) -> list[nn.Module]:
        """Modules from input to output; the last ``unlocked_layers`` stay trainable in lock()."""
        return [self]

    def lock(self, unlocked_layers: int = 0, freeze_norm: bool = True) -> Encoder:
        """Freeze all but the top ``unlocked_layers`` groups; frozen groups stay in eval mode.

        ``freeze_norm=False`` leaves normalisation layers of frozen groups trainable.
        Call it at construction or in ``setup`` (never inside ``forward``).
        """
        groups = self.layer_groups()
        if unlocked_layers < 0 or unlocked_layers > len(groups):
            raise ValueError(f"unlocked_layers={unlocked_layers} is outside 0..{len(groups)} for {type(self).__name__}")
        frozen = groups[: len(groups) - unlocked_layers]
        for group in frozen:
            for module in group.modules():
                is_norm = isinstance(module, _NORMS) or type(module).__name__.endswith("RMSNorm")
                if is_norm and not freeze_norm:
                    continue
                for p in module.parameters(recurse=False):
                    p.requires_grad_(False)
        self._locked = [self] if unlocked_layers == 0 else list(frozen)
        self.train(self.training)
        return self

    @property
    def is_locked(self) -> bool:
        return bool(self._locked)

    def train(self, mode: bool = True) -> Encoder:
        super().train(mode)
        for group in self._locked:  # frozen parts never go back to train mode (dropout, BN stats)
            nn.Module.train(group, False)
        return self
