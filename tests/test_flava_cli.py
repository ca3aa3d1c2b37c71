"""FLAVA through the `vlp` command on a small shapes set: build the k-means image
tokenizer (`vlp data tokenizer`), pretrain on pairs + images + text in turn, `vlp test
--ckpt` prints retrieval and the zero-shot / linear-probe table, then a VQA fine-tune from
that checkpoint (`init_from`) prints the VQA table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import run_in, shrink_trainer

from vlp.data.synth import write_shapes

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
W = 32


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("flava_cli")
    write_shapes(root / "shapes", seed=0, size=400, samples_per_shard=50, image_size=32)  # >= 2 shards per split
    manifest = str(root / "shapes" / "manifests" / "shapes_pair.yaml")
    args = ["--codes", "16", "--patch", "16", "--image_size", "32", "--max-images", "200"]
    run_in(root, ["data", "tokenizer", "--data", manifest, "--out", str(root / "tok.safetensors"), *args])
    return root


def small(recipe: str, root: Path, steps: int) -> dict:
    """``recipe`` at width 32 (1-layer towers, 2x2 patch grid) on this test's shapes."""
    cfg = shrink_trainer(yaml.safe_load((REPO / recipe).read_text()), steps=steps)
    model = cfg["model"]["init_args"]
    tower = {"dim": W, "depth": 1, "num_heads": 2}
    model["image_encoder"]["init_args"] = {"image_size": 32, "patch_size": 16, **tower}
    model["text_encoder"]["init_args"] = {"vocab_size": 30522, "max_length": 32, **tower}
    model["fusion"]["init_args"] = tower
    model["embed_dim"] = W
    if model.get("image_tokenizer"):
        model["image_tokenizer"]["init_args"]["path"] = str(root / "tok.safetensors")
    for o in model["objectives"]:
        if o["class_path"].endswith("VQA"):
            o["init_args"]["answers"] = str(root / "shapes" / "info.json")
    data = cfg["data"]["init_args"]
    for split in ("train", "val", "test"):
        for source in data.get(split, []):
            source["manifest"] = str(root / "shapes" / "manifests" / Path(source["manifest"]).name)
            source["batch_size"] = 8 if split == "train" else 100
            for masker in source.get("maskers", []):
                if masker["class_path"].endswith("PatchMasker"):
                    masker["init_args"]["grid"] = [2, 2]
    data.update(image_size=32, batch_size=8, eval_batch_size=100, num_workers=0)
    return cfg


@pytest.fixture(scope="module")
def pretrained(workdir) -> Path:
    cfg = small("recipes/tiny/flava.yaml", workdir, steps=6)
    (workdir / "pre.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    cli = run_in(workdir / "pre", ["fit", "--config", str(workdir / "pre.yaml")])
    rows = (workdir / "pre" / "logs").rglob("metrics.csv")
    header = next(iter(rows)).read_text().splitlines()[0]
    for loss in ("global_contrastive", "mim", "mlm", "mmm_image", "mmm_text", "itm"):  # every modality ran
        assert f"train/{loss}_loss" in header, header
    assert set(cli.model.results["val"]["scores"]) >= {"i2t_r1", "t2i_r1", "rmean"}
    return workdir / "pre" / "checkpoints" / "last.ckpt"


def test_test_ckpt_prints_retrieval_and_classification(workdir, pretrained, capsys):
    capsys.readouterr()
    test = run_in(workdir / "pre", ["test", "--ckpt", str(pretrained), "--trainer.enable_progress_bar=false"])
    out = capsys.readouterr().out
    assert "R@1" in out and "zeroshot_top1" in out and "probe_top1" in out, out
    results = test.model.results
    image = next(v for k, v in results.items() if "shapes_image" in k)
    assert set(image["scores"]) >= {"zeroshot_top1", "zeroshot_top5", "probe_top1", "probe_top5"}
    assert all(0 <= v <= 100 for v in image["scores"].values())
    record = json.loads(sorted((workdir / "pre").rglob("test_results.json"))[-1].read_text())
    assert record["model"] == "FLAVA"
    state = torch.load(pretrained, weights_only=True)["state_dict"]
    assert "image_tokenizer.centroids" in state  # the checkpoint carries its MIM targets


def test_vqa_fine_tune_from_the_pretrained_checkpoint(workdir, pretrained, capsys):
    cfg = small("recipes/finetune/tiny_flava_vqa.yaml", workdir, steps=4)
    cfg["model"]["init_args"]["init_from"] = str(pretrained)
    (workdir / "ft.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    fit = run_in(workdir / "ft", ["fit", "--config", str(workdir / "ft.yaml")])
    assert fit.model.results["val"]["task"] == "vqa"
    state = torch.load(pretrained, weights_only=True)["state_dict"]
    key = "fusion.blocks.0.attn.qkv.weight"
    assert not torch.equal(state[key], fit.model.state_dict()[key])  # loaded, then fine-tuned
    capsys.readouterr()
    run_in(workdir / "ft", ["test", "--ckpt", "checkpoints/last.ckpt", "--trainer.enable_progress_bar=false"])
    out = capsys.readouterr().out
    assert "question type" in out and "overall" in out
