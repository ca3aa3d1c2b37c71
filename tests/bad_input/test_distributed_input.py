"""Bad input under 2 processes (Lightning DDP on CPU, gloo): skipped test samples are counted
over both ranks (the same count and metrics as 1 process), skips past the limit on one rank's
validation shards and a non-finite loss stop both ranks with one `error:` paragraph each
(exit code 2) instead of leaving the other rank waiting."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml
from helpers import free_port, run_in

from bad_input.test_cli_input import checkpoint_callback, tiny_args
from vlp.data.synth import write_shapes

pytestmark = pytest.mark.slow

DDP = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
TIMEOUT = 240  # a rank left waiting fails the test instead of blocking it (generous: a loaded 2-core CI)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_shapes(root / "shapes", seed=0, size=400, samples_per_shard=100, image_size=32)
    return root / "shapes" / "manifests"


def vlp_ddp(folder: Path, args: list[str], strategy: str = "ddp") -> subprocess.CompletedProcess:
    """``vlp ARGS`` on 2 CPU processes (Lightning ``strategy``) in ``folder``; killed (with the
    rank it started) after TIMEOUT s."""
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env["MASTER_PORT"] = str(free_port())  # Lightning's own pick can collide with a run just ended
    for key in (
        "PYTEST_CURRENT_TEST",
        "LOCAL_RANK",
        "NODE_RANK",
        "GLOBAL_RANK",
        "RANK",
        "WORLD_SIZE",
        "LOCAL_WORLD_SIZE",
    ):
        env.pop(key, None)  # left by an in-process run: rank 0 would take itself for a launched rank
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlp.cli", *args, *DDP[:2], f"--trainer.strategy={strategy}"],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"vlp {args[0]} on 2 processes did not end within {TIMEOUT} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def errors(result: subprocess.CompletedProcess) -> list[str]:
    """The `error:` paragraphs (one per rank that stopped) of a run that must have failed with
    exit code 2, without a traceback; the ranks share stderr, so two may share a line."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return re.findall(r"error: (.+?)(?=error: |$)", result.stderr, flags=re.MULTILINE)


def with_corrupt_images(src: str, dst: Path, count: int) -> str:
    """A copy of shard ``src`` whose first ``count`` images are not images."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        bad = 0
        for member in tin.getmembers():
            data = tin.extractfile(member).read()
            if member.name.endswith(".jpg") and bad < count:
                data, bad = b"not an image", bad + 1
            member.size = len(data)
            tout.addfile(member, io.BytesIO(data))
    return str(dst)


def retrieval_manifest(
    shapes: Path, folder: Path, split: str, corrupt: dict[int, int], name: str = "shapes_retrieval.yaml"
) -> Path:
    """The shapes manifest ``name`` with ``corrupt[i]`` broken images in shard ``i`` of ``split``."""
    from vlp.data.manifest import expand_urls

    manifest = yaml.safe_load((shapes / name).read_text())
    urls = expand_urls(manifest["splits"][split]["urls"])
    folder.mkdir(parents=True, exist_ok=True)
    for i, n in corrupt.items():
        urls[i] = with_corrupt_images(urls[i], folder / f"{split}-{i}.tar", n)
    manifest["splits"][split]["urls"] = urls
    path = folder / "retrieval.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return path


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory):
    """A 1-step, 1-process fit: its last checkpoint."""
    folder = tmp_path_factory.mktemp("trained")
    run_in(folder, ["fit", *tiny_args(shapes, 1, checkpoint_callback("ckpts"))])
    return folder / "ckpts" / "last.ckpt"


def test_test_skips_and_metrics_are_those_of_one_process(shapes, trained, tmp_path):
    """Corrupt test images on both ranks' shards: test_results.json of 2 processes counts the skips
    of both ranks, the same "skipped" and R@K as 1 process."""
    manifest = retrieval_manifest(shapes, tmp_path / "data", "test", {0: 2, 1: 3})  # rank 0: shard 0, rank 1: 1
    args = [
        "test",
        *tiny_args(shapes, 1),
        f"--data.init_args.test=[{{manifest: {manifest}, split: test}}]",
        "--data.init_args.max_skip_fraction=0.05",
        "--ckpt",
        str(trained),
    ]
    run_in(tmp_path / "one", args)
    result = vlp_ddp(tmp_path / "two", args)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = (json.loads(next((tmp_path / d).rglob("test_results.json")).read_text()) for d in ("one", "two"))
    assert one["skipped"]["seen"] == 500 and one["skipped"]["skipped"] == 5
    assert one["skipped"]["reasons"] == {"corrupt image": 5}
    assert two["skipped"] == one["skipped"]
    scores_one, scores_two = one["results"]["test"]["scores"], two["results"]["test"]["scores"]
    assert "t2i_r1" in scores_one
    assert scores_two == pytest.approx(scores_one, abs=1e-6)


def test_validation_skips_on_one_rank_stop_both_ranks(shapes, tmp_path):
    """10 corrupt images in rank 1's validation shard (5% of 200 > max_skip_fraction 1%): both ranks
    stop with the DataError when validation ends, none waits for the other."""
    manifest = retrieval_manifest(shapes, tmp_path / "data", "val", {1: 10})  # val shard 1 is rank 1's
    result = vlp_ddp(
        tmp_path / "run", ["fit", *tiny_args(shapes, 1), f"--data.init_args.val=[{{manifest: {manifest}, split: val}}]"]
    )
    lines = errors(result)
    assert len(lines) == 2, result.stderr[-3000:]
    assert all("val: 10 of 200 samples skipped" in line and "max_skip_fraction" in line for line in lines), lines


def test_training_skips_on_one_rank_stop_both_ranks(shapes, tmp_path):
    """60 corrupt images in one of rank 1's training shards (past max_skip_fraction on that rank
    only): both ranks stop at the same step, rank 1 with the counts, rank 0 pointing to it."""
    manifest = retrieval_manifest(shapes, tmp_path / "data", "train", {1: 60}, name="shapes_pair.yaml")
    args = [
        "fit",
        *tiny_args(shapes, 20),
        f"--data.init_args.train=[{{manifest: {manifest}, split: train}}]",
        "--data.init_args.min_samples_for_skip_check=32",
        "--data.init_args.max_bad_shard_fraction=1.0",
    ]
    lines = errors(vlp_ddp(tmp_path / "run", args))
    assert len(lines) == 2, lines
    assert sum("samples skipped" in line and "max_skip_fraction" in line for line in lines) == 1, lines
    assert sum("another rank passed the data limits" in line for line in lines) == 1, lines


def test_nonfinite_loss_is_skipped_then_stops_on_both_ranks(shapes, tmp_path):
    """lr 1e6 with optim.max_nonfinite_steps=1 on 2 processes: both ranks skip the first NaN step
    together, then stop at the same next one with the "loss is not finite" sentence."""
    args = [
        "fit",
        *tiny_args(shapes, 20),
        "--model.init_args.optim.lr=1e6",
        "--model.init_args.optim.warmup_steps=0",
        "--model.init_args.optim.max_nonfinite_steps=1",
    ]
    result = vlp_ddp(tmp_path / "run", args)
    lines = errors(result)
    assert len(lines) == 2, lines
    steps = {line.split("training step ")[1].split(":")[0] for line in lines}
    assert len(steps) == 1, lines
    assert all("the loss is not finite (itc_loss)" in line and "1 such step(s) skipped" in line for line in lines)
    skipped = re.findall(r"training step (\d+): the loss is not finite \(itc_loss\); step skipped", result.stderr)
    assert len(skipped) == 2 and len(set(skipped)) == 1 and int(skipped[0]) < int(steps.pop()), result.stderr[-3000:]


def test_unreadable_shard_of_one_rank_is_checked_over_all_ranks(shapes, tokenizer, monkeypatch):
    """Rank 1 of 2 loses its only validation shard: no DataError on that rank alone mid-run; at the
    end the counts of both ranks (1 of 2 shards > max_bad_shard_fraction) stop every rank."""
    import vlp.data.datamodule as datamodule
    from vlp.data import Source, WebDataModule
    from vlp.data.pipeline import Skipped
    from vlp.errors import DataError

    val = [Source(str(shapes / "shapes_retrieval.yaml"), split="val")]
    dm = WebDataModule(tokenizer=tokenizer, val=val, image_size=32, max_skip_fraction=0.6)
    dm.setup("validate")
    monkeypatch.setattr(dm, "_rank", lambda: (1, 2))
    url = dm.groups["val"][0].sources[0].urls[1]
    dm.record("val", 0, 0, [Skipped(f"{url}:0", "unreadable shard", count=100, shard=url)])  # rank 1's share
    rank0 = {"seen": 100, "skipped": 0, "reasons": {}, "bad_shards": {}}
    monkeypatch.setattr(datamodule, "gather_objects", lambda local: [rank0, local])
    report = dm.skip_report("val")
    assert (report["seen"], report["skipped"], report["bad_shards"]) == (200, 100, {url: 100})
    with pytest.raises(DataError, match=r"val: 1 of 2 shard\(s\) could not be read"):
        dm.finish_stage("val", report)
