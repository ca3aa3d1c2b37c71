"""The `vlp` command end to end: fit the tiny CLIP on shapes, test from the checkpoint alone,
and the errors a user sees for bad recipes and checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from vlp.cli import cli_main
from vlp.data.synth import write_shapes

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "tiny" / "clip.yaml")
STEPS = 300


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    info = write_shapes(root / "shapes", seed=0, size=4000, samples_per_shard=500)
    return root / "shapes", info


def _data_args(shapes_dir: Path) -> list[str]:
    m = shapes_dir / "manifests"
    return [
        f"--data.init_args.train=[{{manifest: {m / 'shapes_pair.yaml'}, split: train}}]",
        f"--data.init_args.val=[{{manifest: {m / 'shapes_retrieval.yaml'}, split: val}}]",
        f"--data.init_args.test=[{{manifest: {m / 'shapes_retrieval.yaml'}, split: test}}]",
    ]


@pytest.fixture(scope="module")
def fitted(shapes, tmp_path_factory):
    """`vlp fit` on the tiny recipe (shortened) in a scratch working directory."""
    workdir = tmp_path_factory.mktemp("run")
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        cli = cli_main(
            [
                "fit",
                "--config",
                RECIPE,
                *_data_args(shapes[0]),
                f"--trainer.max_steps={STEPS}",
                "--trainer.val_check_interval=150",
                "--trainer.enable_progress_bar=false",
            ]
        )
    finally:
        os.chdir(cwd)
    return workdir, cli


def test_fit_learns_far_above_chance(fitted):
    workdir, cli = fitted
    ckpt = workdir / "runs/tiny_clip/checkpoints/last.ckpt"
    assert ckpt.is_file()
    res = cli.model.results["val"]
    scores, chance = res["scores"], res["chance"]
    assert res["num_texts"] == 5 * res["num_images"]
    # untrained: ~chance; after 300 steps on CPU the dual encoder must be far above it
    assert scores["t2i_r1"] > 10 * chance["t2i_r1"], (scores, chance)
    assert scores["i2t_r5"] > 3 * chance["i2t_r5"], (scores, chance)
    metrics = (workdir / "runs/tiny_clip/logs").rglob("metrics.csv")
    assert any("train/itc_loss" in p.read_text().splitlines()[0] for p in metrics)


def test_checkpoint_is_plain_data_with_the_recipe(fitted):
    workdir, _ = fitted
    ckpt = torch.load(workdir / "runs/tiny_clip/checkpoints/last.ckpt", weights_only=True)
    assert "vlp.models.CLIP" in ckpt["vlp_config"]
    assert "state_dict" in ckpt


def test_test_from_checkpoint_alone(fitted, capsys):
    workdir, fit_cli = fitted
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        cli = cli_main(
            ["test", "--ckpt", "runs/tiny_clip/checkpoints/last.ckpt", "--trainer.enable_progress_bar=false"]
        )
    finally:
        os.chdir(cwd)
    out = capsys.readouterr()
    assert "text→image" in out.out + out.err and "chance" in out.out + out.err
    test = cli.model.results["test"]["scores"]
    chance = cli.model.results["test"]["chance"]
    assert test["t2i_r1"] > 10 * chance["t2i_r1"]
    # the restored weights are the trained ones
    for k, v in fit_cli.model.state_dict().items():
        torch.testing.assert_close(cli.model.state_dict()[k], v, msg=k)


def test_misspelt_key_names_the_key(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["fit", "--config", RECIPE, "--model.init_args.embed_dimm=3"])
    assert e.value.code == 2
    assert "embed_dimm" in capsys.readouterr().err


def test_misspelt_key_inside_the_recipe_names_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(RECIPE).read_text().replace("embed_dim: 128", "embedd_dim: 128"))
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(bad)])
    assert "embedd_dim" in capsys.readouterr().err


def test_wrong_type_names_the_key(capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", RECIPE, "--data.init_args.batch_size=lots"])
    err = capsys.readouterr().err
    assert "batch_size" in err


def test_missing_recipe_file_is_named(capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", "recipes/does_not_exist.yaml"])
    assert "does_not_exist.yaml" in capsys.readouterr().err


def test_missing_manifest_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(
            [
                "fit",
                "--config",
                RECIPE,
                f"--data.init_args.train=[{{manifest: {tmp_path}/nope.yaml}}]",
                f"--trainer.default_root_dir={tmp_path}",
                "--trainer.logger=false",
                "--trainer.callbacks=[]",
            ]
        )
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: manifest file not found" in err and "nope.yaml" in err
    assert "Traceback" not in err


def test_wrong_checkpoint_is_a_clear_error(tmp_path, capsys):
    bogus = tmp_path / "bogus.ckpt"
    bogus.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit):
        cli_main(["test", "--ckpt", str(bogus)])
    assert "bogus.ckpt" in capsys.readouterr().err
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, other)
    with pytest.raises(SystemExit):
        cli_main(["test", "--ckpt", str(other)])
    assert "carries no vlp recipe" in capsys.readouterr().err


def test_checkpoint_of_another_model_lists_keys(fitted, tmp_path, capsys):
    workdir, _ = fitted
    ckpt = torch.load(workdir / "runs/tiny_clip/checkpoints/last.ckpt", weights_only=True)
    ckpt["state_dict"] = {k.replace("text_proj", "txt_head"): v for k, v in ckpt["state_dict"].items()}
    torch.save(ckpt, tmp_path / "renamed.ckpt")
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        with pytest.raises(SystemExit):
            cli_main(["test", "--ckpt", str(tmp_path / "renamed.ckpt")])
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    assert "does not fit CLIP" in err and "text_proj.weight" in err and "txt_head.weight" in err


def test_data_synth_and_inspect(tmp_path, capsys):
    cli_main(["data", "synth", "--out", str(tmp_path / "s"), "--size", "400", "--samples-per-shard", "200"])
    info = json.loads((tmp_path / "s" / "info.json").read_text())
    assert info
    report = cli_main(
        ["data", "inspect", str(tmp_path / "s" / "manifests" / "shapes_retrieval.yaml"), "--split", "test", "-n", "2"]
    )
    (entry,) = report.values()
    assert entry["samples"] == entry["declared"] > 0
    assert entry["modality"] == "retrieval"
    out = capsys.readouterr().out
    assert "captions" in out and "image: tensor(3, 64, 64)" in out
