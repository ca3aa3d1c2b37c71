"""A tokenizer reads either a ready view of the batch (``image_<name>``, [0, 1]) or the
model's normalised image: both give the same input for the same crop."""

from __future__ import annotations

import io

import numpy as np
import torch
from helpers import write_tar
from PIL import Image

from vlp.data import Manifest, Source, Split, WebDataModule
from vlp.tokenizers import KMeansTokenizer, fit_kmeans, patch_features


def _photo(i: int) -> bytes:
    rng = np.random.default_rng(i)
    blocks = rng.integers(0, 256, size=(5, 6, 3), dtype=np.uint8)  # coloured blocks: many distinct patches
    buf = io.BytesIO()
    Image.fromarray(blocks).resize((48, 40), Image.NEAREST).save(buf, format="PNG")
    return buf.getvalue()


def test_view_and_model_image_give_the_same_tokens(tmp_path, tokenizer):
    samples = [{"__key__": f"s{i}", "png": _photo(i), "txt": f"caption {i}"} for i in range(8)]
    url = write_tar(tmp_path / "pairs.tar", samples)
    Manifest(name="toy", modality="pair", splits={"train": Split(urls=url, num_samples=8)}).save(tmp_path / "p.yaml")
    views = {"codebook": {"size": 32, "norm": "unit"}, "small": {"size": 16, "norm": "unit"}}
    dm = WebDataModule(
        tokenizer=tokenizer,
        train=[Source(str(tmp_path / "p.yaml"))],
        image_size=32,
        batch_size=4,
        num_workers=0,
        shuffle_buffer=0,
        seed=0,
        views=views,
        crop_scale=(0.5, 1.0),
        epoch_length=8,
    )
    dm.setup("fit")
    batch = dm.finish_batch(next(iter(dm.train_dataloader())))
    view = batch["image_codebook"]  # (4, 3, 32, 32) in [0, 1]: the crop of ``image``
    x = patch_features(view, 8, pool=2).flatten(0, 1)
    tok = KMeansTokenizer.from_centroids(fit_kmeans(x, 8, seed=0), patch_size=8, pool=2)
    torch.testing.assert_close(tok.prepare(batch["image"], norm="clip"), view, atol=1e-5, rtol=0)
    assert torch.equal(tok.encode(batch["image"], norm="clip"), tok(view))
    assert tok(view).unique().numel() > 1
    # a coarser grid: the model image resized to grid x patch pixels is the small view, up to resampling
    small = tok.prepare(batch["image"], norm="clip", grid=(2, 2))  # (4, 3, 16, 16)
    assert small.shape == batch["image_small"].shape == (4, 3, 16, 16)
    assert (small - batch["image_small"]).abs().mean() < 0.05
