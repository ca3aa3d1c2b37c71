"""Rerun the tiny demos over several seeds and print each score's mean, spread and range.

A one-run comparison on the shapes benchmark can flip between machines and seeds, so the
docs quote these tables. Each seed varies ``seed_everything`` and with it the data order
(the stream seed follows ``PL_GLOBAL_SEED``). The runs go one after the other in the repo
root under the recipes' own folders, which are moved to ``runs/seeds/<run>/s<seed>`` after
each seed; the summary is printed and written to ``runs/seeds/summary.md``.

    python bench/seeds.py --runs clip --seeds 0 1 2
    python bench/seeds.py --runs albef clip_minilm --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VLP = [sys.executable, "-m", "vlp.cli"]

# run → (commands, the folders they write, the folders holding test_results.json)
RUNS: dict[str, tuple[list[list[str]], list[str], list[str]]] = {
    "clip": (
        [["fit", "--config", "recipes/tiny/clip.yaml"], ["test", "--ckpt", "runs/tiny_clip/checkpoints/last.ckpt"]],
        ["runs/tiny_clip"],
        ["runs/tiny_clip"],
    ),
    "albef": (
        [["fit", "--config", "recipes/tiny/albef.yaml"], ["test", "--ckpt", "runs/tiny_albef/checkpoints/last.ckpt"]],
        ["runs/tiny_albef"],
        ["runs/tiny_albef"],
    ),
    "clip_minilm": (
        [
            ["fit", "--config", "recipes/tiny/clip_minilm.yaml"],
            ["test", "--ckpt", "runs/tiny_clip_minilm/checkpoints/last.ckpt"],
        ],
        ["runs/tiny_clip_minilm"],
        ["runs/tiny_clip_minilm"],
    ),
    "meter_vqa": (
        [
            ["fit", "--config", "recipes/tiny/meter.yaml"],
            ["fit", "--config", "recipes/finetune/tiny_meter_vqa.yaml"],
            ["test", "--ckpt", "runs/tiny_meter_vqa/checkpoints/last.ckpt"],
        ],
        ["runs/tiny_meter", "runs/tiny_meter_vqa"],
        ["runs/tiny_meter_vqa"],
    ),
    # `make demo-flava`'s two arms, each pretrained then fine-tuned on VQA
    "flava": (
        [
            ["fit", "--config", "recipes/tiny/flava.yaml"],
            ["test", "--ckpt", "runs/tiny_flava/checkpoints/last.ckpt"],
            ["fit", "--config", "recipes/finetune/tiny_flava_vqa.yaml"],
            ["test", "--ckpt", "runs/tiny_flava_vqa/checkpoints/last.ckpt"],
        ],
        ["runs/tiny_flava", "runs/tiny_flava_vqa"],
        ["runs/tiny_flava", "runs/tiny_flava_vqa"],
    ),
    "flava_c": (
        [
            ["fit", "--config", "recipes/tiny/flava.yaml", "--config", "recipes/ablations/flava_tiny_contrastive.yaml"],
            ["test", "--ckpt", "runs/tiny_flava_c/checkpoints/last.ckpt"],
            [
                "fit",
                "--config",
                "recipes/finetune/tiny_flava_vqa.yaml",
                "--config",
                "recipes/ablations/flava_tiny_contrastive_vqa.yaml",
            ],
            ["test", "--ckpt", "runs/tiny_flava_c_vqa/checkpoints/last.ckpt"],
        ],
        ["runs/tiny_flava_c", "runs/tiny_flava_c_vqa"],
        ["runs/tiny_flava_c", "runs/tiny_flava_c_vqa"],
    ),
    # full FLAVA with the contrastive loss on the masked pass (pretraining only)
    "flava_masked": (
        [
            [
                "fit",
                "--config",
                "recipes/tiny/flava.yaml",
                "--config",
                "recipes/ablations/flava_tiny_masked_contrastive.yaml",
            ],
            ["test", "--ckpt", "runs/tiny_flava_masked/checkpoints/last.ckpt"],
        ],
        ["runs/tiny_flava_masked"],
        ["runs/tiny_flava_masked"],
    ),
}


def run_seed(name: str, seed: int, out: Path) -> dict:
    commands, folders, results = RUNS[name]
    for folder in folders:
        shutil.rmtree(REPO / folder, ignore_errors=True)
    start = time.time()
    for args in commands:
        extra = [f"--seed_everything={seed}"] if args[0] == "fit" else []
        subprocess.run([*VLP, *args, *extra, "--trainer.enable_progress_bar=false"], cwd=REPO, check=True)
    record: dict = {"results": {}}
    for folder in results:
        # the newest test of each folder (a folder tested twice keeps only the last)
        found = sorted((REPO / folder).rglob("test_results.json"), key=lambda f: f.stat().st_mtime)
        record["results"].update(json.loads(found[-1].read_text())["results"])
    record["seconds"] = time.time() - start
    record["seed"] = seed
    dest = out / name / f"s{seed}"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for folder in folders:
        shutil.move(str(REPO / folder), str(dest / Path(folder).name))
    (dest / "record.json").write_text(json.dumps(record, indent=1))
    return record


def summary(name: str, records: list[dict]) -> str:
    """One row per score: mean ± sample std over seeds, [min, max], and the per-seed values."""
    lines = [
        f"### {name} ({len(records)} seeds)",
        "",
        "| score | mean ± std | min – max | per seed |",
        "|---|---|---|---|",
    ]
    keys = [k for k in records[0]["results"]]
    for split in keys:
        scores = [r["results"][split]["scores"] for r in records]
        for score in scores[0]:
            values = [s[score] for s in scores if score in s]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            each = ", ".join(f"{v:.1f}" for v in values)
            label = score if len(keys) == 1 else f"{split}/{score}"
            lines.append(
                f"| {label} | {statistics.mean(values):.1f} ± {std:.1f} | {min(values):.1f} – {max(values):.1f} | {each} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", choices=sorted(RUNS), required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default="runs/seeds")
    args = parser.parse_args()
    out = REPO / args.out
    machine = f"{platform.processor() or platform.machine()}, {platform.system()}"
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        machine = f"{model}, {len(open('/proc/cpuinfo').read().split('processor')) - 1} cores"
    except (OSError, StopIteration):
        pass
    blocks = []
    for name in args.runs:
        for seed in args.seeds:
            run_seed(name, seed, out)
        # every seed recorded for this run so far, from this invocation or earlier ones
        records = [json.loads(f.read_text()) for f in sorted((out / name).glob("s*/record.json"))]
        blocks.append(summary(name, records))
        text = f"Machine: {machine}\n\n" + "\n\n".join(blocks) + "\n"
        (out / "summary.md").write_text(text)
        print(text, flush=True)


if __name__ == "__main__":
    main()
