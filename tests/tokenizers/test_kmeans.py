"""KMeansTokenizer: nearest-centroid assignment, deterministic fitting, the file and its
errors, tokens that carry information on shapes images, and ``vlp data tokenizer``."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from helpers import write_tar
from PIL import Image

from vlp.data.commands import data_main
from vlp.data.shapes.render import _jpeg, render_scene
from vlp.data.shapes.scenes import COLORS, Scene, Shape, random_scene
from vlp.errors import CheckpointError, ConfigError
from vlp.tokenizers import KMeansTokenizer, fit_kmeans, patch_features


def as_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255  # (3, H, W)


def shapes_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    rng = random.Random(seed)
    scenes = [random_scene(rng, rng.randint(1, 3)) for _ in range(n)]
    return torch.stack([as_tensor(Image.open(io.BytesIO(_jpeg(render_scene(s, size))))) for s in scenes])


def test_nearest_centroid_on_a_two_centroid_toy():
    # patch 2 px, every pixel a feature (12 dims): centroid 0 = black, centroid 1 = white
    tok = KMeansTokenizer.from_centroids(torch.stack([torch.zeros(12), torch.ones(12)]), patch_size=2)
    image = torch.zeros(1, 3, 4, 6)
    image[..., 0:2, 2:4] = 0.9  # top middle: nearly white → 1
    image[..., 2:4, 0:2] = 0.4  # bottom left: nearer black → 0
    image[..., 2:4, 4:6] = 0.6  # bottom right: nearer white → 1
    assert tok(image).tolist() == [[[0, 1, 0], [0, 0, 1]]]
    assert tok.to(torch.bfloat16)(image.bfloat16()).tolist() == [[[0, 1, 0], [0, 0, 1]]]
    assert tok.num_codes == 2 and not any(True for _ in tok.parameters())  # centroids are a buffer


def test_patch_features_layout():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float).reshape(2, 3, 4, 4)
    f = patch_features(x, 2)  # (2, 4, 12): row-major patches, (p, p, C) pixels per patch
    assert f.shape == (2, 4, 12)
    assert f[0, 1].tolist()[:3] == [x[0, 0, 0, 2].item(), x[0, 1, 0, 2].item(), x[0, 2, 0, 2].item()]
    pooled = patch_features(x, 2, pool=1)  # (2, 4, 3): the patch's mean colour
    torch.testing.assert_close(pooled[1, 3], x[1, :, 2:, 2:].mean((-1, -2)))
    with pytest.raises(ConfigError, match="pool 3 must divide the patch size 2"):
        patch_features(x, 2, pool=3)


def test_fit_is_deterministic_and_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    x = torch.cat([c + 0.1 * torch.randn(200, 2, generator=g) for c in centres])
    a, b = fit_kmeans(x, 3, seed=7), fit_kmeans(x, 3, seed=7)
    assert torch.equal(a, b)
    assert torch.cdist(centres, a).min(1).values.max() < 0.05  # every true centre found
    with pytest.raises(ConfigError, match="3 patches for 4 codes"):
        fit_kmeans(x[:3], 4)


def test_tokens_carry_information_on_shapes():
    images = shapes_images(200, size=64)
    x = patch_features(images, 8, pool=4).flatten(0, 1)  # (200 * 64, 48)
    tok = KMeansTokenizer.from_centroids(fit_kmeans(x, 64, iters=10, seed=0), patch_size=8, pool=4)
    # a patch inside a large square of each colour: one token per colour, all distinct
    inside = {}
    for name in COLORS:
        scene = Scene((Shape("large", name, "square", 0.5, 0.5),), (), 64, 0)
        ids = tok(as_tensor(render_scene(scene, 64))[None])[0]  # (8, 8)
        inside[name] = ids[3:5, 3:5].unique().tolist()
    assert all(len(v) == 1 for v in inside.values()), inside
    assert len({v[0] for v in inside.values()}) == len(COLORS), inside
    # empty-background images (grey levels 40-90, noise): a handful of codes
    backgrounds = torch.stack(
        [as_tensor(render_scene(Scene((), (), g, n), 64)) for g in range(40, 91, 5) for n in (0, 7)]
    )
    assert tok(backgrounds).unique().numel() <= 8
    assert tok(backgrounds).unique().numel() < tok(images[:50]).unique().numel() / 4


def test_file_round_trip_and_errors(tmp_path):
    centroids = torch.rand(5, 12)
    tok = KMeansTokenizer.from_centroids(centroids, patch_size=4, pool=2, normalize=True)
    path = tmp_path / "tok.safetensors"
    tok.save(str(path), source="toy")
    loaded = KMeansTokenizer(str(path))
    assert (loaded.patch_size, loaded.pool, loaded.normalize, loaded.num_codes) == (4, 2, True, 5)
    assert loaded.meta["source"] == "toy"
    image = torch.rand(2, 3, 8, 12)
    assert torch.equal(loaded(image), tok(image))
    with pytest.raises(
        ConfigError, match=r"(?s)missing\.safetensors does not exist; build it .*vlp data tokenizer --data"
    ):
        KMeansTokenizer(str(tmp_path / "missing.safetensors"))
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="is not a k-means tokenizer file"):
        KMeansTokenizer(str(tmp_path / "other.safetensors"))
    with pytest.raises(ConfigError, match="width 12 do not fit patch_size 8 and pool None"):
        KMeansTokenizer.from_centroids(centroids, patch_size=8)


def test_data_tokenizer_command(tmp_path):
    images = shapes_images(40, size=32)
    samples = []
    for i, img in enumerate(images):
        pil = Image.fromarray((img.permute(1, 2, 0) * 255).round().byte().numpy())
        samples.append({"__key__": f"{i:04d}", "jpg": _jpeg(pil), "txt": "a shape"})
    samples.append({"__key__": "bad", "jpg": b"not an image", "txt": "broken"})
    shard = write_tar(tmp_path / "shards" / "train-000000.tar", samples)
    out = tmp_path / "tok.safetensors"
    args = ["tokenizer", "--data", shard, "--out", str(out), "--codes", "16", "--patch", "8", "--image_size", "32"]
    info = data_main(args)
    assert (info["images"], info["skipped"], info["patches"], info["codes"]) == (40, 1, 640, 16)
    tok = KMeansTokenizer(str(out))
    assert (tok.num_codes, tok.patch_size, tok.pool) == (16, 8, 4) and tok.meta["images"] == 40
    assert tok(images[:2]).shape == (2, 4, 4)
    again = tmp_path / "again.safetensors"
    data_main([*args[:4], str(again), *args[5:]])
    assert torch.equal(KMeansTokenizer(str(again)).centroids, tok.centroids)  # same seed, same file
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(f"name: toy\nmodality: pair\nsplits:\n  train: {{urls: {shard}, num_samples: 41}}\n")
    from_manifest = data_main(
        ["tokenizer", "--data", str(manifest), "--out", str(tmp_path / "m.safetensors"), *args[5:]]
    )
    assert from_manifest["source"] == "toy/train" and from_manifest["images"] == 40
    small = ["tokenizer", "--data", shard, "--out", str(tmp_path / "p2.safetensors"), "--codes", "4", "--patch", "2"]
    data_main(small)  # 4 does not divide a 2 px patch: every pixel is a feature
    assert KMeansTokenizer(str(tmp_path / "p2.safetensors")).pool is None
    with pytest.raises(ConfigError, match="image_size 30 is not a multiple of the patch size 8"):
        data_main([*args[:-1], "30"])
