"""Vision towers: timm models and open_clip ViTs behind the :class:`Encoder` interface.

Both return every token (prefix tokens first) as ``tokens`` and one vector per image as
``pooled``. Weights come from the library's hub (``pretrained=True`` / a tag; honours
``HF_HUB_OFFLINE``) or from a local file read with safetensors or
``torch.load(weights_only=True)``; a local path never touches the network.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import logging
import os
import re
import sys
import zipfile
from collections.abc import Callable, Iterator

import torch
from torch import nn

from vlp.encoders.base import Encoder, EncoderOutput
from vlp.errors import CheckpointError, ConfigError
from vlp.utils.paths import resolve_path

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def brief(e: Exception, limit: int = 300) -> str:
    """An exception's first line, shortened: library errors can list hundreds of keys."""
    text = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return text if len(text) <= limit else text[:limit] + " ..."


def find_weights(path: str, what: str) -> str:
    """The weights file at ``path``: the file itself, or the only weights file in a folder."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise ConfigError(f"{what}: weights path {path!r} does not exist")
    files = sorted(f for f in os.listdir(path) if f.endswith(WEIGHT_SUFFIXES))
    if len(files) != 1:
        raise ConfigError(f"{what}: expected one {'/'.join(WEIGHT_SUFFIXES)} file in {path!r}, found {files}")
    return os.path.join(path, files[0])


def check_weights_file(path: str) -> None:
    """Fail, naming the file, unless it is safetensors or loads with ``weights_only=True``."""
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            safe_open(path, framework="pt")
        else:  # mmap: only the pickled metadata is read, the tensors stay on disk
            torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:
        raise CheckpointError(
            f"cannot read {path} as safetensors or with torch.load(weights_only=True): {brief(e)}"
        ) from None


@contextlib.contextmanager
def _masked_patches(module: nn.Module, mask: torch.Tensor, token: torch.Tensor, layout: str):
    """While active, ``module`` (the patch embedding) outputs ``token`` at the patches where
    ``mask`` (B, N) is True. ``layout``: "nlc" for (B, N, D) outputs, "nchw" for (B, D, h, w)."""

    def hook(_module, _inputs, out: torch.Tensor) -> torch.Tensor:
        m = mask.to(out.device)
        if layout == "nlc":
            if out.shape[:2] != m.shape:
                raise ConfigError(f"patch mask {tuple(m.shape)} does not fit {tuple(out.shape[:2])} patches")
            return torch.where(m[..., None], token.to(out.dtype), out)
        B, D, h, w = out.shape
        if (B, h * w) != tuple(m.shape):
            raise ConfigError(f"patch mask {tuple(m.shape)} does not fit {B} images of {h}x{w} patches")
        flat = torch.where(m[:, None, :], token.to(out.dtype)[None, :, None], out.flatten(2))  # (B, D, N)
        return flat.view(B, D, h, w)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class _Group(nn.Module):
    """A layer group: whole submodules plus parameters that sit directly on a parent."""

    def __init__(self, modules: list[nn.Module], params: list[nn.Parameter]) -> None:
        super().__init__()
        self.members = nn.ModuleList(modules)
        self.loose = nn.ParameterList(params)


def groups_from_params(root: nn.Module, group_of: Callable[[str], int]) -> list[nn.Module]:
    """Bottom-to-top layer groups of ``root`` given each parameter name's group index.

    A module goes whole into a group when all its parameters do; parameter-free modules
    (dropout, activations) join the group of the sibling before them, so freezing a group
    puts all of its modules in eval mode.
    """
    gid = {id(p): group_of(n) for n, p in root.named_parameters()}
    n = max(gid.values(), default=-1) + 1
    mods: list[list[nn.Module]] = [[] for _ in range(n)]
    params: list[list[nn.Parameter]] = [[] for _ in range(n)]

    def visit(module: nn.Module, current: int) -> int:
        ids = {gid[id(p)] for p in module.parameters()}
        if len(ids) <= 1:
            g = ids.pop() if ids else current
            mods[g].append(module)
            return g
        for p in module.parameters(recurse=False):
            params[gid[id(p)]].append(p)
        for child in module.children():
            current = visit(child, current)
        return current

    visit(root, 0)
    return [_Group(m, p) for m, p in zip(mods, params) if m or p]


class GroupedEncoder(Encoder):
    """Encoder whose layer groups follow the parameter names of one wrapped module.

    Subclasses implement ``_grouping() -> (module, group_of)`` with ``group_of(param_name)``
    the bottom-to-top group index (0 = stem).
    """

    def _grouping(self) -> tuple[nn.Module, Callable[[str], int]]:
        raise NotImplementedError

    def layer_groups(self) -> list[nn.Module]:
        return groups_from_params(*self._grouping())


def _timm_group_of(model: nn.Module) -> Callable[[str], int]:
    """timm's ``group_matcher`` groups, with the final norm and the head as one top group.

    timm joins the final norm to the last block (a rule with suffix ``MATCH_PREV_GROUP`` and
    no block index); without such rules those parameters join the unmatched head instead.
    """
    from timm.models import group_parameters

    if not hasattr(model, "group_matcher"):
        return lambda name: 0
    matcher = model.group_matcher(coarse=False)
    if isinstance(matcher, dict):

        def is_final(rule) -> bool:
            return tuple(rule[1] or ()) == (99999,) and re.compile(rule[0]).groups == 0

        matcher = {
            k: [r for r in v if not is_final(r)] if isinstance(v, list | tuple) else v for k, v in matcher.items()
        }
    return group_parameters(model, matcher, reverse=True).__getitem__


def _timm_unknown_argument(e: TypeError, name: str, kwargs: dict, model_kwargs: dict) -> ConfigError | None:
    """A ConfigError naming the argument timm's model class refused (a typo in
    ``model_kwargs``), with close matches among that class's arguments; None for other errors."""
    found = re.search(r"(\w+)\.__init__\(\) got an unexpected keyword argument '(\w+)'", str(e))
    if found is None or found[2] not in kwargs:
        return None
    cls_name, key = found[1], found[2]
    classes = [
        getattr(module, cls_name)
        for module_name, module in list(sys.modules.items())
        if module_name.startswith("timm.") and isinstance(getattr(module, cls_name, None), type)
    ]
    params = sorted(inspect.signature(classes[0].__init__).parameters) if classes else []
    params = [p for p in params if p not in ("self", "args", "kwargs")]
    matches = difflib.get_close_matches(key, params, n=3)
    hint = f"did you mean {', '.join(matches)}?" if matches else f"it takes {', '.join(params)}"
    where = "model_kwargs" if key in model_kwargs else "TimmVisionEncoder argument"
    return ConfigError(f"timm model {name!r} ({cls_name}) has no argument {key!r} ({where}): {hint}")


@contextlib.contextmanager
def _timm_missing_keys() -> Iterator[list[str]]:
    """Collect timm's 'Missing keys' log: after dropping the classifier it loads non-strictly."""
    logger, found = logging.getLogger("timm.models._builder"), []
    level, shown = logger.level, logger.getEffectiveLevel()

    def keep(record: logging.LogRecord) -> bool:  # let through only what was shown anyway
        if record.getMessage().startswith("Missing keys"):
            found.append(record.getMessage())
        return record.levelno >= shown

    logger.addFilter(keep)
    logger.setLevel(logging.INFO)
    try:
        yield found
    finally:
        logger.removeFilter(keep)
        logger.setLevel(level)


class TimmVisionEncoder(GroupedEncoder):
    """Any timm image model as a vision tower.

    Args:
        name: timm model name (``vit_base_patch16_224``, ``convnext_tiny``, ``hf-hub:timm/...``).
        pretrained: ``False`` random init; ``True`` timm's pretrained weights from the hub;
            a path (file or folder with one .safetensors/.pth/.bin file) loads local weights.
        img_size: input resolution for models that fix it (ViT, Swin); None keeps the default.
        pool: "model" (the model's own pooling, e.g. CLS token + norm or global average),
            "cls" (first token) or "avg" (mean of the non-prefix tokens).
        drop_path_rate: stochastic depth rate.
        model_kwargs: extra ``timm.create_model`` arguments (``patch_size``, ``depth``...).
        prepend_pooled: put the pooled feature in front of the tokens, as METER does for
            Swin (the average of the patch tokens becomes the first token, which METER's
            image pooler reads); for towers without a class token.
    """

    def __init__(
        self,
        name: str,
        *,
        pretrained: bool | str = False,
        img_size: int | None = None,
        pool: str = "model",
        drop_path_rate: float = 0.0,
        model_kwargs: dict | None = None,
        prepend_pooled: bool = False,
    ) -> None:
        super().__init__()
        import timm

        if pool not in ("model", "cls", "avg"):
            raise ConfigError(f"pool must be 'model', 'cls' or 'avg', got {pool!r}")
        name = resolve_path(name)
        kwargs = dict(model_kwargs or {})
        if img_size is not None:
            kwargs["img_size"] = img_size
        if drop_path_rate:
            kwargs["drop_path_rate"] = drop_path_rate
        weights = None
        if isinstance(pretrained, str):  # timm reads it with safetensors / weights_only=True
            weights = find_weights(resolve_path(pretrained), f"timm model {name}")
            kwargs["pretrained_cfg_overlay"] = {"file": weights, "source": "file"}
        try:
            with _timm_missing_keys() as missing:
                self.model = timm.create_model(name, pretrained=bool(pretrained), num_classes=0, **kwargs)
        except Exception as e:
            unknown = _timm_unknown_argument(e, name, kwargs, model_kwargs or {}) if isinstance(e, TypeError) else None
            if unknown is not None:
                raise unknown from None
            error = CheckpointError if weights else ConfigError
            raise error(f"cannot build timm model {name!r} (pretrained={pretrained}, {kwargs}): {brief(e)}") from None
        if missing:
            raise CheckpointError(f"{weights} does not fit timm model {name}: {missing[0][:300]}")
        self.name = name
        self.pool = pool
        self.prepend_pooled = prepend_pooled
        self.num_prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 0))
        if pool == "cls" and not self.num_prefix_tokens:
            raise ConfigError(f"pool='cls' needs a class token, timm model {name} has none")
        self.dim = self.pooled_dim = self.model.num_features
        self._nhwc = getattr(self.model, "output_fmt", "NCHW") == "NHWC"
        # token grid at the configured input size: input size / the last feature's stride
        size = getattr(getattr(self.model, "patch_embed", None), "img_size", None)
        h, w = size or self.model.pretrained_cfg.get("input_size", (3, 224, 224))[-2:]
        info = getattr(self.model, "feature_info", None)
        r = info[-1]["reduction"] if info else None
        self.grid_size: tuple[int, int] | None = (h // r, w // r) if r else None

    def image_size_error(self, size: int) -> str | None:
        """A patch embedding with ``strict_img_size`` (ViT and Swin unless ``dynamic_img_size``)
        takes its ``img_size`` only; otherwise sizes must be multiples of the patch size
        (unless ``dynamic_img_pad``). Towers without a patch embedding (CNNs) take any size."""
        embed = getattr(self.model, "patch_embed", None)
        if embed is None or getattr(embed, "dynamic_img_pad", False) or getattr(embed, "img_size", None) is None:
            return None
        (h, w), (ph, pw) = embed.img_size, embed.patch_size
        if getattr(embed, "strict_img_size", False) and (h, w) != (size, size):
            dynamic = " (or model_kwargs dynamic_img_size: true)" if hasattr(self.model, "dynamic_img_size") else ""
            return f"(timm {self.name}) takes {h}x{w} images only: set its img_size to {size}{dynamic}"
        if size % ph or size % pw:
            return f"(timm {self.name}) takes sizes that are multiples of its {ph}x{pw} patches"
        return None

    def _grouping(self) -> tuple[nn.Module, Callable[[str], int]]:
        return self.model, _timm_group_of(self.model)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def forward(
        self, images: torch.Tensor, patch_mask: torch.Tensor | None = None, mask_token: torch.Tensor | None = None
    ) -> EncoderOutput:
        """``images`` (B, 3, H, W); with ``patch_mask`` (B, h*w) bool the masked patches' embeddings
        are replaced by ``mask_token`` (D,) before the position embeddings (BEiT-style MIM; ViTs only)."""
        if patch_mask is not None:
            embed = getattr(self.model, "patch_embed", None)
            if embed is None or not getattr(embed, "flatten", False):
                raise ConfigError(
                    f"masked patches need a ViT with a patch embedding; {type(self.model).__name__} has none"
                )
            with _masked_patches(embed, patch_mask, mask_token, "nlc"):
                return self.forward(images)
        features = self.model.forward_features(images)  # (B, L, D), (B, D, h, w) or (B, h, w, D)
        tokens = features
        if features.ndim == 4:
            tokens = features.flatten(1, 2) if self._nhwc else features.flatten(2).transpose(1, 2)
        if self.pool == "model":
            pooled = self.model.forward_head(features, pre_logits=True)  # (B, D)
        elif self.pool == "cls":
            pooled = tokens[:, 0]
        else:
            pooled = tokens[:, self.num_prefix_tokens :].mean(dim=1)
        if self.prepend_pooled:
            tokens = torch.cat([pooled[:, None].to(tokens.dtype), tokens], 1)  # (B, 1 + L, D)
        return EncoderOutput(tokens=tokens, pooled=pooled)


# A text tower that costs nothing: the text half of an open_clip model is dropped anyway.
_STUB_TEXT = {"context_length": 1, "vocab_size": 1, "width": 8, "heads": 1, "layers": 1}


class OpenCLIPVisionEncoder(GroupedEncoder):
    """The ViT image tower of an open_clip model (its text tower is dropped).

    Args:
        model_name: open_clip model name (``ViT-B-32``), ``hf-hub:org/repo`` or ``local-dir:path``.
        pretrained: a pretrained tag (``openai``, ``laion2b_s34b_b79k``), a local checkpoint
            (file, or folder holding one) of the whole CLIP model, or None for random init.
        use_proj: pool into the CLIP embedding space (``pooled_dim`` = embed dim); False
            keeps the pre-projection pooled token (``pooled_dim`` = width) and drops ``proj``.
        num_layers: keep only the first N transformer blocks (METER runs 11 of CLIP-ViT-B's 12;
            the pretrained weights of the dropped blocks are discarded).
        model_kwargs: overrides of the model config, top-level keys replaced whole, e.g.
            ``{"embed_dim": 16, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32,
            "layers": 2, "head_width": 16}}``; without weights the text tower is a stub.
    """

    def __init__(
        self,
        model_name: str,
        *,
        pretrained: str | None = None,
        use_proj: bool = True,
        num_layers: int | None = None,
        model_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        import open_clip
        from open_clip.transformer import VisionTransformer

        schema, _, rest = model_name.partition(":")
        model_name = f"local-dir:{resolve_path(rest)}" if schema == "local-dir" else resolve_path(model_name)
        if ":" not in model_name and open_clip.get_model_config(model_name) is None:
            raise ConfigError(f"unknown open_clip model {model_name!r} (see open_clip.list_models())")
        if pretrained and ":" in model_name:
            raise ConfigError(f"{model_name} brings its own weights; leave pretrained unset")
        kwargs, tags = dict(model_kwargs or {}), open_clip.list_pretrained_tags_by_model(model_name)
        if pretrained and pretrained not in tags:
            pretrained = find_weights(resolve_path(pretrained), f"open_clip {model_name} (tags {tags})")
            check_weights_file(pretrained)  # open_clip may retry torch.load without weights_only
        if not pretrained and ":" not in model_name:
            kwargs.setdefault("text_cfg", _STUB_TEXT)
        try:
            model = open_clip.create_model(
                model_name,
                pretrained=pretrained,
                pretrained_text=False,
                weights_only=True,
                **kwargs,
            )
        except Exception as e:
            error = CheckpointError if pretrained else ConfigError
            raise error(
                f"cannot build open_clip {model_name!r} (pretrained={pretrained}, {kwargs}): {brief(e)}"
            ) from None
        visual = model.visual
        if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None:
            raise ConfigError(
                f"OpenCLIPVisionEncoder supports plain ViT towers; {model_name} has "
                f"{type(visual).__name__} (use TimmVisionEncoder for timm towers)"
            )
        if not use_proj:
            visual.proj = None
        if num_layers is not None:
            blocks = visual.transformer.resblocks
            if not 1 <= num_layers <= len(blocks):
                raise ConfigError(f"num_layers must be in 1..{len(blocks)} for {model_name}, got {num_layers}")
            visual.transformer.resblocks = blocks[:num_layers]
            visual.transformer.layers = num_layers
        self.visual = visual
        self.dim = visual.transformer.width
        self.pooled_dim = visual.output_dim if use_proj else self.dim
        self.num_prefix_tokens = 1
        self.grid_size = tuple(visual.grid_size)
        self.model_name = model_name

    def image_size_error(self, size: int) -> str | None:
        """open_clip ViTs have position embeddings for one input size."""
        h, w = self.visual.image_size
        if (h, w) != (size, size):
            return f"(open_clip {self.model_name}) takes {h}x{w} images only: set its model_kwargs force_image_size: {size}"
        return None

    def _grouping(self) -> tuple[nn.Module, Callable[[str], int]]:
        top = len(self.visual.transformer.resblocks) + 1

        def group_of(name: str) -> int:
            if name.startswith("transformer.resblocks."):
                return 1 + int(name.split(".")[2])
            return top if name.startswith(("ln_post", "proj")) else 0  # 0: conv1, embeds, ln_pre

        return self.visual, group_of

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)

    def forward(
        self, images: torch.Tensor, patch_mask: torch.Tensor | None = None, mask_token: torch.Tensor | None = None
    ) -> EncoderOutput:
        """``images`` (B, 3, H, W); ``patch_mask`` / ``mask_token``: as ``TimmVisionEncoder``."""
        if patch_mask is not None:
            with _masked_patches(self.visual.conv1, patch_mask, mask_token, "nchw"):
                return self.forward(images)
        v = self.visual  # _embeds / _global_pool: open_clip's own steps, shared with its forward
        x = v.transformer(v._embeds(images))  # (B, 1 + h*w, W), class token first
        tokens = v.ln_post(x)
        if v.final_ln_after_pool:
            pooled = v.ln_post(v._global_pool(x)[0])  # (B, W)
        else:
            pooled = v._global_pool(tokens)[0]  # (B, W)
        if v.proj is not None:
            pooled = pooled @ v.proj  # (B, E)
        return EncoderOutput(tokens=tokens, pooled=pooled, hidden=x)  # hidden: before ln_post
