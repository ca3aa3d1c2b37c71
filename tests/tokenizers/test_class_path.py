"""Both tokenizers build from a recipe's ``class_path`` / ``init_args`` (jsonargparse, as
LightningCLI reads a model argument ``image_tokenizer: ImageTokenizer``)."""

from __future__ import annotations

import pytest
import torch
from jsonargparse import ArgumentParser

from vlp.errors import ConfigError
from vlp.tokenizers import DalleTokenizer, ImageTokenizer, KMeansTokenizer


def build(config: dict) -> ImageTokenizer:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(ImageTokenizer, "image_tokenizer")
    return parser.instantiate(parser.parse_object({"image_tokenizer": config})).image_tokenizer


def test_kmeans_and_dalle_from_class_path(tmp_path):
    kmeans = tmp_path / "shapes_tokenizer.safetensors"
    KMeansTokenizer.from_centroids(torch.rand(4, 48), patch_size=8, pool=4).save(str(kmeans))
    tok = build({"class_path": "vlp.tokenizers.KMeansTokenizer", "init_args": {"path": str(kmeans)}})
    assert isinstance(tok, KMeansTokenizer) and tok.num_codes == 4

    from safetensors.torch import save_file
    from transformers import FlavaImageCodebook, FlavaImageCodebookConfig

    codebook = FlavaImageCodebook(FlavaImageCodebookConfig(hidden_size=8, num_blocks_per_group=1, vocab_size=16))
    save_file({k: v.contiguous() for k, v in codebook.state_dict().items()}, str(tmp_path / "codebook.safetensors"))
    init = {"path": str(tmp_path / "codebook.safetensors"), "eps": 0.1}
    tok = build({"class_path": "vlp.tokenizers.DalleTokenizer", "init_args": init})
    assert isinstance(tok, DalleTokenizer) and (tok.num_codes, tok.patch_size) == (16, 8)


def test_missing_file_says_how_to_build_it(tmp_path):
    path = tmp_path / "data" / "shapes_tokenizer.safetensors"
    with pytest.raises(Exception) as info:
        build({"class_path": "vlp.tokenizers.KMeansTokenizer", "init_args": {"path": str(path)}})
    error = info.value
    while not isinstance(error, ConfigError) and (error.__cause__ or error.__context__):
        error = error.__cause__ or error.__context__
    assert isinstance(error, ConfigError)
    assert str(path) in str(error) and "vlp data tokenizer --data" in str(error)
