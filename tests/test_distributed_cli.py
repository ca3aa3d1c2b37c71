"""`vlp fit` / `vlp test` on 2 CPU processes (Lightning DDP, gloo) with evaluation splits of a
single shard, as COCO/Flickr val and test are: before the one evaluation path, rank 1 got no
batch and the first validation died ("Received data size doesn't match expected size") or
waited forever. Now validation runs on both ranks and the test scores equal 1 process's."""

from __future__ import annotations

import json

import pytest
import yaml
from bad_input.test_cli_input import checkpoint_callback, tiny_args
from bad_input.test_distributed_input import shapes, vlp_ddp  # noqa: F401 (fixture)
from helpers import run_in

pytestmark = pytest.mark.slow


def one_shard_manifest(manifests, folder) -> str:
    """The shapes retrieval manifest with val and test cut to their first shard."""
    from vlp.data.manifest import expand_urls

    manifest = yaml.safe_load((manifests / "shapes_retrieval.yaml").read_text())
    for split in ("val", "test"):
        entry = manifest["splits"][split]
        urls = expand_urls(entry["urls"])
        entry["urls"], entry["num_samples"], entry["shard_sizes"] = (
            urls[:1],
            entry["shard_sizes"][0],
            entry["shard_sizes"][:1],
        )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "one_shard.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return str(path)


def test_one_shard_validation_and_test_on_two_processes_equal_one(shapes, tmp_path):  # noqa: F811
    manifest = one_shard_manifest(shapes, tmp_path / "data")
    data = [
        f"--data.init_args.val=[{{manifest: {manifest}, split: val}}]",
        f"--data.init_args.test=[{{manifest: {manifest}, split: test}}]",
    ]
    fit = vlp_ddp(tmp_path / "fit", ["fit", *tiny_args(shapes, 2, checkpoint_callback("ckpts")), *data])
    assert fit.returncode == 0, fit.stderr[-3000:]
    ckpt = tmp_path / "fit" / "ckpts" / "last.ckpt"
    args = ["test", *tiny_args(shapes, 2), *data, "--ckpt", str(ckpt)]
    # the checkpoint's recipe says 2 DDP devices (it was fitted so): 1 process is asked for
    run_in(tmp_path / "one", [*args, "--trainer.devices=1", "--trainer.strategy=auto"])
    two = vlp_ddp(tmp_path / "two", args)
    assert two.returncode == 0, two.stderr[-3000:]
    one, two = (json.loads(next((tmp_path / d).rglob("test_results.json")).read_text()) for d in ("one", "two"))
    assert one["results"]["test"]["num_images"] == 100  # the whole shard of 100 images, once
    assert two["results"]["test"]["num_images"] == one["results"]["test"]["num_images"]
    assert two["results"]["test"]["scores"] == pytest.approx(one["results"]["test"]["scores"], abs=1e-6)
