"""GLUE-format tsv files → ``text_pair`` shards (``vlp data glue``).

```
vlp data glue --task sst2 --dir GLUE/SST-2 --out data/glue/sst2
```

reads every split file of the task found in ``--dir`` (``train.tsv``, ``dev.tsv``,
``test.tsv``; MNLI: ``dev_matched`` / ``dev_mismatched`` / ``test_matched`` /
``test_mismatched``) by the task's column table (:data:`GLUE_TASKS`), and writes
``out/{split}-000000.tar``... with one ``json`` {text, text_b, label, index} per row and
``out/manifest.yaml`` (modality ``text_pair``). Files are UTF-8 (a BOM is dropped), tab
separated, read with ``csv.QUOTE_NONE`` (GLUE's quotes are text). Columns are found by
header name; CoLA's train/dev files have no header and are read by position. Test files
have no labels: their samples carry no ``label`` (evaluation needs labelled splits).

A row with too few columns, an empty sentence or an unknown label is skipped, logged with
its line number and listed in ``out/{split}-skipped.json`` (counts in the manifest's
``extra``); more than ``max_skip_fraction`` of a split's rows skipped is a DataError.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from vlp.data.convert import ShardSink, read_text, shard_pattern
from vlp.data.manifest import Manifest, Split, load_manifest
from vlp.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GlueTask:
    """How a GLUE task's files are laid out and scored.

    ``text`` / ``text_b`` / ``label``: header names of the columns (``text_b`` None for
    single-sentence tasks). ``positions``: (text, label) column indices of headerless files
    (CoLA train/dev). ``labels``: label names in index order, or None for numeric labels
    (``num_labels`` classes, or regression when 1). ``metrics``: what the task reports."""

    text: str
    text_b: str | None
    label: str
    labels: tuple[str, ...] | None
    num_labels: int
    metrics: tuple[str, ...]
    splits: tuple[str, ...] = ("train", "dev", "test")
    positions: tuple[int, int] | None = None


_NLI2 = ("entailment", "not_entailment")
#: The GLUE tasks (Wang et al. 2019): label order as in the GLUE / HF ``glue`` datasets.
GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask("sentence", None, "label", None, 2, ("mcc", "acc"), positions=(3, 1)),
    "sst2": GlueTask("sentence", None, "label", None, 2, ("acc",)),
    "mrpc": GlueTask("#1 String", "#2 String", "Quality", None, 2, ("acc", "f1")),
    "qqp": GlueTask("question1", "question2", "is_duplicate", None, 2, ("acc", "f1")),
    "stsb": GlueTask("sentence1", "sentence2", "score", None, 1, ("pearson", "spearman")),
    "mnli": GlueTask(
        "sentence1",
        "sentence2",
        "gold_label",
        ("entailment", "neutral", "contradiction"),
        3,
        ("acc",),
        splits=("train", "dev_matched", "dev_mismatched", "test_matched", "test_mismatched"),
    ),
    "qnli": GlueTask("question", "sentence", "label", _NLI2, 2, ("acc",)),
    "rte": GlueTask("sentence1", "sentence2", "label", _NLI2, 2, ("acc",)),
    "wnli": GlueTask("sentence1", "sentence2", "label", None, 2, ("acc",)),
}


def glue_task(name: str) -> GlueTask:
    key = name.lower().replace("-", "")
    if key not in GLUE_TASKS:
        raise ConfigError(f"unknown GLUE task {name!r}; expected one of {sorted(GLUE_TASKS)}")
    return GLUE_TASKS[key]


def _label(task: GlueTask, value: str) -> int | float | None:
    """The label index (or STS-B score) of a cell, or None when it is not a valid label."""
    value = value.strip()
    if task.num_labels == 1:
        try:
            score = float(value)
        except ValueError:
            return None
        return score if math.isfinite(score) else None
    if task.labels is not None:
        return task.labels.index(value) if value in task.labels else None
    return int(value) if value.isdigit() and int(value) < task.num_labels else None


def read_glue_tsv(path: str | Path, task: str | GlueTask) -> tuple[list[dict], list[dict]]:
    """(samples, skipped) of one GLUE tsv file of ``task``.

    Samples are ``{"text", "text_b" (pairs), "label" (labelled files), "index", "line"}``;
    skipped rows are ``{"line", "reason"}`` (1-based line numbers of the file)."""
    path, spec = Path(path), glue_task(task) if isinstance(task, str) else task
    if not path.is_file():
        raise ConfigError(f"GLUE file not found: {path}")
    text = read_text(path)
    if text.startswith("\ufeff"):
        text = text[1:]
    rows = list(csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise DataError(f"{path} is empty")
    header = [c.strip() for c in rows[0]]
    if spec.text in header:
        cols = {"text": header.index(spec.text)}
        if spec.text_b is not None:
            if spec.text_b not in header:
                raise DataError(f"{path}: no column {spec.text_b!r} in the header {header}")
            cols["text_b"] = header.index(spec.text_b)
        if spec.label in header:
            cols["label"] = header.index(spec.label)
        body, first = rows[1:], 2
    elif spec.positions is not None:  # CoLA train/dev: no header
        cols = {"text": spec.positions[0], "label": spec.positions[1]}
        body, first = rows, 1
    else:
        raise DataError(f"{path}: the header {header} has no column {spec.text!r} (is it a {task} file?)")
    need = max(cols.values()) + 1
    samples, skipped = [], []
    for line, row in enumerate(body, start=first):
        if not any(c.strip() for c in row):
            continue  # a blank line (a trailing newline)
        if len(row) < need:
            skipped.append({"line": line, "reason": f"{len(row)} column(s), expected at least {need}"})
            continue
        sample = {"text": " ".join(row[cols["text"]].split()), "index": len(samples), "line": line}
        if "text_b" in cols:
            sample["text_b"] = " ".join(row[cols["text_b"]].split())
        empty = [k for k in ("text", "text_b") if k in sample and not sample[k]]
        if empty:
            skipped.append({"line": line, "reason": f"empty {empty[0]}"})
            continue
        if "label" in cols:
            label = _label(spec, row[cols["label"]])
            if label is None:
                skipped.append({"line": line, "reason": f"unknown label {row[cols['label']]!r}"})
                continue
            sample["label"] = label
        samples.append(sample)
    return samples, skipped


def convert_glue(
    task: str,
    folder: str | Path,
    out: str | Path,
    *,
    splits: list[str] | None = None,
    samples_per_shard: int = 10000,
    max_skip_fraction: float = 0.01,
) -> Manifest:
    """Write the ``splits`` (default: every split file of ``task`` in ``folder``) as
    ``text_pair`` shards under ``out`` and return the manifest saved as ``out/manifest.yaml``."""
    spec, folder, out = glue_task(task), Path(folder), Path(out)
    name = task.lower().replace("-", "")
    if not folder.is_dir():
        raise ConfigError(f"GLUE folder not found: {folder}")
    wanted = splits or [s for s in spec.splits if (folder / f"{s}.tsv").is_file()]
    unknown = [s for s in wanted if s not in spec.splits]
    if unknown:
        raise ConfigError(f"GLUE {name} has no split(s) {unknown}; its splits are {list(spec.splits)}")
    if not wanted:
        raise ConfigError(f"{folder} holds none of {[s + '.tsv' for s in spec.splits]}")
    read = {s: read_glue_tsv(folder / f"{s}.tsv", spec) for s in wanted}
    for split, (samples, skipped) in read.items():
        total = len(samples) + len(skipped)
        for s in skipped[:20]:
            log.warning("glue %s/%s.tsv line %d skipped: %s", name, split, s["line"], s["reason"])
        if len(skipped) > max_skip_fraction * total:
            shown = "; ".join(f"line {s['line']}: {s['reason']}" for s in skipped[:10])
            raise DataError(
                f"{folder / (split + '.tsv')}: {len(skipped)} of {total} rows unusable "
                f"(more than max_skip_fraction={max_skip_fraction}): {shown}"
            )
        if not samples:
            raise DataError(f"{folder / (split + '.tsv')}: no usable row")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".tmp-glue"
    shutil.rmtree(tmp, ignore_errors=True)
    new_splits, extra = {}, {"skipped": {}}
    try:
        for split, (samples, skipped) in read.items():
            with ShardSink(tmp, split, samples_per_shard) as sink:
                for s in samples:
                    sink.write({"__key__": f"{s['index']:09d}", "json": {k: v for k, v in s.items() if k != "line"}})
            (tmp / f"{split}-skipped.json").write_text(json.dumps(skipped, indent=1) + "\n")
            sizes = [min(samples_per_shard, len(samples) - i * samples_per_shard) for i in range(sink.num_shards)]
            new_splits[split] = Split(shard_pattern(str(out), split, sink.num_shards), len(samples), shard_sizes=sizes)
            extra["skipped"][split] = {"count": len(skipped), "file": str(out / f"{split}-skipped.json")}
            if "label" in samples[0]:
                extra.setdefault("labelled", []).append(split)
        for old in out.glob("*.tar"):
            if old.name.split("-")[0] in read:
                old.unlink()
        for f in tmp.iterdir():
            f.replace(out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    old = load_manifest(out / "manifest.yaml") if (out / "manifest.yaml").is_file() else None
    if old is not None:  # splits converted before and not now are kept
        new_splits = {**{k: v for k, v in old.splits.items() if k not in new_splits}, **new_splits}
        extra["skipped"] = {**old.extra.get("skipped", {}), **extra["skipped"]}
        extra["labelled"] = sorted({*old.extra.get("labelled", []), *extra.get("labelled", [])})
    manifest = Manifest(
        name=f"glue_{name}",
        modality="text_pair",
        splits=new_splits,
        license="see the task's own license (GLUE, gluebenchmark.com)",
        description=f"GLUE {name} converted from {folder} by vlp data glue",
        extra={
            "task": name,
            "num_labels": spec.num_labels,
            "labels": list(spec.labels) if spec.labels else None,
            "metrics": list(spec.metrics),
            **extra,
        },
    )
    manifest.save(out / "manifest.yaml")
    return manifest
