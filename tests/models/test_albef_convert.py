"""ALBEF / LAVIS checkpoint import: key coverage, round trips, parity with a reference ALBEF
built from timm + transformers modules, reporting of unknown/missing keys, the CLI, and
position-embedding interpolation."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
import yaml
from reference.albef_reference import ALBEFReference, TinyALBEFConfig, make_albef_checkpoint

from vlp.cli import cli_main
from vlp.convert import albef_to_vlp, convert_albef, map_albef_keys, vlp_to_albef
from vlp.convert.albef import albef_recipe_from_state, build_albef
from vlp.errors import CheckpointError
from vlp.utils.checkpoint import load_state_dict

CFG = TinyALBEFConfig()
ALL = ("itc", "itm", "mlm")
DROPPED_PRETRAIN = {
    f"text_encoder{s}.{k}"
    for s in ("", "_m")
    for k in ("bert.embeddings.position_ids", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
}
OBJECTIVES = {
    "itc": lambda c: {
        "class_path": "vlp.objectives.MomentumITC",
        "init_args": {"queue_size": c.queue_size, "embed_dim": c.embed_dim},
    },
    "itm": lambda c: {"class_path": "vlp.objectives.ITM", "init_args": {"dim": c.text_width}},
    "mlm": lambda c: {
        "class_path": "vlp.objectives.MLM",
        "init_args": {"dim": c.text_width, "vocab_size": c.vocab_size},
    },
}


def tiny_recipe(cfg: TinyALBEFConfig = CFG, objectives=ALL, *, image_size: int | None = None, **kwargs) -> dict:
    """The ``model:`` recipe section of a vlp ALBEF with the reference's sizes."""
    return {
        "class_path": "vlp.models.ALBEF",
        "init_args": {
            "image_encoder": {
                "class_path": "vlp.encoders.TimmVisionEncoder",
                "init_args": {
                    "name": "vit_tiny_patch16_224",
                    "img_size": image_size or cfg.image_size,
                    "pool": "cls",
                    "model_kwargs": {
                        "patch_size": cfg.patch_size,
                        "embed_dim": cfg.vision_width,
                        "depth": cfg.vision_depth,
                        "num_heads": cfg.vision_heads,
                    },
                },
            },
            "text_encoder": {
                "class_path": "vlp.encoders.HFTextEncoder",
                "init_args": {
                    "config": {
                        "model_type": "bert",
                        "vocab_size": cfg.vocab_size,
                        "hidden_size": cfg.text_width,
                        "num_hidden_layers": cfg.fusion_layer,
                        "num_attention_heads": cfg.text_heads,
                        "intermediate_size": cfg.intermediate_size,
                        "max_position_embeddings": cfg.max_position_embeddings,
                        "type_vocab_size": cfg.type_vocab_size,
                    }
                },
            },
            "fusion": {
                "class_path": "vlp.encoders.BertFusion",
                "init_args": {
                    "dim": cfg.text_width,
                    "depth": cfg.num_layers - cfg.fusion_layer,
                    "num_heads": cfg.text_heads,
                    "context_dim": cfg.vision_width,
                    "mlp_ratio": cfg.intermediate_size / cfg.text_width,
                },
            },
            "objectives": [OBJECTIVES[name](cfg) for name in objectives],
            "embed_dim": cfg.embed_dim,
            **kwargs,
        },
    }


def tiny_vlp(cfg: TinyALBEFConfig = CFG, objectives=ALL, **kwargs):
    torch.manual_seed(123)  # different from every checkpoint seed
    return build_albef(tiny_recipe(cfg, objectives, **kwargs)).eval()


def inputs(cfg: TinyALBEFConfig = CFG, B: int = 3, L: int = 7, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(B, 3, cfg.image_size, cfg.image_size, generator=g)
    ids = torch.randint(5, cfg.vocab_size, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 4:] = 0  # padding
    ids[1, 4:] = 0
    masked = ids.clone()
    masked[:, 2] = 3  # [MASK]
    return image, ids, mask, masked


def by_name(model) -> dict:
    return dict(model.objectives)


@pytest.fixture(scope="module")
def pretrain_ckpt() -> dict:
    return make_albef_checkpoint(CFG, seed=0, layout="pretrain")


@pytest.fixture(scope="module")
def retrieval_ckpt() -> dict:
    return make_albef_checkpoint(CFG, seed=1, layout="retrieval")


@pytest.fixture(scope="module")
def converted(pretrain_ckpt):
    """The pretraining checkpoint in a vlp ALBEF whose objectives are NOT in ALBEF's order."""
    model = tiny_vlp(objectives=("mlm", "itc", "itm"))
    report = albef_to_vlp(pretrain_ckpt, model)
    return model, report


# -- (a) key mapping ----------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["pretrain", "retrieval", "lavis"])
def test_every_original_key_is_mapped_or_deliberately_dropped(layout):
    ckpt = make_albef_checkpoint(
        CFG, layout="pretrain" if layout == "lavis" else layout, type_embeddings=layout != "lavis"
    )
    mapped, unknown = map_albef_keys(ckpt, fusion_layer=CFG.fusion_layer)
    assert unknown == []
    model = tiny_vlp(objectives=ALL if layout != "retrieval" else ("itc", "itm"))
    report = albef_to_vlp(ckpt, model)
    assert report.unknown == [] and report.missing == [] and report.unused == {}, report.summary()
    assert report.ok and not report.warnings and not report.momentum_copied and not report.interpolated
    dropped = (
        DROPPED_PRETRAIN if layout != "retrieval" else {f"text_encoder{s}.embeddings.position_ids" for s in ("", "_m")}
    )
    assert set(report.dropped) == dropped
    expected = set(model.state_dict())  # heads are keyed by objective name, as the converter writes them
    if layout != "retrieval":  # pretraining keeps no ids; albef_to_vlp fills -100
        expected.remove("objectives.itc.idx_queue")
    assert set(mapped) == expected
    if layout == "lavis":  # no token types: a zero table adds nothing, as LAVIS adds nothing
        assert any("token_type_embeddings" in n for n in report.notes)
        tt = model.text_encoder.model.embeddings.token_type_embeddings.weight
        assert torch.equal(tt, torch.zeros_like(tt))


def test_mapping_spot_checks(pretrain_ckpt):
    mapped, _ = map_albef_keys({"model": pretrain_ckpt})  # checkpoint wrapper accepted, fusion layer inferred
    F_ = CFG.fusion_layer
    layer = f"text_encoder.bert.encoder.layer.{F_}."
    q, k, v = (pretrain_ckpt[f"{layer}attention.self.{n}.weight"] for n in ("query", "key", "value"))
    assert torch.equal(mapped["fusion.blocks.0.attn.qkv.weight"], torch.cat([q, k, v]))
    xk, xv = (pretrain_ckpt[f"{layer}crossattention.self.{n}.weight"] for n in ("key", "value"))
    assert torch.equal(mapped["fusion.blocks.0.cross_attn.kv.weight"], torch.cat([xk, xv]))
    assert mapped["fusion.blocks.0.cross_attn.kv.weight"].shape == (2 * CFG.text_width, CFG.vision_width)
    assert torch.equal(
        mapped["text_encoder_m.model.encoder.layer.1.output.LayerNorm.bias"],
        pretrain_ckpt["text_encoder_m.bert.encoder.layer.1.output.LayerNorm.bias"],
    )
    assert torch.equal(
        mapped["image_encoder_m.model.blocks.1.attn.qkv.weight"],
        pretrain_ckpt["visual_encoder_m.blocks.1.attn.qkv.weight"],
    )
    assert torch.equal(
        mapped["objectives.mlm.head_m.norm.weight"],
        pretrain_ckpt["text_encoder_m.cls.predictions.transform.LayerNorm.weight"],
    )
    assert torch.equal(mapped["image_proj.weight"], pretrain_ckpt["vision_proj.weight"])
    assert mapped["objectives.itc.logit_scale"].item() == pytest.approx(
        -torch.log(pretrain_ckpt["temp"]).item(), rel=1e-6
    )
    with pytest.raises(CheckpointError, match="first cross-attention layer is 2"):
        map_albef_keys(pretrain_ckpt, fusion_layer=3)


def test_retrieval_idx_queue_is_flattened(retrieval_ckpt):
    mapped, _ = map_albef_keys(retrieval_ckpt)
    assert retrieval_ckpt["idx_queue"].shape == (1, CFG.queue_size)
    assert torch.equal(mapped["objectives.itc.idx_queue"], retrieval_ckpt["idx_queue"][0])


# -- (b) round trips ----------------------------------------------------------------------
def _assert_same_state(a: dict, b: dict, approx: tuple[str, ...]) -> None:
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:10]
    for k in a:
        if k in approx:  # temp -> logit_scale = log(1/temp) -> temp through float64: within one float32 ulp
            torch.testing.assert_close(a[k], b[k], rtol=2**-23, atol=0)
        else:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_round_trip_vlp_albef_vlp(converted):
    model, _ = converted
    other = tiny_vlp(objectives=("itm", "itc", "mlm"))  # another objective order: names, not positions
    report = albef_to_vlp(vlp_to_albef(model), other)
    assert report.ok and report.unused == {} and not report.warnings, report.summary()
    # heads are keyed by name in both, whatever the order; logit_scale -> temp -> logit_scale
    # through float64 comes back exactly (temp -> logit_scale -> temp may not)
    _assert_same_state(model.state_dict(), other.state_dict(), approx=())


@pytest.mark.parametrize("layout", ["pretrain", "retrieval"])
def test_round_trip_albef_vlp_albef(layout, pretrain_ckpt, retrieval_ckpt):
    ckpt = pretrain_ckpt if layout == "pretrain" else retrieval_ckpt
    model = tiny_vlp(objectives=ALL if layout == "pretrain" else ("itc", "itm"))
    albef_to_vlp(ckpt, model)
    _assert_same_state(vlp_to_albef(model, layout), ckpt, approx=("temp",))


# -- (c) parity with the reference ALBEF --------------------------------------------------
def vlp_outputs(model, image, ids, mask, masked, *, momentum: bool = False) -> dict[str, torch.Tensor]:
    """The vlp model's ITC similarities, ITM logits and MLM logits, through its own API."""
    obj = by_name(model)
    mask = mask.bool()
    image_tokens, image_feat = model.encode_image(image, momentum=momentum)  # (B, Li, Dv), (B, E)
    text_tokens, text_feat = model.encode_text(ids, mask, momentum=momentum)  # (B, L, Dt), (B, E)
    out = {}
    if "itc" in obj:
        scale = obj["itc"].scale()
        out["sim_i2t"], out["sim_t2i"] = scale * image_feat @ text_feat.T, scale * text_feat @ image_feat.T
    fused = model.fuse(text_tokens, mask, image_tokens, momentum=momentum)  # (B, L, Dt)
    out["itm"] = obj["itm"].head(fused[:, 0])  # (B, 2)
    if "mlm" in obj:
        hidden = model.mlm_hidden(masked, mask, image_tokens, momentum=momentum)  # (B, L, Dt)
        head = obj["mlm"].head_m if momentum else obj["mlm"].head
        out["mlm"] = head(hidden, model.word_embeddings(momentum=momentum))  # (B, L, V)
    return out


def ref_outputs(ref: ALBEFReference, image, ids, mask, masked) -> dict[str, torch.Tensor]:
    out = {}
    out["sim_i2t"], out["sim_t2i"] = ref.itc_sims(image, ids, mask)
    out["itm"] = ref.itm_logits(image, ids, mask)
    if ref.mlm_head is not None:
        out["mlm"] = ref.mlm_logits(image, masked, mask)
    return out


@pytest.mark.parametrize("momentum", [False, True], ids=["online", "momentum"])
def test_parity_with_reference(converted, pretrain_ckpt, momentum):
    model, _ = converted
    ref = ALBEFReference.from_albef_state(pretrain_ckpt, CFG, momentum=momentum)
    batch = inputs()
    with torch.no_grad():
        got, want = vlp_outputs(model, *batch, momentum=momentum), ref_outputs(ref, *batch)
    assert set(got) == set(want) == {"sim_i2t", "sim_t2i", "itm", "mlm"}
    for name in want:
        assert want[name].abs().max() > 0.1, name  # not a degenerate comparison
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    if not momentum:  # the ITM score of the retrieval re-ranking
        image, ids, mask = batch[0], batch[1], batch[2].bool()
        with torch.no_grad():
            fused = model.fuse(model.encode_text(ids, mask)[0], mask, model.encode_image(image)[0])  # (B, L, Dt)
            score = by_name(model)["itm"].score(fused[:, 0])  # (B,)
        torch.testing.assert_close(score, want["itm"][:, 1], rtol=1e-5, atol=1e-5)


def test_parity_retrieval_checkpoint(retrieval_ckpt):
    model = tiny_vlp(objectives=("itc", "itm"))
    assert albef_to_vlp(retrieval_ckpt, model).ok
    ref = ALBEFReference.from_albef_state(retrieval_ckpt, CFG)
    batch = inputs(seed=1)
    with torch.no_grad():
        got, want = vlp_outputs(model, *batch), ref_outputs(ref, *batch)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5)


# -- (d) unknown, missing, unused keys ------------------------------------------------------
def test_unknown_keys_are_listed_not_ignored(pretrain_ckpt):
    ckpt = dict(pretrain_ckpt)
    ckpt["visual_encoder.head.weight"] = torch.zeros(10, CFG.vision_width)
    ckpt["text_encoder.bert.encoder.layer.0.attention.self.distance_embedding.weight"] = torch.zeros(3, 3)
    ckpt["text_encoder.bert.encoder.layer.0.crossattention.self.query.weight"] = torch.zeros(3, 3)
    ckpt["some_new_head.weight"] = torch.zeros(2)
    extra = sorted(set(ckpt) - set(pretrain_ckpt))
    assert sorted(map_albef_keys(ckpt)[1]) == extra
    report = albef_to_vlp(ckpt, tiny_vlp())
    assert sorted(report.unknown) == extra and report.missing == [] and not report.ok
    assert "UNKNOWN" in report.summary() and "some_new_head.weight" in report.summary()
    with pytest.raises(CheckpointError, match="some_new_head.weight"):
        albef_to_vlp(ckpt, tiny_vlp(), strict=True)


def test_missing_keys_are_listed(pretrain_ckpt):
    ckpt = {k: v for k, v in pretrain_ckpt.items() if not k.startswith("itm_head.")}
    model = tiny_vlp()
    report = albef_to_vlp(ckpt, model)
    i = "itm"
    assert report.missing == [f"objectives.{i}.head.weight", f"objectives.{i}.head.bias"]
    assert "MISSING" in report.summary()
    with pytest.raises(CheckpointError, match="head.weight"):
        albef_to_vlp(ckpt, tiny_vlp(), strict=True)


def test_absent_momentum_copies_start_from_the_online_weights(pretrain_ckpt):
    ckpt = {k: v for k, v in pretrain_ckpt.items() if not k.split(".")[0].endswith("_m")}
    model = tiny_vlp()
    report = albef_to_vlp(ckpt, model)
    assert report.ok, report.summary()
    mlm = "mlm"
    assert report.momentum_copied == sorted(
        ["fusion_m", "image_encoder_m", "image_proj_m", "text_encoder_m", "text_proj_m", f"objectives.{mlm}.head_m"]
    )
    for a, b in model.momentum_pairs():
        for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
            assert torch.equal(p, q), name


def test_unused_components_are_reported(pretrain_ckpt):
    model = tiny_vlp(objectives=("itm",), use_momentum=False)
    report = albef_to_vlp(pretrain_ckpt, model)
    assert report.ok  # everything the model has is filled
    reasons = set(report.unused.values())
    assert "the model has no 'mlm' objective" in reasons and "the model has no 'itc' objective" in reasons
    assert any(k.startswith("fusion_m.") for k in report.unused)
    assert {report.unused[k] for k in report.unused if k.startswith("image_encoder_m.")} == {
        "the model has no momentum copies (use_momentum: false)"
    }


def test_untied_decoder_and_shape_errors(pretrain_ckpt):
    ckpt = dict(pretrain_ckpt)
    ckpt["text_encoder.cls.predictions.decoder.weight"] = ckpt["text_encoder.cls.predictions.decoder.weight"] + 1
    report = albef_to_vlp(ckpt, tiny_vlp())
    assert any("not equal to the word embeddings" in w for w in report.warnings)
    with pytest.raises(CheckpointError, match=r"word_embeddings\.weight: checkpoint \(120, 32\), model \(60, 32\)"):
        albef_to_vlp(pretrain_ckpt, tiny_vlp(dataclasses.replace(CFG, vocab_size=60)))
    with pytest.raises(CheckpointError, match="4 BERT layers"):
        albef_to_vlp(pretrain_ckpt, tiny_vlp(dataclasses.replace(CFG, num_layers=3)))


def test_queue_of_another_size_is_dropped(pretrain_ckpt):
    model = tiny_vlp(dataclasses.replace(CFG, queue_size=4))
    before = {k: v.clone() for k, v in model.state_dict().items() if "queue" in k}
    report = albef_to_vlp(pretrain_ckpt, model)
    assert {k.rsplit(".", 1)[1] for k in report.dropped if k.startswith("objectives.")} == {
        "image_queue",
        "text_queue",
        "queue_ptr",
    }
    for k, v in model.state_dict().items():
        if "queue" in k:
            assert torch.equal(v, before[k]), k


# -- (e) the CLI -------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_cli_writes_a_file_that_loads_into_the_model(tmp_path, pretrain_ckpt, converted, capsys, suffix):
    src = tmp_path / "ALBEF.pth"
    torch.save({"model": pretrain_ckpt, "epoch": 29, "config": {"image_res": 32}}, src)
    recipe = tmp_path / "tiny_albef.yaml"
    recipe.write_text(yaml.safe_dump({"seed_everything": 0, "model": tiny_recipe(objectives=("mlm", "itc", "itm"))}))
    out = tmp_path / f"out/albef_vlp{suffix}"
    report = cli_main(["convert", "albef", str(src), "--out", str(out), "--config", str(recipe), "--strict"])
    assert report.ok and out.is_file()
    printed = capsys.readouterr().out
    assert "OK: every checkpoint key known" in printed and "dropped on purpose" in printed
    model = tiny_vlp(objectives=("mlm", "itc", "itm"))
    model.load_state_dict(load_state_dict(out), strict=True)
    _assert_same_state(model.state_dict(), converted[0].state_dict(), approx=())


def test_cli_infers_the_model_from_the_checkpoint(tmp_path, retrieval_ckpt, capsys):
    src = tmp_path / "ALBEF_retrieval.pth"
    torch.save(retrieval_ckpt, src)  # a bare state dict
    out = tmp_path / "albef.safetensors"
    report = cli_main(["convert", "albef", str(src), "--out", str(out), "--head-dim", "16"])
    assert report.ok, report.summary()
    assert "recipe section" in capsys.readouterr().out
    assert report.recipe == albef_recipe_from_state(retrieval_ckpt, head_dim=16)
    assert [o["class_path"].rsplit(".", 1)[1] for o in report.recipe["init_args"]["objectives"]] == [
        "MomentumITC",
        "ITM",
    ]
    model = build_albef(report.recipe).eval()
    model.load_state_dict(load_state_dict(out), strict=True)
    ref = ALBEFReference.from_albef_state(retrieval_ckpt, CFG)
    batch = inputs()
    with torch.no_grad():
        torch.testing.assert_close(vlp_outputs(model, *batch)["itm"], ref.itm_logits(*batch[:3]), rtol=1e-5, atol=1e-5)


def test_cli_errors_name_the_file(tmp_path, capsys):
    bad = tmp_path / "not_a_checkpoint.pth"
    bad.write_bytes(b"garbage")
    with pytest.raises(SystemExit) as e:
        cli_main(["convert", "albef", str(bad), "--out", str(tmp_path / "x.safetensors")])
    assert e.value.code == 2
    assert "not_a_checkpoint.pth" in capsys.readouterr().err
    torch.save({"model": {"foo.weight": torch.zeros(2)}}, bad)
    with pytest.raises(CheckpointError, match=r"not_a_checkpoint\.pth: the checkpoint has 0 BERT layers"):
        convert_albef(bad, tmp_path / "x.safetensors", tiny_vlp())


# -- (f) position-embedding interpolation ---------------------------------------------------
def test_pos_embed_is_interpolated_to_the_model_grid():
    big = dataclasses.replace(CFG, image_size=48)  # a 6x6 grid, e.g. ALBEF fine-tuned at 384 px
    ckpt = make_albef_checkpoint(big, seed=2)
    model = tiny_vlp(CFG)  # a 4x4 grid
    report = albef_to_vlp(ckpt, model)
    assert report.ok
    assert report.interpolated == [
        f"image_encoder{s}.model.pos_embed: 6x6 -> 4x4 patches (bicubic, prefix tokens kept)" for s in ("", "_m")
    ]
    for s in ("", "_m"):
        src = ckpt[f"visual_encoder{s}.pos_embed"]  # (1, 1 + 36, D)
        grid = src[:, 1:].reshape(1, 6, 6, -1).permute(0, 3, 1, 2)  # (1, D, 6, 6)
        want = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
        got = getattr(model, f"image_encoder{s}").model.pos_embed  # (1, 1 + 16, D)
        assert torch.equal(got[:, :1], src[:, :1])
        torch.testing.assert_close(got[:, 1:], want, rtol=0, atol=1e-6)
    # and the other way, as when fine-tuning a 256 px checkpoint at 384 px
    assert (
        albef_to_vlp(make_albef_checkpoint(CFG), tiny_vlp(CFG, image_size=48))
        .interpolated[0]
        .endswith("4x4 -> 6x6 patches (bicubic, prefix tokens kept)")
    )
