"""Resuming a fit: the stream's order per epoch, its place in the checkpoint, the global RNG,
and the fallback to the previous checkpoint when ``last.ckpt`` is unreadable."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import jpeg_bytes, run_in, shrink_recipe, write_tar

from vlp.data import Manifest, MLMMasker, Split, WebDataModule

IMG = 32
REPO = Path(__file__).resolve().parents[2]
W = 32  # tower width of the fitted models
STEPS, EVERY, BATCHES = 16, 5, 12  # 12 batches an epoch: the run crosses into epoch 1

KILLER = """
import os, signal
import lightning.pytorch as pl

class KillAt(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
"""


def _noise_jpeg(i: int) -> bytes:
    """A textured image, so that random crops change the pixels."""
    from PIL import Image

    img = Image.frombytes("RGB", (40, 32), bytes((i * 7 + j * 13) % 256 for j in range(40 * 32 * 3)))
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


def _pair_manifest(tmp_path, shards: int = 4, per_shard: int = 6, texture: bool = False) -> str:
    urls = []
    for s in range(shards):
        samples = [
            {
                "__key__": f"s{i:05d}",
                "jpg": _noise_jpeg(i) if texture else jpeg_bytes((i * 40 % 256, 80, 160)),
                "txt": f"a caption with number {i} and {i % 3} shapes",
                "json": {"image_id": i},
            }
            for i in range(s * per_shard, (s + 1) * per_shard)
        ]
        urls.append(write_tar(tmp_path / "pair" / f"part-{s:03d}.tar", samples))
    m = Manifest(name="toy_pair", modality="pair", splits={"train": Split(urls=urls, num_samples=shards * per_shard)})
    path = tmp_path / "pair.yaml"
    m.save(path)
    return str(path)


def _train_loader(manifest: str, tokenizer, *, workers: int, seed: int = 0):
    from vlp.data import Source

    dm = WebDataModule(
        train=[Source(manifest)],
        tokenizer=tokenizer,
        image_size=IMG,
        batch_size=4,
        num_workers=workers,
        shuffle_buffer=4,
        seed=seed,
        maskers=[MLMMasker()],
    )
    dm.setup("fit")
    return dm.train_dataloader()


def _epoch_keys(manifest: str, tokenizer, *, workers: int, epochs: int, seed: int = 0) -> list[list[str]]:
    loader = _train_loader(manifest, tokenizer, workers=workers, seed=seed)
    return [[k for batch in loader for k in batch["keys"]] for _ in range(epochs)]


def _same_batches(a: list[dict], b: list[dict]) -> bool:
    keys = ("image", "text_ids", "mlm_input_ids", "mlm_labels")
    return len(a) == len(b) and all(
        x["keys"] == y["keys"] and all(torch.equal(x[k], y[k]) for k in keys) for x, y in zip(a, b)
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_each_epoch_has_its_own_order_and_the_seed_fixes_it(tmp_path, tokenizer, workers):
    """Two epochs of one run (num_workers 0 or 2) are ordered differently; the same seed repeats both."""
    manifest = _pair_manifest(tmp_path)
    first = _epoch_keys(manifest, tokenizer, workers=workers, epochs=2)
    again = _epoch_keys(manifest, tokenizer, workers=workers, epochs=2)
    other_seed = _epoch_keys(manifest, tokenizer, workers=workers, epochs=1, seed=1)
    assert len(first[0]) == len(first[1]) == 24
    assert first[0] != first[1]
    assert first == again
    assert other_seed[0] != first[0]


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_state_continues_the_epoch_where_it_stopped(tmp_path, tokenizer, workers):
    """A training loader restored from the state taken after 3 of 6 batches yields batches 4-6 (same crops, same masks)."""
    manifest = _pair_manifest(tmp_path, texture=True)
    whole = list(_train_loader(manifest, tokenizer, workers=workers))
    first = _train_loader(manifest, tokenizer, workers=workers)
    it = iter(first)
    seen = [next(it) for _ in range(3)]
    state = first.state_dict()
    del it
    assert (state["epoch"], state["batches"], state["num_workers"]) == (0, 3, workers)
    resumed = _train_loader(manifest, tokenizer, workers=workers)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert _same_batches(seen + rest, whole)
    assert [k for b in resumed for k in b["keys"]] != [k for b in whole for k in b["keys"]]  # then epoch 1


def test_loader_state_restores_the_global_rng(tmp_path, tokenizer):
    """Dropout's generators (torch, Python, NumPy) are saved with the loader's state and put back on resume."""
    import random

    import numpy as np

    loader = _train_loader(_pair_manifest(tmp_path), tokenizer, workers=0)
    state = loader.state_dict()
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(123), random.seed(123), np.random.seed(123)
    loader.load_state_dict(state)
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


def test_resume_with_other_workers_warns_and_reads_the_epoch_from_its_start(tmp_path, tokenizer, caplog):
    """A loader state saved with 2 workers, resumed with 0: a warning names num_workers and the epoch starts over."""
    manifest = _pair_manifest(tmp_path)
    saved = _train_loader(manifest, tokenizer, workers=2)
    it = iter(saved)
    next(it), next(it)
    state = saved.state_dict()
    del it
    resumed = _train_loader(manifest, tokenizer, workers=0)
    with caplog.at_level("WARNING", logger="vlp.data"):
        resumed.load_state_dict(state)
    assert "num_workers 2 -> 0" in caplog.text
    assert [b["keys"] for b in resumed] == [b["keys"] for b in _train_loader(manifest, tokenizer, workers=0)]


def _albef_recipe(root: Path, manifest: str, workers: int, kill_at: int | None) -> Path:
    """recipes/tiny/albef.yaml at width 32 with dropout (MLM masks, ITM negatives, crops and dropout
    all draw random numbers), a checkpoint every 4 steps, the loss logged at every step."""
    cfg = yaml.safe_load((REPO / "recipes/tiny/albef.yaml").read_text())
    shrink_recipe(cfg, W, steps=STEPS)
    model = cfg["model"]["init_args"]
    model["fusion"]["init_args"] = {"dim": W, "depth": 1, "num_heads": 2, "context_dim": W, "drop": 0.1}
    itc, itm, mlm = model["objectives"]
    itc["init_args"].update(queue_size=32, embed_dim=16)
    itm["init_args"]["dim"] = W
    mlm["init_args"]["dim"] = W
    model.update(embed_dim=16, rerank_k=4, alpha_ramp_steps=3)
    model["optim"]["warmup_steps"] = 2
    cfg["trainer"].update(log_every_n_steps=1, limit_val_batches=0)
    callbacks = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {
                "dirpath": "checkpoints",
                "save_last": True,
                "every_n_train_steps": EVERY,
                "monitor": "step",
                "mode": "max",
                "save_top_k": 2,
            },
        }
    ]
    if kill_at is not None:
        callbacks.append({"class_path": "killer.KillAt", "init_args": {"step": kill_at}})
    cfg["trainer"]["callbacks"] = callbacks
    cfg["data"]["init_args"].update(
        train=[{"manifest": manifest, "split": "train"}],
        val=[],
        test=[],
        image_size=IMG,
        batch_size=8,
        epoch_length=8 * BATCHES,
        shuffle_buffer=16,
        num_workers=workers,
    )
    path = root / f"albef_{workers}_{kill_at}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _fit(workdir: Path, recipe: Path, *extra: str) -> subprocess.Popen:
    """``vlp fit`` in a subprocess (started, not awaited)."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "killer.py").write_text(KILLER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(workdir), str(REPO)]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "vlp.cli", "fit", "--config", str(recipe), *extra]
    return subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait(run: subprocess.Popen) -> tuple[int, str]:
    _, err = run.communicate(timeout=180)
    return run.returncode, err[-3000:]


def _losses(workdir: Path) -> dict[int, float]:
    """step → train/loss over every CSV log of the run folder (a resumed run adds a version)."""
    out = {}
    for path in sorted((workdir / "logs").rglob("metrics.csv")):
        with path.open() as f:
            for row in csv.DictReader(f):
                if row.get("train/loss"):
                    out[int(row["step"])] = float(row["train/loss"])
    return out


@pytest.mark.slow
def test_killed_fit_resumes_with_the_same_batches_and_losses(tmp_path):
    """SIGKILL at step 7 (2 workers), resume from the step-5 checkpoint: every later step's loss equals the uninterrupted run's."""
    manifest = _pair_manifest(tmp_path, shards=4, per_shard=24, texture=True)
    killed = tmp_path / "killed"
    whole = _fit(tmp_path / "whole", _albef_recipe(tmp_path, manifest, 2, None))
    run = _fit(killed, _albef_recipe(tmp_path, manifest, 2, 7))
    code, err = _wait(run)
    assert code == -9, err
    assert (killed / "checkpoints" / "last.ckpt").is_file()
    resumed = _fit(killed, _albef_recipe(tmp_path, manifest, 2, None), "--ckpt_path", "last")
    for code, err in (_wait(whole), _wait(resumed)):
        assert code == 0, err
    expected, got = _losses(tmp_path / "whole"), _losses(killed)
    assert sorted(expected) == list(range(STEPS))  # logged at every step
    assert set(range(EVERY, STEPS)) <= set(got)
    for step in range(EVERY, STEPS):  # the steps run after the resume, across the end of epoch 0
        assert got[step] == pytest.approx(expected[step], abs=1e-6), (step, got, expected)


def _clip_recipe(root: Path, manifest: str, steps: int) -> Path:
    """recipes/tiny/clip.yaml at width 32 with its checkpoint settings: the last two checkpoints
    (by step) and last.ckpt, written every 4 steps here."""
    cfg = yaml.safe_load((REPO / "recipes/tiny/clip.yaml").read_text())
    recipe_checkpoint = next(c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint"))
    shrink_recipe(cfg, W, steps=steps)
    args = {**recipe_checkpoint["init_args"], "dirpath": "checkpoints", "every_n_train_steps": 4}
    cfg["trainer"].update(limit_val_batches=0, callbacks=[{**recipe_checkpoint, "init_args": args}])
    cfg["data"]["init_args"].update(
        train=[{"manifest": manifest, "split": "train"}], val=[], test=[], image_size=IMG, batch_size=4, num_workers=0
    )
    path = root / f"clip_{steps}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_truncated_last_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    """last.ckpt cut in half, `vlp fit --ckpt_path last`: the run resumes from the step-8 checkpoint and the warning names both."""
    manifest = _pair_manifest(tmp_path)
    run_in(tmp_path / "run", ["fit", "--config", str(_clip_recipe(tmp_path, manifest, 8))])
    folder = tmp_path / "run" / "checkpoints"
    last, previous = folder / "last.ckpt", folder / "epoch=1-step=8.ckpt"
    assert previous.is_file()
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with caplog.at_level("WARNING", logger="vlp"):
        cli = run_in(
            tmp_path / "run", ["fit", "--config", str(_clip_recipe(tmp_path, manifest, 10)), "--ckpt_path", "last"]
        )
    assert str(last) in caplog.text and str(previous) in caplog.text
    assert cli.trainer.ckpt_path == str(previous)
    assert cli.trainer.global_step == 10


def test_resume_fallback_picks_the_newest_complete_checkpoint(tmp_path, caplog):
    """An explicit truncated path resumes from the newest complete file beside it; with none complete it is a CheckpointError."""
    import time

    from vlp.errors import CheckpointError
    from vlp.utils.checkpoint import resolve_resume_checkpoint

    old, new, cut = (tmp_path / n for n in ("step=4.ckpt", "step=8.ckpt", "last.ckpt"))
    for path in (old, new, cut):
        torch.save({"global_step": 1}, path)
        time.sleep(0.02)  # distinct modification times
    assert resolve_resume_checkpoint(cut) == str(cut)  # complete: itself
    cut.write_bytes(b"")
    with caplog.at_level("WARNING", logger="vlp"):
        assert resolve_resume_checkpoint(cut) == str(new)
    assert "0 bytes" in caplog.text and str(new) in caplog.text
    assert resolve_resume_checkpoint("last", [{"init_args": {"dirpath": str(tmp_path)}}]) == str(new)
    for path in (old, new):
        path.write_bytes(path.read_bytes()[:10])
    with pytest.raises(CheckpointError, match="no other complete checkpoint"):
        resolve_resume_checkpoint(cut)


def test_training_skip_counts_survive_a_resume(tmp_path, tokenizer):
    """The datamodule's training skip counts are saved (plain data, weights_only) and restored, so a
    resumed epoch goes on counting towards max_skip_fraction instead of starting at zero."""
    from vlp.data import WebDataModule
    from vlp.data.pipeline import Skipped

    dm = WebDataModule(tokenizer=tokenizer, min_samples_for_skip_check=10**6)
    dm.record(
        "train", 0, 30, [Skipped("a.tar:1", "corrupt image (x)"), Skipped("b.tar", "unreadable shard", 5, "b.tar")]
    )
    torch.save({"dm": dm.state_dict()}, tmp_path / "state.pt")
    resumed = WebDataModule(tokenizer=tokenizer, min_samples_for_skip_check=10**6)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True)["dm"])
    st = resumed.stats["train"]
    assert (st["seen"], st["skipped"], st["bad_shards"]) == (36, 6, {"b.tar": 5})
    assert st["reasons"] == {"corrupt image": 1, "unreadable shard": 5}
    resumed.record("train", 0, 10, [Skipped("a.tar:2", "corrupt image (y)")])
    assert (resumed.stats["train"]["seen"], resumed.stats["train"]["skipped"]) == (47, 7)
