"""A patch k-means tokenizer: each patch's token is its nearest centroid.

Built offline from the user's own images in minutes on a CPU (``vlp data tokenizer``, see
``vlp.tokenizers.build``), it gives FLAVA's MIM / MMM objectives targets that mean something
on data no pretrained codebook has seen, such as the synthetic shapes benchmark. A patch's
feature is its RGB pixels in [0, 1], average-pooled to ``pool x pool`` cells (colour and
coarse layout survive, pixel noise and JPEG ringing are averaged out), optionally
normalised per patch (``normalize``: keeps texture, drops colour and brightness).

The file is a small safetensors file: ``centroids`` (num_codes, D) and, in its metadata,
``patch_size``, ``pool``, ``normalize`` and how it was built.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F

from vlp.errors import CheckpointError, ConfigError
from vlp.tokenizers.base import ImageTokenizer
from vlp.utils.paths import resolve_path

#: how to make a tokenizer file, for error messages
BUILD_HINT = "vlp data tokenizer --data <manifest.yaml or shards> --out {path} --codes 512 --patch 8 --image_size 32"


def patch_features(pixels: torch.Tensor, patch_size: int, pool: int | None = None, normalize: bool = False):
    """(B, 3, H, W) in [0, 1] → (B, h*w, D) patch features, patches in row-major order;
    D = pool * pool * 3 (``pool`` None: every pixel, D = patch_size**2 * 3)."""
    B, C, H, W = pixels.shape
    p, q = patch_size, pool or patch_size
    if p % q:
        raise ConfigError(f"pool {q} must divide the patch size {p}")
    if q != p:
        pixels = F.avg_pool2d(pixels, p // q)  # (B, 3, H*q/p, W*q/p): q x q cells per patch
    h, w = H // p, W // p
    x = pixels.reshape(B, C, h, q, w, q).permute(0, 2, 4, 3, 5, 1).reshape(B, h * w, q * q * C)  # (B, N, D)
    if normalize:
        x = (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True) + 1e-6).sqrt()
    return x


def nearest(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) points, (K, D) centroids → (index of the nearest centroid (N,), squared
    distance to it (N,)); ties go to the lower index."""
    c2 = centroids.pow(2).sum(-1)  # (K,)
    ids, dist = [], []
    for part in x.split(chunk):
        d = c2 - 2 * part @ centroids.T  # (n, K): ||x - c||^2 - ||x||^2
        best, idx = d.min(-1)
        ids.append(idx)
        dist.append((best + part.pow(2).sum(-1)).clamp_min(0))
    return torch.cat(ids), torch.cat(dist)


def fit_kmeans(x: torch.Tensor, k: int, *, iters: int = 25, seed: int = 0, init_sample: int = 20000) -> torch.Tensor:
    """Centroids (k, D) of points ``x`` (N, D): k-means++ seeding on a sample of
    ``init_sample`` points, then Lloyd iterations until no point changes cluster (at most
    ``iters``). An emptied cluster restarts at the point farthest from its centroid. The
    result is a function of ``x``, ``k`` and ``seed`` only."""
    x = x.float()
    N = x.shape[0]
    if N < k:
        raise ConfigError(f"k-means needs at least as many patches as codes: {N} patches for {k} codes")
    g = torch.Generator().manual_seed(seed)
    sample = x[torch.randperm(N, generator=g)[:init_sample]] if N > init_sample else x
    centroids = torch.empty(k, x.shape[1])
    centroids[0] = sample[torch.randint(len(sample), (1,), generator=g)]
    d2 = (sample - centroids[0]).pow(2).sum(-1)  # (n,) squared distance to the nearest chosen centroid
    for j in range(1, k):
        if d2.sum() <= 0:  # fewer distinct points than codes: the rest start on random points
            pick = torch.randint(len(sample), (1,), generator=g)
        else:
            pick = torch.multinomial(d2, 1, generator=g)
        centroids[j] = sample[pick]
        d2 = torch.minimum(d2, (sample - centroids[j]).pow(2).sum(-1))
    assign = None
    for _ in range(iters):
        new, dist = nearest(x, centroids)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        counts = torch.bincount(assign, minlength=k)  # (k,)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
        empty = (~filled).nonzero().flatten()
        if len(empty):
            far = dist.topk(len(empty)).indices
            centroids[empty] = x[far]
    return centroids


class KMeansTokenizer(ImageTokenizer):
    """Tokens = nearest patch centroid, loaded from a file written by ``vlp data tokenizer``.

    Args:
        path: the safetensors file (``centroids`` + metadata ``patch_size``, ``pool``,
            ``normalize``). A missing file is a ConfigError that says how to build one.

    ``forward(pixels)``: (B, 3, p*h, p*w) in [0, 1] → (B, h, w) ids in ``[0, num_codes)``,
    ``p`` = ``patch_size`` (the model's patch: the model's image batch itself is the input).
    """

    def __init__(self, path: str) -> None:
        super().__init__()
        path = resolve_path(path)
        if not os.path.isfile(path):
            raise ConfigError(
                f"k-means tokenizer file {path} does not exist; build it from your training images with\n  "
                + BUILD_HINT.format(path=path)
            )
        centroids, meta = load_kmeans(path)
        self._build(centroids, int(meta["patch_size"]), meta.get("pool"), bool(meta.get("normalize", False)))
        self.meta = meta  # how it was built

    def _build(self, centroids: torch.Tensor, patch_size: int, pool: int | None, normalize: bool) -> None:
        if centroids.dim() != 2:
            raise ConfigError(f"centroids must be (num_codes, D), got shape {tuple(centroids.shape)}")
        q = pool or patch_size
        if patch_size % q or centroids.shape[1] != q * q * 3:
            raise ConfigError(
                f"centroids of width {centroids.shape[1]} do not fit patch_size {patch_size} and pool {pool} "
                f"(expected {q * q * 3} = {q} x {q} x 3)"
            )
        self.patch_size, self.pool, self.normalize = patch_size, pool, normalize
        self.num_codes = centroids.shape[0]
        self.register_buffer("centroids", centroids.float().contiguous())  # (K, D)
        self.freeze()

    @classmethod
    def from_centroids(
        cls, centroids: torch.Tensor, *, patch_size: int, pool: int | None = None, normalize: bool = False
    ) -> KMeansTokenizer:
        """A tokenizer from centroids in memory (``(K, pool*pool*3)``, see :func:`patch_features`)."""
        tokenizer = cls.__new__(cls)
        ImageTokenizer.__init__(tokenizer)
        tokenizer.meta = {}
        tokenizer._build(centroids, patch_size, pool, normalize)
        return tokenizer

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pool={self.pool}, normalize={self.normalize}"

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] → (B, N, D) patch features as the centroids see them."""
        return patch_features(pixels, self.patch_size, self.pool, self.normalize)

    def tokenize(self, pixels: torch.Tensor) -> torch.Tensor:
        B, _, H, W = pixels.shape
        # fp32 even when the parent was cast to half precision (ties decide ids)
        x = self.features(pixels.float())  # (B, N, D)
        ids, _ = nearest(x.flatten(0, 1), self.centroids.float())  # (B*N,)
        return ids.view(B, H // self.patch_size, W // self.patch_size)

    def save(self, path: str, **meta) -> None:
        """Write the tokenizer file (``meta``: extra metadata, e.g. how it was built)."""
        save_kmeans(path, self.centroids, patch_size=self.patch_size, pool=self.pool, normalize=self.normalize, **meta)


def save_kmeans(path: str, centroids: torch.Tensor, *, patch_size: int, pool: int | None, normalize: bool, **meta):
    """Write ``centroids`` and their metadata (every value stored as JSON text) to ``path``."""
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    info = {"format": "vlp.kmeans_tokenizer", "patch_size": patch_size, "pool": pool, "normalize": normalize, **meta}
    save_file(
        {"centroids": centroids.detach().float().contiguous()},
        path,
        metadata={k: json.dumps(v) for k, v in info.items()},
    )


def load_kmeans(path: str) -> tuple[torch.Tensor, dict]:
    """(centroids, metadata) of a tokenizer file."""
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != '"vlp.kmeans_tokenizer"' or "centroids" not in f.keys():
                raise CheckpointError(f"{path} is not a k-means tokenizer file (no vlp.kmeans_tokenizer centroids)")
            return f.get_tensor("centroids"), {k: json.loads(v) for k, v in meta.items()}
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"cannot read the k-means tokenizer file {path}: {type(e).__name__}: {e}") from None
