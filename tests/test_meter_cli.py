"""METER through the `vlp` command: pretrain a very small METER on shapes, fine-tune it on
the VQA split from that checkpoint (`init_from`), and `vlp test --ckpt` prints the VQA table
by question type beside the majority baseline; the pretrained checkpoint tested with a
retrieval recipe keeps its ITM head."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from helpers import run_in, shrink_recipe
from webdataset import tariterators

from vlp.data.manifest import expand_urls, load_manifest
from vlp.data.synth import write_shapes

REPO = Path(__file__).resolve().parents[1]
W = 32


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("meter_cli")
    write_shapes(root / "shapes", seed=0, size=600, samples_per_shard=500)
    return root


def small(recipe: str, root: Path, **data) -> dict:
    """A recipe with every tower shrunk to width 32 (random init) and this test's shapes."""
    cfg = yaml.safe_load((REPO / recipe).read_text())
    shrink_recipe(cfg, W, steps=4)
    model = cfg["model"]["init_args"]
    model["fusion"]["init_args"] = {"dim": W, "depth": 1, "num_heads": 2}
    model["hidden_size"] = W
    for o in model["objectives"]:
        if "dim" in o["init_args"] or o["class_path"].endswith(("ITM", "VQA", "MLM")):
            o["init_args"]["dim"] = 2 * W if o["class_path"].endswith(("ITM", "VQA")) else W
        if o["class_path"].endswith("VQA"):
            o["init_args"]["answers"] = str(root / "shapes" / "info.json")
    m = root / "shapes" / "manifests"
    d = cfg["data"]["init_args"]
    for split in ("train", "val", "test"):
        if split in d:
            d[split] = [{**d[split][0], "manifest": str(m / Path(d[split][0]["manifest"]).name)}]
    d.update(image_size=32, batch_size=16, eval_batch_size=100, num_workers=0, **data)
    return cfg


def majority_baseline(shapes: Path) -> dict[str, float]:
    """VQA accuracy (percent, by question type and overall) on this test's own test split of
    answering each question type with its most common train answer, read from the shards;
    a question scores min(#annotators who gave that answer / 3, 1), as VQA accuracy does."""
    manifest = load_manifest(shapes / "manifests" / "shapes_vqa.yaml")

    def rows(split: str) -> list[tuple[str, list[str]]]:
        urls = expand_urls(manifest.split(split).urls)
        samples = (json.loads(s["json"]) for s in tariterators.tarfile_samples([{"url": u} for u in urls]))
        return [(j["question_type"], j["answers"]) for j in samples]

    counts: dict[str, Counter] = {}
    for qtype, answers in rows("train"):
        counts.setdefault(qtype, Counter()).update(answers)
    guess = {qtype: c.most_common(1)[0][0] for qtype, c in counts.items()}
    scores: dict[str, list[float]] = {}
    for qtype, answers in rows("test"):
        score = min(answers.count(guess.get(qtype)) / 3, 1.0)
        scores.setdefault(qtype, []).append(score)
        scores.setdefault("overall", []).append(score)
    return {qtype: 100 * sum(v) / len(v) for qtype, v in scores.items()}


@pytest.fixture(scope="module")
def pretrained(workdir) -> Path:
    pre = small("recipes/tiny/meter.yaml", workdir)
    (workdir / "pre.yaml").write_text(yaml.safe_dump(pre, sort_keys=False))
    cli = run_in(workdir / "pre", ["fit", "--config", str(workdir / "pre.yaml")])
    scores = cli.model.results["val"]["scores"]
    assert set(scores) == {"itm_acc", "mlm_acc"}
    return workdir / "pre" / "checkpoints" / "last.ckpt"


def test_pretrain_then_vqa_fine_tune_then_test(workdir, pretrained, capsys):
    ckpt = pretrained

    ft = small("recipes/finetune/tiny_meter_vqa.yaml", workdir)
    ft["model"]["init_args"]["init_from"] = str(ckpt)
    # the recipe's baseline is the default 20,000-sample benchmark's; this run's data is smaller
    baseline = majority_baseline(workdir / "shapes")
    (vqa,) = [o for o in ft["model"]["init_args"]["objectives"] if o["class_path"].endswith("VQA")]
    vqa["init_args"]["baseline"] = baseline
    (workdir / "ft.yaml").write_text(yaml.safe_dump(ft, sort_keys=False))
    fit = run_in(workdir / "ft", ["fit", "--config", str(workdir / "ft.yaml")])
    # the towers and the fusion came from the pretraining checkpoint, then trained on VQA
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert fit.model.results["val"]["task"] == "vqa"

    capsys.readouterr()
    test = run_in(workdir / "ft", ["test", "--ckpt", "checkpoints/last.ckpt", "--trainer.enable_progress_bar=false"])
    out = capsys.readouterr().out
    assert "question type" in out and "baseline %" in out
    for qtype in ("overall", "color", "count", "exist", "spatial"):
        assert qtype in out
    results = test.model.results["test"]
    assert results["task"] == "vqa" and set(results["scores"]) >= {"overall", "color", "count", "exist", "spatial"}
    assert results["chance"] == pytest.approx(baseline)
    assert 0 < baseline["overall"] < 100
    for qtype in ("overall", "color", "count", "exist", "spatial"):  # printed beside each row
        row = next(line for line in out.splitlines() if line.startswith(qtype + " "))
        assert row.split()[-1] == f"{baseline[qtype]:.2f}", row
    record = json.loads(sorted((workdir / "ft").rglob("test_results.json"))[-1].read_text())
    assert record["model"] == "METER" and record["results"]["test"]["scores"] == pytest.approx(results["scores"])
    # the fine-tuned weights are the ones tested, and differ from the pretraining ones
    key = "fusion.text_layers.0.attn.qkv.weight"
    torch.testing.assert_close(test.model.state_dict()[key], fit.model.state_dict()[key])
    assert not torch.equal(state[key], fit.model.state_dict()[key])


def test_test_a_pretrained_checkpoint_with_a_retrieval_recipe(workdir, pretrained, capsys):
    """`vlp test --config RECIPE --ckpt PRETRAINED`: the recipe lists [ITM, Retrieval], the
    checkpoint [MLM, ITM]; the ITM head loads by name and the MLM head is reported unused."""
    cfg = small("recipes/finetune/tiny_meter_retrieval.yaml", workdir)
    cfg["model"]["init_args"]["objectives"][1]["init_args"]["max_images"] = 20
    (workdir / "ret.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    capsys.readouterr()
    args = ["test", "--config", str(workdir / "ret.yaml"), "--ckpt", str(pretrained)]
    test = run_in(workdir / "ret", [*args, "--trainer.enable_progress_bar=false"])
    out = capsys.readouterr().out
    assert "heads of objectives ['mlm'] are not in this recipe" in out
    assert "the first 20 of" in out and "ITM over all" in out
    state = torch.load(pretrained, weights_only=True)["state_dict"]
    torch.testing.assert_close(test.model.objectives["itm"].head.weight, state["objectives.itm.head.weight"])
    assert set(test.model.results["test"]["scores"]) >= {"i2t_r1", "t2i_r1", "rmean"}
