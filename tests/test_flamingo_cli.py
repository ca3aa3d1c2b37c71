"""Flamingo-lite through the `vlp` command on a small shapes set: pretrain the LM on the
captions (`train_lm`), train the bridge on pairs + interleaved documents with that LM
frozen, `vlp test --ckpt` prints the few-shot tables, `vlp predict --ckpt` writes captions
for a folder of images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import run_in, shrink_trainer
from PIL import Image

from vlp.data.synth import write_shapes

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("flamingo_cli")
    write_shapes(root / "shapes", seed=0, size=400, samples_per_shard=50, image_size=32)
    return root


def small(recipe: str, root: Path, steps: int) -> dict:
    """``recipe`` at width 32: a 1-layer ViT at 32 px, a 2-layer Llama, a 1-layer perceiver."""
    cfg = shrink_trainer(yaml.safe_load((REPO / recipe).read_text()), steps=steps)
    cfg["trainer"].pop("limit_test_batches", None)
    model = cfg["model"]["init_args"]
    model["vision_encoder"]["init_args"].update(
        img_size=32, model_kwargs={"patch_size": 16, "embed_dim": 32, "depth": 1, "num_heads": 2}
    )
    model["lang_model"]["init_args"]["config"].update(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2
    )
    model["perceiver"] = {"depth": 1, "num_latents": 4, "num_heads": 2, "dim_head": 16}
    model["cross_attn"] = {"num_heads": 2, "dim_head": 16}
    model["vision_weights"] = None
    data = cfg["data"]["init_args"]
    for split in ("train", "test"):
        for source in data.get(split, []):
            source["manifest"] = str(root / "shapes" / "manifests" / Path(source["manifest"]).name)
            fewshot = source.get("evaluation", {}).get("fewshot")
            if fewshot:
                fewshot["support"]["manifest"] = str(
                    root / "shapes" / "manifests" / Path(fewshot["support"]["manifest"]).name
                )
                fewshot.update(shots=[0, 2], num_beams=2, max_support=40)
    data.update(image_size=32, batch_size=8, eval_batch_size=4, num_workers=0)
    return cfg


@pytest.fixture(scope="module")
def lm(workdir) -> Path:
    cfg = small("recipes/tiny/flamingo_lm.yaml", workdir, steps=4)
    (workdir / "lm.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    run_in(workdir / "lm", ["fit", "--config", str(workdir / "lm.yaml")])
    return workdir / "lm" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def trained(workdir, lm) -> Path:
    cfg = small("recipes/tiny/flamingo.yaml", workdir, steps=6)
    cfg["model"]["init_args"]["lm_weights"] = str(lm)
    (workdir / "fl.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    cli = run_in(workdir / "fl", ["fit", "--config", str(workdir / "fl.yaml")])
    header = next((workdir / "fl" / "logs").rglob("metrics.csv")).read_text().splitlines()[0]
    assert "train/lm_pairs_loss" in header and "train/lm_interleaved_loss" in header, header
    # the frozen LM is the one pretrained above
    state = torch.load(lm, weights_only=True)["state_dict"]
    key = "lang_model.model.model.layers.0.decoder_layer.mlp.up_proj.weight"
    own = cli.model.state_dict()[key]
    torch.testing.assert_close(own, state[key])
    return workdir / "fl" / "checkpoints" / "last.ckpt"


def test_checkpoint_holds_only_the_bridge(trained):
    ckpt = torch.load(trained, weights_only=True)
    keys = set(ckpt["state_dict"])
    assert keys and all(k.startswith(("perceiver.", "media_")) or ".gated_cross_attn_layer." in k for k in keys), (
        sorted(keys)[:5]
    )
    assert ckpt["vlp_frozen"]["dropped_tensors"] > 0


def test_test_ckpt_prints_few_shot_tables(workdir, trained, capsys):
    capsys.readouterr()
    test = run_in(workdir / "fl", ["test", "--ckpt", str(trained), "--trainer.limit_test_batches=2"])
    out = capsys.readouterr().out
    results = test.model.results
    scores = {k.split("/")[-2] if k.count("/") >= 2 else k: v["scores"] for k, v in results.items()}
    flat = {s for v in results.values() for s in v["scores"]}
    assert {"cider@0", "cider@2", "bleu4@2", "vqa_acc@0", "vqa_acc@2", "top1@0", "top1@2"} <= flat, scores
    assert "cider@2" in out or "CIDEr" in out, out
    record = json.loads(next((workdir / "fl").rglob("test_results.json")).read_text())
    assert record["model"] == "Flamingo"


def test_predict_writes_captions_for_a_folder_of_images(workdir, trained):
    photos = workdir / "photos"
    photos.mkdir()
    for i, color in enumerate([(255, 0, 0), (0, 0, 255), (0, 200, 0)]):
        Image.new("RGB", (40, 40), color).save(photos / f"{i}.png")
    (photos / "broken.jpg").write_bytes(b"nope")
    out = workdir / "captions.jsonl"
    args = ["predict", "--ckpt", str(trained), f"--data.init_args.prompts.images={photos}"]
    run_in(workdir / "fl", [*args, f"--data.init_args.prompts.out={out}", "--data.init_args.prompts.num_beams=2"])
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["key"] for r in lines) == ["0.png", "1.png", "2.png", "broken.jpg"]
    for r in lines:
        if r["key"] == "broken.jpg":
            assert "cannot read image" in r["error"]
        else:
            assert r["prompt"] == "<image>Output:" and isinstance(r["text"], str)
