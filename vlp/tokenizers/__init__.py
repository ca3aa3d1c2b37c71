"""Frozen image tokenizers: the discrete targets of FLAVA's masked image (MIM) and masked
multimodal (MMM) modelling. See docs/tokenizers.md.

* :class:`DalleTokenizer`: the DALL-E dVAE encoder FLAVA uses (8,192 codes, 8 px per token),
  loaded from ``facebook/flava-image-codebook`` or a local file.
* :class:`KMeansTokenizer`: nearest patch centroid, built from your own images in minutes
  on a CPU with ``vlp data tokenizer`` (the tiny recipes' choice).
"""

from vlp.tokenizers.base import ImageTokenizer, to_unit
from vlp.tokenizers.build import build_kmeans_tokenizer
from vlp.tokenizers.dalle import DalleTokenizer
from vlp.tokenizers.kmeans import KMeansTokenizer, fit_kmeans, patch_features

__all__ = [
    "DalleTokenizer",
    "ImageTokenizer",
    "KMeansTokenizer",
    "build_kmeans_tokenizer",
    "fit_kmeans",
    "patch_features",
    "to_unit",
]
