"""Bring your own data: a folder of images plus captions or labels → webdataset shards.

```python
convert_folder("photos/", "data/mine", captions="captions.csv")   # image,caption[,caption_index]
convert_folder("photos/", "data/mine", captions="captions.json")  # [{image, captions: [...]}]
convert_folder("photos/", "data/cls", labels="labels.csv", classnames="classes.json")
```

Several captions for every image give a ``retrieval`` split (one sample per image, ``json``
{image_id, captions}); one caption each, or ``modality="pair"``, gives ``pair`` (one sample
per caption: ``jpg`` + ``txt`` + ``json``); a mix of both needs ``modality``. Labels give
``image`` (``jpg`` + ``cls`` + ``json``). Shards are ``out/{split}-000000.tar``...;
``out/manifest.yaml`` gets the split with its ``shard_sizes`` (other splits already there are
kept). JPEGs are copied byte for byte unless ``max_image_size`` forces a resize; other formats
are re-encoded. Every image is fully decoded with the training decoder first.

Annotation files are UTF-8 (a BOM is allowed) unless ``encoding`` says otherwise. A repeated
(image, caption) row is an error unless ``duplicates`` is ``"drop"`` or ``"keep"``. Listed
paths that resolve outside the image folder (absolute, ``..``, symlinks pointing out) are
refused; they, missing or undecodable images, empty captions, dropped repeats and invalid
labels are skipped, logged by name and listed in ``out/{split}-skipped.json`` (counts in the
manifest's ``extra``); more than ``max_skip_fraction`` of the listed images lost is an error.
The split is written to ``out/.tmp-{split}-{pid}`` and moved in only when complete and
re-counted, so a failed run leaves the earlier shards and manifest as they were.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import os
import re
import shutil
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
DUPLICATES = ("error", "drop", "keep")

# UTF-32 first: its little-endian BOM starts with UTF-16's.
_BOMS = (
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def read_text(path: Path, encoding: str | None = None) -> str:
    """The text of an annotation file: UTF-8 (UTF-8/16/32 with a BOM are recognised by it)
    unless ``encoding`` names the codec. Undecodable bytes are a ConfigError naming the
    file, the byte offset and the line."""
    data = path.read_bytes()
    codec = encoding or next((c for bom, c in _BOMS if data.startswith(bom)), "utf-8")
    try:
        return data.decode(codec)
    except LookupError:
        raise ConfigError(f"unknown encoding {encoding!r} given for {path}") from None
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        hint = (
            "pass its encoding with --encoding (encoding= in Python), e.g. --encoding latin-1 or cp1252"
            if encoding is None
            else "check --encoding"
        )
        raise ConfigError(
            f"{path} is not valid {codec}: byte {e.start} (line {line}) is {data[e.start : e.start + 1]!r}; {hint}"
        ) from None


def _read_csv(path: Path, required: tuple[str, ...], encoding: str | None) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) for each CSV row; absent cells are empty strings."""
    reader = csv.DictReader(io.StringIO(read_text(path, encoding), newline=""))
    try:
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ConfigError(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
        return [(reader.line_num, {k: v or "" for k, v in row.items() if k is not None}) for row in reader]
    except csv.Error as e:
        raise ConfigError(f"{path}: line {reader.line_num}: {e}") from None


def read_captions(path: str | Path, *, encoding: str | None = None, duplicates: str = "error") -> dict[str, list[str]]:
    """image → captions (in ``caption_index`` order when given), in first-seen image order.

    A row repeating an earlier (image, caption) pair (whitespace aside) is a ConfigError
    naming both rows unless ``duplicates`` is ``"drop"`` (left out) or ``"keep"``."""
    return _read_captions(Path(path), encoding, duplicates)[0]


def _read_captions(path: Path, encoding: str | None, duplicates: str) -> tuple[dict[str, list[str]], list[dict]]:
    """(image → captions, a skipped-report entry for each repeated row dropped)."""
    if duplicates not in DUPLICATES:
        raise ConfigError(f"duplicates={duplicates!r}; expected one of {DUPLICATES}")
    if not path.is_file():
        raise ConfigError(f"captions file not found: {path}")
    rows: list[tuple[str, str, int, str]] = []  # (where, image, order, caption)
    if path.suffix.lower() == ".json":
        text = read_text(path, encoding)
        try:
            entries = json.loads(text)
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
            for j, c in enumerate(caps):
                rows.append((f"entry {n} caption {j}", str(e["image"]), len(rows), str(c or "")))
    else:
        table = _read_csv(path, ("image", "caption"), encoding)
        indexed = "caption_index" in table[0][1] if table else False
        for n, (line, row) in enumerate(table):
            order = row["caption_index"] if indexed else n
            try:
                order = int(order)
            except ValueError:
                raise ConfigError(f"{path}: line {line}: caption_index {order!r} is not an integer") from None
            rows.append((f"line {line}", row["image"], order, row["caption"]))

    first: dict[tuple[str, str], str] = {}
    repeats: list[tuple[str, str, str, str]] = []  # (where, where first, image, caption)
    out: dict[str, list] = {}
    for where, img, order, caption in rows:
        key = (img, " ".join(caption.split()))
        if key[1] and key in first and duplicates != "keep":
            repeats.append((where, first[key], img, caption))
            continue
        first.setdefault(key, where)
        out.setdefault(img, []).append((order, caption))
    if repeats and duplicates == "error":
        shown = "; ".join(f"{w} repeats {w0} (image {img!r}, caption {c!r})" for w, w0, img, c in repeats[:5])
        more = f"; and {len(repeats) - 5} more" if len(repeats) > 5 else ""
        raise ConfigError(
            f"{path}: {len(repeats)} repeated (image, caption) row(s): {shown}{more}; "
            "pass --duplicates drop (duplicates='drop') to leave them out or --duplicates keep to keep them"
        )
    dropped = [{"image": img, "row": w, "reason": f"duplicate row (repeats {w0})"} for w, w0, img, _ in repeats]
    return {img: [c for _, c in sorted(caps, key=lambda x: x[0])] for img, caps in out.items()}, dropped


def _read_classnames(
    classnames: str | Path | list[str] | None, encoding: str | None = None
) -> tuple[list[str] | None, dict]:
    """(names, the JSON object to save beside the shards)."""
    if classnames is None or isinstance(classnames, list):
        return classnames, {"classnames": classnames}
    path = Path(classnames)
    if not path.is_file():
        raise ConfigError(f"class names file not found: {path}")
    text = read_text(path, encoding)
    try:
        data = json.loads(text)
    except ValueError as e:
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
    encoding: str | None = None,
    duplicates: str = "error",
) -> Manifest:
    """Write ``images`` with their ``captions`` (CSV/JSON) or ``labels`` (CSV) as shards under
    ``out`` and return the manifest saved as ``out/manifest.yaml`` (see the module docstring).

    ``classnames``: a JSON list or an object with a ``classnames`` list (prompt templates
    in it are kept), or a list; saved as ``out/classes.json``. ``encoding``: the codec of the
    annotation files (default UTF-8). ``duplicates``: what to do with a repeated (image,
    caption) row, ``"error"``, ``"drop"`` or ``"keep"``. Raises DataError when more than
    ``max_skip_fraction`` of the listed images are missing, outside ``images``, undecodable
    or unusable; on any error ``out`` is left as it was.
    """
    images, out_dir = Path(images), Path(out)
    if (captions is None) == (labels is None):
        raise ConfigError("convert_folder needs exactly one of captions= or labels=")
    if not images.is_dir():
        raise ConfigError(f"image folder not found: {images}")
    if not re.fullmatch(r"\w[\w.-]*", split):
        raise ConfigError(f"split {split!r} must be a plain name (letters, digits, '_', '-', '.')")
    if samples_per_shard < 1:
        raise ConfigError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if not 0 <= max_skip_fraction <= 1:
        raise ConfigError(f"max_skip_fraction must be in [0, 1], got {max_skip_fraction}")
    allowed = ("image",) if labels is not None else ("pair", "retrieval")
    if modality is not None and modality not in allowed:
        raise ConfigError(
            f"modality {modality!r} does not fit {'labels' if labels else 'captions'}; use one of {allowed}"
        )
    extra, names, classes_json, skipped = {}, None, None, []
    if labels is not None:
        names, classes_json = _read_classnames(classnames, encoding)
        records, names = _read_labels(Path(labels), names, encoding)
        modality = "image"
        if names is not None:
            classes_json = {**classes_json, "classnames": names}
            extra.update(classes=str(out_dir / "classes.json"), num_classes=len(names))
    else:
        records, skipped = _read_captions(Path(captions), encoding, duplicates)
        modality = modality or _infer_modality(records, captions, images)
    if not records:
        raise DataError(f"{captions or labels} lists no images")

    root = images.resolve()
    paths = {img: _inside(root, img) for img in records}
    refused = [img for img, p in paths.items() if p is None]
    if refused:
        shown = ", ".join(refused[:20]) + (f" and {len(refused) - 20} more" if len(refused) > 20 else "")
        log.warning("convert %s: refused %d listed path(s) outside the image folder: %s", images, len(refused), shown)
        skipped += [{"image": img, "reason": "outside the image folder"} for img in refused]
    missing = [img for img, p in paths.items() if p is not None and not p.is_file()]
    _check_lost(refused + missing, len(records), max_skip_fraction, f"missing from or outside {images}")

    # Everything is written to a private folder and moved in only once it is complete, so a
    # failed run leaves the shards and manifest of an earlier run untouched.
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".tmp-{split}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with ShardSink(tmp, split, samples_per_shard) as sink:
            for image_id, (img, payload) in enumerate(records.items()):
                if paths[img] is None:
                    continue
                for sample in _samples(
                    paths[img], img, image_id, payload, modality, names, max_image_size, jpeg_quality, skipped
                ):
                    sink.write({"__key__": f"{sink.count:09d}", **sample})
        report = out_dir / f"{split}-skipped.json"
        (tmp / report.name).write_text(json.dumps(skipped, indent=1, ensure_ascii=False), encoding="utf-8")
        if classes_json is not None and names is not None:
            (tmp / "classes.json").write_text(json.dumps(classes_json, indent=1, ensure_ascii=False), encoding="utf-8")
        if skipped:
            shown = ", ".join(f"{s['image']} ({s['reason']})" for s in skipped[:20])
            more = f" and {len(skipped) - 20} more" if len(skipped) > 20 else ""
            log.warning(
                "convert %s: skipped %d item(s): %s%s (all listed in %s)", images, len(skipped), shown, more, report
            )
        lost = sorted({s["image"] for s in skipped if "caption_index" not in s and "row" not in s})
        _check_lost(lost, len(records), max_skip_fraction, "missing, outside the folder, undecodable or unusable")
        if sink.count == 0:
            raise DataError(f"convert {images}: no usable sample (skipped: {len(skipped)})")
        sizes = _shard_sizes([tmp / _shard_name(split, i) for i in range(sink.num_shards)])
        if sum(sizes) != sink.count:
            raise DataError(f"convert {images}: wrote {sink.count} samples but the shards hold {sum(sizes)}")

        by_reason = Counter(s["reason"].split(" (")[0] for s in skipped)
        extra.update(
            source=str(images), skipped={"count": len(skipped), "by_reason": dict(by_reason), "file": str(report)}
        )
        new = Split(shard_pattern(str(out_dir), split, sink.num_shards), sink.count, shard_sizes=sizes)
        manifest = _merged_manifest(out_dir, name, modality, split, new, extra, images)
        manifest.save(tmp / "manifest.yaml")
        _move_in(tmp, out_dir, split, sink.num_shards)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if created and not any(out_dir.iterdir()):  # a failed first run leaves no empty folder
            out_dir.rmdir()
    log.info("convert %s: %d %s samples in %d shard(s) -> %s", images, sink.count, modality, sink.num_shards, out_dir)
    return manifest


def _infer_modality(records: dict[str, list[str]], captions, images: Path) -> str:
    """``retrieval`` when every image has several captions, ``pair`` when each has one."""
    several = sum(len(c) > 1 for c in records.values())
    if 0 < several < len(records):
        raise ConfigError(
            f"{captions}: {several} of {len(records)} images have several captions and the others one; "
            "pass --modality pair (one sample per caption) or --modality retrieval (one sample per image)"
        )
    modality = "retrieval" if several else "pair"
    why = "every image has several captions" if several else "every image has one caption"
    log.info("convert %s: modality %s (%s in %s)", images, modality, why, captions)
    return modality


def _inside(root: Path, name: str) -> Path | None:
    """``root/name`` with symlinks resolved, or None when that lies outside ``root``
    (absolute names, ``..``, links pointing out)."""
    if os.path.isabs(name):
        return None
    try:
        path = (root / name).resolve()
    except (OSError, ValueError, RuntimeError):  # NUL bytes, symlink loops
        return None
    return path if path.is_relative_to(root) else None


def _shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def _shard_sizes(shards: list[Path]) -> list[int]:
    """Samples per shard, counted from the tar headers as a reader will see them."""
    from vlp.data.commands import count_local

    try:
        return count_local([str(shard) for shard in shards])[0]
    except DataError as e:
        raise DataError(f"cannot re-read the shards just written: {e}") from None


def _merged_manifest(
    out_dir: Path, name: str | None, modality: str, split: str, new: Split, extra: dict, images: Path
) -> Manifest:
    """The manifest with ``split`` set to ``new``; other splits already in ``out_dir`` are kept."""
    if not (out_dir / "manifest.yaml").is_file():
        return Manifest(
            name=name or out_dir.name,
            modality=modality,
            splits={split: new},
            description=f"converted from {images} by vlp data convert",
            extra={"converted": {split: extra}},
        )
    old = load_manifest(out_dir / "manifest.yaml")
    new.modality = None if modality == old.modality else modality
    return Manifest(
        name=name or old.name,
        modality=old.modality,
        splits={**old.splits, split: new},
        fields=old.fields,
        license=old.license,
        description=old.description,
        homepage=old.homepage,
        citation=old.citation,
        extra={**old.extra, "converted": {**old.extra.get("converted", {}), split: extra}},
    )


def _move_in(tmp: Path, out_dir: Path, split: str, num_shards: int) -> None:
    """Rename the finished files from ``tmp`` into ``out_dir``: shards, reports, then the
    manifest in one ``os.replace``; the split's old shards beyond the new count go last."""
    for i in range(num_shards):
        os.replace(tmp / _shard_name(split, i), out_dir / _shard_name(split, i))
    for extra in (f"{split}-skipped.json", "classes.json"):
        if (tmp / extra).is_file():
            os.replace(tmp / extra, out_dir / extra)
    os.replace(tmp / "manifest.yaml", out_dir / "manifest.yaml")
    for old in out_dir.glob(f"{split}-*.tar"):
        m = re.fullmatch(rf"{re.escape(split)}-(\d{{6}})\.tar", old.name)
        if m and int(m.group(1)) >= num_shards:
            old.unlink()


def _check_lost(lost: list[str], total: int, max_fraction: float, what: str) -> None:
    if len(lost) > max_fraction * total:
        shown = ", ".join(lost[:10]) + (f" and {len(lost) - 10} more" if len(lost) > 10 else "")
        raise DataError(
            f"{len(lost)} of {total} listed image(s) {what} (more than max_skip_fraction={max_fraction}): {shown}"
        )


def _read_labels(
    path: Path, names: list[str] | None, encoding: str | None = None
) -> tuple[dict[str, tuple], list[str] | None]:
    """image → (label index or None, the reason it is invalid, other columns), and class names."""
    if not path.is_file():
        raise ConfigError(f"labels file not found: {path}")
    rows = _read_csv(path, ("image", "label"), encoding)
    raw = [r["label"].strip() for _, r in rows]
    if names is None and any(v and not v.isdigit() for v in raw):
        names = sorted({v for v in raw if v})  # labels given by name: index them alphabetically
    index = {n: i for i, n in enumerate(names or [])}
    records: dict[str, tuple] = {}
    for (line, row), value in zip(rows, raw, strict=True):
        if row["image"] in records:
            raise ConfigError(f"{path}: line {line}: image {row['image']!r} is listed twice")
        label = int(value) if value.isdigit() else index.get(value)
        if label is not None and names is not None and label >= len(names):
            label = None
        meta = {k: v for k, v in row.items() if k not in ("image", "label")}
        records[row["image"]] = (label, f"invalid label {value!r}", meta)
    return records, names


def _samples(
    path: Path,
    img: str,
    image_id: int,
    payload,
    modality: str,
    names: list[str] | None,
    max_image_size: int | None,
    quality: int,
    skipped: list[dict],
) -> Iterator[dict]:
    """The samples of one listed image (``img``, found at ``path``); problems are appended to ``skipped``."""
    from vlp.data.transforms import ImageDecodeError

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
