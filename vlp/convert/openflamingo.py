"""``vlp convert openflamingo``: OpenFlamingo checkpoints → the trained tensors of a vlp Flamingo.

OpenFlamingo (mlfoundations/open_flamingo) saves a flat state dict of what trains —
``perceiver.*``, ``lang_encoder.<layers>.<i>.gated_cross_attn_layer.*`` and the LM's input
embedding (``lang_encoder.transformer.wte.weight``, ``...embed_tokens.weight``; the output
embedding too when it is tied or named ``embed*``) — or a training checkpoint holding it as
``model_state_dict``, under DDP with a ``module.`` prefix. vlp's ``PerceiverResampler`` and
``FlamingoLayer`` use OpenFlamingo's names, so those keys map one to one (``lang_encoder.`` →
``lang_model.model.``). Of the embedding only the ``<image>`` / ``<|endofchunk|>`` rows
trained (OpenFlamingo zeroes every other row's gradient); they become ``media_embeddings``
/ ``media_head``. The frozen towers are the recipe's: the checkpoint's copies of frozen LM
tensors are compared with them (a warning when they differ) and not written.

Token ids: OpenFlamingo adds ``<|endofchunk|>`` then ``<image>`` (then ``<PAD>`` if the
tokenizer has none) after the LM tokenizer's own tokens, so by default the checkpoint's ids
are ``base`` and ``base + 1``, ``base`` the size of the recipe tokenizer without its special
tokens; the model's own ids come from the recipe tokenizer, in any order.
"""

from __future__ import annotations

import importlib
import os
import re

import torch
from torch import Tensor, nn

from vlp.convert.common import ConversionReport, save_state_dict
from vlp.errors import CheckpointError, ConfigError

FROZEN = "frozen tower tensor: taken from the recipe, not the checkpoint"
DUPLICATE = "OpenFlamingo's duplicate of the layers' cross-attention / decoder blocks"
_XATTN = re.compile(r"lang_encoder\.(.+)\.(\d+)\.gated_cross_attn_layer\.(.+)")


def read_openflamingo_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """The OpenFlamingo state dict in ``path``: ``*.safetensors`` or a torch file read with
    ``weights_only=True`` (a flat state dict, or a training checkpoint's ``model_state_dict``),
    without a DDP ``module.`` prefix."""
    path = str(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"OpenFlamingo checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        ckpt = load_file(path)
    else:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot be read with torch.load(weights_only=True): {e}") from None
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model_state_dict"), dict):
        ckpt = ckpt["model_state_dict"]
    if not isinstance(ckpt, dict) or not ckpt or not all(isinstance(v, Tensor) for v in ckpt.values()):
        what = sorted(ckpt)[:5] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{path}: no OpenFlamingo state dict (a mapping of tensors or 'model_state_dict'): {what}"
        )
    if all(k.startswith("module.") for k in ckpt):
        ckpt = {k[len("module.") :]: v for k, v in ckpt.items()}
    ckpt = {k.replace("_checkpoint_wrapped_module.", ""): v for k, v in ckpt.items()}
    check_openflamingo_layout(ckpt, path)
    return ckpt


def check_openflamingo_layout(state: dict[str, Tensor], where: str = "<state dict>") -> None:
    """CheckpointError unless ``state`` has OpenFlamingo's ``perceiver.*`` and cross-attention keys."""
    if any(k.startswith("perceiver.") for k in state) and any(_XATTN.fullmatch(k) for k in state):
        return
    hint = ""
    if any(k.startswith(("lang_model.", "state_dict")) for k in state):
        hint = " (it looks like a vlp checkpoint: load it with init_from)"
    raise CheckpointError(
        f"{where}: not an OpenFlamingo checkpoint: expected perceiver.* and "
        f"lang_encoder.<layers>.<i>.gated_cross_attn_layer.* keys, found e.g. {sorted(state)[:4]}{hint}"
    )


def openflamingo_token_ids(tokenizer) -> tuple[int, int]:
    """(``<image>``, ``<|endofchunk|>``) ids that OpenFlamingo's factory gives them on the LM
    tokenizer under ``tokenizer`` (a vlp tokenizer with the two special tokens added last)."""
    added = len(getattr(tokenizer, "special_tokens", None) or ())
    if added < 2:
        raise ConfigError(
            "the recipe's tokenizer must add the special tokens ['<image>', '<|endofchunk|>'] "
            "(data.init_args.tokenizer.init_args.special_tokens), or pass the checkpoint's token ids"
        )
    base = tokenizer.vocab_size - added
    return base + 1, base


def _module_name(root: nn.Module, module: nn.Module) -> str:
    for name, m in root.named_modules():
        if m is module:
            return name
    raise ConfigError(f"{type(module).__name__} is not a submodule of {type(root).__name__}")


def openflamingo_to_vlp(
    state: dict[str, Tensor],
    model: nn.Module,
    *,
    media_token_id: int | None = None,
    eoc_token_id: int | None = None,
) -> ConversionReport:
    """Load OpenFlamingo's ``state`` into ``model`` (a vlp ``Flamingo`` whose tokenizer is set);
    ``media_token_id`` / ``eoc_token_id``: the ids in the checkpoint's vocabulary (default:
    as the model's)."""
    check_openflamingo_layout(state)
    if not getattr(model, "has_media_tokens", False):
        raise ConfigError("the Flamingo has no <image> / <|endofchunk|> ids: call model.set_tokenizer(tokenizer) first")
    report = ConversionReport(family="OpenFlamingo")
    own = model.state_dict()
    trained = model.trainable_keys()
    hf = model.lang_model.model
    layers_name = model.lang_model._layers_name
    in_key = f"lang_encoder.{_module_name(hf, hf.get_input_embeddings())}.weight"
    out_module = hf.get_output_embeddings()
    out_key = f"lang_encoder.{_module_name(hf, out_module)}.weight"
    tied = out_module.weight is hf.get_input_embeddings().weight
    ours = [int(i) for i in model.media_token_ids]
    theirs = [ours[0] if media_token_id is None else media_token_id, ours[1] if eoc_token_id is None else eoc_token_id]
    new: dict[str, Tensor] = {}
    differ: list[str] = []
    kept: set[str] = set()  # trained tensors that keep the recipe's values on purpose

    def put(key: str, value: Tensor, source: str) -> None:
        if tuple(value.shape) != tuple(own[key].shape):
            raise CheckpointError(
                f"{source} has shape {tuple(value.shape)} but the recipe's {key} has {tuple(own[key].shape)}: "
                "the recipe's perceiver / cross_attn sizes or LM differ from the checkpoint's"
            )
        new[key] = value.to(own[key].dtype)
        report.loaded.append(key)

    xattn_layers = sorted({int(m[2]) for k in state if (m := _XATTN.fullmatch(k))})
    ours_layers = sorted({int(m[1]) for k in trained if (m := re.search(r"\.(\d+)\.gated_cross_attn_layer\.", k))})
    if xattn_layers != ours_layers:
        raise CheckpointError(
            f"the checkpoint has cross-attention before LM layers {xattn_layers}, the recipe's model "
            f"(cross_attn_every_n_layers={model.cross_attn_every_n_layers}) before {ours_layers}: set "
            "model.init_args.cross_attn_every_n_layers to the checkpoint's"
        )
    for key, value in state.items():
        if key.startswith("perceiver."):
            if key in own:
                put(key, value, key)
            else:
                report.unknown.append(key)
        elif key in (in_key, out_key):
            continue  # below
        elif key.startswith(("lang_encoder.old_decoder_blocks.", "lang_encoder.gated_cross_attn_layers.")):
            report.dropped[key] = DUPLICATE
        elif key.startswith("vision_encoder."):
            report.dropped[key] = FROZEN
        elif key.startswith("lang_encoder."):
            target = "lang_model.model." + key[len("lang_encoder.") :]
            if target in trained:
                if not _XATTN.fullmatch(key) or not key.startswith(f"lang_encoder.{layers_name}."):
                    report.unknown.append(key)
                    continue
                put(target, value, key)
            elif target in own:
                report.dropped[key] = FROZEN
                if value.shape != own[target].shape or not torch.equal(value.to(own[target].dtype), own[target]):
                    differ.append(key)
            else:
                report.unknown.append(key)
        else:
            report.unknown.append(key)

    # the two media rows of the input and output embeddings
    rows = state.get(in_key)
    if rows is None:
        raise CheckpointError(
            f"the checkpoint has no input embedding {in_key} (OpenFlamingo trained with --freeze_lm_embeddings?): "
            "the <image> / <|endofchunk|> rows are not in it"
        )
    if max(theirs) >= rows.shape[0]:
        raise CheckpointError(
            f"{in_key} has {rows.shape[0]} rows but the checkpoint's <image> / <|endofchunk|> ids are {theirs}: "
            "pass the ids of OpenFlamingo's tokenizer (--media-token-id / --eoc-token-id)"
        )
    put("media_embeddings", rows[theirs], f"{in_key}[{theirs}]")
    base_rows = min(rows.shape[0], model.lang_model.vocab_size, min(theirs))
    recipe_rows = hf.get_input_embeddings().weight[:base_rows]
    if rows.shape[1] != recipe_rows.shape[1] or not torch.equal(rows[:base_rows].to(recipe_rows.dtype), recipe_rows):
        differ.append(f"{in_key} (rows of the LM's own tokens)")
    report.dropped[in_key] = "input embedding: its <image> / <|endofchunk|> rows → media_embeddings, the rest frozen"
    if out_key in state and out_key != in_key:
        put("media_head", state[out_key][theirs], f"{out_key}[{theirs}]")
        report.dropped[out_key] = "output embedding: its <image> / <|endofchunk|> rows → media_head"
    elif tied or out_key == in_key:
        put("media_head", rows[theirs], f"{in_key}[{theirs}] (tied output embedding)")
    else:
        kept.add("media_head")
        report.warnings.append(
            f"the checkpoint has no output embedding ({out_key}: OpenFlamingo keeps an untied LM head frozen and "
            "leaves it out), so the <image> / <|endofchunk|> logit columns keep the recipe's rows"
        )
    if differ:
        report.warnings.append(
            f"{len(differ)} frozen LM tensor(s) of the checkpoint differ from the recipe's (e.g. {differ[:3]}): "
            "is the recipe's lang_model the LM OpenFlamingo was trained on?"
        )
    report.notes.append(f"token ids: checkpoint <image>={theirs[0]}, <|endofchunk|>={theirs[1]}; model {ours}")
    report.missing = sorted(trained - set(new) - kept)
    model.load_state_dict(new, strict=False)
    return report


def _tokenizer_from_recipe(path: str):
    """The ``data.init_args.tokenizer`` of a recipe YAML, instantiated."""
    import yaml

    from vlp.utils.paths import resolve_path

    with open(resolve_path(path)) as f:
        spec = ((yaml.safe_load(f) or {}).get("data") or {}).get("init_args", {}).get("tokenizer")
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ConfigError(f"{path}: no data.init_args.tokenizer (class_path / init_args) to take the token ids from")
    module, _, name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**(spec.get("init_args") or {}))


def convert_openflamingo(
    src_path: str | os.PathLike,
    out_path: str | os.PathLike,
    model: nn.Module | str | os.PathLike,
    *,
    tokenizer=None,
    media_token_id: int | None = None,
    eoc_token_id: int | None = None,
    strict: bool = False,
) -> ConversionReport:
    """Convert an OpenFlamingo checkpoint into the trained tensors of a vlp Flamingo (the
    perceiver, the cross-attention layers, ``media_embeddings`` / ``media_head``), written to
    ``out_path`` (``*.safetensors`` or a torch file) for a recipe's ``init_from``.

    Args:
        model: a ``vlp.models.Flamingo`` or a recipe YAML (its model, and its data tokenizer).
        tokenizer: the vlp tokenizer (default: the recipe's ``data.init_args.tokenizer``).
        media_token_id / eoc_token_id: the checkpoint's ids (default: OpenFlamingo's order
            on the tokenizer, :func:`openflamingo_token_ids`).
        strict: fail, writing nothing, unless every key is known and every trained tensor filled.
    """
    from vlp.convert.common import build_model, read_model_section
    from vlp.models.flamingo import Flamingo

    src, out = str(src_path), str(out_path)
    state = read_openflamingo_checkpoint(src)
    if isinstance(model, str | os.PathLike):
        recipe = str(model)
        model = build_model(Flamingo, read_model_section(recipe))
        tokenizer = tokenizer if tokenizer is not None else _tokenizer_from_recipe(recipe)
    if not isinstance(model, Flamingo):
        raise ConfigError(f"model must be a vlp Flamingo or a recipe path, got {type(model).__name__}")
    if tokenizer is not None:
        model.set_tokenizer(tokenizer)
        if media_token_id is None and eoc_token_id is None:
            media_token_id, eoc_token_id = openflamingo_token_ids(tokenizer)
    try:
        report = openflamingo_to_vlp(state, model, media_token_id=media_token_id, eoc_token_id=eoc_token_id)
    except CheckpointError as e:
        raise CheckpointError(f"{src}: {e}") from None
    report.source, report.output = src, out
    if strict and not report.ok:
        raise CheckpointError("incomplete OpenFlamingo conversion (strict):\n" + report.summary())
    keep = model.trainable_keys()
    save_state_dict(
        {k: v for k, v in model.state_dict().items() if k in keep}, out, converted_by="vlp convert openflamingo"
    )
    return report
