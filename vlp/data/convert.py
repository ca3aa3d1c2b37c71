"""Bring your own data: a folder of images plus captions or labels → webdataset shards.

```python
convert_folder("photos/", "data/mine", captions="captions.csv")   # image,caption[,caption_index]
convert_folder("photos/", "data/mine", captions="captions.json")  # [{image, captions: [...]}]
convert_folder("photos/", "data/cls", labels="labels.csv", classnames="classes.json")
```

Several captions per image give a ``retrieval`` split (one sample per image, ``json``
{image_id, captions}); one caption each, or ``modality="pair"``, gives ``pair`` (one sample
per caption: ``jpg`` + ``txt`` + ``json``). Labels give ``image`` (``jpg`` + ``cls`` + ``json``).
Shards are ``out/{split}-000000.tar``...; ``out/manifest.yaml`` gets the split (other splits
already there are kept). JPEGs are copied byte for byte unless ``max_image_size`` forces a
resize; other formats are re-encoded. Every image is fully decoded with the training decoder
first. Missing or undecodable images, empty captions and invalid labels are skipped, logged
by name and listed in ``out/{split}-skipped.json`` (counts in the manifest's ``extra``); more
than ``max_skip_fraction`` of the listed images lost is an error.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from vlp.data.manifest import Manifest, Split, load_manifest
from vlp.errors import ConfigError, DataError

log = logging.getLogger(__name__)


class ShardSink:
    """Samples → ``folder/{prefix}-000000.tar``, ... with ``per_shard`` samples each.

    Values may be bytes, str (utf-8) or dict/list (JSON). Members are ``{key}.{ext}`` in
    sorted order, as ``webdataset.TarWriter`` writes them, but with fixed headers (mtime 0,
    owner vlp, mode 0444): equal samples give byte-identical shards. The USTAR headers are
    built here because ``tarfile`` takes ~50 us per member, more than drawing a shapes image.
    Old shards of the same prefix are removed first, so no stale shard is left behind.
    """

    def __init__(self, folder: str | Path, prefix: str, per_shard: int = 1000) -> None:
        self.folder, self.prefix, self.per_shard = Path(folder), prefix, per_shard
        self.folder.mkdir(parents=True, exist_ok=True)
        for old in self.folder.glob(f"{prefix}-*.tar"):
            if re.fullmatch(rf"{re.escape(prefix)}-\d{{6}}\.tar", old.name):
                old.unlink()
        self.count = self.num_shards = 0
        self._file: io.BufferedWriter | None = None

    def write(self, sample: dict) -> None:
        key = sample["__key__"]
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
        if self.count % self.per_shard == 0:
            self._close_tar()
            self._file = open(self.folder / f"{self.prefix}-{self.num_shards:06d}.tar", "wb")
            self.num_shards += 1
        for ext in sorted(k for k in sample if not k.startswith("_")):
            data = _encode(sample[ext])
            self._file.write(_ustar_header(f"{key}.{ext}", len(data)))
            self._file.write(data)
            self._file.write(bytes(-len(data) % 512))
        self.count += 1

    def _close_tar(self) -> None:
        if self._file is not None:
            self._file.write(bytes(1024))  # end-of-archive marker
            self._file.close()
            self._file = None

    def close(self) -> None:
        self._close_tar()

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _ustar_header(name: str, size: int) -> bytes:
    raw = name.encode("utf-8")
    if len(raw) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {name!r}")
    h = bytearray(512)
    h[0 : len(raw)] = raw
    h[100:148] = b"0000444\x000000000\x000000000\x00" + b"%011o\x00" % size + b"00000000000\x00"
    h[148:156] = b" " * 8  # the checksum counts its own field as spaces
    h[156:157] = b"0"  # regular file
    h[257:265] = b"ustar\x0000"
    h[265:268] = h[297:300] = b"vlp"  # owner and group names
    h[148:156] = b"%06o\x00 " % sum(h)
    return bytes(h)


def _encode(value) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def shard_pattern(folder: str, prefix: str, num_shards: int) -> str:
    """The brace pattern of ``num_shards`` shards written by :class:`ShardSink`."""
    if num_shards == 1:
        return f"{folder}/{prefix}-000000.tar"
    return f"{folder}/{prefix}-{{000000..{num_shards - 1:06d}}}.tar"


# -- annotations ------------------------------------------------------------------------------
def _read_csv(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ConfigError(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
        return list(reader)


def read_captions(path: str | Path) -> dict[str, list[str]]:
    """image → captions (in ``caption_index`` order when given), in first-seen image order."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"captions file not found: {path}")
    out: dict[str, list] = {}
    if path.suffix.lower() == ".json":
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(entries, list):
            raise ConfigError(f"{path}: expected a list of {{image, captions}} objects")
        for n, e in enumerate(entries):
            caps = None
            if isinstance(e, dict):
                caps = e.get("captions", [e["caption"]] if "caption" in e else None)
            if not isinstance(caps, list) or "image" not in e:
                raise ConfigError(f"{path}: entry {n} needs 'image' and 'captions' (a list) or 'caption'")
            out.setdefault(str(e["image"]), []).extend(str(c or "") for c in caps)
        return out
    rows = _read_csv(path, ("image", "caption"))
    indexed = "caption_index" in rows[0] if rows else False
    for n, row in enumerate(rows):
        order = row["caption_index"] if indexed else n
        try:
            order = int(order)
        except ValueError:
            raise ConfigError(f"{path}: row {n + 2}: caption_index {order!r} is not an integer") from None
        out.setdefault(row["image"], []).append((order, row["caption"] or ""))
    return {img: [c for _, c in sorted(caps, key=lambda x: x[0])] for img, caps in out.items()}


def _read_classnames(classnames: str | Path | list[str] | None) -> tuple[list[str] | None, dict]:
    """(names, the JSON object to save beside the shards)."""
    if classnames is None or isinstance(classnames, list):
        return classnames, {"classnames": classnames}
    path = Path(classnames)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read class names from {path}: {e}") from None
    if isinstance(data, list):
        data = {"classnames": data}
    if not isinstance(data, dict) or not isinstance(data.get("classnames"), list):
        raise ConfigError(f"{path}: expected a JSON list of names or an object with a 'classnames' list")
    if "templates" not in data:  # zero-shot code reads "templates"; take the first template list
        first = next((v for k, v in data.items() if "template" in k and isinstance(v, list)), None)
        if first is not None:
            data = {**data, "templates": first}
    return [str(c) for c in data["classnames"]], data


# -- images ---------------------------------------------------------------------------------
def load_image_bytes(path: Path, max_image_size: int | None, quality: int) -> bytes:
    """JPEG bytes for ``path``: the file itself when it is a JPEG that needs no resize,
    else an upright RGB re-encode. Raises ImageDecodeError when the image does not decode."""
    from vlp.data.transforms import ImageDecodeError, decode_image  # imports torch: only here

    data = path.read_bytes()
    img = decode_image(data)  # full decode, EXIF-rotated RGB: what training will see
    try:
        is_jpeg = Image.open(io.BytesIO(data)).format == "JPEG"
    except Exception as e:  # decode_image succeeded, so this should not happen
        raise ImageDecodeError(str(e)) from None
    too_big = max_image_size is not None and max(img.size) > max_image_size
    if is_jpeg and not too_big:
        return data
    if too_big:
        img.thumbnail((max_image_size, max_image_size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# -- the converter ----------------------------------------------------------------------------
def convert_folder(
    images: str | Path,
    out: str | Path,
    *,
    captions: str | Path | None = None,
    labels: str | Path | None = None,
    classnames: str | Path | list[str] | None = None,
    modality: str | None = None,
    name: str | None = None,
    samples_per_shard: int = 1000,
    max_image_size: int | None = None,
    jpeg_quality: int = 95,
    split: str = "train",
    max_skip_fraction: float = 0.05,
) -> Manifest:
    """Write ``images`` with their ``captions`` (CSV/JSON) or ``labels`` (CSV) as shards under
    ``out`` and return the manifest saved as ``out/manifest.yaml`` (see the module docstring).

    ``classnames``: a JSON list or an object with a ``classnames`` list (prompt templates
    in it are kept), or a list; saved as ``out/classes.json``. Raises DataError when more
    than ``max_skip_fraction`` of the listed images are missing, undecodable or unusable.
    """
    images, out_dir = Path(images), Path(out)
    if (captions is None) == (labels is None):
        raise ConfigError("convert_folder needs exactly one of captions= or labels=")
    if not images.is_dir():
        raise ConfigError(f"image folder not found: {images}")
    allowed = ("image",) if labels is not None else ("pair", "retrieval")
    if modality is not None and modality not in allowed:
        raise ConfigError(
            f"modality {modality!r} does not fit {'labels' if labels else 'captions'}; use one of {allowed}"
        )
    extra, names = {}, None
    if labels is not None:
        names, classes_json = _read_classnames(classnames)
        records, names = _read_labels(Path(labels), names)
        modality = "image"
        if names is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            classes_json = {**classes_json, "classnames": names}
            (out_dir / "classes.json").write_text(json.dumps(classes_json, indent=1))
            extra.update(classes=str(out_dir / "classes.json"), num_classes=len(names))
    else:
        records = read_captions(captions)
        several = any(len(c) > 1 for c in records.values())
        modality = modality or ("retrieval" if several else "pair")
    if not records:
        raise DataError(f"{captions or labels} lists no images")

    missing = [img for img in records if not (images / img).is_file()]
    _check_lost(missing, len(records), max_skip_fraction, f"missing from {images}")
    skipped: list[dict] = []
    with ShardSink(out_dir, split, samples_per_shard) as sink:
        for image_id, (img, payload) in enumerate(records.items()):
            for sample in _samples(
                images, img, image_id, payload, modality, names, max_image_size, jpeg_quality, skipped
            ):
                sink.write({"__key__": f"{sink.count:09d}", **sample})
    report = out_dir / f"{split}-skipped.json"
    report.write_text(json.dumps(skipped, indent=1, ensure_ascii=False))
    if skipped:
        shown = ", ".join(f"{s['image']} ({s['reason']})" for s in skipped[:20])
        more = f" and {len(skipped) - 20} more" if len(skipped) > 20 else ""
        log.warning(
            "convert %s: skipped %d item(s): %s%s (all listed in %s)", images, len(skipped), shown, more, report
        )
    lost = sorted({s["image"] for s in skipped if "caption_index" not in s})
    _check_lost(lost, len(records), max_skip_fraction, "missing, undecodable or unusable")
    if sink.count == 0:
        raise DataError(f"convert {images}: no usable sample (see {report})")

    by_reason = Counter(s["reason"].split(" (")[0] for s in skipped)
    extra.update(source=str(images), skipped={"count": len(skipped), "by_reason": dict(by_reason), "file": str(report)})
    new = Split(shard_pattern(str(out_dir), split, sink.num_shards), sink.count)
    manifest = Manifest(
        name=name or out_dir.name,
        modality=modality,
        splits={split: new},
        description=f"converted from {images} by vlp data convert",
        extra={"converted": {split: extra}},
    )
    if (out_dir / "manifest.yaml").is_file():  # keep the other splits already converted
        old = load_manifest(out_dir / "manifest.yaml")
        new.modality = None if modality == old.modality else modality
        converted = {**old.extra.get("converted", {}), split: extra}
        manifest = Manifest(
            name=name or old.name,
            modality=old.modality,
            splits={**old.splits, split: new},
            license=old.license,
            description=old.description,
            extra={**old.extra, "converted": converted},
        )
    manifest.save(out_dir / "manifest.yaml")
    log.info("convert %s: %d %s samples in %d shard(s) -> %s", images, sink.count, modality, sink.num_shards, out_dir)
    return manifest


def _check_lost(lost: list[str], total: int, max_fraction: float, what: str) -> None:
    if len(lost) > max_fraction * total:
        shown = ", ".join(lost[:10]) + (f" and {len(lost) - 10} more" if len(lost) > 10 else "")
        raise DataError(
            f"{len(lost)} of {total} listed image(s) {what} (more than max_skip_fraction={max_fraction}): {shown}"
        )


def _read_labels(path: Path, names: list[str] | None) -> tuple[dict[str, tuple], list[str] | None]:
    """image → (label index or None, the reason it is invalid, other columns), and class names."""
    if not path.is_file():
        raise ConfigError(f"labels file not found: {path}")
    rows = _read_csv(path, ("image", "label"))
    raw = [(r.get("label") or "").strip() for r in rows]
    if names is None and any(v and not v.isdigit() for v in raw):
        names = sorted({v for v in raw if v})  # labels given by name: index them alphabetically
    index = {n: i for i, n in enumerate(names or [])}
    records: dict[str, tuple] = {}
    for n, (row, value) in enumerate(zip(rows, raw, strict=True)):
        if row["image"] in records:
            raise ConfigError(f"{path}: row {n + 2}: image {row['image']!r} is listed twice")
        label = int(value) if value.isdigit() else index.get(value)
        if label is not None and names is not None and label >= len(names):
            label = None
        meta = {k: v for k, v in row.items() if k not in ("image", "label") and k is not None}
        records[row["image"]] = (label, f"invalid label {value!r}", meta)
    return records, names


def _samples(
    images: Path,
    img: str,
    image_id: int,
    payload,
    modality: str,
    names: list[str] | None,
    max_image_size: int | None,
    quality: int,
    skipped: list[dict],
) -> Iterator[dict]:
    """The samples of one listed image; problems are appended to ``skipped``."""
    from vlp.data.transforms import ImageDecodeError

    path = images / img
    if not path.is_file():
        skipped.append({"image": img, "reason": "missing image file"})
        return
    if modality == "image":
        label, why, meta = payload
        if label is None:
            skipped.append({"image": img, "reason": why})
            return
    else:
        texts = []
        for i, c in enumerate(payload):
            if c.strip():
                texts.append((i, " ".join(c.split())))
            else:
                skipped.append({"image": img, "caption_index": i, "reason": "empty caption"})
        if not texts:
            skipped.append({"image": img, "reason": "no non-empty caption"})
            return
    try:
        jpg = load_image_bytes(path, max_image_size, quality)
    except (ImageDecodeError, OSError) as e:
        skipped.append({"image": img, "reason": f"undecodable image ({e})"})
        return
    meta_base = {"image_id": image_id, "image": img}
    if modality == "image":
        label_name = {"label_name": names[label]} if names else {}
        yield {"jpg": jpg, "cls": str(label), "json": {**meta_base, **label_name, **meta}}
    elif modality == "retrieval":
        yield {"jpg": jpg, "json": {**meta_base, "captions": [t for _, t in texts]}}
    else:
        for i, text in texts:
            yield {"jpg": jpg, "txt": text, "json": {**meta_base, "caption_index": i}}
