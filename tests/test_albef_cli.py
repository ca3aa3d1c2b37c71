"""ALBEF through the `vlp` command: fit a (very) small ALBEF on shapes, `vlp test --ckpt`
prints the retrieval table and writes test_results.json, `vlp compare` reads it, and a
fine-tuning run starts from the checkpoint (`init_from`) at another resolution and queue
size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import run_in, shrink_recipe
from jsonargparse import ArgumentParser

from vlp.cli import cli_main
from vlp.data.synth import write_shapes
from vlp.errors import CheckpointError
from vlp.eval.compare import run_names
from vlp.models import ALBEF
from vlp.utils.checkpoint import interpolate_pos_embed, load_state_dict

REPO = Path(__file__).resolve().parents[1]
W = 32  # width of every tower in this test


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("albef_cli")
    write_shapes(root / "shapes", seed=0, size=1000, samples_per_shard=500)
    return root


def small_recipe(root: Path, *, image_size: int = 32, queue: int = 64, positives: str = "same_text") -> Path:
    """recipes/tiny/albef.yaml with every tower shrunk to width 32 (random init) and the
    shapes manifests of ``root``; the rest (objectives, trainer, data) as in the recipe."""
    cfg = yaml.safe_load((REPO / "recipes/tiny/albef.yaml").read_text())
    m = root / "shapes" / "manifests"
    shrink_recipe(cfg, W, steps=6, image_size=image_size)
    model = cfg["model"]["init_args"]
    model["fusion"]["init_args"] = {"dim": W, "depth": 1, "num_heads": 2, "context_dim": W}
    itc, itm, mlm = model["objectives"]
    itc["init_args"].update(queue_size=queue, embed_dim=16, positives=positives)
    itm["init_args"]["dim"] = W
    mlm["init_args"]["dim"] = W
    model.update(embed_dim=16, rerank_k=4, alpha_ramp_steps=3)
    model["optim"]["warmup_steps"] = 2
    data = cfg["data"]["init_args"]
    data.update(
        train=[{"manifest": str(m / "shapes_pair.yaml"), "split": "train"}],
        val=[{"manifest": str(m / "shapes_retrieval.yaml"), "split": "val"}],
        test=[{"manifest": str(m / "shapes_retrieval.yaml"), "split": "test"}],
        image_size=image_size,
        batch_size=16,
        eval_batch_size=100,
        num_workers=0,
    )
    path = root / f"albef_{image_size}_{queue}_{positives}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _build(recipe: dict) -> ALBEF:
    parser = ArgumentParser()
    parser.add_subclass_arguments(ALBEF, "model")
    return parser.instantiate(parser.parse_object({"model": recipe["model"]})).model


@pytest.fixture(scope="module")
def pretrained(workdir):
    run = workdir / "pretrain"
    cli = run_in(run, ["fit", "--config", str(small_recipe(workdir))])
    return run, cli


def test_fit_then_test_from_the_checkpoint_alone(pretrained, capsys):
    run, fit_cli = pretrained
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    capsys.readouterr()
    cli = run_in(run, ["test", "--ckpt", str(ckpt), "--trainer.enable_progress_bar=false"])
    out = capsys.readouterr().out
    # the ALBEF table: ITC and ITC+ITM rows per direction, chance, means
    assert "ITC+ITM@4" in out and "image→text" in out and "text→image" in out and "chance" in out
    scores = cli.model.results["test"]["scores"]
    assert {"i2t_r1", "t2i_r10", "itm_i2t_r1", "itm_t2i_r5", "itm_rmean", "itm_acc"} <= set(scores)
    assert cli.model.results["test"]["num_texts"] == 5 * cli.model.results["test"]["num_images"]
    for k, v in fit_cli.model.state_dict().items():  # the trained weights, queues included
        torch.testing.assert_close(cli.model.state_dict()[k], v, msg=k)
    # the results file that `vlp compare` reads
    files = sorted(run.rglob("test_results.json"))
    assert files, "vlp test wrote no test_results.json"
    record = json.loads(files[-1].read_text())
    assert record["model"] == "ALBEF" and record["results"]["test"]["scores"] == pytest.approx(scores)
    # momentum twins are not counted as model parameters
    model = cli.model
    twins = sum(p.numel() for _, twin in model.momentum_pairs() for p in twin.parameters())
    assert record["num_parameters"] == sum(p.numel() for p in model.parameters()) - twins


def test_compare_prints_runs_side_by_side(pretrained, capsys):
    run, _ = pretrained
    if not list(run.rglob("test_results.json")):
        run_in(run, ["test", "--ckpt", str(run / "checkpoints/last.ckpt"), "--trainer.enable_progress_bar=false"])
    capsys.readouterr()
    table = cli_main(["compare", str(run), str(run), "--names", "first,second"])
    assert table == capsys.readouterr().out.rstrip("\n")
    lines = table.splitlines()
    assert lines[0].split() == ["first", "second", "chance"]
    assert any(line.startswith("ITM accuracy") for line in lines)
    itm_row = next(line for line in lines if line.startswith("mean R@K       ITC+ITM")).split()
    record = json.loads(sorted(run.rglob("test_results.json"))[-1].read_text())["results"]["test"]
    # default column names: the run folders' names, or the paths where those repeat
    (run.parent / "other").mkdir(exist_ok=True)
    assert run_names([str(run), str(run.parent / "other")]) == ["pretrain", "other"]
    assert run_names([f"a/{run.name}", f"b/{run.name}/"]) == [f"a/{run.name}", f"b/{run.name}"]
    with pytest.raises(SystemExit):  # one error paragraph: --names of the wrong length
        cli_main(["compare", str(run), "--names", "a,b"])
    assert "--names needs 1 distinct names" in capsys.readouterr().err
    # one run twice, then the chance column
    assert itm_row[-3:] == [f"{record['scores']['itm_rmean']:.2f}"] * 2 + [f"{record['chance']['rmean']:.2f}"]


def test_finetune_from_the_checkpoint_at_another_resolution_and_queue(workdir, pretrained, caplog):
    run, pre = pretrained
    recipe = small_recipe(workdir, image_size=48, queue=32, positives="same_id")
    ft = workdir / "finetune"
    with caplog.at_level("WARNING", logger="vlp"):
        cli = run_in(
            ft,
            [
                "fit",
                "--config",
                str(recipe),
                f"--model.init_args.init_from={run / 'checkpoints/last.ckpt'}",
                "--trainer.max_steps=3",
                "--trainer.val_check_interval=1000",
                "--trainer.limit_val_batches=0",
            ],
        )
    notes = caplog.text
    assert "pos_embed: 2x2 -> 3x3 patches" in notes
    assert "image_queue: queue of another size" in notes
    model = cli.model
    # everything but the position embeddings and the queues came from the checkpoint ...
    before = pre.model.state_dict()
    assert model.image_encoder.model.pos_embed.shape[1] == 1 + 9
    # ... and was then trained: the first fusion layer moved away from the checkpoint
    key = next(k for k in before if k.startswith("fusion.") and k.endswith("weight"))
    assert not torch.equal(model.state_dict()[key], before[key])
    itc = model.objectives["itc"]
    assert itc.positives == "same_id" and itc.image_queue.shape[1] == 32
    assert int(itc.queue_ptr) == 3 * 16 % 32  # its own queue, filled from 0 by the 3 steps


def test_init_from_keeps_weights_and_forgets_queue_ids(workdir, pretrained):
    """Before any step: weights equal the checkpoint's, pos_embed is the interpolation,
    queue features of the same size are kept and their ids forgotten."""
    run, pre = pretrained
    ckpt = run / "checkpoints" / "last.ckpt"
    model = _build(yaml.safe_load(small_recipe(workdir, image_size=48, queue=64).read_text()))
    model.load_init_from(str(ckpt))
    state = load_state_dict(ckpt)
    own = model.state_dict()
    for k, v in state.items():
        if k.endswith("pos_embed"):
            torch.testing.assert_close(own[k], interpolate_pos_embed(v, (3, 3)))
        elif k.endswith("idx_queue"):
            assert (own[k] == -100).all() and (v != -100).any()
        else:
            torch.testing.assert_close(own[k], v, msg=k)


def test_init_from_a_checkpoint_of_another_width_is_a_clear_error(workdir, pretrained):
    run, _ = pretrained
    recipe = yaml.safe_load(small_recipe(workdir).read_text())
    recipe["model"]["init_args"]["fusion"]["init_args"]["mlp_ratio"] = 2.0
    model = _build(recipe)
    with pytest.raises(
        CheckpointError, match=r"do not fit the model: fusion\.blocks\.0\..*checkpoint \(128, 32\), model \(64, 32\)"
    ):
        model.load_init_from(str(run / "checkpoints" / "last.ckpt"))
