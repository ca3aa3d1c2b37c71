"""Build a :class:`~vlp.tokenizers.KMeansTokenizer` from webdataset shards
(``vlp data tokenizer``): read up to ``max_images`` images, cut them into patches, run
k-means, write the centroids to a small safetensors file."""

from __future__ import annotations

import random
import time

import torch

from vlp.data.manifest import DEFAULT_FIELDS, expand_urls, load_manifest
from vlp.data.pipeline import Skipped, read_shards
from vlp.data.transforms import ImageDecodeError, ImageTransform, decode_image
from vlp.errors import ConfigError, DataError
from vlp.tokenizers.kmeans import KMeansTokenizer, fit_kmeans, nearest, patch_features


def source_urls(source: str, split: str | None = None) -> tuple[list[str], list[str], str]:
    """(shard urls, image extensions, a name) of a manifest YAML (its ``split``, default
    ``train``, else its only split) or of a shard path / brace pattern."""
    if source.endswith((".yaml", ".yml")):
        manifest = load_manifest(source)
        if split is None:
            split = "train" if "train" in manifest.splits else next(iter(manifest.splits))
        pattern, exts, name = manifest.split(split).urls, manifest.fields["image"], f"{manifest.name}/{split}"
    else:
        pattern, exts, name = source, DEFAULT_FIELDS["image"], source
    urls = expand_urls(pattern)
    if not urls:
        raise ConfigError(f"{name}: {pattern!r} matches no shards")
    return urls, exts.split(";"), name


def read_images(urls: list[str], exts: list[str], image_size: int, max_images: int, seed: int = 0):
    """Up to ``max_images`` images (N, 3, S, S) in [0, 1], resized and centre cropped to
    ``image_size``, every image of a sample (``jpg``, ``0.jpg``, ``left.jpg``...), shards in
    an order drawn from ``seed``; returns (images, skipped count)."""
    transform = ImageTransform(image_size, train=False, norm="unit")
    order = list(urls)
    random.Random(seed).shuffle(order)
    images, skipped = [], 0
    for sample in read_shards(order):
        if isinstance(sample, Skipped):
            skipped += sample.count
            continue
        for key, data in sample.items():
            if key.startswith("__") or key.rsplit(".", 1)[-1] not in exts:
                continue
            try:
                images.append(transform(decode_image(data)))  # (3, S, S)
            except ImageDecodeError:
                skipped += 1
        if len(images) >= max_images:
            break
    if not images:
        raise DataError(f"no decodable images (extensions {'/'.join(exts)}) in {len(urls)} shard(s): {urls[0]} ...")
    return torch.stack(images[:max_images]), skipped


def build_kmeans_tokenizer(
    source: str,
    out: str,
    *,
    codes: int = 512,
    patch_size: int = 8,
    image_size: int = 32,
    pool: int | None = 4,
    normalize: bool = False,
    max_images: int = 5000,
    iters: int = 25,
    seed: int = 0,
    split: str | None = None,
) -> dict:
    """Fit and write a k-means tokenizer; returns what it did (also stored in the file's
    metadata): images, patches, codes used, mean squared patch error, seconds."""
    if image_size % patch_size:
        raise ConfigError(f"image_size {image_size} is not a multiple of the patch size {patch_size}")
    if pool is not None and (pool < 1 or patch_size % pool):
        raise ConfigError(f"pool {pool} must divide the patch size {patch_size}")
    if codes < 2:
        raise ConfigError(f"codes must be at least 2, got {codes}")
    start = time.perf_counter()
    urls, exts, name = source_urls(source, split)
    images, skipped = read_images(urls, exts, image_size, max_images, seed)
    read_s = time.perf_counter() - start
    x = patch_features(images, patch_size, pool, normalize).flatten(0, 1)  # (N * h * w, D)
    centroids = fit_kmeans(x, codes, iters=iters, seed=seed)
    ids, dist = nearest(x, centroids)
    info = {
        "source": name,
        "images": len(images),
        "skipped": skipped,
        "patches": len(x),
        "codes": codes,
        "codes_used": int(torch.bincount(ids, minlength=codes).gt(0).sum()),
        "mse": float(dist.mean() / x.shape[1]),
        "image_size": image_size,
        "iters": iters,
        "seed": seed,
        "read_s": round(read_s, 2),
        "seconds": round(time.perf_counter() - start, 2),
    }
    tokenizer = KMeansTokenizer.from_centroids(centroids, patch_size=patch_size, pool=pool, normalize=normalize)
    tokenizer.save(out, **info)
    return info
