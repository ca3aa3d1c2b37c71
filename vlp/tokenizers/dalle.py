"""The DALL-E dVAE encoder that FLAVA uses as its image tokenizer (8,192 codes).

The encoder is a stack of residual conv blocks in four groups (widths 1x, 2x, 4x, 8x
``hidden_size``, a 2x2 max-pool after each group but the last: 8 input pixels per token),
then a 1x1 conv to one logit per code. The module tree mirrors transformers'
``FlavaImageCodebook`` (``blocks.input``, ``blocks.group_<g>.group.block_<b>.{id_path,
res_path.path.conv_<i>}``, ``blocks.output.conv``), so the ``facebook/flava-image-codebook``
weights load by key, and so do flava-full's ``image_codebook.*`` once the prefix is dropped.

Input: the same crop as the model's image at ``grid x 8`` pixels (112 px for a 14 x 14 patch
grid), in [0, 1]; the tokenizer applies the logit-Laplace map ``(1 - 2 eps) x + eps``
(eps = 0.1) itself, as transformers' image processor does before the codebook.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict

import torch
from torch import nn

from vlp.errors import CheckpointError, ConfigError
from vlp.tokenizers.base import ImageTokenizer
from vlp.utils.paths import is_local, resolve_path

#: the weights FLAVA's paper uses, on the Hugging Face hub
DEFAULT_CODEBOOK = "facebook/flava-image-codebook"
#: what a checkpoint folder or hub repository may hold, in the order they are tried
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class _ResBlock(nn.Module):
    """``id_path(x) + post_gain * res_path(x)``; the residual path is relu-conv3 x3, relu-conv1
    at a quarter of the output width, scaled by ``1 / num_layers**2`` (DALL-E's init trick)."""

    def __init__(self, in_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        hidden = out_dim // 4
        self.post_gain = 1.0 / num_layers**2
        self.id_path = nn.Conv2d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()
        dims = [(in_dim, hidden, 3), (hidden, hidden, 3), (hidden, hidden, 3), (hidden, out_dim, 1)]
        layers = OrderedDict()
        for i, (d_in, d_out, k) in enumerate(dims, start=1):
            layers[f"relu_{i}"] = nn.ReLU()
            layers[f"conv_{i}"] = nn.Conv2d(d_in, d_out, k, padding=k // 2)
        self.res_path = _Wrap(path=nn.Sequential(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class _Wrap(nn.Module):
    """One named Sequential (the extra level of the checkpoint's key paths)."""

    def __init__(self, **layers: nn.Sequential) -> None:
        super().__init__()
        ((self.name, seq),) = layers.items()
        self.add_module(self.name, seq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.name)(x)


def _group(in_dim: int, out_dim: int, num_blocks: int, num_layers: int, pool: bool) -> nn.Module:
    blocks = OrderedDict(
        (f"block_{b + 1}", _ResBlock(in_dim if b == 0 else out_dim, out_dim, num_layers)) for b in range(num_blocks)
    )
    if pool:
        blocks["pool"] = nn.MaxPool2d(2)
    return _Wrap(group=nn.Sequential(blocks))


def dalle_blocks(hidden_size: int, num_blocks_per_group: int, vocab_size: int, num_groups: int = 4) -> nn.Sequential:
    """The encoder: (B, 3, H, W) → logits (B, vocab_size, H / 2**(num_groups-1), W / ...)."""
    num_layers = num_groups * num_blocks_per_group
    widths = [hidden_size * 2**g for g in range(num_groups)]  # 1x, 2x, 4x, 8x
    layers = OrderedDict(input=nn.Conv2d(3, hidden_size, 7, padding=3))
    for g in range(num_groups):
        d_in = widths[max(g - 1, 0)]
        layers[f"group_{g + 1}"] = _group(d_in, widths[g], num_blocks_per_group, num_layers, pool=g < num_groups - 1)
    layers["output"] = nn.Sequential(OrderedDict(relu=nn.ReLU(), conv=nn.Conv2d(widths[-1], vocab_size, 1)))
    return nn.Sequential(layers)


def dalle_sizes(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """``hidden_size``, ``num_blocks_per_group``, ``vocab_size``, ``num_groups`` read off a
    codebook state dict (keys without prefix)."""
    try:
        groups = {int(m[1]) for k in state if (m := re.match(r"blocks\.group_(\d+)\.", k))}
        blocks = {int(m[1]) for k in state if (m := re.match(r"blocks\.group_1\.group\.block_(\d+)\.", k))}
        return {
            "hidden_size": state["blocks.input.weight"].shape[0],
            "num_blocks_per_group": max(blocks),
            "vocab_size": state["blocks.output.conv.weight"].shape[0],
            "num_groups": max(groups),
        }
    except (KeyError, ValueError):  # a key absent, or no group / block keys at all
        raise CheckpointError(
            "not a DALL-E codebook state dict: expected blocks.input.weight, blocks.group_<g>.group.block_<b>.* "
            f"and blocks.output.conv.weight, found {sorted(state)[:5]}..."
        ) from None


def strip_prefix(state: dict[str, torch.Tensor], prefix: str | None, where: str) -> dict[str, torch.Tensor]:
    """The codebook's keys of ``state``. ``prefix`` None: as they are when they start with
    ``blocks.``, else those under ``image_codebook.`` (flava-full) or ``model.``; other keys of
    a bigger checkpoint are not the codebook's and are left out."""
    if prefix is None:
        for candidate in ("", "image_codebook.", "model."):
            if any(k.startswith(candidate + "blocks.") for k in state):
                prefix = candidate
                break
        else:
            raise CheckpointError(f"{where}: no codebook keys (blocks.* or image_codebook.blocks.*) in the checkpoint")
    picked = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not picked:
        raise CheckpointError(f"{where}: no keys start with {prefix!r}")
    return picked


def _load_file(path: str) -> dict[str, torch.Tensor]:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read the codebook checkpoint {path}: {type(e).__name__}: {e}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return state


def resolve_weights(path: str) -> str:
    """A local weights file for ``path``: a file, a folder holding one of
    :data:`WEIGHT_FILES`, or a hub name (downloaded unless ``HF_HUB_OFFLINE=1``, then only
    taken from the local cache)."""
    path = resolve_path(path)
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        for name in WEIGHT_FILES:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise ConfigError(f"codebook folder {path} holds none of {', '.join(WEIGHT_FILES)}")
    if is_local(path) or path.startswith((".", "/", "~")) or path.endswith((".safetensors", ".bin", ".pt", ".pth")):
        raise ConfigError(f"codebook checkpoint {path} does not exist")
    from huggingface_hub import hf_hub_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    errors = []
    for name in WEIGHT_FILES:
        try:
            return hf_hub_download(path, name, local_files_only=offline)
        except Exception as e:  # not cached / not on the hub / no network
            errors.append(f"{name}: {type(e).__name__}")
    how = "HF_HUB_OFFLINE=1 and it is not in the local cache" if offline else "it could not be downloaded"
    raise ConfigError(
        f"codebook {path!r} is neither a local file or folder nor a usable hub repository ({how}: "
        f"{'; '.join(errors)}); pass a local path to a safetensors / torch file or a folder holding one"
    )


class DalleTokenizer(ImageTokenizer):
    """FLAVA's image tokenizer: the DALL-E dVAE encoder, argmax over its codes.

    Args:
        path: a safetensors / torch file, a folder with ``model.safetensors`` or
            ``pytorch_model.bin``, or a hub name (default ``facebook/flava-image-codebook``;
            with ``HF_HUB_OFFLINE=1`` only the local cache is used). The sizes are read off
            the weights.
        prefix: the key prefix of the codebook in the checkpoint (None: ``blocks.*`` as they
            are, else ``image_codebook.*`` as in flava-full, or ``model.*``).
        eps: the logit-Laplace map ``(1 - 2 eps) x + eps`` applied to [0, 1] pixels.

    ``forward(pixels)``: (B, 3, 8h, 8w) in [0, 1] → (B, h, w) ids in ``[0, vocab_size)``.
    """

    patch_size = 8

    def __init__(self, path: str = DEFAULT_CODEBOOK, *, prefix: str | None = None, eps: float = 0.1) -> None:
        super().__init__()
        where = resolve_weights(path)
        state = strip_prefix(_load_file(where), prefix, where)
        self._build(**dalle_sizes(state), eps=eps)
        self.load_codebook(state, where)
        self.freeze()

    def _build(self, hidden_size: int, num_blocks_per_group: int, vocab_size: int, num_groups: int, eps: float):
        if not 0 <= eps < 0.5:
            raise ConfigError(f"DalleTokenizer eps must be in [0, 0.5), got {eps}")
        self.eps = eps
        self.num_codes = vocab_size
        self.patch_size = 2 ** (num_groups - 1)
        self.blocks = dalle_blocks(hidden_size, num_blocks_per_group, vocab_size, num_groups)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], *, prefix: str | None = None, eps: float = 0.1):
        """A tokenizer from an in-memory codebook state dict (e.g. ``FlavaImageCodebook.state_dict()``)."""
        tokenizer = cls.__new__(cls)
        ImageTokenizer.__init__(tokenizer)
        state = strip_prefix(state, prefix, "<state dict>")
        tokenizer._build(**dalle_sizes(state), eps=eps)
        tokenizer.load_codebook(state, "<state dict>")
        return tokenizer.freeze()

    def load_codebook(self, state: dict[str, torch.Tensor], where: str) -> None:
        """Load ``state`` by key; unknown, missing or misshapen keys are one error that lists them."""
        own = self.state_dict()
        unknown = sorted(set(state) - set(own))
        missing = sorted(set(own) - set(state))
        shapes = [
            f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
            for k, v in own.items()
            if k in state and state[k].shape != v.shape
        ]
        if unknown or missing or shapes:
            parts = [
                f"{len(keys)} {what} {keys[:8]}"
                for what, keys in (("unknown keys", unknown), ("missing keys", missing), ("wrong shapes", shapes))
                if keys
            ]
            raise CheckpointError(f"{where} does not fit a DALL-E codebook: " + "; ".join(parts))
        self.load_state_dict({k: v.float() for k, v in state.items()})

    def map_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] → [eps, 1 - eps], the dVAE's input range."""
        return (1 - 2 * self.eps) * pixels + self.eps

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] → code logits (B, num_codes, H / 8, W / 8)."""
        weight = self.blocks.input.weight
        return self.blocks(self.map_pixels(pixels).to(weight.dtype))

    @torch.no_grad()
    def probs(self, pixels: torch.Tensor) -> torch.Tensor:
        """Softmax over codes (B, num_codes, H / 8, W / 8): soft MIM targets."""
        self.check_input(pixels)
        with torch.autocast(pixels.device.type, enabled=False):
            return self.logits(pixels.float()).softmax(dim=1)

    def tokenize(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.logits(pixels).argmax(dim=1)  # (B, h, w)
