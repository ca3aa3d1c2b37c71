"""``vlp convert flava``: transformers' ``FlavaForPreTraining`` and TorchMultimodal's
``flava_model_for_pretraining`` layouts (the latter written from a vlp model by the inverse
mapping: no TorchMultimodal install needed), the model inferred from a checkpoint's shapes,
bad input, and the CLI end to end (its output loads with ``init_from``)."""

from __future__ import annotations

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")

from vlp.cli import cli_main  # noqa: E402
from vlp.convert.common import build_model  # noqa: E402
from vlp.convert.flava import (  # noqa: E402
    convert_flava,
    flava_layout,
    flava_recipe_from_state,
    flava_to_vlp,
    hf_to_tmm_keys,
    read_flava_checkpoint,
    tmm_to_hf_keys,
    vlp_to_flava,
)
from vlp.errors import CheckpointError  # noqa: E402
from vlp.models import FLAVA  # noqa: E402

D, HEADS, IMAGE, PATCH, TEXT_VOCAB, IMAGE_VOCAB, MAXLEN, EMBED = 32, 4, 32, 8, 90, 40, 16, 24
HEAD_DIM = D // HEADS


def hf_flava() -> torch.nn.Module:
    tower = dict(hidden_size=D, num_attention_heads=HEADS, intermediate_size=4 * D)
    config = transformers.FlavaConfig(
        image_config=dict(tower, num_hidden_layers=2, image_size=IMAGE, patch_size=PATCH, vocab_size=IMAGE_VOCAB),
        text_config=dict(tower, num_hidden_layers=3, vocab_size=TEXT_VOCAB, max_position_embeddings=MAXLEN),
        multimodal_config=dict(tower, num_hidden_layers=1),
        hidden_size=D,
        projection_dim=EMBED,
        init_codebook=False,
    )
    torch.manual_seed(0)
    model = transformers.FlavaForPreTraining(config).eval()
    with torch.no_grad():  # distinct values everywhere, so that a swapped tensor shows
        for p in model.parameters():
            p.normal_()
    return model


@pytest.fixture(scope="module")
def hf_state() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in hf_flava().state_dict().items()}


def recipe(layout: str = "transformers") -> dict:
    """The model section :func:`flava_recipe_from_state` should infer (by hand)."""
    tower = {"num_heads": HEADS, "mlp_ratio": 4.0, "norm_eps": 1e-12}
    eps = 1e-5 if layout == "torchmultimodal" else 1e-12

    def obj(cls, **args):
        return {"class_path": f"vlp.objectives.{cls}", "init_args": args}

    mlm = dict(dim=D, vocab_size=TEXT_VOCAB, distill=False, tie_weights=False)
    return {
        "class_path": "vlp.models.FLAVA",
        "init_args": {
            "image_encoder": {
                "class_path": "vlp.encoders.ViTEncoder",
                "init_args": {"image_size": IMAGE, "patch_size": PATCH, "dim": D, "depth": 2, **tower},
            },
            "text_encoder": {
                "class_path": "vlp.encoders.TransformerTextEncoder",
                "init_args": {"vocab_size": TEXT_VOCAB, "max_length": MAXLEN, "dim": D, "depth": 3, **tower}
                | {"type_vocab_size": 2},
            },
            "fusion": {
                "class_path": "vlp.encoders.MultimodalEncoder",
                "init_args": {"dim": D, "depth": 1, **tower},
            },
            "objectives": [
                obj("ITC", name="global_contrastive", min_temperature=0.01, max_temperature=1.0),
                obj("CodebookMIM", name="mim", modalities=["image"], vocab_size=IMAGE_VOCAB, norm_eps=eps),
                obj("MLM", name="mlm", modalities=["text"], **mlm),
                obj("CodebookMIM", name="mmm_image", modalities=["pair"], vocab_size=IMAGE_VOCAB, norm_eps=eps),
                obj("MLM", name="mmm_text", modalities=["pair"], **mlm),
                obj("ITM", hard_negatives=False, pooler=True),
            ],
            "embed_dim": EMBED,
        },
    }


@pytest.fixture(scope="module")
def converted(hf_state) -> FLAVA:
    """The vlp FLAVA filled from the transformers checkpoint."""
    model = build_model(FLAVA, recipe())
    report = flava_to_vlp(hf_state, model)
    assert report.ok, report.summary()
    return model


def fresh() -> FLAVA:
    torch.manual_seed(1)
    return build_model(FLAVA, recipe())


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    differ = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not differ, differ


# -- layouts ------------------------------------------------------------------------------
def test_recipe_is_inferred_from_the_checkpoint_shapes(hf_state):
    assert flava_recipe_from_state(hf_state, head_dim=HEAD_DIM) == recipe()
    tmm = hf_to_tmm_keys(hf_state)
    assert flava_recipe_from_state(tmm, head_dim=HEAD_DIM) == recipe("torchmultimodal")
    with pytest.raises(CheckpointError, match="width 32 is not a multiple of head_dim 64; pass --head-dim"):
        flava_recipe_from_state(hf_state)


def test_objectives_follow_the_heads_in_the_checkpoint(hf_state):
    heads = ("mim_head.", "mmm_text_head.", "itm_head.pooler.")
    state = {k: v for k, v in hf_state.items() if not k.startswith(heads)}
    names = [o["init_args"].get("name") for o in flava_recipe_from_state(state, head_dim=8)["init_args"]["objectives"]]
    assert names == ["global_contrastive", "mlm", "mmm_image", None]
    itm = flava_recipe_from_state(state, head_dim=8)["init_args"]["objectives"][-1]
    assert itm == {"class_path": "vlp.objectives.ITM", "init_args": {"hard_negatives": False, "pooler": False}}


def test_the_transformers_checkpoint_fills_every_weight(hf_state, converted):
    report = flava_to_vlp(hf_state, fresh())
    assert report.unknown == [] and report.missing == []
    assert set(report.unused) == {k for k in hf_state if ".pooler." in k and "itm_head" not in k}
    assert set(report.dropped) == {f"{h}_head.bias" for h in ("mim", "mlm", "mmm_image", "mmm_text")}
    own = converted.state_dict()  # spot checks: the head named by instance, fused qkv, the ITC scale
    assert torch.equal(own["objectives.mmm_image.head.decoder"], hf_state["mmm_image_head.decoder.weight"])
    assert torch.equal(own["objectives.mim.head.decoder"], hf_state["mim_head.decoder.weight"])
    assert torch.equal(own["objectives.global_contrastive.logit_scale"], hf_state["flava.logit_scale"])
    assert torch.equal(own["objectives.itm.head.0.weight"], hf_state["itm_head.pooler.dense.weight"])
    qkv = own["fusion.blocks.0.attn.qkv.weight"]
    assert torch.equal(
        qkv[D : 2 * D], hf_state["flava.multimodal_model.encoder.layer.0.attention.attention.key.weight"]
    )


def test_vlp_to_transformers_is_the_inverse(hf_state, converted):
    back = vlp_to_flava(converted, "transformers")
    assert set(back) == {k for k in hf_state if ".pooler." not in k or k.startswith("itm_head.")}
    assert all(torch.equal(back[k], hf_state[k]) for k in back)


#: TorchMultimodal's names for a few of the tiny model's keys (flava_model_for_pretraining)
TMM_KEYS = [
    "model.image_encoder.embeddings.cls_token",
    "model.image_encoder.embeddings.mask_token",
    "model.image_encoder.embeddings.patch_embeddings.projection.weight",
    "model.image_encoder.encoder.layer.1.attention.query.weight",
    "model.image_encoder.encoder.layer.1.attention.output.bias",
    "model.image_encoder.encoder.layer.0.feedforward.model.0.weight",
    "model.image_encoder.encoder.layer.0.feedforward.model.2.bias",
    "model.image_encoder.encoder.layer.0.attention_layernorm.weight",
    "model.image_encoder.encoder.layer.0.feedforward_layernorm.bias",
    "model.image_encoder.layernorm.weight",
    "model.text_encoder.embeddings.word_embeddings.weight",
    "model.text_encoder.embeddings.layer_norm.bias",
    "model.text_encoder.encoder.layer.2.attention.value.bias",
    "model.mm_encoder.cls_token",
    "model.mm_encoder.encoder.layer.0.attention.key.weight",
    "model.mm_encoder.layernorm.bias",
    "model.image_to_mm_projection.weight",
    "model.text_projection.bias",
    "loss.contrastive_loss.logit_scale",
    "loss.mlm_loss.cls.dense.weight",
    "loss.mim_loss.cls.layer_norm.weight",
    "loss.mmm_loss.mlm.cls.decoder.weight",
    "loss.mmm_loss.mim.cls.decoder.bias",
    "loss.mmm_loss.mim.cls.bias",
    "loss.itm_loss.pooler.dense.weight",
    "loss.itm_loss.cls.seq_relationship.bias",
]


def test_torchmultimodal_layout_round_trip(converted):
    tmm = vlp_to_flava(converted, "torchmultimodal")
    assert flava_layout(tmm) == "torchmultimodal"
    assert set(TMM_KEYS) <= set(tmm)
    assert all(k.startswith(("model.", "loss.")) for k in tmm)
    # 2+3+1 layers x 16 tensors, embeddings 5+5, final norms 6, mm CLS, 4 projections x 2,
    # logit scale, 4 heads x 7 (bias and the tied decoder.bias), ITM 4
    assert len(tmm) == 6 * 16 + 10 + 6 + 1 + 8 + 1 + 4 * 7 + 4
    own = converted.state_dict()
    assert tmm["model.image_encoder.embeddings.mask_token"].shape == (1, 1, D)
    assert torch.equal(
        tmm["model.text_encoder.encoder.layer.2.attention.value.bias"],
        own["text_encoder.transformer.blocks.2.attn.qkv.bias"][2 * D :],
    )
    assert torch.equal(tmm["loss.mmm_loss.mim.cls.bias"], tmm["loss.mmm_loss.mim.cls.decoder.bias"])
    model = fresh()
    report = flava_to_vlp(tmm, model)
    assert report.unknown == [] and report.missing == [], report.summary()
    assert any("TorchMultimodal layout" in n for n in report.notes)
    assert "loss.mim_loss.cls.bias" in report.dropped
    same_weights(model, converted)
    renamed, origin, left = tmm_to_hf_keys(tmm)
    assert left == {} and origin["flava.multimodal_model.cls_token"] == "model.mm_encoder.cls_token"


def test_transformers_and_torchmultimodal_checkpoints_give_the_same_model(hf_state, converted):
    """The same weights in TorchMultimodal's names (the towers' poolers included) load into
    the same vlp weights as the transformers checkpoint; so does a bare FLAVAModel / FlavaModel
    (the encoders without the heads), and a TorchMultimodal MLP built with dropout (model.3)."""
    tmm = hf_to_tmm_keys(hf_state)
    assert "model.text_encoder.pooler.dense.weight" in tmm
    model = fresh()
    report = flava_to_vlp(tmm, model)
    assert report.ok and set(report.unused) == {k for k in tmm if ".pooler." in k and "itm_loss" not in k}
    same_weights(model, converted)

    dropout = {k.replace("feedforward.model.2.", "feedforward.model.3."): v for k, v in tmm.items()}
    model = fresh()
    assert flava_to_vlp(dropout, model).ok
    same_weights(model, converted)

    encoders = converted.state_dict()
    heads = [k for k in encoders if k.startswith("objectives.")]
    for bare in (
        {k[len("model.") :]: v for k, v in tmm.items() if k.startswith("model.")},
        {k[len("flava.") :]: v for k, v in hf_state.items() if k.startswith("flava.") and k != "flava.logit_scale"},
    ):
        model = fresh()
        report = flava_to_vlp(bare, model)
        assert report.unknown == [] and report.missing == sorted(heads)  # the heads and the ITC scale
        own = model.state_dict()
        assert all(torch.equal(own[k], encoders[k]) for k in report.loaded)


# -- bad input ----------------------------------------------------------------------------
def albef_state() -> dict[str, torch.Tensor]:
    return {
        "visual_encoder.cls_token": torch.zeros(1, 1, 8),
        "visual_encoder.patch_embed.proj.weight": torch.zeros(8, 3, 4, 4),
        "text_encoder.embeddings.word_embeddings.weight": torch.zeros(10, 8),
        "text_encoder.encoder.layer.0.attention.self.query.weight": torch.zeros(8, 8),
        "vision_proj.weight": torch.zeros(4, 8),
        "temp": torch.tensor(0.07),
    }


def test_an_albef_checkpoint_is_not_a_flava_checkpoint(tmp_path, capsys):
    src, out = tmp_path / "albef_4m.pth", tmp_path / "out.safetensors"
    torch.save({"model": albef_state()}, src)
    with pytest.raises(CheckpointError, match=r"albef_4m\.pth: not a FLAVA checkpoint.*begin: visual_encoder"):
        convert_flava(src, out, head_dim=8)
    with pytest.raises(CheckpointError, match=r"albef_4m\.pth: not a FLAVA checkpoint"):
        convert_flava(src, out, fresh())
    assert not out.exists()
    with pytest.raises(SystemExit) as e:
        cli_main(["convert", "flava", str(src), "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "albef_4m.pth" in err and "not a FLAVA checkpoint" in err


def test_unknown_keys_are_listed_and_strict_refuses_them(tmp_path, hf_state):
    hf = {**hf_state, "flava.image_model.adapter.weight": torch.zeros(2)}
    report = flava_to_vlp(hf, fresh())
    assert report.unknown == ["flava.image_model.adapter.weight"] and not report.ok
    assert "UNKNOWN checkpoint keys (1): flava.image_model.adapter.weight" in report.summary()
    tmm = {
        **hf_to_tmm_keys(hf_state),
        "loss.distill_loss.proj.weight": torch.zeros(2),
        "model.mm_encoder.gate": torch.zeros(1),
    }
    report = flava_to_vlp(tmm, fresh())
    assert report.unknown == ["loss.distill_loss.proj.weight", "model.mm_encoder.gate"]  # in the checkpoint's names
    src, out = tmp_path / "tmm.pt", tmp_path / "out.pt"
    torch.save(tmm, src)
    assert not convert_flava(src, out, head_dim=HEAD_DIM).ok and out.is_file()
    out.unlink()
    with pytest.raises(CheckpointError, match=r"(?s)strict.*UNKNOWN checkpoint keys \(2\): loss\.distill_loss"):
        convert_flava(src, out, head_dim=HEAD_DIM, strict=True)
    assert not out.exists()


def test_missing_weights_are_listed_and_strict_refuses_them(tmp_path, hf_state):
    gone = ("flava.multimodal_model.cls_token", "flava.text_model.layernorm.weight")
    report = flava_to_vlp({k: v for k, v in hf_state.items() if k not in gone}, fresh())
    assert report.missing == ["fusion_cls", "text_encoder.transformer.norm.weight"] and not report.ok
    assert "MISSING model keys, left at their initial values (2): fusion_cls" in report.summary()
    src, out = tmp_path / "flava.safetensors", tmp_path / "out.safetensors"
    from safetensors.torch import save_file

    save_file({k: v for k, v in hf_state.items() if k != "flava.multimodal_model.cls_token"}, src)
    with pytest.raises(CheckpointError, match=r"(?s)strict.*MISSING model keys.*fusion_cls"):
        convert_flava(src, out, head_dim=HEAD_DIM, strict=True)
    assert not out.exists()


def test_a_tower_missing_part_of_qkv_is_an_error(hf_state):
    hf = {k: v for k, v in hf_state.items() if k != "flava.text_model.encoder.layer.1.attention.attention.key.weight"}
    with pytest.raises(
        CheckpointError, match=r"text_encoder\.transformer\.blocks\.1\.attn\.qkv\.weight.*\['query', 'value'\]"
    ):
        flava_to_vlp(hf, fresh())


class Payload:
    """An arbitrary pickled object: a weights-only load refuses it."""


def test_checkpoints_are_read_as_weights_only(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "hook": Payload()}, evil)
    with pytest.raises(CheckpointError, match=r"evil\.pt with weights_only=True: it pickles .*\.Payload"):
        read_flava_checkpoint(str(evil))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match=r"cannot read safetensors file .*garbage\.safetensors"):
        read_flava_checkpoint(str(garbage))
    with pytest.raises(CheckpointError, match="checkpoint not found: .*absent.pt"):
        read_flava_checkpoint(str(tmp_path / "absent.pt"))


def test_a_model_of_other_sizes_is_refused_with_the_key(hf_state):
    other = recipe()
    other["init_args"]["embed_dim"] = 16
    with pytest.raises(
        CheckpointError, match=r"image_proj\.weight: the checkpoint's tensor is \(24, 32\), the model's \(16, 32\)"
    ):
        flava_to_vlp(hf_state, build_model(FLAVA, other))


# -- the CLI ------------------------------------------------------------------------------
def printed_recipe(text: str) -> dict:
    section = text.split("its recipe section (add the objectives' settings you need):\n", 1)[1]
    return yaml.safe_load(section.split("\nwrote ", 1)[0])["model"]


@pytest.mark.parametrize("layout", ["transformers", "torchmultimodal"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_cli_infers_the_model_and_its_output_loads_with_init_from(
    tmp_path, hf_state, converted, capsys, suffix, layout
):
    state = hf_state if layout == "transformers" else hf_to_tmm_keys(hf_state)
    src, out = tmp_path / f"flava{suffix}", tmp_path / "out" / f"flava_vlp{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, src)
    else:
        torch.save(state, src)
    report = cli_main(["convert", "flava", str(src), "--out", str(out), "--head-dim", str(HEAD_DIM), "--strict"])
    assert report.ok and out.is_file()
    printed = capsys.readouterr().out
    assert "OK: every checkpoint key known" in printed and f"wrote {out}" in printed
    section = printed_recipe(printed)
    assert section == recipe(layout) == report.recipe
    section["init_args"]["init_from"] = str(out)
    model = build_model(FLAVA, section)
    model.load_init_from(str(out))
    same_weights(model, converted)


def test_cli_fills_the_model_of_a_recipe(tmp_path, hf_state, converted, capsys):
    src, out = tmp_path / "flava.pt", tmp_path / "flava_vlp.pt"
    torch.save({"state_dict": hf_state}, src)
    config = tmp_path / "tiny_flava.yaml"
    config.write_text(yaml.safe_dump({"seed_everything": 0, "model": recipe()}))
    report = cli_main(["convert", "flava", str(src), "--out", str(out), "--config", str(config)])
    assert report.ok and report.recipe is None
    assert "recipe section" not in capsys.readouterr().out
    section = recipe()
    section["init_args"]["init_from"] = str(out)
    model = build_model(FLAVA, section)
    model.load_init_from(str(out))
    same_weights(model, converted)
