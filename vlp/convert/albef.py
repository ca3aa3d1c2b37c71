"""Official ALBEF / LAVIS checkpoints → :class:`vlp.models.ALBEF` (and back).

Source layouts (salesforce/ALBEF and salesforce/LAVIS, ``{"model": state_dict, ...}`` or a
bare state dict):

=================================================  ==============================================
ALBEF / LAVIS key                                   vlp key
=================================================  ==============================================
visual_encoder[_m].*  (timm ViT names)             image_encoder[_m].model.*
text_encoder[_m].bert.embeddings.*                 text_encoder[_m].model.embeddings.*
text_encoder[_m].bert.encoder.layer.{i}.*, i < F   text_encoder[_m].model.encoder.layer.{i}.*
text_encoder[_m].bert.encoder.layer.{i}.*, i >= F  fusion[_m].blocks.{i-F}.*  (``bert_layer_to_block``)
text_encoder[_m].cls.predictions.transform.dense   objectives.{mlm}.head[_m].dense
text_encoder[_m].cls.predictions.transform.LayerNorm  objectives.{mlm}.head[_m].norm
text_encoder[_m].cls.predictions.bias              objectives.{mlm}.head[_m].bias
vision_proj[_m] / text_proj[_m]                    image_proj[_m] / text_proj[_m]
itm_head                                           objectives.{itm}.head
temp                                               objectives.{itc}.logit_scale = log(1 / temp)
image_queue / text_queue / queue_ptr / idx_queue   objectives.{itc}.*  (idx_queue (1, Q) → (Q,))
=================================================  ==============================================

F is the fusion layer (6 in ALBEF: the first layer with ``crossattention.*``). Retrieval
fine-tuned checkpoints hold a ``BertModel`` (``text_encoder.embeddings...``, no ``bert.``
and no ``cls.*``). Left out on purpose, and listed in the report: xbert's
``embeddings.position_ids`` buffer, the MLM ``decoder.weight`` (tied to the word embeddings
in both models; checked to be equal) and ``decoder.bias`` (the same tensor as
``predictions.bias``). LAVIS's BERT has no ``token_type_embeddings`` and adds none: a zero
table does the same in the Hugging Face BERT.

Objectives are found by name (``itc``, ``itm``, ``mlm``), never by position: the pure
mapping :func:`map_albef_keys` writes ``objectives.itc.logit_scale``, and
:func:`albef_to_vlp` resolves the name to the model's index. Nothing is ever silently
ignored: every source key is loaded, or reported as unknown, unused (no place in this
model, e.g. the MLM head of a model without MLM) or dropped (with the reason).
"""

from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from vlp.convert.common import (
    ConversionReport,
    build_model,
    count_indices,
    extract_state_dict,
    read_model_section,
    save_state_dict,
)
from vlp.encoders.bert import bert_layer_to_block, block_to_bert_layer
from vlp.errors import CheckpointError, ConfigError
from vlp.objectives.base import find_objective, names_by_kind
from vlp.objectives.itc import ITC
from vlp.utils.checkpoint import QUEUE_BUFFERS as QUEUES
from vlp.utils.checkpoint import is_pos_embed, resize_pos_embed

if TYPE_CHECKING:
    from vlp.models.albef import ALBEF

COPIES = ("", "_m")  # online weights, momentum copy
_PARTS = ("weight", "bias")

_VIT_KEY = re.compile(
    r"(cls_token|pos_embed|patch_embed\.proj\.(weight|bias)|norm\.(weight|bias)"
    r"|blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias))"
)
_EMBEDDING_KEYS = {
    "word_embeddings.weight",
    "position_embeddings.weight",
    "token_type_embeddings.weight",
    "LayerNorm.weight",
    "LayerNorm.bias",
}
_SELF_LAYER_KEYS = {
    f"{m}.{p}"
    for m in (
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "attention.output.LayerNorm",
        "intermediate.dense",
        "output.dense",
        "output.LayerNorm",
    )
    for p in _PARTS
}
_CROSS_LAYER_KEYS = {
    f"crossattention.{m}.{p}"
    for m in ("self.query", "self.key", "self.value", "output.dense", "output.LayerNorm")
    for p in _PARTS
}
_MLM_KEYS = {  # cls.predictions.* → MLMHead.*
    "bias": "bias",
    "transform.dense.weight": "dense.weight",
    "transform.dense.bias": "dense.bias",
    "transform.LayerNorm.weight": "norm.weight",
    "transform.LayerNorm.bias": "norm.bias",
}


@dataclass
class _Mapping:
    """Result of the pure key mapping (objective keys under their names)."""

    mapped: dict[str, Tensor]
    unknown: list[str]
    dropped: dict[str, str]
    notes: list[str]
    warnings: list[str]
    synthesized: set[str]  # mapped keys made up by the converter (zero token types)
    fusion_layer: int


# -- reading ------------------------------------------------------------------------------
def _text_prefix(state: dict[str, Tensor], copy: str = "") -> str:
    """``text_encoder[_m].bert.`` (BertForMaskedLM: pretraining) or ``text_encoder[_m].`` (BertModel)."""
    bert = f"text_encoder{copy}.bert."
    return bert if any(k.startswith(bert) for k in state) else f"text_encoder{copy}."


_LAYER = re.compile(r"encoder\.layer\.(\d+)\.(.*)")


def infer_fusion_layer(state: dict[str, Tensor]) -> int:
    """The fusion layer (ALBEF: 6): the first of the top BERT layers that all have cross-attention."""
    prefix = _text_prefix(state)
    layers, cross = set(), set()
    for k in state:
        if k.startswith(prefix) and (m := _LAYER.match(k[len(prefix) :])):
            layers.add(int(m[1]))
            if m[2].startswith("crossattention."):
                cross.add(int(m[1]))
    first = len(layers)
    while first > 0 and first - 1 in cross:
        first -= 1
    if first == len(layers):
        raise CheckpointError(f"no top BERT layer under {prefix!r} has cross-attention: not an ALBEF text encoder")
    return first


# -- the pure mapping ---------------------------------------------------------------------
def _map(state: dict[str, Tensor], fusion_layer: int | None = None) -> _Mapping:
    inferred = infer_fusion_layer(state)
    if fusion_layer is not None and fusion_layer != inferred:
        raise CheckpointError(
            f"the checkpoint's first cross-attention layer is {inferred}, but fusion_layer={fusion_layer} was asked "
            "(the vlp text encoder must have exactly the layers before the first cross-attention layer)"
        )
    F_ = inferred
    out = _Mapping({}, [], {}, [], [], set(), F_)
    consumed: set[str] = set()

    def put(src: str, dst: str, t: Tensor) -> None:
        out.mapped[dst] = t
        consumed.add(src)

    for s in COPIES:
        # image tower: timm names as they are
        vis = f"visual_encoder{s}."
        for k, t in state.items():
            if k.startswith(vis) and _VIT_KEY.fullmatch(k[len(vis) :]):
                put(k, f"image_encoder{s}.model.{k[len(vis) :]}", t)
        # text encoder: embeddings, unimodal layers, fusion layers
        text = _text_prefix(state, s)
        layers: dict[int, dict[str, Tensor]] = defaultdict(dict)
        for k, t in state.items():
            if not k.startswith(text):
                continue
            rest = k[len(text) :]
            if rest.startswith("embeddings."):
                name = rest[len("embeddings.") :]
                if name in _EMBEDDING_KEYS:
                    put(k, f"text_encoder{s}.model.{rest}", t)
                elif name == "position_ids":
                    out.dropped[k] = "xbert's position_ids buffer (arange; transformers rebuilds it)"
                    consumed.add(k)
            elif rest.startswith("pooler."):
                out.dropped[k] = "BERT pooler: ALBEF does not use it"
                consumed.add(k)
            elif m := _LAYER.match(rest):
                i, name = int(m[1]), m[2]
                known = _SELF_LAYER_KEYS | (_CROSS_LAYER_KEYS if i >= F_ else set())
                if name in known:
                    layers[i][name] = t
                    consumed.add(k)
                elif name in _CROSS_LAYER_KEYS:  # cross-attention below the fusion layer: not ALBEF
                    out.unknown.append(k)
        for i in sorted(layers):
            if i < F_:
                for name, t in layers[i].items():
                    out.mapped[f"text_encoder{s}.model.encoder.layer.{i}.{name}"] = t
                continue
            try:
                block = bert_layer_to_block(layers[i], cross_attention=True)
            except CheckpointError as e:
                raise CheckpointError(f"{text}encoder.layer.{i}: {e}") from None
            for name, t in block.items():
                out.mapped[f"fusion{s}.blocks.{i - F_}.{name}"] = t
        emb = f"text_encoder{s}.model.embeddings."
        if f"{emb}word_embeddings.weight" in out.mapped and f"{emb}token_type_embeddings.weight" not in out.mapped:
            width = out.mapped[f"{emb}word_embeddings.weight"].shape[1]
            key = f"{emb}token_type_embeddings.weight"
            out.mapped[key] = torch.zeros(2, width, dtype=out.mapped[f"{emb}word_embeddings.weight"].dtype)
            out.synthesized.add(key)
            out.notes.append(
                f"{text}embeddings has no token_type_embeddings (LAVIS: add_type_embeddings false, nothing is added); "
                f"{key} set to zeros, which adds nothing either"
            )
        # MLM head (BertForMaskedLM checkpoints only)
        cls = f"text_encoder{s}.cls.predictions."
        for k, t in state.items():
            if not k.startswith(cls):
                continue
            name = k[len(cls) :]
            if name in _MLM_KEYS:
                put(k, f"objectives.mlm.head{s}.{_MLM_KEYS[name]}", t)
            elif name == "decoder.weight":
                consumed.add(k)
                out.dropped[k] = "MLM decoder weight: tied to the word embeddings (vlp stores it once)"
                words = state.get(f"{text}embeddings.word_embeddings.weight")
                if words is None or words.shape != t.shape:
                    out.warnings.append(f"{k} has no word embeddings of its shape to be tied to")
                elif not torch.equal(words, t):
                    diff = (words.float() - t.float()).abs().max().item()
                    out.warnings.append(
                        f"{k} is not equal to the word embeddings (max |diff| {diff:.3g}); the word embeddings are kept"
                    )
            elif name == "decoder.bias":
                bias = state.get(f"{cls}bias")
                if bias is None:  # only the decoder's reference to the shared bias was saved
                    put(k, f"objectives.mlm.head{s}.bias", t)
                    continue
                consumed.add(k)
                out.dropped[k] = "MLM decoder bias: the same tensor as cls.predictions.bias"
                if not torch.equal(bias, t):
                    out.warnings.append(f"{k} differs from {cls}bias; {cls}bias is kept")
        # projections
        for src, dst in (("vision_proj", "image_proj"), ("text_proj", "text_proj")):
            for p in _PARTS:
                k = f"{src}{s}.{p}"
                if k in state:
                    put(k, f"{dst}{s}.{p}", state[k])
    # single copies: ITM head, temperature, queues
    for p in _PARTS:
        if f"itm_head.{p}" in state:
            put(f"itm_head.{p}", f"objectives.itm.head.{p}", state[f"itm_head.{p}"])
    if "temp" in state:
        temp = state["temp"]
        put("temp", "objectives.itc.logit_scale", (-torch.log(temp.double())).to(temp.dtype).reshape(()))
    for name in QUEUES:
        if name in state:
            t = state[name]
            if name == "idx_queue" and t.ndim == 2 and t.shape[0] == 1:
                t = t.reshape(-1)  # ALBEF/LAVIS store (1, Q)
            put(name, f"objectives.itc.{name}", t)
    out.unknown += [k for k in state if k not in consumed and k not in out.dropped and k not in out.unknown]
    return out


def map_albef_keys(state: dict[str, Tensor], fusion_layer: int | None = None) -> tuple[dict[str, Tensor], list[str]]:
    """ALBEF/LAVIS state dict → (vlp-named tensors, unknown source keys). Needs no model.

    Objective keys are named by objective (``objectives.itc.logit_scale``,
    ``objectives.mlm.head.dense.weight``); :func:`albef_to_vlp` finds the model's objective of
    each kind (``names_by_kind``), whatever the recipe named it.
    ``fusion_layer``: the first cross-attention layer, checked against the checkpoint
    (inferred when None). Deliberately dropped keys (tied MLM decoder, ``position_ids``)
    are neither mapped nor unknown; :func:`albef_to_vlp` reports them.
    """
    result = _map(extract_state_dict(state), fusion_layer)
    return result.mapped, result.unknown


# -- onto a model -------------------------------------------------------------------------
def _momentum_twin(key: str) -> str | None:
    """The online key whose weights a momentum key copies (None for non-momentum keys)."""
    head, _, rest = key.partition(".")
    if head.endswith("_m"):
        return f"{head[:-2]}.{rest}"
    if m := re.match(r"(objectives\.[a-z0-9_]+\.head)_m\.(.*)", key):
        return f"{m[1]}.{m[2]}"
    return None


def _momentum_group(key: str) -> str:
    m = re.match(r"(objectives\.[a-z0-9_]+\.head_m)\.", key)
    return m[1] if m else key.split(".")[0]


def albef_to_vlp(state: dict[str, Tensor], model: ALBEF, *, strict: bool = False) -> ConversionReport:
    """Load an ALBEF/LAVIS state dict (or checkpoint) into ``model``; return the report.

    The model's text encoder must have the checkpoint's layers before the first
    cross-attention layer and its fusion the rest; ViT depth and widths must match (a
    different image resolution is fine: ``pos_embed`` is interpolated). Momentum copies
    absent from the checkpoint are filled from the online weights; queues of another size
    are left as the model made them. ``strict``: raise ``CheckpointError`` unless every
    checkpoint key is known and every model key filled.
    """
    state = extract_state_dict(state)
    text_layers = getattr(getattr(getattr(model.text_encoder, "model", None), "encoder", None), "layer", None)
    vit_blocks = getattr(getattr(model.image_encoder, "model", None), "blocks", None)
    if text_layers is None or vit_blocks is None or not hasattr(model.fusion, "blocks"):
        raise ConfigError(
            "albef_to_vlp needs an ALBEF with a timm ViT (TimmVisionEncoder), a BERT text encoder (HFTextEncoder) "
            f"and a BertFusion, got {type(model.image_encoder).__name__}, {type(model.text_encoder).__name__}, "
            f"{type(model.fusion).__name__}"
        )
    F_ = len(text_layers)
    src_layers = count_indices(state, re.escape(_text_prefix(state)) + r"encoder\.layer\.(\d+)\.")
    src_blocks = count_indices(state, r"visual_encoder\.blocks\.(\d+)\.")
    dst_blocks = len(vit_blocks)
    if src_layers != F_ + len(model.fusion.blocks) or src_blocks != dst_blocks:
        raise CheckpointError(
            f"the checkpoint has {src_layers} BERT layers and {src_blocks} ViT blocks, the model "
            f"{F_} text + {len(model.fusion.blocks)} fusion layers and {dst_blocks} ViT blocks"
        )
    mapping = _map(state, F_)
    report = ConversionReport(
        unknown=mapping.unknown, dropped=mapping.dropped, notes=mapping.notes, warnings=mapping.warnings
    )
    index = names_by_kind(model)  # official head kind → the model's objective name
    target = model.state_dict()
    filled: dict[str, Tensor] = {}
    mismatched: list[str] = []
    queue_dropped = False
    for key, t in mapping.mapped.items():
        if m := re.match(r"objectives\.([a-z_]+)\.(.*)", key):
            if m[1] not in index:
                report.unused[key] = f"the model has no {m[1]!r} objective"
                continue
            key = f"objectives.{index[m[1]]}.{m[2]}"
        if key not in target:
            why = (
                "the model has no momentum copies (use_momentum: false)" if _momentum_twin(key) else "not in the model"
            )
            report.unused[key] = why
            continue
        want = target[key]
        if t.shape != want.shape:
            if key in mapping.synthesized:
                t = torch.zeros_like(want)
            elif is_pos_embed(key, t, want):
                t, note = resize_pos_embed(model, key, t, want)
                report.interpolated.append(note)
            elif key.rsplit(".", 1)[-1] in QUEUES:
                report.dropped[key] = (
                    f"queue of another size ({tuple(t.shape)} vs {tuple(want.shape)}): the model keeps its own"
                )
                queue_dropped = True
                continue
            else:
                mismatched.append(f"{key}: checkpoint {tuple(t.shape)}, model {tuple(want.shape)}")
                continue
        filled[key] = t
    if mismatched:
        raise CheckpointError(f"{len(mismatched)} tensors do not fit the model: " + "; ".join(mismatched[:10]))
    # a queue is only meaningful with its pointer and ids: all or none
    queue_keys = [k for k in filled if re.fullmatch(r"objectives\.[a-z0-9_]+\.(" + "|".join(QUEUES) + ")", k)]
    if queue_dropped:
        for k in queue_keys:
            report.dropped[k] = "dropped with the other queue buffers (a queue of another size)"
            filled.pop(k)
    elif "itc" in index:
        idx_key = f"objectives.{index['itc']}.idx_queue"
        if idx_key in target and idx_key not in filled and f"objectives.{index['itc']}.image_queue" in filled:
            filled[idx_key] = torch.full_like(target[idx_key], -100)
            report.notes.append(f"{idx_key}: the checkpoint keeps no ids (pretraining); set to -100 (no id)")
    itc = find_objective(model, ITC)
    if itc is not None and "temp" in state and hasattr(itc, "min_temperature"):
        temp = float(state["temp"])
        if not itc.min_temperature <= temp <= itc.max_temperature:
            report.warnings.append(
                f"temp {temp:.4g} is outside the ITC clamp [{itc.min_temperature}, {itc.max_temperature}]"
            )
    # momentum copies the checkpoint lacks: start equal to the online weights, as ALBEF does
    copied: set[str] = set()
    for key in target:
        twin = _momentum_twin(key)
        if key not in filled and twin is not None and twin in filled:
            filled[key] = filled[twin].clone()
            copied.add(_momentum_group(key))
    report.momentum_copied = sorted(copied)
    result = model.load_state_dict(filled, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # filled ⊆ target by construction
    report.loaded = sorted(filled)
    report.missing = [k for k in target if k not in filled]
    if strict and not report.ok:
        raise CheckpointError("incomplete ALBEF conversion (strict):\n" + report.summary())
    return report


# -- back to ALBEF's layout ---------------------------------------------------------------
def vlp_to_albef(model: ALBEF, layout: str = "pretrain") -> dict[str, Tensor]:
    """The inverse of :func:`albef_to_vlp`: ``model``'s weights under ALBEF's key names.

    layout: "pretrain" (``text_encoder.bert.*`` + ``text_encoder.cls.*`` when the model has
    an MLM objective; no ``idx_queue``) or "retrieval" (``text_encoder.*``, no MLM head,
    ``idx_queue`` of shape (1, Q)). xbert's ``position_ids`` buffers and the tied MLM
    decoder are written too, so ALBEF's own code loads the result strictly.
    """
    if layout not in ("pretrain", "retrieval"):
        raise ConfigError(f"layout must be 'pretrain' or 'retrieval', got {layout!r}")
    kinds = {o.name: o.default_name for o in model.objectives.values()}  # instance name → official kind
    F_ = len(model.text_encoder.model.encoder.layer)
    out: dict[str, Tensor] = {}
    blocks: dict[tuple[str, int], dict[str, Tensor]] = defaultdict(dict)
    unknown = []
    for key, t in model.state_dict().items():
        head, _, rest = key.partition(".")
        s = "_m" if head.endswith("_m") else ""
        base = head[:-2] if s else head
        text = f"text_encoder{s}.bert." if layout == "pretrain" else f"text_encoder{s}."
        if base == "image_encoder" and rest.startswith("model."):
            out[f"visual_encoder{s}.{rest[len('model.') :]}"] = t
        elif base == "text_encoder" and rest.startswith("model."):
            out[text + rest[len("model.") :]] = t
        elif base == "fusion" and (m := re.match(r"blocks\.(\d+)\.(.*)", rest)):
            blocks[(s, int(m[1]))][m[2]] = t
        elif base in ("image_proj", "text_proj"):
            out[f"{'vision_proj' if base == 'image_proj' else 'text_proj'}{s}.{rest}"] = t
        elif head == "objectives" and (m := re.match(r"([a-z0-9_]+)\.(.*)", rest)):
            name, sub = kinds[m[1]], m[2]
            if name == "itc" and sub == "logit_scale":
                out["temp"] = torch.exp(-t.double()).to(t.dtype)
            elif name == "itc" and sub in QUEUES:
                if sub == "idx_queue":
                    if layout == "retrieval":
                        out["idx_queue"] = t.reshape(1, -1)  # (1, Q), as ALBEF stores it
                else:
                    out[sub] = t
            elif name == "itm" and (mm := re.fullmatch(r"head\.(weight|bias)", sub)):
                out[f"itm_head.{mm[1]}"] = t
            elif name == "mlm" and (mm := re.fullmatch(r"head(_m)?\.(.*)", sub)):
                if layout == "pretrain":
                    inverse = {v: k for k, v in _MLM_KEYS.items()}
                    out[f"text_encoder{mm[1] or ''}.cls.predictions.{inverse[mm[2]]}"] = t
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"vlp_to_albef: no ALBEF name for {unknown[:10]}")
    for (s, j), block in sorted(blocks.items()):
        text = f"text_encoder{s}.bert." if layout == "pretrain" else f"text_encoder{s}."
        for name, t in block_to_bert_layer(block, cross_attention=True).items():
            out[f"{text}encoder.layer.{F_ + j}.{name}"] = t
    for s in COPIES:
        text = f"text_encoder{s}.bert." if layout == "pretrain" else f"text_encoder{s}."
        words = out.get(f"{text}embeddings.word_embeddings.weight")
        if words is None:
            continue
        positions = out[f"{text}embeddings.position_embeddings.weight"].shape[0]
        out[f"{text}embeddings.position_ids"] = torch.arange(positions)[None]  # (1, P)
        cls = f"text_encoder{s}.cls.predictions."
        if f"{cls}bias" in out:
            out[f"{cls}decoder.weight"] = words
            out[f"{cls}decoder.bias"] = out[f"{cls}bias"]
    return out


# -- files --------------------------------------------------------------------------------
def _strip_pretrained(node: Any) -> Any:
    """Recipe tree with pretrained weights switched off (the checkpoint replaces them)."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "pretrained" and v not in (None, False):
                v = False
            elif k in ("init_from",):
                v = None
            out[k] = _strip_pretrained(v)
        return out
    if isinstance(node, list):
        return [_strip_pretrained(v) for v in node]
    return node


def build_albef(model_config: dict) -> ALBEF:
    """An ALBEF from a recipe's ``model:`` section (``class_path`` / ``init_args``)."""
    from vlp.models.albef import ALBEF

    return build_model(ALBEF, model_config)


def albef_from_recipe(path: str | os.PathLike) -> ALBEF:
    """The model of a vlp recipe YAML, built without loading any pretrained weights it names
    (``pretrained`` → false, ``init_from`` → null): the checkpoint replaces them. A text
    encoder given by hub name still needs its config (Hugging Face cache or a local folder)."""

    return build_albef(_strip_pretrained(read_model_section(path)))


def albef_recipe_from_state(state: dict[str, Tensor], *, head_dim: int = 64) -> dict:
    """The ``model:`` recipe section of an ALBEF with the checkpoint's shapes.

    Widths, depths, vocabulary, fusion layer, patch size and resolution come from the
    tensors; the number of attention heads cannot, so it is ``width // head_dim`` (64 in
    ALBEF's ViT-B/16 and BERT-base). Objectives: MomentumITC (ITC without queues), ITM
    and MLM when their weights are there.
    """
    state = extract_state_dict(state)

    def need(key: str) -> Tensor:
        if key not in state:
            raise CheckpointError(f"cannot infer the ALBEF architecture: the checkpoint has no {key!r}")
        return state[key]

    def heads(width: int, what: str) -> int:
        if width % head_dim:
            raise CheckpointError(f"{what} width {width} is not a multiple of head_dim {head_dim}; pass head_dim")
        return width // head_dim

    text = _text_prefix(state)
    Dv = need("visual_encoder.cls_token").shape[-1]
    patch = need("visual_encoder.patch_embed.proj.weight").shape[-1]
    n = need("visual_encoder.pos_embed").shape[1] - 1
    side = math.isqrt(n)
    if side * side != n:
        raise CheckpointError(f"visual_encoder.pos_embed has {n} patch positions: not a square grid")
    words = need(f"{text}embeddings.word_embeddings.weight")
    V, Dt = words.shape
    types = state.get(f"{text}embeddings.token_type_embeddings.weight")
    num_layers = count_indices(state, re.escape(text) + r"encoder\.layer\.(\d+)\.")
    F_ = infer_fusion_layer(state)
    inter = need(f"{text}encoder.layer.0.intermediate.dense.weight").shape[0]
    E = need("vision_proj.weight").shape[0]
    objectives: list[dict] = []
    if "temp" in state or "image_queue" in state:
        itc = {"embed_dim": E, "temperature": 0.07, "min_temperature": 0.001, "max_temperature": 0.5}
        if "image_queue" in state:
            itc["queue_size"] = int(state["image_queue"].shape[1])
            objectives.append({"class_path": "vlp.objectives.MomentumITC", "init_args": itc})
        else:
            itc.pop("embed_dim")
            objectives.append({"class_path": "vlp.objectives.ITC", "init_args": itc})
    if "itm_head.weight" in state:
        objectives.append({"class_path": "vlp.objectives.ITM", "init_args": {"dim": Dt}})
    if any(k.startswith("text_encoder.cls.predictions.") for k in state):
        objectives.append({"class_path": "vlp.objectives.MLM", "init_args": {"dim": Dt, "vocab_size": V}})
    use_momentum = any(k.startswith("visual_encoder_m.") for k in state)
    return {
        "class_path": "vlp.models.ALBEF",
        "init_args": {
            "image_encoder": {
                "class_path": "vlp.encoders.TimmVisionEncoder",
                "init_args": {
                    "name": "vit_base_patch16_224",
                    "img_size": side * patch,
                    "pool": "cls",
                    "model_kwargs": {
                        "patch_size": patch,
                        "embed_dim": Dv,
                        "depth": count_indices(state, r"visual_encoder\.blocks\.(\d+)\."),
                        "num_heads": heads(Dv, "ViT"),
                        "mlp_ratio": need("visual_encoder.blocks.0.mlp.fc1.weight").shape[0] / Dv,
                    },
                },
            },
            "text_encoder": {
                "class_path": "vlp.encoders.HFTextEncoder",
                "init_args": {
                    "config": {
                        "model_type": "bert",
                        "vocab_size": V,
                        "hidden_size": Dt,
                        "num_hidden_layers": F_,
                        "num_attention_heads": heads(Dt, "BERT"),
                        "intermediate_size": inter,
                        "max_position_embeddings": need(f"{text}embeddings.position_embeddings.weight").shape[0],
                        "type_vocab_size": types.shape[0] if types is not None else 2,
                    },
                    "pooling": "cls",
                },
            },
            "fusion": {
                "class_path": "vlp.encoders.BertFusion",
                "init_args": {
                    "dim": Dt,
                    "depth": num_layers - F_,
                    "num_heads": heads(Dt, "BERT"),
                    "context_dim": Dv,
                    "mlp_ratio": inter / Dt,
                },
            },
            "objectives": objectives,
            "embed_dim": E,
            "use_momentum": use_momentum,
        },
    }


def convert_albef(
    src_path: str | os.PathLike,
    out_path: str | os.PathLike,
    model: ALBEF | str | os.PathLike | None = None,
    *,
    head_dim: int = 64,
    strict: bool = False,
) -> ConversionReport:
    """Convert an ALBEF/LAVIS checkpoint file into a vlp ALBEF state dict file.

    Args:
        src_path: the checkpoint, read with ``torch.load(weights_only=True)`` (or safetensors).
        out_path: ``*.safetensors`` or a torch file (``{"state_dict": ...}``); use it as a
            recipe's ``model.init_args.init_from`` or load it with ``load_state_dict``.
        model: an ALBEF, a recipe YAML whose model to fill, or None: build one with the
            checkpoint's shapes (:func:`albef_recipe_from_state`; the report's ``recipe``).
        head_dim: attention head width when building from the checkpoint's shapes.
        strict: fail, writing nothing, unless every key is known and every weight filled.
    """
    from vlp.utils.checkpoint import read_checkpoint

    src, out = str(src_path), str(out_path)
    state = extract_state_dict(read_checkpoint(src), src)
    recipe = None
    if model is None:
        recipe = albef_recipe_from_state(state, head_dim=head_dim)
        model = build_albef(recipe)
    elif isinstance(model, str | os.PathLike):
        model = albef_from_recipe(model)
    elif not isinstance(model, nn.Module):
        raise ConfigError(f"model must be an ALBEF, a recipe path or None, got {type(model).__name__}")
    try:
        report = albef_to_vlp(state, model, strict=strict)
    except CheckpointError as e:
        raise CheckpointError(f"{src}: {e}") from None
    report.source, report.output, report.recipe = src, out, recipe
    save_state_dict(model.state_dict(), out)
    return report
