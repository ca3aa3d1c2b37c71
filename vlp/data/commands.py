"""``vlp data synth | inspect | convert | tokenizer``: make, look at and bring data, and build
an image tokenizer from it."""

from __future__ import annotations

import argparse
import json
import os
import tarfile
import time
from collections import Counter

from vlp.data.manifest import DEFAULT_FIELDS, MODALITIES, expand_urls, load_manifest
from vlp.errors import ConfigError, DataError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlp data", description="Make, inspect and convert webdataset shards.")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write the synthetic 'shapes' benchmark (every modality)")
    s.add_argument("--out", required=True, help="output folder, e.g. data/shapes")
    s.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    s.add_argument("--size", type=int, default=20000, help="training pairs; other splits scale with it")
    s.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    s.add_argument("--samples-per-shard", type=int, default=1000)

    i = sub.add_parser("inspect", help="count samples, list fields, decode a few samples")
    i.add_argument("source", help="a manifest YAML, a shard path/URL or a brace pattern")
    i.add_argument("--split", default=None, help="manifest split (default: all)")
    i.add_argument("-n", "--num", type=int, default=3, help="samples to decode and show")
    i.add_argument("--modality", choices=MODALITIES, default=None, help="for raw shards (default: guessed)")

    c = sub.add_parser("convert", help="a folder of images + captions/labels -> shards and a manifest")
    c.add_argument("images", help="folder of image files")
    c.add_argument("--out", required=True, help="output folder for shards and manifest.yaml")
    group = c.add_mutually_exclusive_group(required=True)
    group.add_argument("--captions", help="CSV (image,caption[,caption_index]) or JSON list of {image, captions}")
    group.add_argument("--labels", help="CSV (image,label[,...]) for an image-classification split")
    c.add_argument("--classnames", default=None, help="JSON file with a 'classnames' list (labels only)")
    c.add_argument(
        "--modality",
        choices=["pair", "retrieval", "image"],
        default=None,
        help="default: retrieval when every image has several captions, pair when each has one",
    )
    c.add_argument("--name", default=None, help="dataset name in the manifest")
    c.add_argument("--split", default="train")
    c.add_argument("--samples-per-shard", type=int, default=1000)
    c.add_argument("--max-image-size", type=int, default=None, help="downscale so the longer side is at most this")
    c.add_argument("--encoding", default=None, help="codec of the captions/labels files (default: UTF-8, BOM allowed)")
    c.add_argument(
        "--duplicates",
        choices=["error", "drop", "keep"],
        default="error",
        help="a repeated (image, caption) row: stop with an error, drop the repeat (listed as skipped) or keep it",
    )
    c.add_argument("--max-skip-fraction", type=float, default=0.05, help="stop when more of the listed images are lost")

    t = sub.add_parser("tokenizer", help="fit a k-means patch tokenizer (MIM/MMM targets) on images of shards")
    t.add_argument("--data", required=True, help="a manifest YAML, a shard path or a brace pattern")
    t.add_argument("--split", default=None, help="manifest split (default: train, else the only one)")
    t.add_argument("--out", required=True, help="the tokenizer file to write, e.g. data/shapes_tokenizer.safetensors")
    t.add_argument("--codes", type=int, default=512, help="vocabulary size (centroids)")
    t.add_argument("--patch", type=int, default=8, help="pixels per patch side: the model's patch size")
    t.add_argument("--image-size", "--image_size", type=int, default=32, help="the model's image side in pixels")
    t.add_argument(
        "--pool",
        type=int,
        default=None,
        help="patch feature: pool x pool RGB cells (0: every pixel; default 4 if it divides the patch)",
    )
    t.add_argument("--normalize", action="store_true", help="normalise each patch feature (drops colour)")
    t.add_argument("--max-images", "--max_images", type=int, default=5000, help="images to read")
    t.add_argument("--iters", type=int, default=25, help="k-means iterations at most")
    t.add_argument("--seed", type=int, default=0)
    g = sub.add_parser("glue", help="GLUE-format tsv files of one task -> text_pair shards and a manifest")
    g.add_argument("--task", required=True, help="cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte or wnli")
    g.add_argument("--dir", required=True, help="the task's folder of tsv files, e.g. GLUE/SST-2")
    g.add_argument("--out", required=True, help="output folder for shards and manifest.yaml")
    g.add_argument("--splits", nargs="*", default=None, help="split files to convert (default: all found)")
    g.add_argument("--samples-per-shard", type=int, default=10000)
    g.add_argument("--max-skip-fraction", type=float, default=0.01, help="stop when more rows of a split are bad")
    return parser


def data_main(args: list[str]) -> object:
    ns = _parser().parse_args(args)
    return {"synth": _synth, "inspect": _inspect, "convert": _convert, "tokenizer": _tokenizer, "glue": _glue}[
        ns.command
    ](ns)


def _tokenizer(ns: argparse.Namespace) -> dict:
    from vlp.tokenizers import build_kmeans_tokenizer

    info = build_kmeans_tokenizer(
        ns.data,
        ns.out,
        codes=ns.codes,
        patch_size=ns.patch,
        image_size=ns.image_size,
        pool=(4 if ns.patch % 4 == 0 else None) if ns.pool is None else (ns.pool or None),
        normalize=ns.normalize,
        max_images=ns.max_images,
        iters=ns.iters,
        seed=ns.seed,
        split=ns.split,
    )
    print(
        f"wrote a {info['codes']}-code k-means tokenizer to {ns.out} in {info['seconds']:.1f}s "
        f"({info['images']} images of {info['source']}, {info['patches']} patches, {info['codes_used']} codes used, "
        f"mean squared error {info['mse']:.4f})"
    )
    return info


def _synth(ns: argparse.Namespace) -> dict:
    from vlp.data.synth import write_shapes

    start = time.perf_counter()
    info = write_shapes(
        ns.out, seed=ns.seed, size=ns.size, image_size=ns.image_size, samples_per_shard=ns.samples_per_shard
    )
    print(f"wrote the shapes benchmark to {ns.out} in {time.perf_counter() - start:.1f}s")
    for name in sorted(os.listdir(os.path.join(ns.out, "manifests"))):
        manifest = load_manifest(os.path.join(ns.out, "manifests", name))
        splits = ", ".join(f"{k}: {v.num_samples}" for k, v in manifest.splits.items())
        print(f"  {manifest.modality:12} {splits}   ({os.path.join(ns.out, 'manifests', name)})")
    return info


def _convert(ns: argparse.Namespace):
    from vlp.data.convert import convert_folder

    kwargs = dict(
        captions=ns.captions,
        labels=ns.labels,
        modality=ns.modality,
        name=ns.name,
        samples_per_shard=ns.samples_per_shard,
        max_image_size=ns.max_image_size,
        split=ns.split,
        encoding=ns.encoding,
        duplicates=ns.duplicates,
        max_skip_fraction=ns.max_skip_fraction,
    )
    if ns.classnames:
        kwargs["classnames"] = ns.classnames
    manifest = convert_folder(ns.images, ns.out, **kwargs)
    split = manifest.split(ns.split)
    print(
        f"wrote {split.num_samples} {manifest.modality_of(ns.split)} samples to {ns.out} "
        f"(manifest: {os.path.join(ns.out, 'manifest.yaml')})"
    )
    return manifest


def _glue(ns: argparse.Namespace):
    from vlp.data.glue import convert_glue

    manifest = convert_glue(
        ns.task,
        ns.dir,
        ns.out,
        splits=ns.splits,
        samples_per_shard=ns.samples_per_shard,
        max_skip_fraction=ns.max_skip_fraction,
    )
    for name, split in manifest.splits.items():
        skipped = manifest.extra["skipped"].get(name, {})
        print(
            f"  {name:16} {split.num_samples} samples, {skipped.get('count', 0)} bad rows skipped "
            f"({skipped.get('file', '-')})"
        )
    print(f"wrote GLUE {manifest.extra['task']} to {ns.out} (manifest: {os.path.join(ns.out, 'manifest.yaml')})")
    return manifest


# -- inspect ----------------------------------------------------------------------------------
def count_local(urls: list[str]) -> tuple[list[int], Counter]:
    """Samples per shard and per-extension file counts of local tar shards (reads headers only)."""
    sizes, exts = [], Counter()
    for url in urls:
        keys, last = 0, None
        try:
            with tarfile.open(url) as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    base = os.path.basename(member.name)
                    key, _, ext = base.partition(".")
                    key = os.path.join(os.path.dirname(member.name), key)
                    if key != last:
                        keys, last = keys + 1, key
                    exts[ext] += 1
        except (OSError, tarfile.TarError) as e:
            raise DataError(f"cannot read shard {url}: {e}") from None
        sizes.append(keys)
    return sizes, exts


def _guess_modality(exts: Counter) -> str:
    images = {e for e in exts if e in DEFAULT_FIELDS["image"].split(";")}
    if any(e[0].isdigit() for e in exts):
        return "interleaved"
    if any(e.startswith(("left.", "right.")) for e in exts):
        return "nlvr2"
    if images and "cls" in exts:
        return "image"
    if images and "txt" in exts:
        return "pair"
    if not images and "txt" in exts:
        return "text"
    if not images and set(exts) == {"json"}:
        return "text_pair"
    return "retrieval" if images else "text"


def _show(example: dict) -> str:
    parts = []
    for k, v in example.items():
        if hasattr(v, "shape"):
            parts.append(f"{k}: tensor{tuple(v.shape)}")
        elif isinstance(v, list) and v and hasattr(v[0], "shape"):
            parts.append(f"{k}: {len(v)} x tensor{tuple(v[0].shape)}")
        else:
            parts.append(f"{k}: {json.dumps(v) if not isinstance(v, str) else repr(v)}")
    return "\n    ".join(parts)


def _inspect(ns: argparse.Namespace) -> dict:
    from vlp.data.pipeline import SampleDecoder, Skipped, read_shards
    from vlp.data.transforms import ImageTransform

    if ns.source.endswith((".yaml", ".yml")):
        manifest = load_manifest(ns.source)
        targets = [
            (
                f"{manifest.name}/{s}",
                manifest.split(s).urls,
                manifest.modality_of(s),
                manifest.fields,
                manifest.split(s).num_samples,
            )
            for s in ([ns.split] if ns.split else manifest.splits)
        ]
    else:
        targets = [(ns.source, ns.source, ns.modality, dict(DEFAULT_FIELDS), None)]
    report = {}
    for name, pattern, modality, fields, declared in targets:
        urls = expand_urls(pattern)
        if not urls:
            raise ConfigError(f"{name}: {pattern!r} matches no shards")
        local = all(os.path.isfile(u) for u in urls)
        sizes, exts = count_local(urls) if local else (None, Counter())
        count = sum(sizes) if sizes is not None else None
        modality = modality or _guess_modality(exts)
        print(f"{name}: {len(urls)} shard(s), modality {modality}")
        print(
            f"  samples: {count if count is not None else '?'}"
            + (f" (manifest says {declared})" if declared is not None else "")
        )
        if exts:
            print("  fields: " + ", ".join(f"{e} x{n}" for e, n in sorted(exts.items())))
        decoder = SampleDecoder(modality, fields, ImageTransform(64))
        shown = 0
        for raw in read_shards(urls):
            if shown >= ns.num:
                break
            example = decoder(raw)
            label = example.key if isinstance(example, Skipped) else example.pop("key")
            print(f"  [{shown}] {label}")
            print("    " + (f"SKIPPED: {example.reason}" if isinstance(example, Skipped) else _show(example)))
            shown += 1
        report[name] = {
            "shards": len(urls),
            "samples": count,
            "declared": declared,
            "fields": dict(exts),
            "modality": modality,
        }
    return report
