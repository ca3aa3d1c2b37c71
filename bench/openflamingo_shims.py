"""Small shims that let the real OpenFlamingo 2.0.1 package run here (torch 2.x, transformers 5).

Install it without its pinned dependencies, next to vlp's environment::

    pip install --no-deps --target /work/ofpkgs open-flamingo==2.0.1 einops einops-exts
    PYTHONPATH=$PWD:/work/ofpkgs python bench/openflamingo_parity.py

Nothing of OpenFlamingo is copied: these functions build its ``Flamingo`` the way its
``factory.create_model_and_transforms`` does, from towers built here (its factory downloads
from the hub), and adapt three calls:

* transformers 5's GPT-2 calls its blocks with positional ``(hidden, cache, mask, encoder
  states)``; OpenFlamingo's ``FlamingoLayer.forward(lang_x, attention_mask=None, **kw)`` would
  bind the cache to ``attention_mask``. :func:`patch_flamingo_layer` binds the positional
  arguments to the decoder layer's own parameter names, then calls OpenFlamingo's forward.
* transformers 5 reads attributes such as ``attention_type`` off the decoder layers; the
  patched ``FlamingoLayer`` forwards unknown attribute reads to its ``decoder_layer``.
* transformers 5's ``generate`` derives position ids from the attention mask only for models
  whose ``forward`` names ``position_ids``; OpenFlamingo's mixin ``forward(input_ids,
  attention_mask, **kwargs)`` does not, so left-padded prompts would get positions counted
  over their padding (GPT-2; rotary LMs do not notice). :func:`generate` passes them as
  transformers 4's GPT-2 ``prepare_inputs_for_generation`` computed them.
* transformers 5's ``generate`` drops an all-ones attention mask; the mixin's ``forward``
  requires one (:func:`patch_lm_mixin` gives it the default None).
* ``open_flamingo.train.train_utils`` imports ``wandb`` at module level (only used to upload
  checkpoints): an empty module stands in when it is not installed, so its own
  ``save_checkpoint`` / ``filter_state_dict_to_trainable`` write the checkpoints.

open_clip >= 2.21 returns its patch tokens *after* ``ln_post`` from ``visual(x)[1]``;
OpenFlamingo was trained on open_clip 2.16, which returned them before it.
:class:`OldOpenCLIPTokens` gives a tower that old behaviour (vlp: ``vision_features:
prenorm``); the installed open_clip's is vlp's ``vision_features: tokens``.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import os
import sys
import tempfile
import types
from types import SimpleNamespace

import torch
from torch import nn


def import_open_flamingo():
    """The ``open_flamingo`` package with the shims applied, or None when it is not importable
    (the reason in :data:`IMPORT_ERROR`)."""
    global IMPORT_ERROR
    try:
        import einops  # noqa: F401
        import einops_exts  # noqa: F401
        import open_flamingo
        from open_flamingo.src import flamingo_lm
    except Exception as e:  # ImportError, or its modules failing on this torch / transformers
        IMPORT_ERROR = f"{type(e).__name__}: {e}"
        return None
    patch_flamingo_layer(flamingo_lm.FlamingoLayer)
    patch_lm_mixin(flamingo_lm.FlamingoLMMixin)
    return open_flamingo


IMPORT_ERROR: str | None = None
HOW_TO_INSTALL = (
    "pip install --no-deps --target /work/ofpkgs open-flamingo==2.0.1 einops einops-exts; "
    "then run with PYTHONPATH=$PWD:/work/ofpkgs"
)


def patch_flamingo_layer(cls: type) -> None:
    """Let OpenFlamingo's ``FlamingoLayer`` take the positional arguments transformers 5 passes
    (bound to its ``decoder_layer``'s parameter names) and forward attribute reads to it."""
    if getattr(cls, "_vlp_shim", False):
        return
    original = cls.forward

    def forward(self, lang_x, *args, **kwargs):
        if args:
            names = list(inspect.signature(self.decoder_layer.forward).parameters)[1:]
            taken = [n for n in names[: len(args)] if n in kwargs]
            if len(args) > len(names) or taken:
                raise TypeError(f"FlamingoLayer shim: cannot bind {len(args)} positional arguments to {names}")
            kwargs.update(zip(names, args))
        return original(self, lang_x, **kwargs)

    def __getattr__(self, name):  # noqa: N807 - the module's attribute fallback
        try:
            return nn.Module.__getattr__(self, name)
        except AttributeError:
            return getattr(self._modules["decoder_layer"], name)

    cls.forward, cls.__getattr__, cls._vlp_shim = forward, __getattr__, True


def patch_lm_mixin(cls: type) -> None:
    """Give ``FlamingoLMMixin.forward``'s ``attention_mask`` a default: transformers 5's
    ``generate`` drops an all-ones mask instead of passing it."""
    if getattr(cls, "_vlp_shim", False):
        return
    original = cls.forward

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return original(self, input_ids, attention_mask, **kwargs)

    cls.forward, cls._vlp_shim = forward, True


class OldOpenCLIPTokens(nn.Module):
    """An open_clip ``VisionTransformer`` whose ``forward`` returns what open_clip 2.16's did
    with ``output_tokens=True`` for OpenFlamingo: ``(pooled, patch tokens before ln_post)``."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, images: torch.Tensor):
        v = self.visual
        x = v.transformer(v._embeds(images))  # (N, 1 + P, W)
        pooled = v.ln_post(x[:, 0])
        if v.proj is not None:
            pooled = pooled @ v.proj
        return pooled, x[:, 1:]


def build_flamingo(
    of,
    visual: nn.Module,
    lang_model: nn.Module,
    *,
    eoc_token_id: int,
    media_token_id: int,
    decoder_layers_attr_name: str,
    cross_attn_every_n_layers: int = 1,
    vis_dim: int | None = None,
):
    """OpenFlamingo's ``Flamingo`` over ``visual`` (an open_clip ViT, used as is) and
    ``lang_model`` (an HF causal LM, its embedding already sized to the tokenizer), set up as
    ``create_model_and_transforms`` does: the LM extended with ``FlamingoLMMixin``,
    ``output_tokens`` on, everything frozen but the perceiver, the cross-attention layers and
    the LM's input embedding. Perceiver and cross-attention sizes are OpenFlamingo's own."""
    from open_flamingo.src.flamingo import Flamingo
    from open_flamingo.src.flamingo_lm import FlamingoLMMixin
    from open_flamingo.src.utils import extend_instance

    inner = getattr(visual, "visual", visual)
    inner.output_tokens = True
    extend_instance(lang_model, FlamingoLMMixin)
    lang_model.set_decoder_layers_attr_name(decoder_layers_attr_name)
    model = Flamingo(
        SimpleNamespace(visual=visual),
        lang_model,
        eoc_token_id,
        media_token_id,
        vis_dim=vis_dim if vis_dim is not None else inner.transformer.width,
        cross_attn_every_n_layers=cross_attn_every_n_layers,
    )
    model.requires_grad_(False)
    model.perceiver.requires_grad_(True)
    model.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
    model.lang_encoder.get_input_embeddings().requires_grad_(True)
    return model


def generate(model, vision_x: torch.Tensor, lang_x: torch.Tensor, attention_mask: torch.Tensor, **kwargs):
    """OpenFlamingo's ``Flamingo.generate`` (HF ``generate`` over its cached media) with the
    prompt's position ids given (see the module docstring) → (B, L + new) ids."""
    if "position_ids" not in kwargs:
        position_ids = attention_mask.long().cumsum(-1) - 1
        kwargs["position_ids"] = position_ids.masked_fill(attention_mask == 0, 1)
    return model.generate(vision_x, lang_x, attention_mask=attention_mask, **kwargs)


def _train_utils():
    if "wandb" not in sys.modules:
        try:
            import wandb  # noqa: F401
        except ImportError:
            sys.modules["wandb"] = types.ModuleType("wandb")  # only its upload calls use it
    from open_flamingo.train import train_utils

    return train_utils


def save_checkpoint(model, out_dir: str | os.PathLike) -> str:
    """Write ``model``'s checkpoint with OpenFlamingo's own ``train_utils.save_checkpoint``
    (its trainable state dict as ``model_state_dict``, an AdamW and a scheduler state) →
    the file's path."""
    train_utils = _train_utils()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    args = SimpleNamespace(
        fsdp=False, rank=0, run_name=str(out_dir), report_to_wandb=False, delete_previous_checkpoint=False
    )
    with contextlib.redirect_stdout(io.StringIO()):  # its "Saving checkpoint to ..." line
        train_utils.save_checkpoint(model, optimizer, scheduler, 0, args)
    return os.path.join(str(out_dir), "checkpoint_0.pt")


def trainable_state_dict(model) -> dict[str, torch.Tensor]:
    """OpenFlamingo's ``filter_state_dict_to_trainable`` of ``model``'s state dict."""
    return _train_utils().filter_state_dict_to_trainable(model, model.state_dict())


def temp_dir() -> str:
    return tempfile.mkdtemp(prefix="openflamingo_")
