"""A text task through the `vlp` command: `vlp fit` the text-pair recipe (shrunk) for a few
steps, then `vlp test --ckpt` prints the TextTask table (accuracy, F1, MCC beside chance)
and writes it to test_results.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import run_in, shrink_recipe

from vlp.data.synth import write_shapes

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_fit_then_test_a_text_task(tmp_path, capsys):
    write_shapes(tmp_path / "shapes", seed=0, size=600, samples_per_shard=500)
    cfg = yaml.safe_load((REPO / "recipes/finetune/tiny_clip_textpair.yaml").read_text())
    shrink_recipe(cfg, 32, steps=6)
    d = cfg["data"]["init_args"]
    manifest = str(tmp_path / "shapes" / "manifests" / "shapes_text_pair.yaml")
    for split in ("train", "val", "test"):
        d[split] = [{"manifest": manifest, "split": split}]
    d.update(image_size=32, batch_size=16, num_workers=0)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    fit = run_in(tmp_path / "run", ["fit", "--config", str(tmp_path / "recipe.yaml")])
    val = fit.model.results["val"]
    assert val["task"] == "same_scene" and set(val["scores"]) == {"acc", "f1", "mcc"}
    metrics = next((tmp_path / "run" / "logs").rglob("metrics.csv")).read_text().splitlines()[0]
    assert "train/same_scene_loss" in metrics and "val/same_scene_acc" in metrics

    capsys.readouterr()
    test = run_in(tmp_path / "run", ["test", "--ckpt", "checkpoints/last.ckpt", "--trainer.enable_progress_bar=false"])
    out = capsys.readouterr().out
    assert "same_scene (CLIP)" in out and "(chance 50.00)" in out
    scores = test.model.results["test"]["scores"]
    for name in ("acc", "f1", "mcc"):
        assert 0 <= scores[name] <= 100 or name == "mcc"
        assert any(line.startswith(name) and f"{scores[name]:6.2f}" in line for line in out.splitlines()), out
    record = json.loads(next((tmp_path / "run").rglob("test_results.json")).read_text())
    assert record["results"]["test"]["scores"] == pytest.approx(scores)
    # the tested weights are the fitted ones
    key = "text_encoder.model.encoder.layer.0.attention.self.query.weight"
    torch.testing.assert_close(test.model.state_dict()[key], fit.model.state_dict()[key])
