"""FLAVA checkpoints → ``vlp.models.FLAVA``: the Hugging Face (``FlavaForPreTraining``,
``FlavaModel``) and TorchMultimodal (``flava_model_for_pretraining``, ``flava_model``) layouts.

``vlp convert flava CKPT --out OUT [--config RECIPE] [--strict]``; without a recipe the model
is built from the checkpoint's shapes (:func:`flava_recipe_from_state`). A TorchMultimodal
state dict is first renamed into the transformers layout (:func:`tmm_to_hf_keys`), then
mapped like one:

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

=================================================  ==========================================
TorchMultimodal key                                transformers key
=================================================  ==========================================
model.{image,text,mm}_encoder                      flava.{image,text,multimodal}_model
….encoder.layer.N.attention.{query,key,value,      ….encoder.layer.N.attention.attention.{query,
output}                                            key,value}, attention.output.dense
….attention_layernorm, feedforward_layernorm       layernorm_before, layernorm_after
….feedforward.model.{0, last}                      intermediate.dense, output.dense
text embeddings.layer_norm                         embeddings.LayerNorm
model.*_projection                                 flava.*_projection
loss.contrastive_loss.logit_scale                  flava.logit_scale
loss.{mlm_loss, mim_loss, mmm_loss.mlm,            {mlm, mim, mmm_text, mmm_image}_head
mmm_loss.mim}.cls.{dense, layer_norm, decoder}     .{transform.dense, transform.LayerNorm, decoder}
loss.itm_loss.{pooler.dense, cls.seq_relationship} itm_head.{pooler.dense, seq_relationship}
image_codebook.encoder.blocks.… (``w`` / ``b``)    image_codebook.blocks.… (``weight`` / ``bias``)
=================================================  ==========================================

The towers' poolers (``*_model.pooler``) are not part of FLAVA's pretraining losses:
reported as unused. Checkpoints are read with ``torch.load(weights_only=True)`` or
safetensors. :func:`vlp_to_flava` writes a vlp FLAVA back in either layout.
"""

from __future__ import annotations

import math
import os
import re

import torch
from torch import Tensor, nn

from vlp.convert.common import ConversionReport, count_indices, extract_state_dict, save_state_dict
from vlp.errors import CheckpointError, ConfigError
from vlp.objectives.base import names_by_kind
from vlp.utils.checkpoint import read_checkpoint

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


# -- the TorchMultimodal layout ----------------------------------------------------------
#: TorchMultimodal module prefix → transformers module prefix (a bijection)
_TMM_PREFIXES = {
    "model.image_encoder.": "flava.image_model.",
    "model.text_encoder.": "flava.text_model.",
    "model.mm_encoder.": "flava.multimodal_model.",
    "model.image_projection.": "flava.image_projection.",
    "model.text_projection.": "flava.text_projection.",
    "model.image_to_mm_projection.": "flava.image_to_mm_projection.",
    "model.text_to_mm_projection.": "flava.text_to_mm_projection.",
    "loss.mlm_loss.cls.": "mlm_head.",
    "loss.mim_loss.cls.": "mim_head.",
    "loss.mmm_loss.mlm.cls.": "mmm_text_head.",
    "loss.mmm_loss.mim.cls.": "mmm_image_head.",
    "loss.itm_loss.pooler.dense.": "itm_head.pooler.dense.",
    "loss.itm_loss.cls.seq_relationship.": "itm_head.seq_relationship.",
    "image_codebook.encoder.": "image_codebook.",
}
#: older TorchMultimodal checkpoints kept the contrastive projections in the loss
_TMM_OLD_PREFIXES = {
    "loss.contrastive_loss.image_projection.": "flava.image_projection.",
    "loss.contrastive_loss.text_projection.": "flava.text_projection.",
}
_L = r"^encoder\.layer\.(\d+)\."
#: (TorchMultimodal pattern, transformers replacement)
#: of the key after its module prefix, per kind of module
_TMM_RULES = {
    "tower": [
        (_L + r"attention\.(query|key|value)\.", r"encoder.layer.\1.attention.attention.\2."),
        (_L + r"attention\.output\.", r"encoder.layer.\1.attention.output.dense."),
        (_L + r"attention_layernorm\.", r"encoder.layer.\1.layernorm_before."),
        (_L + r"feedforward_layernorm\.", r"encoder.layer.\1.layernorm_after."),
        (_L + r"feedforward\.model\.0\.", r"encoder.layer.\1.intermediate.dense."),
        # the MLP's second Linear: index 2, or 3 when it was built with dropout
        (_L + r"feedforward\.model\.[23]\.", r"encoder.layer.\1.output.dense."),
        (r"^embeddings\.layer_norm\.", "embeddings.LayerNorm."),
    ],
    "head": [(r"^dense\.", "transform.dense."), (r"^layer_norm\.", "transform.LayerNorm.")],
    "codebook": [
        (r"^blocks\.(group_\d+)\.(block_\d+)\.res_path\.", r"blocks.\1.group.\2.res_path.path."),
        (r"^blocks\.(group_\d+)\.(block_\d+)\.id_path\.", r"blocks.\1.group.\2.id_path."),
        (r"\.w$", ".weight"),
        (r"\.b$", ".bias"),
    ],
}
#: the inverse rules (transformers → TorchMultimodal)
_HF_RULES = {
    "tower": [
        (_L + r"attention\.attention\.(query|key|value)\.", r"encoder.layer.\1.attention.\2."),
        (_L + r"attention\.output\.dense\.", r"encoder.layer.\1.attention.output."),
        (_L + r"layernorm_before\.", r"encoder.layer.\1.attention_layernorm."),
        (_L + r"layernorm_after\.", r"encoder.layer.\1.feedforward_layernorm."),
        (_L + r"intermediate\.dense\.", r"encoder.layer.\1.feedforward.model.0."),
        (_L + r"output\.dense\.", r"encoder.layer.\1.feedforward.model.2."),
        (r"^embeddings\.LayerNorm\.", "embeddings.layer_norm."),
    ],
    "head": [(r"^transform\.dense\.", "dense."), (r"^transform\.LayerNorm\.", "layer_norm.")],
    "codebook": [
        (r"^blocks\.(group_\d+)\.group\.(block_\d+)\.res_path\.path\.", r"blocks.\1.\2.res_path."),
        (r"^blocks\.(group_\d+)\.group\.(block_\d+)\.id_path\.", r"blocks.\1.\2.id_path."),
        (r"\.weight$", ".w"),
        (r"\.bias$", ".b"),
    ],
}


def _scope(hf_prefix: str) -> str:
    if hf_prefix.endswith("_model."):
        return "tower"
    if hf_prefix.endswith("_head."):
        return "head"
    return "codebook" if hf_prefix == "image_codebook." else "direct"


def _rewrite(rest: str, rules) -> str:
    for pattern, replacement in rules:
        rest = re.sub(pattern, replacement, rest)
    return rest


def tmm_to_hf_keys(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str], dict[str, str]]:
    """A TorchMultimodal FLAVA state dict renamed into the transformers layout → (renamed,
    transformers key → its TorchMultimodal key, unknown TorchMultimodal key → why).
    Tensors keep their layout: both use separate q/k/v, (1, 1, D) CLS and mask tokens and
    a scalar logit scale; a head's ``decoder.bias`` is its tied ``bias``."""
    renamed: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    left: dict[str, str] = {}
    for key, value in state.items():
        new = "flava.logit_scale" if key == "loss.contrastive_loss.logit_scale" else None
        for tmm, hf in (*_TMM_PREFIXES.items(), *_TMM_OLD_PREFIXES.items()):
            if new is None and key.startswith(tmm):
                new = hf + _rewrite(key[len(tmm) :], _TMM_RULES.get(_scope(hf), []))
        if new is None:
            left[key] = "unknown"
            continue
        renamed[new], origin[new] = value, key
    return renamed, origin, left


def hf_to_tmm_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of :func:`tmm_to_hf_keys`: a transformers-layout FLAVA state dict in
    TorchMultimodal's names (a head's tied ``bias`` written as ``bias`` and ``decoder.bias``)."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key == "flava.logit_scale":
            out["loss.contrastive_loss.logit_scale"] = value
            continue
        for tmm, hf in _TMM_PREFIXES.items():
            if key.startswith(hf):
                out[tmm + _rewrite(key[len(hf) :], _HF_RULES.get(_scope(hf), []))] = value
                break
        else:
            raise CheckpointError(f"{key}: no place in the TorchMultimodal FLAVA layout")
    return out


# -- layouts -----------------------------------------------------------------------------
_HF_MARKS = ("flava.image_model.", "flava.text_model.", "flava.multimodal_model.")
_TMM_MARKS = ("model.image_encoder.embeddings.", "model.text_encoder.embeddings.", "model.mm_encoder.")
#: the bare encoders' models: transformers' FlavaModel (no ``flava.``), TorchMultimodal's
#: FLAVAModel (no ``model.``)
_HF_BARE = ("image_model.", "text_model.", "multimodal_model.")
_TMM_BARE = ("image_encoder.embeddings.patch_embeddings.", "mm_encoder.")


def flava_layout(state: dict[str, Tensor]) -> str:
    """``"transformers"`` or ``"torchmultimodal"``: which FLAVA layout ``state`` has (after
    :func:`_unbare`); a CheckpointError when it is neither."""
    if any(k.startswith(_HF_MARKS) for k in state):
        return "transformers"
    if any(k.startswith(_TMM_MARKS) for k in state):
        return "torchmultimodal"
    some = ", ".join(list(state)[:3])
    raise CheckpointError(
        "not a FLAVA checkpoint: it has no transformers (flava.image_model.*, flava.text_model.*, "
        "flava.multimodal_model.*) or TorchMultimodal (model.image_encoder.*, model.text_encoder.*, "
        f"model.mm_encoder.*) FLAVA keys (its keys begin: {some})"
    )


def _unbare(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A bare FlavaModel / FLAVAModel state dict given the prefix of the pretraining model's."""
    if any(k.startswith(("flava.", "model.")) for k in state):
        return state
    if any(k.startswith(_HF_BARE) for k in state):
        return {f"flava.{k}": v for k, v in state.items()}
    if any(k.startswith(_TMM_BARE) for k in state):
        return {f"model.{k}": v for k, v in state.items()}
    return state


def to_hf_layout(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], str, dict[str, str], dict[str, str]]:
    """Any FLAVA state dict in the transformers layout → (state, its layout, transformers key →
    the checkpoint's own key, unknown checkpoint keys → why)."""
    state = _unbare(state)
    layout = flava_layout(state)
    if layout == "transformers":
        return dict(state), layout, {}, {}
    renamed, origin, left = tmm_to_hf_keys(state)
    return renamed, layout, origin, left


_TMM_NOTES = [
    "TorchMultimodal layout: renamed into the transformers layout (see vlp.convert.flava)",
    "TorchMultimodal's prediction heads normalise with LayerNorm eps 1e-5 (CodebookMIM(norm_eps: 1.0e-5) "
    "in a recipe; vlp's MLM head uses 1e-12, a ~1e-6 relative difference)",
    "TorchMultimodal's multimodal encoder also attends to text padding; vlp masks it out: "
    "outputs agree on unpadded text",
]


# -- loading into a vlp model ------------------------------------------------------------
def flava_heads(model: nn.Module) -> dict[str, str]:
    """Checkpoint head kind (itc, mim, mlm, mmm_image, mmm_text, itm) → the name of the
    objective of ``model`` that holds it. The MMM heads are the instances named ``mmm_*``;
    the unimodal MIM / MLM are the first instances of their kind not named so."""
    heads = names_by_kind(model)
    mmm = {o.name for o in model.objectives.values() if o.name.startswith("mmm_")}
    heads.update({n: n for n in mmm})  # mmm_image / mmm_text are named, not kinds
    for kind in ("mim", "mlm"):
        own = [o.name for o in model.objectives.values() if o.default_name == kind and o.name not in mmm]
        if own:
            heads[kind] = own[0]
        else:
            heads.pop(kind, None)
    return heads


def flava_to_vlp(state: dict[str, Tensor], model: nn.Module) -> ConversionReport:
    """Load a FLAVA state dict of either layout (transformers or TorchMultimodal, pretraining
    model or bare encoders) into ``model`` (a ``vlp.models.FLAVA``) in place."""
    hf, layout, origin, tmm_left = to_hf_layout(state)
    mapped, left = hf_to_vlp_keys(hf, flava_heads(model))
    left = {origin.get(k, k): why for k, why in left.items()} | tmm_left
    report = ConversionReport(family="FLAVA")
    if layout == "torchmultimodal":
        report.notes += _TMM_NOTES
    for key in hf:
        if re.fullmatch(r"\w+_head\.bias", key) and f"{key[: -len('bias')]}decoder.bias" in hf:
            report.dropped[origin.get(key, key)] = "tied: the same tensor as the head's decoder.bias"
            if not torch.equal(hf[key], hf[f"{key[: -len('bias')]}decoder.bias"]):
                report.warnings.append(f"{origin.get(key, key)} differs from its decoder.bias (decoder.bias loaded)")
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


# -- writing a vlp FLAVA in the other layouts --------------------------------------------
_HF_TOWERS = {v: k for k, v in _TOWERS.items()}
_VLP_DIRECT = {v: k for k, v in _DIRECT.items()}
_VLP_LAYER = {v: k for k, v in _LAYER.items()}
_HF_HEADS = {v: k for k, v in _HEADS.items()}
_VLP_HEAD_PARTS = {v: k for k, v in _HEAD_PARTS.items()}


def vlp_to_hf_keys(state: dict[str, Tensor], heads: dict[str, str]) -> tuple[dict[str, Tensor], list[str]]:
    """The inverse of :func:`hf_to_vlp_keys`: a vlp FLAVA state dict in transformers' names
    → (state, vlp keys with no place there). ``heads``: head kind → vlp objective name."""
    owner = {name: kind for kind, name in heads.items()}
    out: dict[str, Tensor] = {}
    left: list[str] = []
    for key, value in state.items():
        if key in _VLP_DIRECT:
            out[_VLP_DIRECT[key]] = value
        elif key == "mask_token":
            out["flava.image_model.embeddings.mask_token"] = value.reshape(1, 1, -1)
        elif key.startswith("image_tokenizer."):
            out["image_codebook." + key[len("image_tokenizer.") :]] = value
        elif m := re.match(r"(image_encoder\.transformer|text_encoder\.transformer|fusion)\.(.+)$", key):
            hf, rest = _HF_TOWERS[m[1]], m[2]
            b = re.match(r"blocks\.(\d+)\.(.+)\.(weight|bias)$", rest)
            if rest.startswith("norm."):
                out[f"{hf}.layernorm.{rest[len('norm.') :]}"] = value
            elif b and b[2] == "attn.qkv":
                for part, chunk in zip(("query", "key", "value"), value.chunk(3, dim=0), strict=True):
                    out[f"{hf}.encoder.layer.{b[1]}.attention.attention.{part}.{b[3]}"] = chunk
            elif b and b[2] in _VLP_LAYER:
                out[f"{hf}.encoder.layer.{b[1]}.{_VLP_LAYER[b[2]]}.{b[3]}"] = value
            else:
                left.append(key)
        elif m := re.match(r"objectives\.(\w+)\.(.+)$", key):
            kind, rest = owner.get(m[1]), m[2]
            if kind == "itc" and rest == "logit_scale":
                out["flava.logit_scale"] = value.reshape(())
            elif kind in _HF_HEADS and rest.startswith("head.") and rest[len("head.") :] in _VLP_HEAD_PARTS:
                out[f"{_HF_HEADS[kind]}.{_VLP_HEAD_PARTS[rest[len('head.') :]]}"] = value
                if rest == "head.bias":  # tied: the decoder's bias is the head's
                    out[f"{_HF_HEADS[kind]}.bias"] = value
            elif kind == "itm" and (p := re.fullmatch(r"head\.([02])\.(weight|bias)", rest)):
                out[f"itm_head.{'pooler.dense' if p[1] == '0' else 'seq_relationship'}.{p[2]}"] = value
            else:
                left.append(key)
        else:
            left.append(key)
    return out, left


def vlp_to_flava(model: nn.Module, layout: str = "transformers") -> dict[str, Tensor]:
    """A vlp FLAVA's weights as a ``FlavaForPreTraining`` (``layout="transformers"``) or
    TorchMultimodal ``flava_model_for_pretraining`` (``"torchmultimodal"``) state dict. The
    towers' poolers, which FLAVA's losses do not use, are not written; an objective with no
    place in FLAVA (a weight without a FLAVA key) is a CheckpointError."""
    if layout not in ("transformers", "torchmultimodal"):
        raise ConfigError(f"layout must be 'transformers' or 'torchmultimodal', got {layout!r}")
    state, left = vlp_to_hf_keys(model.state_dict(), flava_heads(model))
    left = [k for k in left if not _derived(k)]
    if left:
        raise CheckpointError(f"{len(left)} weight(s) of this model have no place in FLAVA's layout: {left[:5]}")
    return hf_to_tmm_keys(state) if layout == "torchmultimodal" else state


# -- the model a checkpoint describes ----------------------------------------------------
def flava_recipe_from_state(state: dict[str, Tensor], *, head_dim: int = 64) -> dict:
    """The ``model:`` recipe section of a vlp FLAVA with the checkpoint's shapes (either
    layout): widths, depths (layer indices), MLP ratios, patch and image size (patch conv,
    position table), text vocabulary and positions, ``embed_dim`` (the projections), heads
    ``width // head_dim``, and the objectives of FLAVA's pretraining whose heads the
    checkpoint holds (ITC global_contrastive, CodebookMIM mim [image], MLM mlm [text],
    CodebookMIM mmm_image [pair], MLM mmm_text [pair], ITM with its pooler). LayerNorm
    epsilons are FLAVA's (1e-12; TorchMultimodal's heads 1e-5): weights do not record them."""
    hf, layout, _, _ = to_hf_layout(state)

    def need(key: str) -> Tensor:
        if key not in hf:
            raise CheckpointError(f"cannot infer the FLAVA architecture: the checkpoint has no {key!r}")
        return hf[key]

    def tower(prefix: str, what: str) -> dict:
        query = need(f"{prefix}.encoder.layer.0.attention.attention.query.weight")
        dim = query.shape[0]
        if dim % head_dim:
            raise CheckpointError(f"the {what} width {dim} is not a multiple of head_dim {head_dim}; pass --head-dim")
        return {
            "dim": dim,
            "depth": count_indices(hf, re.escape(prefix) + r"\.encoder\.layer\.(\d+)\."),
            "num_heads": dim // head_dim,
            "mlp_ratio": need(f"{prefix}.encoder.layer.0.intermediate.dense.weight").shape[0] / dim,
            "norm_eps": 1e-12,
        }

    conv = need("flava.image_model.embeddings.patch_embeddings.projection.weight")  # (D, C, p, p)
    n = need("flava.image_model.embeddings.position_embeddings").shape[1] - 1
    side = math.isqrt(n)
    if side * side != n:
        raise CheckpointError(f"the image position table has {n} patch positions: not a square grid")
    patch = conv.shape[-1]
    image = {"image_size": side * patch, "patch_size": patch, **tower("flava.image_model", "image")}
    if conv.shape[1] != 3:
        image["in_chans"] = conv.shape[1]
    words = need("flava.text_model.embeddings.word_embeddings.weight")
    text = {
        "vocab_size": words.shape[0],
        "max_length": need("flava.text_model.embeddings.position_embeddings.weight").shape[0],
        **tower("flava.text_model", "text"),
        "type_vocab_size": need("flava.text_model.embeddings.token_type_embeddings.weight").shape[0],
    }
    fusion = tower("flava.multimodal_model", "multimodal")
    head_eps = 1e-5 if layout == "torchmultimodal" else 1e-12

    def rows(head: str) -> int | None:
        w = hf.get(f"{head}.decoder.weight")
        return None if w is None else w.shape[0]

    objectives = []
    if "flava.logit_scale" in hf:
        objectives.append(_obj("ITC", name="global_contrastive", min_temperature=0.01, max_temperature=1.0))
    if rows("mim_head"):
        objectives.append(_obj("CodebookMIM", name="mim", modalities=["image"], vocab_size=rows("mim_head")))
        objectives[-1]["init_args"]["norm_eps"] = head_eps
    if rows("mlm_head"):
        objectives.append(_mlm("mlm", "text", hf["mlm_head.transform.dense.weight"].shape[1], rows("mlm_head")))
    if rows("mmm_image_head"):
        vocab = rows("mmm_image_head")
        objectives.append(_obj("CodebookMIM", name="mmm_image", modalities=["pair"], vocab_size=vocab))
        objectives[-1]["init_args"]["norm_eps"] = head_eps
    if rows("mmm_text_head"):
        objectives.append(
            _mlm("mmm_text", "pair", hf["mmm_text_head.transform.dense.weight"].shape[1], rows("mmm_text_head"))
        )
    if "itm_head.seq_relationship.weight" in hf:
        objectives.append(_obj("ITM", hard_negatives=False, pooler="itm_head.pooler.dense.weight" in hf))
    return {
        "class_path": "vlp.models.FLAVA",
        "init_args": {
            "image_encoder": {"class_path": "vlp.encoders.ViTEncoder", "init_args": image},
            "text_encoder": {"class_path": "vlp.encoders.TransformerTextEncoder", "init_args": text},
            "fusion": {"class_path": "vlp.encoders.MultimodalEncoder", "init_args": fusion},
            "objectives": objectives,
            "embed_dim": need("flava.image_projection.weight").shape[0],
        },
    }


def _obj(cls: str, **args) -> dict:
    return {"class_path": f"vlp.objectives.{cls}", "init_args": args}


def _mlm(name: str, modality: str, dim: int, vocab: int) -> dict:
    # MLM builds a head of the given vocab_size only when its dim is given too
    return _obj("MLM", name=name, modalities=[modality], dim=dim, vocab_size=vocab, distill=False, tie_weights=False)


# -- files -------------------------------------------------------------------------------
def read_flava_checkpoint(path: str) -> dict[str, Tensor]:
    """A FLAVA state dict from ``path`` (safetensors, or a torch file read with weights_only)."""
    return extract_state_dict(read_checkpoint(path), path)


def convert_flava(
    src_path: str | os.PathLike,
    out_path: str | os.PathLike,
    model: nn.Module | str | os.PathLike | None = None,
    *,
    head_dim: int = 64,
    strict: bool = False,
) -> ConversionReport:
    """Convert a FLAVA checkpoint file (transformers or TorchMultimodal layout) into a vlp
    FLAVA state dict file.

    Args:
        src_path: ``*.safetensors`` or a torch file read with ``weights_only=True``.
        out_path: ``*.safetensors`` or a torch file (``{"state_dict": ...}``), for a recipe's
            ``model.init_args.init_from``.
        model: a FLAVA, a recipe YAML whose model to fill, or None: the model of
            :func:`flava_recipe_from_state`, whose section is the report's ``recipe``.
        head_dim: attention head width when inferring the model (64).
        strict: fail, writing nothing, unless every key is known and every weight filled.
    """
    from vlp.convert.common import build_model, read_model_section
    from vlp.models.flava import FLAVA

    src, out = str(src_path), str(out_path)
    state = read_flava_checkpoint(src)
    recipe = None
    try:
        if model is None:
            recipe = flava_recipe_from_state(state, head_dim=head_dim)
            model = build_model(FLAVA, recipe)
        elif isinstance(model, str | os.PathLike):
            model = build_model(FLAVA, read_model_section(model))
        if not isinstance(model, FLAVA):
            raise ConfigError(f"model must be a FLAVA, a recipe path or None, got {type(model).__name__}")
        report = flava_to_vlp(state, model)
    except CheckpointError as e:
        raise CheckpointError(f"{src}: {e}") from None
    report.source, report.output, report.recipe = src, out, recipe
    if strict and not report.ok:
        raise CheckpointError("incomplete FLAVA conversion (strict):\n" + report.summary())
    save_state_dict(model.state_dict(), out, converted_by="vlp convert flava")
    return report
