"""Typed model outputs. Objectives name the fields they need (``Objective.requires``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class VLPOutput:
    """Base class of every family's output."""


@dataclass
class DualEncoderOutput(VLPOutput):
    image_embeds: torch.Tensor | None = None  # (B, E) L2-normalised
    text_embeds: torch.Tensor | None = None  # (B, E) L2-normalised
    image_pooled: torch.Tensor | None = None  # (B, Dv) the image tower's pooled output (linear probe)
    image_tokens: torch.Tensor | None = None  # (B, Li, Dv)
    text_tokens: torch.Tensor | None = None  # (B, Lt, Dt)
    text_mask: torch.Tensor | None = None  # (B, Lt) bool
