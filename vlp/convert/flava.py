"""FLAVA checkpoints (Hugging Face ``FlavaForPreTraining`` layout) → ``vlp.models.FLAVA``.

=================================================  ==========================================
Hugging Face key                                   vlp key
=================================================  ==========================================
flava.image_model.embeddings.{cls_token,           image_encoder.embed.{cls_token, pos_embed,
position_embeddings, patch_embeddings.projection}  proj}; ``mask_token`` → mask_token
flava.text_model.embeddings.{word,position,        text_encoder.embed.{word, position,
token_type}_embeddings, LayerNorm                  token_type, norm}
flava.{image,text,multimodal}_model.encoder.       {image_encoder,text_encoder}.transformer /
layer.N (query/key/value → qkv, attention.output   fusion: blocks.N (attn.qkv, attn.proj,
.dense, layernorm_before/after, intermediate,      norm1, norm2, mlp.fc1, mlp.fc2)
output)
flava.*_model.layernorm                            ….transformer.norm / fusion.norm
flava.multimodal_model.cls_token                   fusion_cls
flava.{image,text}_projection,                     image_proj, text_proj, image_to_mm,
{image,text}_to_mm_projection                      text_to_mm
flava.logit_scale                                  objectives.<itc>.logit_scale
mim_head, mlm_head, mmm_image_head, mmm_text_head  objectives.<mim|mlm|mmm_image|mmm_text>.head
(transform.dense, transform.LayerNorm, decoder)    (dense, norm, decoder + bias)
itm_head.{pooler.dense, seq_relationship}          objectives.<itm>.head.{0, 2} (ITM(pooler))
image_codebook.*                                   image_tokenizer.* (when the model has one)
=================================================  ==========================================

The towers' poolers (``*_model.pooler``) are not part of FLAVA's pretraining losses:
reported as unused. Checkpoints are read with ``torch.load(weights_only=True)`` or
safetensors.
"""

from __future__ import annotations

import os
import re

import torch
from torch import Tensor, nn

from vlp.convert.common import ConversionReport, extract_state_dict, save_state_dict
from vlp.errors import CheckpointError, ConfigError
from vlp.objectives.base import names_by_kind

#: HF layer sub-keys → vlp TransformerBlock sub-keys (q/k/v are concatenated into qkv)
_LAYER = {
    "attention.output.dense": "attn.proj",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
_TOWERS = {
    "flava.image_model": "image_encoder.transformer",
    "flava.text_model": "text_encoder.transformer",
    "flava.multimodal_model": "fusion",
}
_DIRECT = {
    "flava.image_model.embeddings.cls_token": "image_encoder.embed.cls_token",
    "flava.image_model.embeddings.position_embeddings": "image_encoder.embed.pos_embed",
    "flava.image_model.embeddings.patch_embeddings.projection.weight": "image_encoder.embed.proj.weight",
    "flava.image_model.embeddings.patch_embeddings.projection.bias": "image_encoder.embed.proj.bias",
    "flava.text_model.embeddings.word_embeddings.weight": "text_encoder.embed.word.weight",
    "flava.text_model.embeddings.position_embeddings.weight": "text_encoder.embed.position.weight",
    "flava.text_model.embeddings.token_type_embeddings.weight": "text_encoder.embed.token_type.weight",
    "flava.text_model.embeddings.LayerNorm.weight": "text_encoder.embed.norm.weight",
    "flava.text_model.embeddings.LayerNorm.bias": "text_encoder.embed.norm.bias",
    "flava.multimodal_model.cls_token": "fusion_cls",
}
for _hf, _vlp in (
    ("flava.image_projection", "image_proj"),
    ("flava.text_projection", "text_proj"),
    ("flava.image_to_mm_projection", "image_to_mm"),
    ("flava.text_to_mm_projection", "text_to_mm"),
):
    for _p in ("weight", "bias"):
        _DIRECT[f"{_hf}.{_p}"] = f"{_vlp}.{_p}"
#: prediction heads → the objective kind (default name) that owns each
_HEADS = {"mim_head": "mim", "mlm_head": "mlm", "mmm_image_head": "mmm_image", "mmm_text_head": "mmm_text"}
_HEAD_PARTS = {
    "transform.dense.weight": "dense.weight",
    "transform.dense.bias": "dense.bias",
    "transform.LayerNorm.weight": "norm.weight",
    "transform.LayerNorm.bias": "norm.bias",
    "decoder.weight": "decoder",
    "decoder.bias": "bias",
}


def hf_to_vlp_keys(state: dict[str, Tensor], heads: dict[str, str]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The HF state dict renamed to vlp keys → (mapped, unknown-or-unused key → why).
    ``heads``: HF head prefix → the vlp objective name that holds it."""
    mapped: dict[str, Tensor] = {}
    left: dict[str, str] = {}
    qkv: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        if key in _DIRECT:
            mapped[_DIRECT[key]] = value
            continue
        if key == "flava.image_model.embeddings.mask_token":
            mapped["mask_token"] = value.reshape(-1)
            continue
        if key == "flava.logit_scale":
            if "itc" in heads:
                mapped[f"objectives.{heads['itc']}.logit_scale"] = value.reshape(())
            else:
                left[key] = "no ITC objective in the model"
            continue
        m = re.match(r"(flava\.\w+_model)\.encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$", key)
        if m and m[1] in _TOWERS:
            prefix = f"{_TOWERS[m[1]]}.blocks.{m[2]}"
            sub = m[3]
            if sub in ("attention.attention.query", "attention.attention.key", "attention.attention.value"):
                qkv.setdefault(f"{prefix}.attn.qkv.{m[4]}", {})[sub.rsplit(".", 1)[1]] = value
                continue
            if sub in _LAYER:
                mapped[f"{prefix}.{_LAYER[sub]}.{m[4]}"] = value
                continue
        m = re.match(r"(flava\.\w+_model)\.layernorm\.(weight|bias)$", key)
        if m and m[1] in _TOWERS:
            mapped[f"{_TOWERS[m[1]]}.norm.{m[2]}"] = value
            continue
        if re.match(r"flava\.\w+_model\.pooler\.", key):
            left[key] = "the towers' poolers are not used by FLAVA's pretraining losses"
            continue
        m = re.match(r"(\w+_head)\.(.+)$", key)
        if m and m[1] in _HEADS:
            if m[2] == "bias":
                continue  # tied to decoder.bias
            name = heads.get(_HEADS[m[1]])
            if name is None:
                left[key] = f"no {_HEADS[m[1]]} objective in the model"
            elif m[2] in _HEAD_PARTS:
                mapped[f"objectives.{name}.head.{_HEAD_PARTS[m[2]]}"] = value
            else:
                left[key] = "unknown"
            continue
        if key.startswith("itm_head."):
            part = {"pooler.dense": "0", "seq_relationship": "2"}.get(key.rsplit(".", 1)[0][len("itm_head.") :])
            if "itm" not in heads:
                left[key] = "no ITM objective in the model"
            elif part is None:
                left[key] = "unknown"
            else:
                mapped[f"objectives.{heads['itm']}.head.{part}.{key.rsplit('.', 1)[1]}"] = value
            continue
        if key.startswith("image_codebook."):
            mapped["image_tokenizer." + key[len("image_codebook.") :]] = value
            continue
        left[key] = "unknown"
    for key, parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise CheckpointError(f"{key}: the checkpoint has only {sorted(parts)} of query/key/value")
        mapped[key] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return mapped, left


def flava_to_vlp(state: dict[str, Tensor], model: nn.Module) -> ConversionReport:
    """Load an HF-layout FLAVA state dict into ``model`` (a ``vlp.models.FLAVA``) in place."""
    heads = names_by_kind(model)
    mmm = {o.name for o in model.objectives.values() if o.name.startswith("mmm_")}
    heads.update({n: n for n in mmm})  # mmm_image / mmm_text are named, not kinds
    for kind in ("mim", "mlm"):  # the unimodal heads are the instances not named mmm_*
        own = [o.name for o in model.objectives.values() if o.default_name == kind and o.name not in mmm]
        if own:
            heads[kind] = own[0]
        else:
            heads.pop(kind, None)
    mapped, left = hf_to_vlp_keys(state, heads)
    report = ConversionReport(family="FLAVA")
    own = model.state_dict()
    for key, value in mapped.items():
        if key.startswith("image_tokenizer.") and getattr(model, "image_tokenizer", None) is None:
            report.unused[key] = "the model has no image tokenizer"
            continue
        if key not in own:
            report.unused[key] = "no such parameter in this model"
            continue
        if own[key].shape != value.shape:
            raise CheckpointError(
                f"{key}: the checkpoint's tensor is {tuple(value.shape)}, the model's {tuple(own[key].shape)} "
                "(build the model with the checkpoint's sizes)"
            )
        report.loaded.append(key)
    report.unknown = sorted(k for k, why in left.items() if why == "unknown")
    report.unused.update({k: why for k, why in left.items() if why != "unknown"})
    report.missing = sorted(k for k in own if k not in mapped and not _derived(k))
    with torch.no_grad():
        for key in report.loaded:
            own[key].copy_(mapped[key])
    return report


def _derived(key: str) -> bool:
    """Buffers that are not weights (a frozen tokenizer's non-persistent state)."""
    return key.endswith("num_batches_tracked")


def read_flava_checkpoint(path: str) -> dict[str, Tensor]:
    """A FLAVA state dict from ``path`` (safetensors, or a torch file read with weights_only)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"FLAVA checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable weights-only checkpoint ({type(e).__name__}: {e})") from None
    return extract_state_dict(ckpt, path)


def convert_flava(
    src_path: str | os.PathLike, out_path: str | os.PathLike, model: nn.Module | str | os.PathLike, *, strict=False
) -> ConversionReport:
    """Convert an HF-layout FLAVA checkpoint file into a vlp FLAVA state dict file; ``model`` is
    a FLAVA or a recipe YAML whose model to fill."""
    from vlp.convert.common import build_model, read_model_section
    from vlp.models.flava import FLAVA

    src, out = str(src_path), str(out_path)
    if isinstance(model, str | os.PathLike):
        model = build_model(FLAVA, read_model_section(model))
    if not isinstance(model, FLAVA):
        raise ConfigError(f"model must be a FLAVA or a recipe path, got {type(model).__name__}")
    report = flava_to_vlp(read_flava_checkpoint(src), model)
    report.source, report.output = src, out
    if strict and not report.ok:
        raise CheckpointError("incomplete FLAVA conversion (strict):\n" + report.summary())
    save_state_dict(model.state_dict(), out, converted_by="vlp convert flava")
    return report
