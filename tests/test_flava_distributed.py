"""FLAVA on 2 processes (Lightning DDP on CPU, gloo), round robin over pairs, images and text
whose streams differ in length: every step has one modality on both ranks (parameters a
modality leaves unused do not break DDP: ``ddp_find_unused_parameters_true``, as the
recipes say), the run ends, and every objective trained."""

from __future__ import annotations

import csv

import pytest
import yaml
from bad_input.test_distributed_input import vlp_ddp
from test_flava_cli import small, workdir  # noqa: F401  (the fixture)

pytestmark = pytest.mark.slow


def test_round_robin_on_two_processes(workdir):  # noqa: F811
    cfg = small("recipes/tiny/flava.yaml", workdir, steps=6)
    data = cfg["data"]["init_args"]
    data["val"] = []  # training only: evaluation on 2 processes is tested elsewhere
    data["train"][1]["batch_size"] = 4  # another batch size per modality on top of another length
    path = workdir / "ddp.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    result = vlp_ddp(workdir / "ddp", ["fit", "--config", str(path)], strategy="ddp_find_unused_parameters_true")
    assert result.returncode == 0, result.stderr[-3000:]
    (metrics,) = (workdir / "ddp" / "logs").rglob("metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    trained = {k for row in rows for k, v in row.items() if v and k.endswith("_loss")}
    assert trained >= {f"train/{n}_loss" for n in ("global_contrastive", "mim", "mlm", "mmm_image", "mmm_text", "itm")}
    assert max(int(r["step"]) for r in rows if r["step"]) >= 5
