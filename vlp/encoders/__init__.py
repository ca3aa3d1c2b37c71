"""Tower adapters: timm / open_clip vision towers and Hugging Face text models behind one
interface, :class:`Encoder` -> :class:`EncoderOutput` ``(tokens, pooled, mask)``."""

from vlp.encoders.base import Encoder, EncoderOutput
from vlp.encoders.text import HFCausalLM, HFTextEncoder
from vlp.encoders.vision import OpenCLIPVisionEncoder, TimmVisionEncoder

__all__ = [
    "Encoder",
    "EncoderOutput",
    "HFCausalLM",
    "HFTextEncoder",
    "OpenCLIPVisionEncoder",
    "TimmVisionEncoder",
]
