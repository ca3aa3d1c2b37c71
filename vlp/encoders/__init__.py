"""Tower adapters: timm / open_clip vision towers and Hugging Face text models behind one
interface, :class:`Encoder` -> :class:`EncoderOutput` ``(tokens, pooled, mask)``."""

from vlp.encoders.base import Encoder, EncoderOutput
from vlp.encoders.bert import BertFusion, bert_layer_to_block, block_to_bert_layer
from vlp.encoders.text import HFCausalLM, HFTextEncoder
from vlp.encoders.transformer import MultimodalEncoder, TransformerTextEncoder, ViTEncoder
from vlp.encoders.vision import OpenCLIPVisionEncoder, TimmVisionEncoder

__all__ = [
    "BertFusion",
    "Encoder",
    "EncoderOutput",
    "HFCausalLM",
    "HFTextEncoder",
    "MultimodalEncoder",
    "OpenCLIPVisionEncoder",
    "TimmVisionEncoder",
    "TransformerTextEncoder",
    "ViTEncoder",
    "bert_layer_to_block",
    "block_to_bert_layer",
]
