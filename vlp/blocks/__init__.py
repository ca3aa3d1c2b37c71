"""Shared building blocks (plain ``nn.Module``s): attention, MLP, transformer blocks and stacks,
METER fusion encoders, a text decoder for encoder-decoder models, and Flamingo's perceiver resampler and gated cross-attention."""

from vlp.blocks.attention import Attention
from vlp.blocks.decoder import TextDecoder
from vlp.blocks.fusion import CoAttentionFusion, FusionOutput, MergedAttentionFusion
from vlp.blocks.gated_xattn import GatedCrossAttentionDense, MaskedCrossAttention
from vlp.blocks.mlp import Mlp
from vlp.blocks.perceiver import FeedForward, PerceiverAttention, PerceiverResampler
from vlp.blocks.transformer import Transformer, TransformerBlock

__all__ = [
    "Attention",
    "CoAttentionFusion",
    "FeedForward",
    "FusionOutput",
    "GatedCrossAttentionDense",
    "MaskedCrossAttention",
    "MergedAttentionFusion",
    "Mlp",
    "PerceiverAttention",
    "PerceiverResampler",
    "TextDecoder",
    "Transformer",
    "TransformerBlock",
]
