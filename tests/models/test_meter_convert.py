"""METER (zdou0830/METER) checkpoint import: key coverage, parity with a reference METER
written from the original code, round trips, reporting of unknown/missing keys and of
architecture mismatches, reading Lightning checkpoints, the CLI, position-embedding
interpolation."""

from __future__ import annotations

import dataclasses
import sys
import types

import pytest
import torch
import torch.nn.functional as F
import yaml
from reference.meter_reference import METERReference, TinyMETERConfig, make_meter_checkpoint, make_meter_reference

from vlp.cli import cli_main
from vlp.convert import convert_meter, map_meter_keys, meter_to_vlp, read_meter_checkpoint, vlp_to_meter
from vlp.convert.meter import build_meter, meter_from_recipe, meter_recipe_from_state
from vlp.errors import CheckpointError
from vlp.models.meter import METEROutput
from vlp.utils.checkpoint import load_state_dict

CFG = TinyMETERConfig()
TASKS = dataclasses.replace(CFG, tasks=("vqa", "nlvr2", "snli"))
DROPPED = {
    "vit_model.positional_embedding",
    "vit_model.ln_final.weight",
    "vit_model.ln_final.bias",
    "text_transformer.pooler.dense.weight",
    "text_transformer.pooler.dense.bias",
    "text_transformer.embeddings.position_ids",
}
TOL = dict(rtol=1e-5, atol=1e-5)


def objective(name: str, cfg: TinyMETERConfig, *, tie: bool = False) -> dict:
    h = cfg.hidden_size
    args = {
        "mlm": ("MLM", {"dim": h, "vocab_size": cfg.vocab_size, "distill": False, "tie_weights": tie}),
        "itm": ("ITM", {"dim": 2 * h, "hard_negatives": False}),
        "vqa": ("VQA", {"dim": 2 * h, "answers": [f"answer {i}" for i in range(cfg.vqa_labels)]}),
        "nlvr2": ("NLVR2", {"dim": 2 * h}),
        "ve": ("VE", {"dim": 2 * h, "num_classes": 3}),
    }[name]
    return {"class_path": f"vlp.objectives.{args[0]}", "init_args": args[1]}


def tiny_recipe(
    cfg: TinyMETERConfig = CFG,
    objectives=("mlm", "itm"),
    *,
    image_size: int | None = None,
    model_name: str = "ViT-B-16-quickgelu",
    blocks: int | None = None,
    norm_eps: float = 1e-12,
    tie: bool = False,
    num_token_types: int = 2,
) -> dict:
    """The ``model:`` section of a vlp METER with the reference's sizes."""
    return {
        "class_path": "vlp.models.METER",
        "init_args": {
            "image_encoder": {
                "class_path": "vlp.encoders.OpenCLIPVisionEncoder",
                "init_args": {
                    "model_name": model_name,
                    "use_proj": False,
                    "model_kwargs": {
                        "embed_dim": 16,
                        "vision_cfg": {
                            "image_size": image_size or cfg.image_size,
                            "patch_size": cfg.patch_size,
                            "width": cfg.vision_width,
                            "layers": blocks or cfg.vision_blocks,
                            "head_width": cfg.vision_width // cfg.vision_heads,
                        },
                    },
                },
            },
            "text_encoder": {
                "class_path": "vlp.encoders.HFTextEncoder",
                "init_args": {
                    "config": {"model_type": cfg.text_model, **cfg.text_config().to_diff_dict()},
                    "pooling": "cls",
                },
            },
            "fusion": {
                "class_path": "vlp.blocks.CoAttentionFusion",
                "init_args": {
                    "dim": cfg.hidden_size,
                    "depth": cfg.num_top_layer,
                    "num_heads": cfg.num_heads,
                    "mlp_ratio": float(cfg.mlp_ratio),
                    "norm_eps": norm_eps,
                },
            },
            "objectives": [objective(o, cfg, tie=tie) for o in objectives],
            "hidden_size": cfg.hidden_size,
            "num_token_types": num_token_types,
        },
    }


def tiny_vlp(cfg: TinyMETERConfig = CFG, objectives=("mlm", "itm"), **kwargs):
    torch.manual_seed(123)  # different from every checkpoint seed
    return build_meter(tiny_recipe(cfg, objectives, **kwargs)).eval()


def inputs(cfg: TinyMETERConfig = CFG, B: int = 3, L: int = 7, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(B, 3, cfg.image_size, cfg.image_size, generator=g)
    image2 = torch.randn(B, 3, cfg.image_size, cfg.image_size, generator=g)
    ids = torch.randint(5, cfg.vocab_size, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 4:] = 0  # padding
    ids[1, 4:] = 1  # RoBERTa's pad id
    masked = ids.clone()
    masked[:, 2] = 4  # <mask>
    return image, image2, ids, mask, masked


def by_name(model) -> dict:
    return dict(model.objectives)


def vlp_outputs(model, image, image2, ids, mask, masked) -> dict[str, torch.Tensor]:
    """The vlp model's match features and heads' logits, through its own API."""
    obj, m = by_name(model), mask.bool()
    image_tokens, _ = model.embed_image(image)  # (B, Li, h)
    text_tokens, _ = model.embed_text(ids, m)  # (B, L, h)
    feats = model.match_features(text_tokens, m, image_tokens)  # (B, 2h)
    out = {"cls_feats": feats}
    if "itm" in obj:
        out["itm"] = obj["itm"].head(feats)
        out["rank"] = obj["itm"].score(feats)
    if "mlm" in obj:
        out["mlm"] = obj["mlm"].head(model.mlm_hidden(masked, m, image_tokens))  # (B, L, V)
    if "vqa" in obj:
        out["vqa"] = obj["vqa"].head(feats)
    if "ve" in obj:
        out["snli"] = obj["ve"].head(feats)
    if "nlvr2" in obj:
        output = METEROutput(fused_cls=feats, text_tokens=text_tokens, text_mask=m)
        out["nlvr2"] = obj["nlvr2"].head(obj["nlvr2"].features(output, {"image2": image2}, model))
    return out


def ref_outputs(ref: METERReference, image, image2, ids, mask, masked) -> dict[str, torch.Tensor]:
    out = {"cls_feats": ref.infer(image, ids, mask)["cls_feats"]}
    if hasattr(ref, "itm_score"):
        out["itm"] = ref.itm_logits(image, ids, mask)
        out["rank"] = ref.rank_scores(image, ids, mask) if hasattr(ref, "rank_output") else out["itm"][:, 1]
    if hasattr(ref, "mlm_score"):
        out["mlm"] = ref.mlm_logits(image, masked, mask)
    if hasattr(ref, "vqa_classifier"):
        out["vqa"] = ref.vqa_logits(image, ids, mask)
    if hasattr(ref, "snli_classifier"):
        out["snli"] = ref.snli_logits(image, ids, mask)
    if hasattr(ref, "nlvr2_classifier"):
        out["nlvr2"] = ref.nlvr2_logits(image, image2, ids, mask)
    return out


def assert_parity(model, ref, cfg: TinyMETERConfig = CFG, expect: set[str] | None = None) -> None:
    batch = inputs(cfg)
    with torch.no_grad():
        got, want = vlp_outputs(model, *batch), ref_outputs(ref, *batch)
    assert set(got) == set(want), (sorted(got), sorted(want))
    if expect is not None:
        assert set(want) == expect
    for name in want:
        assert want[name].abs().max() > 0.05, name  # not a degenerate comparison
        torch.testing.assert_close(got[name], want[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one intra-op thread is faster than two on busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pretrain_ckpt() -> dict:
    return make_meter_checkpoint(CFG, seed=0)


@pytest.fixture(scope="module")
def converted(pretrain_ckpt):
    """The pretraining checkpoint in a vlp METER whose objectives are not in METER's order."""
    model = tiny_vlp(objectives=("itm", "mlm"))
    return model, meter_to_vlp(pretrain_ckpt, model)


# -- (a) key mapping ----------------------------------------------------------------------------
def test_every_original_key_is_mapped_or_deliberately_dropped(pretrain_ckpt, converted):
    mapped, unknown = map_meter_keys(pretrain_ckpt)
    assert unknown == []
    model, report = converted
    assert report.ok and report.unknown == [] and report.missing == [] and report.unused == {}, report.summary()
    assert not report.mismatches and not report.warnings and not report.interpolated
    assert set(report.dropped) == DROPPED
    resolved = set(mapped)  # heads are keyed by objective name, as the converter writes them
    assert resolved == set(model.state_dict()) | {
        "text_encoder.model.pooler.dense.weight",
        "text_encoder.model.pooler.dense.bias",
    }
    assert "OK: every checkpoint key known" in report.summary() and "METER conversion" in report.summary()


def test_mapping_spot_checks(pretrain_ckpt):
    mapped, _ = map_meter_keys(pretrain_ckpt)
    state = pretrain_ckpt["state_dict"]
    layer = "cross_modal_image_layers.1."
    q, k, v = (state[f"{layer}attention.self.{n}.weight"] for n in ("query", "key", "value"))
    assert torch.equal(mapped["fusion.image_layers.1.attn.qkv.weight"], torch.cat([q, k, v]))
    xk, xv = (state[f"{layer}crossattention.self.{n}.bias"] for n in ("key", "value"))
    assert torch.equal(mapped["fusion.image_layers.1.cross_attn.kv.bias"], torch.cat([xk, xv]))
    pairs = {
        "fusion.text_layers.0.norm_cross.weight": "cross_modal_text_layers.0.crossattention.output.LayerNorm.weight",
        "fusion.text_layers.0.norm2.bias": "cross_modal_text_layers.0.output.LayerNorm.bias",
        "image_encoder.visual.transformer.resblocks.1.attn.in_proj_weight": (
            "vit_model.visual.transformer.resblocks.1.attn.in_proj_weight"
        ),
        "image_encoder.visual.positional_embedding": "vit_model.visual.positional_embedding",
        "image_encoder.visual.ln_post.bias": "vit_model.visual.ln_post.bias",
        "text_encoder.model.encoder.layer.0.output.LayerNorm.weight": (
            "text_transformer.encoder.layer.0.output.LayerNorm.weight"
        ),
        "image_proj.weight": "cross_modal_image_transform.weight",
        "text_proj.bias": "cross_modal_text_transform.bias",
        "token_type.weight": "token_type_embeddings.weight",
        "image_pooler.dense.weight": "cross_modal_image_pooler.dense.weight",
        "objectives.mlm.head.decoder": "mlm_score.decoder.weight",
        "objectives.mlm.head.norm.weight": "mlm_score.transform.LayerNorm.weight",
        "objectives.mlm.head.bias": "mlm_score.bias",
        "objectives.itm.head.weight": "itm_score.fc.weight",
    }
    for dst, src in pairs.items():
        assert torch.equal(mapped[dst], state[src]), dst


# -- (b) parity with the reference METER ------------------------------------------------------------
def test_parity_pretraining_heads(converted):
    model, _ = converted
    ref = make_meter_reference(CFG, seed=0)  # the checkpoint's own weights
    assert_parity(model, ref, expect={"cls_feats", "itm", "rank", "mlm"})


def test_parity_task_heads_and_third_token_type():
    cfg = TASKS
    ckpt = make_meter_checkpoint(cfg, seed=3)
    model = tiny_vlp(cfg, ("vqa", "nlvr2", "ve"), num_token_types=3)
    report = meter_to_vlp(ckpt, model)
    assert report.ok and report.unused == {}, report.summary()
    assert_parity(model, make_meter_reference(cfg, seed=3), cfg, expect={"cls_feats", "vqa", "nlvr2", "snli"})


def test_parity_retrieval_checkpoint_ranks_with_rank_output():
    cfg = dataclasses.replace(CFG, tasks=("itm", "irtr"))
    ckpt = make_meter_checkpoint(cfg, seed=4)
    model = tiny_vlp(cfg, ("itm",))
    report = meter_to_vlp(ckpt, model)
    assert report.ok and any("rank_output" in n for n in report.notes), report.summary()
    ref = make_meter_reference(cfg, seed=4)
    batch = inputs(cfg)
    with torch.no_grad():
        got, want = vlp_outputs(model, *batch), ref_outputs(ref, *batch)
    torch.testing.assert_close(got["rank"], want["rank"], **TOL)  # ITM.score == METER's rank_output
    torch.testing.assert_close(got["itm"][:, 0], want["itm"][:, 0], **TOL)  # the "no match" row is itm_score's


def test_task_heads_of_another_width_are_reported_not_loaded():
    from vlp.objectives.tasks import classifier

    ckpt = make_meter_checkpoint(TASKS, seed=3)
    assert meter_to_vlp(ckpt, tiny_vlp(TASKS, ("vqa", "ve"), num_token_types=3)).ok  # vlp's heads are METER's
    model = tiny_vlp(TASKS, ("vqa", "ve"), num_token_types=3)
    i = "vqa"
    d = model.objectives[i].head[0].in_features
    model.objectives[i].head = classifier(d, model.objectives[i].head[-1].out_features, hidden=2 * d)
    report = meter_to_vlp(ckpt, model)
    assert not report.ok
    assert f"objectives.{i}.head.0.weight" in report.unused and f"objectives.{i}.head.0.weight" in report.missing
    assert "another hidden width" in report.unused[f"objectives.{i}.head.0.weight"]
    assert any("vqa head was not loaded" in w for w in report.warnings)
    assert report.unused["objectives.nlvr2.head.0.weight"] == "the model has no 'nlvr2' objective"
    with pytest.raises(CheckpointError, match="incomplete METER conversion"):
        meter_to_vlp(ckpt, model, strict=True)


# -- (c) round trips ----------------------------------------------------------------------------------
def test_round_trip_vlp_meter_vlp(converted):
    model, _ = converted
    other = tiny_vlp(objectives=("mlm", "itm"))  # another objective order: names, not positions
    report = meter_to_vlp(vlp_to_meter(model), other)
    assert report.ok and report.unused == {}, report.summary()
    a, b = model.state_dict(), other.state_dict()  # heads keyed by name in both
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_round_trip_meter_vlp_meter(pretrain_ckpt, converted):
    model, _ = converted
    back = vlp_to_meter(model)
    original = pretrain_ckpt["state_dict"]
    assert set(back) == set(original) - (DROPPED - {"text_transformer.embeddings.position_ids"})
    for k, v in back.items():
        assert torch.equal(v, original[k]), k


def test_vlp_to_meter_refuses_what_meter_lacks():
    recipe = tiny_recipe()
    recipe["init_args"]["objectives"].append({"class_path": "vlp.objectives.ITC"})
    with pytest.raises(CheckpointError, match="image_itc_proj"):
        vlp_to_meter(build_meter(recipe))


# -- (d) unknown, missing keys and architecture mismatches --------------------------------------------
def test_unknown_keys_are_listed_not_ignored(pretrain_ckpt):
    ckpt = {**pretrain_ckpt, "state_dict": dict(pretrain_ckpt["state_dict"])}
    state = ckpt["state_dict"]
    state["vit_model.visual.proj"] = torch.zeros(CFG.vision_width, 16)  # known, but the model has no proj
    state["cross_modal_text_layers.0.attention.self.distance_embedding.weight"] = torch.zeros(3, 3)
    state["text_transformer.encoder.layer.0.crossattention.self.query.weight"] = torch.zeros(3, 3)
    state["contrastive_head.weight"] = torch.zeros(2)
    extra = sorted(
        [
            "cross_modal_text_layers.0.attention.self.distance_embedding.weight",
            "text_transformer.encoder.layer.0.crossattention.self.query.weight",
            "contrastive_head.weight",
        ]
    )
    assert sorted(map_meter_keys(ckpt)[1]) == extra
    report = meter_to_vlp(ckpt, tiny_vlp())
    assert sorted(report.unknown) == extra and report.missing == [] and not report.ok
    assert report.unused == {"image_encoder.visual.proj": "not in the model"}
    assert "UNKNOWN" in report.summary() and "contrastive_head.weight" in report.summary()
    with pytest.raises(CheckpointError, match="contrastive_head.weight"):
        meter_to_vlp(ckpt, tiny_vlp(), strict=True)


def test_missing_keys_are_listed(pretrain_ckpt):
    state = {k: v for k, v in pretrain_ckpt["state_dict"].items() if not k.startswith("itm_score.")}
    model = tiny_vlp()
    report = meter_to_vlp(state, model)  # a bare state dict: no config to check against
    i = "itm"
    assert report.missing == [f"objectives.{i}.head.weight", f"objectives.{i}.head.bias"]
    assert any("no config" in n for n in report.notes)
    assert "MISSING" in report.summary()
    with pytest.raises(CheckpointError, match="head.weight"):
        meter_to_vlp(state, tiny_vlp(), strict=True)


def test_architecture_mismatches_are_reported(pretrain_ckpt):
    model = tiny_vlp(model_name="ViT-B-16", norm_eps=1e-6)  # a GELU tower, timm's eps
    by_name(model)["mlm"].head.decoder = None  # tied (METER refuses to build one at these widths)
    report = meter_to_vlp(pretrain_ckpt, model)
    assert report.unknown == [] and report.missing == [] and not report.ok
    text = "\n".join(report.mismatches)
    assert "QuickGELU" in text and "ViT-B-16-quickgelu" in text
    assert "norm_eps: 1.0e-12" in text and "tie_weights: true" in text
    assert any(k.endswith("head.decoder") for k in report.unused)
    assert "MISMATCH" in report.summary()
    with pytest.raises(CheckpointError, match="QuickGELU"):
        meter_to_vlp(pretrain_ckpt, tiny_vlp(model_name="ViT-B-16"), strict=True)
    # a BERT model for a RoBERTa checkpoint (the config says roberta-base)
    bert = tiny_vlp(dataclasses.replace(CFG, text_model="bert"))
    with pytest.raises(CheckpointError, match=r"token_type_embeddings\.weight: checkpoint \(1, 48\), model \(2, 48\)"):
        meter_to_vlp(pretrain_ckpt, bert)


def test_the_dropped_last_clip_block_is_explained(pretrain_ckpt):
    with pytest.raises(CheckpointError, match=r"2 CLIP residual blocks, the model 3.*layers - 1.*layers: 2"):
        meter_to_vlp(pretrain_ckpt, tiny_vlp(blocks=CFG.clip_layers))
    swin = {k: v for k, v in pretrain_ckpt["state_dict"].items() if not k.startswith("vit_model.visual.")}
    swin["vit_model.layers.0.blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match="Swin"):
        meter_to_vlp(swin, tiny_vlp())


def test_more_token_types_copy_the_image_type(pretrain_ckpt):
    model = tiny_vlp(num_token_types=3)  # as when fine-tuning on NLVR2
    report = meter_to_vlp(pretrain_ckpt, model)
    assert report.ok and any("2 -> 3 token types" in n for n in report.notes)
    table = pretrain_ckpt["state_dict"]["token_type_embeddings.weight"]
    assert torch.equal(model.token_type.weight, torch.cat([table, table[1:]]))


# -- (e) files and the CLI ------------------------------------------------------------------------------
def test_lightning_metadata_is_read_with_inert_stand_ins(tmp_path, pretrain_ckpt):
    """METER's checkpoints (Lightning 1.3 + sacred) pickle AttributeDict, sacred's read-only
    containers and callback classes: weights_only refuses them; stand-ins read the file."""
    fakes: dict[str, types.ModuleType] = {}

    def fake_class(module: str, name: str, base: type = object, **attrs) -> type:
        parts = module.split(".")
        for i in range(1, len(parts) + 1):
            fakes.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
        cls = type(name, (base,), {"__module__": module, **attrs})
        setattr(fakes[module], name, cls)
        return cls

    attribute_dict = fake_class("pytorch_lightning.utilities.parsing", "AttributeDict", dict)
    read_only = fake_class(
        "sacred.config.custom_containers", "ReadOnlyDict", dict, __reduce__=lambda self: (type(self), (dict(self),))
    )
    callback = fake_class("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint")
    payload = fake_class("evil.payload", "Payload")
    ckpt = {
        **pretrain_ckpt,
        "hyper_parameters": attribute_dict(config=read_only(pretrain_ckpt["hyper_parameters"]["config"])),
        "callbacks": {callback: {"best_model_score": torch.tensor(0.5)}},
    }
    sys.modules.update(fakes)
    try:
        torch.save(ckpt, tmp_path / "meter.ckpt")
        torch.save({**ckpt, "extra": payload()}, tmp_path / "evil.ckpt")
    finally:
        for name in fakes:
            sys.modules.pop(name, None)
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(tmp_path / "meter.ckpt", weights_only=True)
    loaded, notes = read_meter_checkpoint(tmp_path / "meter.ckpt")
    assert "AttributeDict" in notes[0] and "ReadOnlyDict" in notes[0]
    assert loaded["hyper_parameters"]["config"]["tokenizer"] == "roberta-base"
    assert torch.equal(loaded["state_dict"]["itm_score.fc.weight"], pretrain_ckpt["state_dict"]["itm_score.fc.weight"])
    with pytest.raises(CheckpointError, match=r"evil\.payload\.Payload"):
        read_meter_checkpoint(tmp_path / "evil.ckpt")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_cli_writes_a_file_that_loads_into_the_model(tmp_path, pretrain_ckpt, converted, capsys, suffix):
    src = tmp_path / "meter.ckpt"
    torch.save(pretrain_ckpt, src)
    recipe = tmp_path / "tiny_meter.yaml"
    recipe.write_text(yaml.safe_dump({"seed_everything": 0, "model": tiny_recipe(objectives=("itm", "mlm"))}))
    out = tmp_path / f"out/meter_vlp{suffix}"
    report = cli_main(["convert", "meter", str(src), "--out", str(out), "--config", str(recipe), "--strict"])
    assert report.ok and out.is_file()
    printed = capsys.readouterr().out
    assert "OK: every checkpoint key known" in printed and "dropped on purpose" in printed
    model = tiny_vlp(objectives=("itm", "mlm"))
    model.load_state_dict(load_state_dict(out), strict=True)
    a, b = model.state_dict(), converted[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_infers_the_model_from_the_checkpoint(tmp_path, pretrain_ckpt, capsys):
    src = tmp_path / "meter.ckpt"
    torch.save(pretrain_ckpt, src)
    out = tmp_path / "meter.safetensors"
    report = cli_main(["convert", "meter", str(src), "--out", str(out), "--head-dim", "16", "--strict"])
    assert report.ok, report.summary()
    assert "recipe section" in capsys.readouterr().out
    recipe = report.recipe
    assert recipe == meter_recipe_from_state(pretrain_ckpt, head_dim=16, base=_base())
    vision = recipe["init_args"]["image_encoder"]["init_args"]
    assert vision["model_kwargs"]["quick_gelu"] is True
    assert vision["model_kwargs"]["vision_cfg"]["layers"] == CFG.vision_blocks and vision["use_proj"] is False
    model = build_meter(recipe).eval()
    model.load_state_dict(load_state_dict(out), strict=True)
    assert_parity(model, make_meter_reference(CFG, seed=0))


def test_recipe_is_built_without_pretrained_weights(tmp_path, pretrain_ckpt):
    """``pretrained: openai`` is switched off and a text tower named by folder is built from
    its config.json alone (the folder has no weights): nothing is downloaded or read twice."""
    folder = tmp_path / "roberta_tiny"
    CFG.text_config().save_pretrained(folder)
    recipe = tiny_recipe()
    recipe["init_args"]["image_encoder"]["init_args"]["pretrained"] = "openai"
    recipe["init_args"]["text_encoder"]["init_args"] = {
        "name_or_path": str(folder),
        "config": {"hidden_dropout_prob": 0.0},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"model": recipe}))
    notes: list[str] = []
    model = meter_from_recipe(path, notes)
    assert any("built from its config alone" in n for n in notes)
    assert model.text_encoder.model.config.hidden_dropout_prob == 0.0
    assert meter_to_vlp(pretrain_ckpt, model.eval()).ok


def _base() -> dict | None:
    from vlp.convert.common import read_model_section
    from vlp.convert.meter import DEFAULT_RECIPE

    return read_model_section(DEFAULT_RECIPE) if DEFAULT_RECIPE.is_file() else None


def test_cli_errors_name_the_file(tmp_path, capsys):
    bad = tmp_path / "not_a_checkpoint.ckpt"
    bad.write_bytes(b"garbage")
    with pytest.raises(SystemExit) as e:
        cli_main(["convert", "meter", str(bad), "--out", str(tmp_path / "x.safetensors")])
    assert e.value.code == 2
    assert "not_a_checkpoint.ckpt" in capsys.readouterr().err
    torch.save({"state_dict": {"foo.weight": torch.zeros(2)}}, bad)
    with pytest.raises(CheckpointError, match=r"not_a_checkpoint\.ckpt: not a CLIP-ViT METER checkpoint"):
        convert_meter(bad, tmp_path / "x.safetensors", tiny_vlp())
    assert not (tmp_path / "x.safetensors").exists()


# -- (f) position-embedding interpolation -------------------------------------------------------------
def test_positional_embedding_is_interpolated_to_the_model_grid():
    big = dataclasses.replace(CFG, image_size=48)  # a 6x6 grid, as METER fine-tuned at a higher resolution
    ckpt = make_meter_checkpoint(big, seed=2)
    model = tiny_vlp()  # a 4x4 grid
    report = meter_to_vlp(ckpt, model)
    assert report.ok, report.summary()
    key = "image_encoder.visual.positional_embedding"
    assert report.interpolated == [f"{key}: 6x6 -> 4x4 patches (bicubic, class token kept)"]
    src = ckpt["state_dict"]["vit_model.visual.positional_embedding"]  # (1 + 36, W)
    grid = src[1:].reshape(1, 6, 6, -1).permute(0, 3, 1, 2)  # (1, W, 6, 6)
    want = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False).flatten(2)[0].T  # (16, W)
    got = model.image_encoder.visual.positional_embedding  # (1 + 16, W)
    assert torch.equal(got[:1], src[:1])
    torch.testing.assert_close(got[1:], want, rtol=0, atol=1e-6)
    # and the other way, as when fine-tuning a 288 px checkpoint at 576 px
    report = meter_to_vlp(make_meter_checkpoint(CFG), tiny_vlp(image_size=48))
    assert report.interpolated[0].endswith("4x4 -> 6x6 patches (bicubic, class token kept)")
