"""Every recipe and every ablation override parses (keys, types, class paths) without
building anything, and the tiny ablations build a model with the intended objectives that
takes a training step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser

from vlp.cli import cli_main
from vlp.models import ALBEF, VLPModule

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if "ablations" not in p.parts)
ABLATIONS = sorted((REPO / "recipes" / "ablations").glob("*.yaml"))


def _base_of(ablation: Path) -> Path:
    if ablation.name.startswith("flamingo"):
        return REPO / "recipes" / ("tiny/flamingo.yaml" if "_tiny_" in ablation.name else "flamingo_3b.yaml")
    if ablation.name.startswith("flava"):
        if ablation.name.endswith("_vqa.yaml"):
            return REPO / "recipes/finetune/tiny_flava_vqa.yaml"
        return REPO / "recipes" / ("tiny/flava.yaml" if "_tiny_" in ablation.name else "flava_full.yaml")
    if ablation.name.startswith("meter"):
        if ablation.name.endswith("_vqa.yaml"):
            return REPO / "recipes/finetune/tiny_meter_vqa.yaml"
        return REPO / "recipes" / ("tiny/meter.yaml" if "_tiny_" in ablation.name else "meter_clip16_roberta.yaml")
    return REPO / "recipes" / ("tiny/albef.yaml" if "_tiny_" in ablation.name else "albef_4m.yaml")


#: recipes that go over another one (``--config BASE --config OVERLAY``)
OVERLAYS = {"tiny/flamingo_clip.yaml": "tiny/clip.yaml", "tiny/flamingo_rices.yaml": "tiny/flamingo.yaml"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_recipe_parses(recipe, capsys):
    base = OVERLAYS.get(str(recipe.relative_to(REPO / "recipes")))
    configs = ["--config", str(REPO / "recipes" / base)] if base else []
    with pytest.raises(SystemExit) as e:
        cli_main(["fit", *configs, "--config", str(recipe), "--print_config"])
    assert e.value.code in (0, None)
    assert "class_path" in capsys.readouterr().out


def pair_batch() -> dict:
    """4 pairs at the tiny recipes' sizes (64 px, 4x4 patches), MLM- and MIM-masked."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (4, 9), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    labels = torch.full_like(ids, -100)
    labels[:, 3] = ids[:, 3]
    return {
        "modality": "pair",
        "image": torch.randn(4, 3, 64, 64, generator=g),
        "text_ids": ids,
        "text_mask": torch.ones_like(ids),
        "image_id": torch.arange(4),
        "text_image_id": torch.arange(4),
        "mlm_input_ids": ids.masked_fill(labels != -100, 103),
        "mlm_labels": labels,
        "image_mask": torch.rand(4, 16, generator=g) < 0.4,  # PatchMasker's key (MIM)
    }


@pytest.mark.parametrize("ablation", ABLATIONS, ids=lambda p: p.name)
def test_ablation_stacks_on_its_base(ablation, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["fit", "--config", str(_base_of(ablation)), "--config", str(ablation), "--print_config"])
    assert e.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    model = printed["model"]["init_args"]
    names = [o["class_path"].rsplit(".", 1)[1] for o in model["objectives"]]
    encdec = "_encdec" in ablation.name
    if ablation.name.startswith("flava") and ablation.name.endswith("_vqa.yaml"):
        assert names == ["VQA"] and model["init_from"] == "runs/tiny_flava_c/checkpoints/last.ckpt"
    elif ablation.name.endswith("_vqa.yaml"):
        pretrained = "tiny_meter_encdec" if encdec else "tiny_meter_merged"
        assert names == (["GenerativeVQA"] if encdec else ["VQA"])
        assert model["init_from"].endswith(f"{pretrained}/checkpoints/last.ckpt")
    elif encdec:
        assert names == ["DenoisingLM", "GenerativeITM"]
    if ablation.name.startswith("meter"):
        assert (model.get("decoder") is not None) == encdec
        assert ("ITC" in names) == ("_itc" in ablation.name)
        keeps_objectives = ablation.name.endswith(("_merged.yaml", "_swin_roberta.yaml"))
        assert ("ITM" in names) == ("_itm" in ablation.name or keeps_objectives)
        swin = model["image_encoder"]["init_args"].get("name", "").startswith("swin")
        assert swin == ("_swin" in ablation.name)
        if swin:  # METER's Swin setting: the average token in front, 384 px, ImageNet statistics
            assert model["image_encoder"]["init_args"]["prepend_pooled"] is True
            assert printed["data"]["init_args"]["image_size"] == 384
        assert ("MIM" in names) == ("_mim" in ablation.name)
        assert model["fusion"]["class_path"].endswith("MergedAttentionFusion") == ("merged" in ablation.name)
    elif ablation.name.endswith("_masked_contrastive.yaml"):  # full FLAVA, contrastive on the masked pass
        assert model["contrastive_on"] == "masked" and len(names) == 6
    elif ablation.name.startswith("flava") and not ablation.name.endswith(
        "_vqa.yaml"
    ):  # FLAVA_C: contrastive only; FLAVA_MM: + MMM + ITM, pairs only
        assert names[0] == "ITC" and (names == ["ITC"]) == ablation.name.endswith("_contrastive.yaml")
        modalities = {(o.get("init_args", {}).get("modalities") or ["pair"])[0] for o in model["objectives"]}
        assert modalities == {"pair"}
        sources = printed["data"]["init_args"]["train"]
        assert {Path(s["manifest"]).stem for s in sources} & {"shapes_image", "shapes_text", "imagenet1k"} == set()
    elif ablation.name.startswith("flamingo"):
        assert names == ["CausalLM", "CausalLM"]
        every = model.get("cross_attn_every_n_layers")
        assert every == (int(ablation.stem[-1]) if "xattn_every" in ablation.name else 1)
        assert (model.get("projection") == "linear") == ablation.name.endswith("_linear.yaml")
        assert bool(model.get("freeze_gates")) == ablation.name.endswith("_frozen_gates.yaml")
        accumulate = printed["trainer"]["accumulate_grad_batches"]
        assert (accumulate == 2) == (ablation.name.endswith("_accumulate.yaml") or "_3b_xattn" in ablation.name)
    elif not ablation.name.startswith("flava"):
        assert ("MomentumITC" in names) == ("_itc_" in ablation.name)


@pytest.mark.parametrize("ablation", [a for a in ABLATIONS if a.name.startswith("albef_tiny_")], ids=lambda p: p.name)
def test_tiny_ablations_build(ablation):
    config = yaml.safe_load((REPO / "recipes/tiny/albef.yaml").read_text())["model"]
    override = yaml.safe_load(ablation.read_text())["model"]["init_args"]
    config["init_args"].update(override)
    parser = ArgumentParser()
    parser.add_subclass_arguments(ALBEF, "model")
    model = parser.instantiate(parser.parse_object({"model": config})).model
    assert list(model.objectives) == (["itc"] if "_itc_" in ablation.name else []) + ["itm", "mlm"]
    itm, mlm = model.objectives["itm"], model.objectives["mlm"]
    assert itm.hard_negatives == ("hard" in ablation.name)
    assert mlm.distill == ablation.name.endswith("_mod.yaml")
    assert model.use_momentum == ("_itc_" in ablation.name)
    # and it trains: one step on a small batch at the recipe's widths
    b = pair_batch()
    model.train()
    loss = model.training_step(b, 0)
    assert torch.isfinite(loss)
    loss.backward()
    assert model.fusion.blocks[-1].cross_attn.q.weight.grad is not None  # ITM / MLM went through fusion
    assert mlm.head.dense.weight.grad is not None and itm.head.weight.grad is not None
    assert (model.image_proj.weight.grad is not None) == ("_itc_" in ablation.name)


def _build(recipe: Path, override: Path | None = None):
    config = yaml.safe_load(recipe.read_text())["model"]
    if override is not None:
        config["init_args"].update(yaml.safe_load(override.read_text())["model"]["init_args"])
    parser = ArgumentParser()
    parser.add_subclass_arguments(VLPModule, "model")
    return parser.instantiate(parser.parse_object({"model": config})).model


@pytest.mark.parametrize(
    "ablation",
    [a for a in ABLATIONS if a.name.startswith("meter_tiny_") and "_vqa" not in a.name],
    ids=lambda p: p.name,
)
def test_tiny_meter_ablations_build_and_train_a_step(ablation):
    base = _build(REPO / "recipes/tiny/meter.yaml")
    model = _build(REPO / "recipes/tiny/meter.yaml", ablation)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    if "merged" in ablation.name:  # merged vs co-attention at (nearly) equal size
        assert type(model.fusion).__name__ == "MergedAttentionFusion"
        assert abs(n(model.fusion) - n(base.fusion)) / n(base.fusion) < 0.1
    b = pair_batch()
    model.train()
    loss = model.training_step(b, 0)
    loss.backward()
    # MLM reads the text stream only: the last image layer and the image pooler get no gradient then
    fused = model.fusion.text_layers if ablation.name.endswith("_mlm.yaml") else model.fusion
    assert all(p.grad is not None for p in fused.parameters())
    extra = [name for name in ("itc", "mim") if f"_{name}" in ablation.name]
    assert list(model.objectives) == (
        ["mlm"]
        if ablation.name.endswith("_mlm.yaml")
        else ["dlm", "itm"]
        if "_encdec" in ablation.name
        else ["mlm", "itm", *extra]
    )
    if "_encdec" in ablation.name:
        assert all(p.grad is not None for p in model.decoder.parameters())


def test_tiny_encoder_decoder_vqa_recipe_trains_and_answers_in_words(capsys):
    model = _build(REPO / "recipes/finetune/tiny_meter_vqa.yaml", REPO / "recipes/ablations/meter_tiny_encdec_vqa.yaml")
    vqa = model.objectives["vqa"]
    assert vqa.name == "vqa" and model.text_pooler is None and vqa.max_answer_tokens == 4
    b = {**pair_batch(), "modality": "vqa", "question_type": ["color", "count", "exist", "spatial"]}
    b["answers"] = [["red"] * 10, ["2"] * 10, ["yes"] * 10, ["left"] * 10]
    model.train()
    model.training_step(b, 0).backward()
    assert all(p.grad is not None for p in model.decoder.parameters())
    model.eval()
    with torch.no_grad():
        answers = vqa.answer(model(b), model)
    assert len(answers) == 4 and all(isinstance(a, str) for a in answers)
    model.test_step(b, 0)
    model.on_test_epoch_end()
    assert set(model.results["test"]["scores"]) == {"overall", "color", "count", "exist", "spatial"}
    assert "baseline" in capsys.readouterr().out


def test_tiny_meter_retrieval_recipe_trains_and_ranks_a_subset(capsys):
    model = _build(REPO / "recipes/finetune/tiny_meter_retrieval.yaml")
    assert list(model.objectives) == ["itm", "irtr"]
    head = model.objectives["irtr"]
    assert (head.k, head.max_images, head.negatives) == (None, 100, 3)
    b = {**pair_batch(), "modality": "retrieval"}
    b["text_ids"], b["text_mask"] = b["text_ids"].repeat_interleave(2, 0), b["text_mask"].repeat_interleave(2, 0)
    b["text_image_id"] = b["image_id"].repeat_interleave(2)  # two captions per image
    model.train()
    loss = model.training_step(b, 0)
    loss.backward()
    assert model.fusion.image_layers[-1].mlp.fc1.weight.grad is not None
    model.eval()
    model.test_step(b, 0)
    model.on_test_epoch_end()
    assert set(model.results["test"]["scores"]) >= {"i2t_r1", "t2i_r10", "rmean"}
    assert "ITM over all 32 pairs" in capsys.readouterr().out


@pytest.mark.parametrize(
    "ablation", [None, *[a for a in ABLATIONS if a.name.startswith("flava_tiny_") and "_vqa" not in a.name]]
)
def test_tiny_flava_recipes_build_and_train_each_modality(ablation, tmp_path, monkeypatch):
    """The tiny FLAVA recipes build (a k-means tokenizer file written here stands for
    ``vlp data tokenizer``'s) and train a step of each modality their objectives take."""
    from vlp.tokenizers import KMeansTokenizer

    monkeypatch.setenv("VLP_DATA_ROOT", str(tmp_path))
    KMeansTokenizer.from_centroids(torch.rand(32, 48), patch_size=16, pool=4).save(
        str(tmp_path / "shapes_tokenizer.safetensors")
    )
    model = _build(REPO / "recipes/tiny/flava.yaml", ablation).train()
    pair = pair_batch()
    image = {"modality": "image", "image": pair["image"], "image_mask": pair["image_mask"]}
    text = {"modality": "text", **{k: pair[k] for k in ("text_ids", "text_mask", "mlm_input_ids", "mlm_labels")}}
    modalities = {m for o in model.objectives.values() for m in o.modalities}
    full = ablation is None or ablation.name.endswith("_masked_contrastive.yaml")  # full FLAVA's objectives
    assert modalities == ({"pair", "image", "text"} if full else {"pair"})
    assert model.contrastive_on == ("masked" if ablation is not None and full else "unmasked")
    for batch in (pair, image, text):
        if batch["modality"] not in modalities:
            continue
        model.zero_grad()
        loss = model.training_step(batch, 0)
        assert torch.isfinite(loss)
        loss.backward()
        fused = [model.fusion] if "mmm_text" in model.objectives else []  # FLAVA_C has no fused loss
        trained = {
            "pair": [model.image_encoder, model.text_encoder, model.image_proj, model.text_proj, *fused],
            "image": [model.image_encoder],
            "text": [model.text_encoder],
        }[batch["modality"]]
        assert all(p.grad is not None for m in trained for p in m.parameters())
    if ablation is None:
        assert model.objectives["mim"].head.bias.numel() == 32  # sized from the tokenizer file


def _interleaved_batch() -> dict:
    """2 documents of 2 images at the tiny Flamingo's sizes (64 px, MiniLM ids + 2 specials)."""
    from vlp.data.interleaved import lm_labels

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (2, 12), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    ids[:, [1, 6]] = 30522  # <image>
    ids[:, [5, 10]] = 30523  # <|endofchunk|>
    mask = torch.ones_like(ids, dtype=torch.bool)
    media = ids == 30522
    return {
        "modality": "interleaved",
        "images": torch.randn(2, 2, 3, 64, 64, generator=g),
        "images_mask": torch.ones(2, 2, dtype=torch.bool),
        "num_images": torch.tensor([2, 2]),
        "text_ids": ids,
        "text_mask": mask,
        "media_mask": media,
        "lm_labels": lm_labels(ids, mask, media),
    }


@pytest.mark.parametrize("ablation", [None, *[a for a in ABLATIONS if a.name.startswith("flamingo_tiny_")]])
def test_tiny_flamingo_recipes_build_and_train_a_step(ablation):
    """The tiny Flamingo recipes build (their frozen towers' weight files left out: random
    towers) and a pair and an interleaved batch train exactly the bridge."""
    from tests.helpers import MINILM
    from vlp.data import HFTokenizer

    config = yaml.safe_load((REPO / "recipes/tiny/flamingo.yaml").read_text())["model"]
    config["init_args"].update(vision_weights=None, lm_weights=None)
    if ablation is not None:
        config["init_args"].update(yaml.safe_load(ablation.read_text())["model"]["init_args"])
    parser = ArgumentParser()
    parser.add_subclass_arguments(VLPModule, "model")
    model = parser.instantiate(parser.parse_object({"model": config})).model
    model.set_tokenizer(HFTokenizer(MINILM, special_tokens=["<image>", "<|endofchunk|>"]))
    assert model.media_token_ids.tolist() == [30522, 30523]
    model.train()
    doc = _interleaved_batch()
    pair = {**{k: v[:, :1] if k in ("images", "images_mask") else v for k, v in doc.items()}, "modality": "pair"}
    pair["media_mask"] = pair["media_mask"] & (pair["media_mask"].cumsum(1) == 1)
    for batch in (pair, doc):
        model.zero_grad()
        loss = model.training_step(batch, 0)
        assert torch.isfinite(loss)
        loss.backward()
    frozen_gates = ablation is not None and ablation.name.endswith("_frozen_gates.yaml")
    for name, p in model.named_parameters():
        bridge = name.startswith(("perceiver.", "media_")) or ".gated_cross_attn_layer." in name
        assert p.requires_grad == (bridge and not (frozen_gates and name.endswith("_gate"))), name
        if p.requires_grad:
            assert p.grad is not None, name


def test_the_fsdp_recipe_wraps_every_flamingo_layer():
    from typing import Union

    from lightning.pytorch.strategies import Strategy

    from vlp.models.flamingo import FlamingoLayer

    strategy = yaml.safe_load((REPO / "recipes/flamingo_9b.yaml").read_text())["trainer"]["strategy"]
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Union[str, Strategy])  # noqa: UP007 (jsonargparse's typing)
    built = parser.instantiate(parser.parse_object({"strategy": strategy})).strategy
    assert type(built).__name__ == "FSDPStrategy"
    policy = built.kwargs["auto_wrap_policy"]
    assert FlamingoLayer in policy._module_classes
    assert built.kwargs["use_orig_params"] is True  # units hold frozen and trained tensors
