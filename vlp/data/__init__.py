"""Data: manifests, the webdataset DataModule, transforms, tokenisers, collators, masking,
the synthetic "shapes" benchmark and the folder-to-shards converter."""

from vlp.data.collate import Collator
from vlp.data.datamodule import Source, WebDataModule
from vlp.data.interleaved import END_OF_CHUNK, MEDIA_TOKEN, MEDIA_TOKENS, interleaved_batch, lm_labels, media_text
from vlp.data.manifest import MODALITIES, Manifest, Split, expand_urls, load_manifest
from vlp.data.masking import Masker, MLMMasker, PatchMasker, block_mask, mask_tokens
from vlp.data.pipeline import SampleDecoder, Skipped
from vlp.data.prompts import Prompts, prompt_batch
from vlp.data.stream import MIXING
from vlp.data.tokenization import HFTokenizer, OpenCLIPTokenizer, Tokenizer
from vlp.data.transforms import ImageTransform, MultiViewTransform, ViewSpec, decode_image

__all__ = [
    "END_OF_CHUNK",
    "MEDIA_TOKEN",
    "MEDIA_TOKENS",
    "MIXING",
    "MODALITIES",
    "MultiViewTransform",
    "ViewSpec",
    "interleaved_batch",
    "lm_labels",
    "media_text",
    "Collator",
    "HFTokenizer",
    "ImageTransform",
    "MLMMasker",
    "Manifest",
    "Masker",
    "OpenCLIPTokenizer",
    "PatchMasker",
    "Prompts",
    "SampleDecoder",
    "Skipped",
    "Source",
    "Split",
    "Tokenizer",
    "WebDataModule",
    "block_mask",
    "prompt_batch",
    "decode_image",
    "expand_urls",
    "load_manifest",
    "mask_tokens",
]
