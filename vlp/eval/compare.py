"""``vlp compare``: test results of several runs side by side.

    vlp compare runs/tiny_clip_minilm runs/tiny_albef [--source test] [--names clip,albef]

With several test sources (logged as ``test/<source>``) it prints one table per source
that every run has.

Each argument is a ``test_results.json`` written by ``vlp test`` (see
``VLPModule.on_test_end``) or a run folder, in which the newest such file is used. Rows are
the metrics any run reports (R@K per direction and their mean, for ITC and, for fusion
models, after ITM re-ranking; the ITM accuracy), columns the runs, with chance last.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vlp.errors import ConfigError

RESULTS_FILE = "test_results.json"

# (key, label) in print order; a row is printed when any run has the key
ROWS = [
    *((f"i2t_r{k}", f"image→text R@{k:<3} ITC") for k in (1, 5, 10)),
    *((f"itm_i2t_r{k}", f"image→text R@{k:<3} ITC+ITM") for k in (1, 5, 10)),
    *((f"t2i_r{k}", f"text→image R@{k:<3} ITC") for k in (1, 5, 10)),
    *((f"itm_t2i_r{k}", f"text→image R@{k:<3} ITC+ITM") for k in (1, 5, 10)),
    ("rmean", "mean R@K       ITC"),
    ("itm_rmean", "mean R@K       ITC+ITM"),
    ("itm_acc", "ITM accuracy (balanced)"),
]
CHANCE = {"itm_acc": 50.0}  # balanced: half matching pairs, half hardest negatives
OTHER_LABELS = {
    "overall": "accuracy, overall",
    "acc": "accuracy",
    "auroc": "ROC-AUC",
    "zeroshot_top1": "zero-shot top-1",
    "zeroshot_top5": "zero-shot top-5",
    "probe_top1": "linear probe top-1",
    "probe_top5": "linear probe top-5",
}


def find_results(path: str | Path) -> Path:
    """``path`` itself if it is a file, else the newest ``test_results.json`` below it."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise ConfigError(f"{path}: no such results file or run folder")
    found = sorted(path.rglob(RESULTS_FILE), key=lambda p: p.stat().st_mtime)
    if not found:
        raise ConfigError(f"{path}: no {RESULTS_FILE} below it; run `vlp test --ckpt CKPT` first")
    return found[-1]


def load_results(path: str | Path) -> dict:
    file = find_results(path)
    try:
        record = json.loads(file.read_text())
        record["results"]
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{file}: not a vlp test results file ({e})") from None
    return record


def _chance(record: dict, key: str) -> float | None:
    if key in CHANCE:
        return CHANCE[key]
    chance = record.get("chance", {})
    return chance.get(key.removeprefix("itm_"))


def compare_table(records: dict[str, dict], source: str = "test") -> str:
    """Text table of ``records`` (run name → results record) for evaluation ``source``."""
    picked: dict[str, dict] = {}
    for name, record in records.items():
        results = record["results"]
        if source not in results:
            raise ConfigError(f"{name}: no results for {source!r} (has {sorted(results)})")
        picked[name] = {
            "scores": {},
            **results[source],
            "model": record.get("model", "?"),
            "n": record.get("num_parameters"),
        }
    names = list(picked)
    tasks = {picked[n].get("task") for n in names} - {None}
    # retrieval rows in their fixed order, then any other metric (task heads: VQA by type, accuracy)
    known = {key for key, _ in ROWS}
    others = dict.fromkeys(k for n in names for k in picked[n]["scores"] if k not in known)
    others = sorted(others, key=lambda k: (k not in OTHER_LABELS, k))
    rows = [
        (key, label)
        for key, label in ROWS + [(k, OTHER_LABELS.get(k, f"accuracy, {k}")) for k in others]
        if any(key in picked[n]["scores"] for n in names)
    ]
    if tasks == {"irtr"} and not any(k.startswith("itm_") for n in names for k in picked[n]["scores"]):
        # the Retrieval head without ITC features: the ITM score ranked every pair
        rows = [(key, label.replace(" ITC", " ITM")) for key, label in rows]
    width = max(12, *(len(n) + 2 for n in names))
    label_w = max(len(label) for _, label in [*rows, ("parameters", "parameters")]) + 2
    reference = "baseline" if tasks == {"vqa"} else "chance"
    params = [f"{picked[n]['n'] / 1e6:.2f} M" if picked[n]["n"] else "?" for n in names]
    lines = [
        f"{'':{label_w}}" + "".join(f"{n:>{width}}" for n in names) + f"{reference:>{width}}",
        f"{'model':{label_w}}" + "".join(f"{picked[n]['model']:>{width}}" for n in names),
        f"{'parameters':{label_w}}" + "".join(f"{p:>{width}}" for p in params),
    ]
    for key, label in rows:
        cells = [picked[n]["scores"].get(key) for n in names]
        chance = next((c for n in names if (c := _chance(picked[n], key)) is not None), None)
        row = "".join(f"{v:{width}.2f}" if v is not None else f"{'-':>{width}}" for v in cells)
        lines.append(f"{label:{label_w}}{row}" + (f"{chance:{width}.2f}" if chance is not None else ""))
    first = next(iter(picked.values()))
    if "num_images" in first:
        texts = f", {first['num_texts']} texts" if "num_texts" in first else ""
        lines.append(f"({first['num_images']} images{texts}; '-': not reported)")
    elif tasks:
        lines.append(f"(task: {', '.join(sorted(tasks))}; accuracy in %; '-': not reported)")
    return "\n".join(lines)


def compare_main(args: list[str]) -> str:
    parser = argparse.ArgumentParser(prog="vlp compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="test_results.json files or run folders")
    parser.add_argument("--source", default="test", help="evaluation source (default: test)")
    parser.add_argument("--names", help="comma-separated column names (default: the run folders' names)")
    ns = parser.parse_args(args)
    names = run_names(ns.runs) if ns.names is None else [n.strip() for n in ns.names.split(",")]
    if len(names) != len(ns.runs) or len(set(names)) != len(names):
        raise ConfigError(f"--names needs {len(ns.runs)} distinct names, got {ns.names!r}")
    records = {name: load_results(run) for name, run in zip(names, ns.runs, strict=True)}
    sources = [ns.source]
    if not all(ns.source in r["results"] for r in records.values()):
        # several evaluation sources (logged as <stage>/<source>): one table each, those all runs have
        per_run = [{k for k in r["results"] if k.startswith(ns.source + "/")} for r in records.values()]
        sources = sorted(set.intersection(*per_run)) or sources
    tables = [compare_table(records, src) for src in sources]
    table = "\n\n".join(t if len(sources) == 1 else f"{src}\n{t}" for src, t in zip(sources, tables, strict=True))
    print(table)
    return table


def run_names(runs: list[str]) -> list[str]:
    """Column names: each run folder's name (a results file's run folder), or the paths as
    given where those names repeat."""
    folders = [Path(r).parent if str(r).endswith(".json") else Path(r) for r in runs]
    names = [f.name for f in folders]
    return names if len(set(names)) == len(names) else [str(r).rstrip("/") for r in runs]
