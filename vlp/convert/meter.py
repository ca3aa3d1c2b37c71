"""Official METER checkpoints (zdou0830/METER, CLIP-ViT towers) → :class:`vlp.models.METER` (and back).

A METER checkpoint is a PyTorch Lightning checkpoint: ``{"state_dict": ..., "hyper_parameters":
{"config": <the sacred config>}, ...}``. Its keys map as follows (``{p}`` = weight / bias):

=====================================================  ==============================================
METER key                                              vlp key
=====================================================  ==============================================
vit_model.visual.{conv1,class_embedding,ln_pre,...}    image_encoder.visual.* (open_clip names, as is)
vit_model.visual.positional_embedding  (N, W)          image_encoder.visual.positional_embedding
                                                       (bicubic to the model's grid if N differs)
vit_model.visual.transformer.resblocks.{i}.*           image_encoder.visual.transformer.resblocks.{i}.*
vit_model.visual.ln_post.{p}                           image_encoder.visual.ln_post.{p}
text_transformer.{embeddings,encoder,pooler}.*         text_encoder.model.*  (Hugging Face names)
cross_modal_text_layers.{i}.* (BertCrossLayer)         fusion.text_layers.{i}.*   (``bert_layer_to_block``:
cross_modal_image_layers.{i}.*                         fusion.image_layers.{i}.*   q|k|v → attn.qkv, k|v →
                                                       cross_attn.kv, LayerNorms → norm1/norm_cross/norm2)
cross_modal_text_transform.{p}                         text_proj.{p}
cross_modal_image_transform.{p}                        image_proj.{p}
token_type_embeddings.weight  (2 or 3, h)              token_type.weight (rows added from the last)
cross_modal_{text,image}_pooler.dense.{p}              {text,image}_pooler.dense.{p}
mlm_score.transform.dense.{p}                          objectives.{mlm}.head.dense.{p}
mlm_score.transform.LayerNorm.{p}                      objectives.{mlm}.head.norm.{p}
mlm_score.decoder.weight  (V, h)                       objectives.{mlm}.head.decoder (needs tie_weights: false)
mlm_score.bias                                         objectives.{mlm}.head.bias
itm_score.fc.{p}                                       objectives.{itm}.head.{p}
rank_output.{p}  (irtr fine-tuning, (1, 2h))           row 1 ("match") of objectives.{itm}.head.{p}
vqa_classifier.{0,1,3}.{p}                             objectives.{vqa}.head.{0,1,3}.{p}
nlvr2_classifier.{0,1,3}.{p}                           objectives.{nlvr2}.head.{0,1,3}.{p}
snli_classifier.{0,1,3}.{p}                            objectives.{ve}.head.{0,1,3}.{p}
=====================================================  ==============================================

Dropped on purpose, and listed in the report: ``vit_model.positional_embedding`` and
``vit_model.ln_final.*`` (the text half of METER's CLIP: built, never run), transformers'
``position_ids`` / ``token_type_ids`` buffers, and the text tower's ``pooler`` when the vlp
model has none (METER never runs it).

Quirks of the original, checked on every conversion (``report.mismatches``; ``strict`` fails
on them):

* METER's CLIP ``Transformer`` builds ``layers - 1`` residual blocks: its ViT-B/16 has **11**
  blocks, the output of OpenAI's 11th block (the 12th is never loaded). The vlp tower needs
  ``num_layers: 11`` (or ``model_kwargs.vision_cfg.layers: 11`` when built without weights).
* Its blocks use QuickGELU (``x * sigmoid(1.702 x)``). open_clip's ``ViT-B-16`` config uses
  ``nn.GELU``; use ``ViT-B-16-quickgelu`` (or ``model_kwargs.quick_gelu: true``).
* ``ln_post`` normalises every token and there is no ``proj`` (``use_proj: false``), as
  :class:`~vlp.encoders.OpenCLIPVisionEncoder` returns its tokens.
* The cross-modal layers are post-norm BERT layers with LayerNorm eps 1e-12 (BertConfig's
  default, also for RoBERTa) and erf GELU: ``CoAttentionFusion(pre_norm=False, norm_eps=1e-12)``.
  The text tower keeps its own eps (roberta-base 1e-5, bert-base 1e-12).
* The MLM decoder is its own matrix: ``MLM(tie_weights: false)``.
* METER's task classifiers are Linear(2h → 2h), LayerNorm, GELU, Linear(2h → C) (NLVR2:
  Linear(4h → 2h) first): their hidden width is the width of their input, not twice it.
* NLVR2 models have a third token type, made by METER as a copy of the image type.

Nothing is silently ignored: every checkpoint key is loaded, reported as unknown, unused (no
place in this model) or dropped (with the reason).
"""

from __future__ import annotations

import copy
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
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
from vlp.objectives.mlm import MLM
from vlp.utils.checkpoint import interpolate_pos_embed, read_checkpoint

if TYPE_CHECKING:
    from vlp.models.meter import METER

DEFAULT_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "meter_clip16_roberta.yaml"

VIT, TEXT = "vit_model.visual.", "text_transformer."
_PARTS = ("weight", "bias")
_P = r"\.(weight|bias)"
_VIT_KEY = re.compile(
    r"(class_embedding|positional_embedding|proj|conv1\.weight"
    rf"|ln_(pre|post){_P}"
    rf"|transformer\.resblocks\.\d+\.(ln_1|ln_2|attn\.out_proj|mlp\.c_fc|mlp\.c_proj){_P}"
    r"|transformer\.resblocks\.\d+\.attn\.in_proj_(weight|bias))"
)
_CLIP_TEXT = ("vit_model.positional_embedding", "vit_model.ln_final.weight", "vit_model.ln_final.bias")
_BERT_SELF = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "attention.output.LayerNorm",
    "intermediate.dense",
    "output.dense",
    "output.LayerNorm",
)
_BERT_CROSS = tuple(
    f"crossattention.{m}" for m in ("self.query", "self.key", "self.value", "output.dense", "output.LayerNorm")
)
_TEXT_KEY = re.compile(
    rf"embeddings\.(word_embeddings|position_embeddings|token_type_embeddings)\.weight|embeddings\.LayerNorm{_P}"
    rf"|encoder\.layer\.\d+\.({'|'.join(re.escape(m) for m in _BERT_SELF)}){_P}|pooler\.dense{_P}"
)
_CROSS_LAYER = re.compile(r"cross_modal_(text|image)_layers\.(\d+)\.(.*)")
_CROSS_NAMES = {f"{m}.{p}" for m in _BERT_SELF + _BERT_CROSS for p in _PARTS}
_SIMPLE = {  # METER prefix → vlp prefix, for ``.weight`` / ``.bias``
    "cross_modal_text_transform": "text_proj",
    "cross_modal_image_transform": "image_proj",
    "cross_modal_text_pooler.dense": "text_pooler.dense",
    "cross_modal_image_pooler.dense": "image_pooler.dense",
    "mlm_score.transform.dense": "objectives.mlm.head.dense",
    "mlm_score.transform.LayerNorm": "objectives.mlm.head.norm",
    "itm_score.fc": "objectives.itm.head",
}
_TASK_HEADS = {"vqa_classifier": "vqa", "nlvr2_classifier": "nlvr2", "snli_classifier": "ve"}
_SINGLE = {
    "token_type_embeddings.weight": "token_type.weight",
    "mlm_score.decoder.weight": "objectives.mlm.head.decoder",
    "mlm_score.bias": "objectives.mlm.head.bias",
}
_FUSION_EPS = 1e-12  # BertConfig's default: METER's bert_config sets sizes only
_CLIP_EPS = 1e-5


@dataclass
class METERConversionReport(ConversionReport):
    """:class:`~vlp.convert.albef.ConversionReport` plus ``mismatches``: ways in which the
    model would compute something else than METER even with every weight loaded (GELU for
    QuickGELU, another LayerNorm epsilon...). ``ok`` needs none of them."""

    mismatches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.unknown and not self.missing and not self.mismatches

    def summary(self, max_keys: int = 10) -> str:
        lines = super().summary(max_keys).replace("ALBEF conversion", "METER conversion", 1).split("\n")
        extra = [f"  MISMATCH (the model would not compute what METER computes): {m}" for m in self.mismatches]
        return "\n".join(lines[:-1] + extra + lines[-1:])


@dataclass
class _Mapping:
    mapped: dict[str, Tensor]
    unknown: list[str]
    dropped: dict[str, str]
    notes: list[str]
    warnings: list[str]


# -- reading ------------------------------------------------------------------------------
# METER's checkpoints are PyTorch Lightning 1.3 checkpoints: their metadata (not the weights)
# hold Lightning's AttributeDict, sacred's read-only containers and callback classes, which
# torch.load(weights_only=True) refuses. Those classes are replaced by inert stand-ins that
# never run the original code; anything outside these packages still fails.
_METADATA_MODULES = (
    "pytorch_lightning.",
    "lightning.",
    "lightning_fabric.",
    "sacred.",
    "argparse.",
    "omegaconf.",
    "numpy.",
)


class _Inert:
    """Stand-in for a class named in a checkpoint's metadata: a dict subclass comes back as a
    plain dict, a container passed whole as a plain copy, anything else as this inert object."""

    def __new__(cls, *args, **kwargs):
        if not args and not kwargs:
            return {}  # pickled dict subclass: its items follow
        if len(args) == 1 and not kwargs and type(args[0]) in (dict, list, tuple):
            return type(args[0])(args[0])
        return super().__new__(cls)

    def __init__(self, *args, **kwargs) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state) -> None:
        self.state = state


def read_meter_checkpoint(path: str | os.PathLike) -> tuple[Any, list[str]]:
    """Read a METER checkpoint with ``torch.load(weights_only=True)`` → (checkpoint, notes).

    Classes of Lightning / sacred metadata that ``weights_only`` refuses are replaced by
    inert stand-ins (still ``weights_only``: no code from the file runs); any other class
    fails with a :class:`CheckpointError` naming it."""
    from vlp.utils.paths import resolve_path

    path = resolve_path(path)
    try:
        return read_checkpoint(path), []
    except CheckpointError as e:
        first = e
    try:
        names = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:
        raise first from None
    if not names:
        raise first
    foreign = [n for n in names if not n.startswith(_METADATA_MODULES)]
    if foreign:
        raise CheckpointError(f"{first}; it names classes outside checkpoint metadata: {foreign[:10]}") from None
    stubs = [(type(n.rsplit(".", 1)[-1], (_Inert,), {"__module__": __name__}), n) for n in names]
    try:
        with torch.serialization.safe_globals(stubs):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"cannot read checkpoint {path} with weights_only=True even with stand-ins for {names[:10]}: "
            f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        ) from None
    note = f"{path}: metadata classes read as inert stand-ins (weights_only=True): {', '.join(sorted(names))}"
    return ckpt, [note]


def meter_hparams(ckpt: Any) -> dict | None:
    """METER's sacred config from a Lightning checkpoint (``hyper_parameters["config"]``), or None."""
    if not isinstance(ckpt, dict):
        return None
    hp = ckpt.get("hyper_parameters")
    if isinstance(hp, dict) and isinstance(hp.get("config"), dict):
        return dict(hp["config"])
    return None


# -- the pure mapping ---------------------------------------------------------------------
def _map(state: dict[str, Tensor]) -> _Mapping:
    out = _Mapping({}, [], {}, [], [])
    consumed: set[str] = set()

    def put(src: str, dst: str, t: Tensor) -> None:
        out.mapped[dst] = t
        consumed.add(src)

    layers: dict[tuple[str, int], dict[str, Tensor]] = defaultdict(dict)
    for k, t in state.items():
        if k.startswith(VIT) and _VIT_KEY.fullmatch(k[len(VIT) :]):
            put(k, f"image_encoder.visual.{k[len(VIT) :]}", t)
        elif k in _CLIP_TEXT:
            out.dropped[k] = "the text half of METER's CLIP: built, never run"
        elif k.startswith(TEXT):
            rest = k[len(TEXT) :]
            if _TEXT_KEY.fullmatch(rest):
                put(k, f"text_encoder.model.{rest}", t)
            elif rest in ("embeddings.position_ids", "embeddings.token_type_ids"):
                out.dropped[k] = "transformers buffer (transformers rebuilds it)"
        elif m := _CROSS_LAYER.fullmatch(k):
            if m[3] in _CROSS_NAMES:
                layers[(m[1], int(m[2]))][m[3]] = t
                consumed.add(k)
        elif k in _SINGLE:
            put(k, _SINGLE[k], t)
        elif (m := re.fullmatch(r"(.+)\.(weight|bias)", k)) and m[1] in _SIMPLE:
            put(k, f"{_SIMPLE[m[1]]}.{m[2]}", t)
        elif (m := re.fullmatch(r"(\w+_classifier)\.([013])\.(weight|bias)", k)) and m[1] in _TASK_HEADS:
            put(k, f"objectives.{_TASK_HEADS[m[1]]}.head.{m[2]}.{m[3]}", t)
    for (stream, i), layer in sorted(layers.items()):
        try:
            block = bert_layer_to_block(layer, cross_attention=True)
        except CheckpointError as e:
            raise CheckpointError(f"cross_modal_{stream}_layers.{i}: {e}") from None
        for name, t in block.items():
            out.mapped[f"fusion.{stream}_layers.{i}.{name}"] = t
    # irtr fine-tuning: METER ranks with rank_output, a copy of itm_score.fc's "match" row
    # trained on; it becomes row 1 of the ITM head, whose score() is that row
    if any(k.startswith("rank_output.") for k in state):
        rank = [state.get(f"rank_output.{p}") for p in _PARTS]
        itm = [out.mapped.get(f"objectives.itm.head.{p}") for p in _PARTS]
        if all(t is not None for t in rank + itm) and rank[0].shape == itm[0][1:].shape:
            for p, r, h in zip(_PARTS, rank, itm, strict=True):
                merged = h.clone()
                merged[1] = r.reshape(h[1].shape)
                out.mapped[f"objectives.itm.head.{p}"] = merged
                consumed.add(f"rank_output.{p}")
            out.notes.append(
                "rank_output (irtr) loaded as row 1 of the ITM head: ITM.score() is METER's retrieval score; "
                "itm_score.fc's own row 1 (frozen during irtr) is replaced"
            )
        else:
            for p in _PARTS:
                if f"rank_output.{p}" in state:
                    out.dropped[f"rank_output.{p}"] = (
                        "irtr rank_output without an itm_score.fc of its width to merge into"
                    )
                    out.warnings.append(f"rank_output.{p} was not loaded (no matching itm_score.fc)")
    out.unknown = [k for k in state if k not in consumed and k not in out.dropped]
    return out


def map_meter_keys(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """METER state dict (or checkpoint) → (vlp-named tensors, unknown source keys). Needs no model.

    Objective keys are named by objective (``objectives.mlm.head.dense.weight``,
    ``objectives.vqa.head.0.weight``); :func:`meter_to_vlp` finds the model's
    objective of each kind (``names_by_kind``), whatever the recipe named it.
    Deliberately dropped keys are neither mapped nor unknown."""
    result = _map(extract_state_dict(state))
    return result.mapped, result.unknown


# -- checks of the target model -------------------------------------------------------------
def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
    visual = getattr(model.image_encoder, "visual", None)
    hf = getattr(model.text_encoder, "model", None)
    fusion = model.fusion
    layers = getattr(getattr(hf, "encoder", None), "layer", None)
    if visual is None or not hasattr(visual, "transformer") or layers is None or not hasattr(fusion, "text_layers"):
        raise ConfigError(
            "meter_to_vlp needs a METER with an open_clip ViT (OpenCLIPVisionEncoder), a Hugging Face text encoder "
            f"(HFTextEncoder, BERT/RoBERTa) and a CoAttentionFusion, got {type(model.image_encoder).__name__}, "
            f"{type(model.text_encoder).__name__}, {type(fusion).__name__}"
        )
    return visual, hf, fusion


def _check_architecture(model: nn.Module, hparams: dict | None) -> tuple[list[str], list[str]]:
    """Differences that change outputs, and notes on what could not be checked."""
    visual, hf, fusion = _parts(model)
    bad, notes = [], []
    acts = {type(b.mlp.gelu).__name__ if hasattr(b.mlp, "gelu") else "?" for b in visual.transformer.resblocks}
    if acts != {"QuickGELU"}:
        bad.append(
            f"image_encoder: the MLP activation is {'/'.join(sorted(acts))}; METER's CLIP uses QuickGELU "
            "(model_name ViT-B-16-quickgelu, or model_kwargs quick_gelu: true)"
        )
    eps = sorted({m.eps for m in visual.modules() if isinstance(m, nn.LayerNorm)})
    if eps != [_CLIP_EPS]:
        bad.append(f"image_encoder: LayerNorm eps {eps}; METER's CLIP uses {_CLIP_EPS}")
    blocks = list(fusion.text_layers) + list(fusion.image_layers)
    if any(getattr(b, "pre_norm", False) for b in blocks):
        bad.append("fusion: pre-norm blocks; METER's cross-modal layers are post-norm (pre_norm: false)")
    eps = sorted({m.eps for b in blocks for m in b.modules() if isinstance(m, nn.LayerNorm)})
    if eps and eps != [_FUSION_EPS]:
        bad.append(f"fusion: LayerNorm eps {eps}; METER's cross-modal layers use {_FUSION_EPS} (norm_eps: 1.0e-12)")
    acts = {(type(b.mlp.act).__name__, getattr(b.mlp.act, "approximate", "none")) for b in blocks}
    if acts and acts != {("GELU", "none")}:
        bad.append(f"fusion: MLP activation {sorted(acts)}; METER's cross-modal layers use the erf GELU (nn.GELU)")
    hp = hparams or {}
    heads = {b.attn.num_heads for b in blocks}
    if "num_heads" in hp:
        if heads != {int(hp["num_heads"])}:
            bad.append(
                f"fusion: {sorted(heads)} attention heads; the checkpoint's config has num_heads {hp['num_heads']}"
            )
    else:
        notes.append(f"the checkpoint has no config: the fusion's {sorted(heads)} attention heads are assumed right")
    for o in model.objectives.values():
        if o.default_name == "mlm" and isinstance(getattr(o, "head", None), nn.Module) and hasattr(o.head, "norm"):
            if o.head.decoder is None:
                bad.append("MLM decodes with the word embeddings (tie_weights: true); METER's decoder is its own")
            if o.head.norm.eps != _FUSION_EPS:
                bad.append(f"MLM head LayerNorm eps {o.head.norm.eps}; METER's uses {_FUSION_EPS}")
    tokenizer = str(hp.get("tokenizer", ""))
    if tokenizer:
        want = "roberta" if "roberta" in tokenizer else "bert"
        have = getattr(hf.config, "model_type", "?")
        if have != want:
            bad.append(f"text_encoder: a {have} model; the checkpoint's text tower is {tokenizer} ({want})")
        want_eps = 1e-5 if want == "roberta" else 1e-12
        if getattr(hf.config, "layer_norm_eps", want_eps) != want_eps:
            bad.append(
                f"text_encoder: layer_norm_eps {hf.config.layer_norm_eps}; {tokenizer} uses {want_eps} (METER loads it "
                "with from_pretrained)"
            )
    else:
        notes.append("the checkpoint has no config: the text tower's type and LayerNorm eps are not checked")
    return bad, notes


# -- onto a model ---------------------------------------------------------------------------
def _resize_positional_embedding(t: Tensor, grid: tuple[int, int]) -> Tensor:
    """open_clip's (1 + h*w, W) table → (1 + H*W, W), bicubic (METER's adapt_position_encoding)."""
    return interpolate_pos_embed(t[None], grid, num_prefix=1)[0]


def meter_to_vlp(
    state: dict[str, Any], model: METER, *, strict: bool = False, hparams: dict | None = None
) -> METERConversionReport:
    """Load a METER state dict (or whole checkpoint) into ``model``; return the report.

    The model's towers and fusion must have the checkpoint's depths (the CLIP tower has
    METER's ``layers - 1`` blocks); another image resolution is fine (the position
    embedding is interpolated), and a model with more token types gets its new rows from
    the checkpoint's last one (METER's rule for NLVR2). ``hparams``: METER's config, read
    from the checkpoint's ``hyper_parameters`` when None. ``strict``: raise
    ``CheckpointError`` unless every checkpoint key is known, every model key filled and
    the architecture computes what METER computes.
    """
    hparams = hparams if hparams is not None else meter_hparams(state)
    state = extract_state_dict(state)
    visual, hf, fusion = _parts(model)
    if not any(k.startswith(VIT) for k in state):
        what = (
            "a Swin image tower (METER-Swin is not supported)"
            if any(k.startswith("vit_model.") for k in state)
            else "no vit_model.visual.* keys"
        )
        raise CheckpointError(f"not a CLIP-ViT METER checkpoint: {what}")
    counts = [
        (
            "CLIP residual blocks",
            count_indices(state, re.escape(VIT) + r"transformer\.resblocks\.(\d+)\."),
            len(visual.transformer.resblocks),
        ),
        ("text layers", count_indices(state, re.escape(TEXT) + r"encoder\.layer\.(\d+)\."), len(hf.encoder.layer)),
        ("cross-modal layers", count_indices(state, r"cross_modal_text_layers\.(\d+)\."), len(fusion.text_layers)),
    ]
    wrong = [f"the checkpoint has {src} {what}, the model {dst}" for what, src, dst in counts if src != dst]
    if wrong:
        hint = ""
        if counts[0][1] + 1 == counts[0][2]:
            hint = f" (METER's CLIP keeps layers - 1 blocks: ViT-B/16 runs 11 of 12; set num_layers: {counts[0][1]})"
        raise CheckpointError("; ".join(wrong) + hint)
    mapping = _map(state)
    report = METERConversionReport(
        unknown=mapping.unknown, dropped=mapping.dropped, notes=mapping.notes, warnings=mapping.warnings
    )
    report.mismatches, notes = _check_architecture(model, hparams)
    report.notes += notes
    index = names_by_kind(model)  # official head kind → the model's objective name
    target = model.state_dict()
    filled: dict[str, Tensor] = {}
    mismatched: list[str] = []
    head_widths: dict[str, str] = {}
    for key, t in mapping.mapped.items():
        src_key = key
        if m := re.match(r"objectives\.([a-z0-9_]+)\.(.*)", key):
            if m[1] not in index:
                report.unused[key] = f"the model has no {m[1]!r} objective"
                continue
            key = f"objectives.{index[m[1]]}.{m[2]}"
        if key not in target:
            if src_key.startswith("text_encoder.model.pooler."):
                report.dropped[f"{TEXT}{src_key[len('text_encoder.model.') :]}"] = (
                    "the text tower's pooler: METER never runs it (the model has none)"
                )
            elif src_key.endswith("head.decoder"):
                report.unused[key] = "the model's MLM head is tied to the word embeddings (use MLM(tie_weights: false))"
            else:
                report.unused[key] = "not in the model"
            continue
        want = target[key]
        if t.shape != want.shape:
            if key == "image_encoder.visual.positional_embedding" and t.ndim == 2 and t.shape[1] == want.shape[1]:
                grid = tuple(int(g) for g in visual.grid_size)
                side = math.isqrt(t.shape[0] - 1)
                if side * side != t.shape[0] - 1:
                    raise CheckpointError(f"{key}: {t.shape[0] - 1} patch positions, not a square grid")
                t = _resize_positional_embedding(t, grid)
                report.interpolated.append(
                    f"{key}: {side}x{side} -> {grid[0]}x{grid[1]} patches (bicubic, class token kept)"
                )
            elif key == "token_type.weight" and t.shape[1] == want.shape[1] and t.shape[0] < want.shape[0]:
                report.notes.append(
                    f"{key}: {t.shape[0]} -> {want.shape[0]} token types, the new rows copy the last "
                    "(METER's rule for NLVR2)"
                )
                t = torch.cat([t, t[-1:].expand(want.shape[0] - t.shape[0], -1)])
            elif m := re.match(r"objectives\.(vqa|nlvr2|ve)\.head\.", src_key):
                report.unused[key] = f"the model's {m[1]} classifier has another hidden width than METER's"
                head_widths[m[1]] = (
                    f"the {m[1]} head was not loaded: METER's classifier is Linear(d, d) → LayerNorm → GELU → "
                    f"Linear(d, C) (NLVR2: Linear(2d, d) first, d = 2 x hidden), the model's is {_describe(model, m[1])}"
                )
                continue
            else:
                mismatched.append(f"{key}: checkpoint {tuple(t.shape)}, model {tuple(want.shape)}")
                continue
        filled[key] = t
    if mismatched:
        raise CheckpointError(f"{len(mismatched)} tensors do not fit the model: " + "; ".join(mismatched[:10]))
    report.warnings += list(head_widths.values())
    result = model.load_state_dict(filled, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # filled ⊆ target by construction
    report.loaded = sorted(filled)
    report.missing = [k for k in target if k not in filled]
    if "image_encoder.visual.proj" in report.missing:
        report.notes.append("METER's CLIP has no proj: build the tower with use_proj: false")
    if strict and not report.ok:
        raise CheckpointError("incomplete METER conversion (strict):\n" + report.summary())
    return report


def _describe(model: nn.Module, name: str) -> str:
    head = next((o.head for o in model.objectives.values() if o.default_name == name), None)
    if isinstance(head, nn.Sequential) and isinstance(head[0], nn.Linear):
        return f"Linear({head[0].in_features}, {head[0].out_features}) → ... → Linear({head[-1].in_features}, C)"
    return type(head).__name__


# -- back to METER's layout -----------------------------------------------------------------
def vlp_to_meter(model: METER) -> dict[str, Tensor]:
    """The inverse of :func:`meter_to_vlp`: ``model``'s weights under METER's key names
    (with transformers 4.6's ``position_ids`` buffer). The text half of METER's CLIP
    (``vit_model.positional_embedding``, ``ln_final``) is not written: vlp has no values for
    it (METER loads with ``strict=False`` and never runs it). A tied MLM decoder is
    written as the word embeddings; an ITC projection has no METER name and raises."""
    kinds = {o.name: o.default_name for o in model.objectives.values()}  # instance name → official kind
    heads = {v: k for k, v in _TASK_HEADS.items()}
    simple = {v: k for k, v in _SIMPLE.items()}
    single = {v: k for k, v in _SINGLE.items()}
    out: dict[str, Tensor] = {}
    layers: dict[tuple[str, int], dict[str, Tensor]] = defaultdict(dict)
    unknown = []
    for key, t in model.state_dict().items():
        if key.startswith("image_encoder.visual."):
            out[VIT + key[len("image_encoder.visual.") :]] = t
        elif key.startswith("text_encoder.model."):
            out[TEXT + key[len("text_encoder.model.") :]] = t
        elif m := re.fullmatch(r"fusion\.(text|image)_layers\.(\d+)\.(.*)", key):
            layers[(m[1], int(m[2]))][m[3]] = t
        elif m := re.fullmatch(r"objectives\.([a-z0-9_]+)\.(.*)", key):
            name, sub = kinds[m[1]], m[2]
            vlp_key = f"objectives.{name}.{sub}"
            if name in heads and (mm := re.fullmatch(r"head\.([013])\.(weight|bias)", sub)):
                out[f"{heads[name]}.{mm[1]}.{mm[2]}"] = t
            elif vlp_key in single:
                out[single[vlp_key]] = t
            elif (mm := re.fullmatch(r"(.+)\.(weight|bias)", vlp_key)) and mm[1] in simple:
                out[f"{simple[mm[1]]}.{mm[2]}"] = t
            else:
                unknown.append(key)
        elif key in single:
            out[single[key]] = t
        elif (m := re.fullmatch(r"(.+)\.(weight|bias)", key)) and m[1] in simple:
            out[f"{simple[m[1]]}.{m[2]}"] = t
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"vlp_to_meter: no METER name for {unknown[:10]}")
    for (stream, i), block in sorted(layers.items()):
        for name, t in block_to_bert_layer(block, cross_attention=True).items():
            out[f"cross_modal_{stream}_layers.{i}.{name}"] = t
    mlm = find_objective(model, MLM)
    if mlm is not None and mlm.head.decoder is None:
        out["mlm_score.decoder.weight"] = model.word_embeddings()  # tied: METER keeps its own copy
    positions = out.get(f"{TEXT}embeddings.position_embeddings.weight")
    if positions is not None:
        out[f"{TEXT}embeddings.position_ids"] = torch.arange(positions.shape[0])[None]  # (1, P)
    return out


# -- recipes and files ----------------------------------------------------------------------
def _weights_free(node: Any, notes: list[str]) -> Any:
    """Recipe tree without pretrained weights (the checkpoint replaces them): ``pretrained``
    → false/null, ``init_from`` → null, and a Hugging Face text tower given by name becomes
    its config alone (read from a local folder or the hub cache; no weights are fetched)."""
    if isinstance(node, list):
        return [_weights_free(v, notes) for v in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for k, v in node.items():
        if k == "pretrained" and v not in (None, False):
            v = None if isinstance(v, str) else False
        elif k == "init_from":
            v = None
        out[k] = _weights_free(v, notes)
    args = out.get("init_args")
    if str(out.get("class_path", "")).endswith("HFTextEncoder") and isinstance(args, dict) and args.get("name_or_path"):
        config = _hf_config(str(args["name_or_path"]))
        if config is not None:
            out["init_args"] = {**args, "name_or_path": None, "config": {**config, **(args.get("config") or {})}}
            notes.append(
                f"text encoder {args['name_or_path']}: built from its config alone (weights from the checkpoint)"
            )
    return out


def _hf_config(name: str) -> dict | None:
    """A Hugging Face model's config as ``AutoConfig.for_model`` arguments, or None if unreadable."""
    from transformers import AutoConfig

    from vlp.utils.paths import is_local, resolve_path

    path = resolve_path(name)
    try:
        cfg = AutoConfig.from_pretrained(
            path, local_files_only=is_local(path) or os.environ.get("HF_HUB_OFFLINE") == "1"
        )
    except Exception:
        return None
    return {"model_type": cfg.model_type, **cfg.to_diff_dict()}


def build_meter(model_config: dict) -> METER:
    """A METER from a recipe's ``model:`` section (``class_path`` / ``init_args``)."""
    from vlp.models.meter import METER

    return build_model(METER, model_config)


def meter_from_recipe(path: str | os.PathLike, notes: list[str] | None = None) -> METER:
    """The model of a vlp recipe YAML, built without the pretrained weights it names
    (``pretrained`` off, ``init_from`` null, a Hugging Face text tower from its config when
    the config can be read offline): the checkpoint replaces them."""
    return build_meter(_weights_free(read_model_section(path), notes if notes is not None else []))


def meter_recipe_from_state(
    state: dict[str, Any], *, hparams: dict | None = None, head_dim: int = 64, base: dict | None = None
) -> dict:
    """The ``model:`` recipe section of a vlp METER that computes what the checkpoint's METER
    computes: shapes from the tensors, heads from ``hparams`` (METER's config) or
    ``width // head_dim``, settings the checkpoint cannot know (dropout, optimiser, ITM
    sampling) from ``base`` (a recipe's model section, e.g. recipes/meter_clip16_roberta.yaml).

    The image tower is open_clip's ``ViT-B-{patch}-quickgelu`` with METER's block count and
    no ``proj``; the text tower is a config of the checkpoint's shapes (RoBERTa when the
    config says so or the tower has one token type); task heads become VQA / NLVR2 / VE. A
    VQA objective needs METER's answer list in its label order (``answers``: a placeholder).
    """
    hparams = hparams if hparams is not None else meter_hparams(state)
    hp = hparams or {}
    state = extract_state_dict(state)
    base_args = copy.deepcopy((base or {}).get("init_args", {}))

    def need(key: str) -> Tensor:
        if key not in state:
            raise CheckpointError(f"cannot infer the METER architecture: the checkpoint has no {key!r}")
        return state[key]

    def heads(width: int, what: str) -> int:
        if width % head_dim:
            raise CheckpointError(f"{what} width {width} is not a multiple of head_dim {head_dim}; pass head_dim")
        return width // head_dim

    conv = need(f"{VIT}conv1.weight")
    W, patch = conv.shape[0], conv.shape[-1]
    n = need(f"{VIT}positional_embedding").shape[0] - 1
    side = math.isqrt(n)
    if side * side != n:
        raise CheckpointError(f"{VIT}positional_embedding has {n} patch positions: not a square grid")
    blocks = count_indices(state, re.escape(VIT) + r"transformer\.resblocks\.(\d+)\.")
    vision_mlp = need(f"{VIT}transformer.resblocks.0.mlp.c_fc.weight").shape[0] / W
    heads(W, "CLIP")
    V, Dt = need(f"{TEXT}embeddings.word_embeddings.weight").shape
    types = need(f"{TEXT}embeddings.token_type_embeddings.weight").shape[0]
    tokenizer = str(hp.get("tokenizer", ""))
    roberta = "roberta" in tokenizer if tokenizer else types == 1
    text_config = {
        "model_type": "roberta" if roberta else "bert",
        "vocab_size": V,
        "hidden_size": Dt,
        "num_hidden_layers": count_indices(state, re.escape(TEXT) + r"encoder\.layer\.(\d+)\."),
        "num_attention_heads": heads(Dt, "text"),
        "intermediate_size": need(f"{TEXT}encoder.layer.0.intermediate.dense.weight").shape[0],
        "max_position_embeddings": need(f"{TEXT}embeddings.position_embeddings.weight").shape[0],
        "type_vocab_size": types,
        "layer_norm_eps": 1e-5 if roberta else 1e-12,
        "pad_token_id": 1 if roberta else 0,
    }
    hidden = need("cross_modal_text_transform.weight").shape[0]
    inter = need("cross_modal_text_layers.0.intermediate.dense.weight").shape[0]
    fusion_args = {
        k: v for k, v in base_args.get("fusion", {}).get("init_args", {}).items() if k in ("drop", "attn_drop")
    }
    if "drop_rate" in hp:
        fusion_args = {"drop": float(hp["drop_rate"]), "attn_drop": float(hp["drop_rate"])}
    fusion_args = {
        "dim": hidden,
        "depth": count_indices(state, r"cross_modal_text_layers\.(\d+)\."),
        "num_heads": int(hp["num_heads"]) if "num_heads" in hp else heads(hidden, "fusion"),
        "mlp_ratio": inter / hidden,
        **fusion_args,
        "norm_eps": _FUSION_EPS,
    }
    base_objectives = {o.get("class_path"): o.get("init_args", {}) for o in base_args.get("objectives", [])}

    def objective(cls: str, **args) -> dict:
        return {
            "class_path": f"vlp.objectives.{cls}",
            "init_args": {**base_objectives.get(f"vlp.objectives.{cls}", {}), **args},
        }

    objectives = []
    if "mlm_score.decoder.weight" in state:
        objectives.append(objective("MLM", dim=hidden, vocab_size=V, distill=False, tie_weights=False))
    if "itm_score.fc.weight" in state:
        objectives.append(objective("ITM", dim=2 * hidden, hard_negatives=False))
    if "vqa_classifier.3.weight" in state:
        answers = "${VLP_DATA_ROOT:-data}/vqav2/answers.json"
        objectives.append(objective("VQA", dim=2 * hidden, answers=answers))
    if "nlvr2_classifier.3.weight" in state:
        objectives.append(objective("NLVR2", dim=2 * hidden))
    if "snli_classifier.3.weight" in state:
        objectives.append(objective("VE", dim=2 * hidden, num_classes=state["snli_classifier.3.weight"].shape[0]))
    model_name = f"ViT-B-{patch}-quickgelu" if patch in (16, 32) else "ViT-B-16-quickgelu"
    init_args = {
        "image_encoder": {
            "class_path": "vlp.encoders.OpenCLIPVisionEncoder",
            "init_args": {
                "model_name": model_name,
                "pretrained": None,
                "use_proj": False,
                "model_kwargs": {
                    "quick_gelu": True,
                    "vision_cfg": {
                        "image_size": side * patch,
                        "patch_size": patch,
                        "width": W,
                        "layers": blocks,
                        "head_width": head_dim,
                        "mlp_ratio": vision_mlp,
                    },
                },
            },
        },
        "text_encoder": {
            "class_path": "vlp.encoders.HFTextEncoder",
            "init_args": {
                "config": text_config,
                "pooling": base_args.get("text_encoder", {}).get("init_args", {}).get("pooling", "cls"),
            },
        },
        "fusion": {"class_path": "vlp.blocks.CoAttentionFusion", "init_args": fusion_args},
        "objectives": objectives,
        "hidden_size": hidden,
        "num_token_types": need("token_type_embeddings.weight").shape[0],
    }
    if "optim" in base_args:
        init_args["optim"] = base_args["optim"]
    return {"class_path": "vlp.models.METER", "init_args": init_args}


def _with_answers(recipe: dict, state: dict[str, Tensor]) -> dict:
    """The recipe with placeholder VQA answers of the checkpoint's count in place of the
    answer file (the head's size is what the conversion needs)."""
    recipe = copy.deepcopy(recipe)
    for o in recipe["init_args"]["objectives"]:
        if o["class_path"].endswith(".VQA"):
            count = state["vqa_classifier.3.weight"].shape[0]
            o["init_args"]["answers"] = [f"meter answer {i}" for i in range(count)]
    return recipe


def convert_meter(
    src_path: str | os.PathLike,
    out_path: str | os.PathLike,
    model: METER | str | os.PathLike | None = None,
    *,
    head_dim: int = 64,
    strict: bool = False,
) -> METERConversionReport:
    """Convert a METER checkpoint file into a vlp METER state dict file.

    Args:
        src_path: the Lightning checkpoint (``.ckpt``) or a bare state dict, read with
            ``torch.load(weights_only=True)`` (see :func:`read_meter_checkpoint`).
        out_path: ``*.safetensors`` or a torch file (``{"state_dict": ...}``), for a recipe's
            ``model.init_args.init_from`` or ``load_state_dict``.
        model: a METER, a recipe YAML whose model to fill (its pretrained weights are not
            loaded), or None: the model of :func:`meter_recipe_from_state` (the checkpoint's
            architecture; other settings from ``recipes/meter_clip16_roberta.yaml``), whose
            recipe section is the report's ``recipe``.
        head_dim: attention head width where the checkpoint's config does not say (64).
        strict: fail, writing nothing, unless the conversion is complete and exact.
    """
    src, out = str(src_path), str(out_path)
    ckpt, read_notes = read_meter_checkpoint(src)
    hparams = meter_hparams(ckpt)
    state = extract_state_dict(ckpt, src)
    recipe, notes = None, list(read_notes)
    if model is None:
        base = read_model_section(DEFAULT_RECIPE) if DEFAULT_RECIPE.is_file() else None
        recipe = meter_recipe_from_state(state, hparams=hparams, head_dim=head_dim, base=base)
        if "vqa_classifier.3.weight" in state:
            notes.append(
                "VQA: the model was built with placeholder answers; its recipe needs METER's answer list "
                "(label2ans of METER's write_vqa.py) in label order"
            )
        model = build_meter(_with_answers(recipe, state))
    elif isinstance(model, str | os.PathLike):
        model = meter_from_recipe(model, notes)
    elif not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a METER, a recipe path or None, got {type(model).__name__}")
    try:
        report = meter_to_vlp(state, model, hparams=hparams)
    except CheckpointError as e:
        raise CheckpointError(f"{src}: {e}") from None
    report.source, report.output, report.recipe = src, out, recipe
    report.notes = notes + report.notes
    if strict and not report.ok:
        raise CheckpointError("incomplete METER conversion (strict):\n" + report.summary())
    save_state_dict(model.state_dict(), out, converted_by="vlp convert meter")
    return report
