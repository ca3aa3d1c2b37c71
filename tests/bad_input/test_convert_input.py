"""`vlp data convert` on hostile input: paths out of the image folder, failed re-runs,
foreign encodings and repeated rows are refused, counted or stopped with a clear error."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
from helpers import jpeg_bytes
from webdataset import tariterators

import vlp.data.convert as convert
from vlp.cli import cli_main
from vlp.data.convert import convert_folder, read_captions
from vlp.data.manifest import Split, expand_urls, load_manifest
from vlp.errors import ConfigError, DataError


def _images(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"{i}.jpg").write_bytes(jpeg_bytes((10 * i, 100, 200), size=(32, 32)))
    return folder


def _csv(path: Path, rows: list[tuple[str, str]], encoding: str = "utf-8") -> Path:
    with open(path, "w", newline="", encoding=encoding) as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)
    return path


def _samples(manifest, split: str = "train") -> list[dict]:
    urls = expand_urls(manifest.split(split).urls)
    return list(tariterators.tarfile_samples([{"url": u} for u in urls]))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_paths_outside_the_image_folder_are_refused(tmp_path, caplog):
    """Captions naming ../x, /abs/x or a symlink out of the folder: refused, skipped as "outside the image folder"."""
    folder = _images(tmp_path / "imgs", 4)
    (folder / "sub").mkdir()
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(jpeg_bytes((1, 2, 3), size=(32, 32)))
    (folder / "link.jpg").symlink_to(secret)
    outside = ["../secret.jpg", str(secret), "link.jpg", "sub/../../secret.jpg"]
    rows = [(f"{i}.jpg", f"photo {i}") for i in range(3)] + [("sub/../3.jpg", "photo 3")]
    _csv(tmp_path / "caps.csv", rows + [(p, "stolen") for p in outside])
    with caplog.at_level(logging.WARNING):
        manifest = convert_folder(folder, tmp_path / "out", captions=tmp_path / "caps.csv", max_skip_fraction=0.5)
    samples = _samples(manifest)
    assert sorted(s["txt"].decode() for s in samples) == [f"photo {i}" for i in range(4)]
    assert all(s["jpg"] != secret.read_bytes() for s in samples)
    skipped = json.loads((tmp_path / "out" / "train-skipped.json").read_text())
    assert {s["image"]: s["reason"] for s in skipped} == dict.fromkeys(outside, "outside the image folder")
    assert manifest.extra["converted"]["train"]["skipped"]["by_reason"] == {"outside the image folder": 4}
    assert "outside the image folder" in caplog.text and "../secret.jpg" in caplog.text
    with pytest.raises(DataError, match=r"4 of 8 listed image\(s\) missing from or outside .*\.\./secret\.jpg"):
        convert_folder(folder, tmp_path / "out2", captions=tmp_path / "caps.csv", max_skip_fraction=0.25)


def test_failed_rerun_leaves_earlier_shards_and_manifest(tmp_path, monkeypatch):
    """A re-run into a converted folder that fails (bad images, an exception mid-way): old shards and manifest intact."""
    folder = _images(tmp_path / "imgs", 8)
    good = _csv(tmp_path / "good.csv", [(f"{i}.jpg", f"photo {i}") for i in range(8)])
    out = tmp_path / "out"
    manifest = convert_folder(folder, out, captions=good, samples_per_shard=2)
    assert manifest.split("train").shard_sizes == [2, 2, 2, 2]
    before = _snapshot(out)
    assert len([k for k in before if k.endswith(".tar")]) == 4

    for i in range(4, 8):
        (folder / f"bad{i}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    bad = _csv(
        tmp_path / "bad.csv", [(f"{i}.jpg", "x") for i in range(4)] + [(f"bad{i}.jpg", "x") for i in range(4, 8)]
    )
    with pytest.raises(DataError, match="4 of 8 listed image.*bad4.jpg"):
        convert_folder(folder, out, captions=bad, samples_per_shard=1)
    assert _snapshot(out) == before

    calls = []

    def fail_on_third(*args):
        calls.append(args)
        if len(calls) % 3 == 0:
            raise RuntimeError("disk full")
        return jpeg_bytes(size=(32, 32))

    monkeypatch.setattr(convert, "load_image_bytes", fail_on_third)
    with pytest.raises(RuntimeError, match="disk full"):
        convert_folder(folder, out, captions=good, samples_per_shard=1)
    with pytest.raises(RuntimeError, match="disk full"):
        convert_folder(folder, tmp_path / "fresh", captions=good)
    monkeypatch.undo()
    assert not (tmp_path / "fresh").exists()
    assert _snapshot(out) == before
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]

    small = convert_folder(folder, out, captions=_csv(tmp_path / "small.csv", [("0.jpg", "zero"), ("1.jpg", "one")]))
    assert sorted(p.name for p in out.glob("train-*.tar")) == ["train-000000.tar"]  # stale shards removed
    assert load_manifest(out / "manifest.yaml").split("train") == small.split("train")
    assert small.split("train").shard_sizes == [2] and small.split("train").num_samples == 2


def test_manifest_records_shard_sizes(tmp_path):
    """Seven samples in shards of three: the manifest split says shard_sizes [3, 3, 1]; a wrong sum is refused."""
    folder = _images(tmp_path / "imgs", 7)
    caps = _csv(tmp_path / "caps.csv", [(f"{i}.jpg", f"photo {i}") for i in range(7)])
    manifest = convert_folder(folder, tmp_path / "out", captions=caps, samples_per_shard=3)
    assert manifest.split("train").shard_sizes == [3, 3, 1]
    assert load_manifest(tmp_path / "out" / "manifest.yaml").split("train").shard_sizes == [3, 3, 1]
    with pytest.raises(ConfigError, match="shard_sizes sum to 6, but num_samples is 7"):
        Split("x-{000000..000002}.tar", 7, shard_sizes=[3, 3, 0])
    with pytest.raises(ConfigError, match="integers >= 0"):
        Split("x.tar", 1, shard_sizes=[-1, 2])


def test_latin1_captions_need_an_encoding(tmp_path, capsys):
    """A Latin-1 captions CSV/JSON: ConfigError naming the file, byte and line, suggesting --encoding; with it, correct text."""
    folder = _images(tmp_path / "imgs", 2)
    caps = _csv(tmp_path / "caps.csv", [("0.jpg", "plain"), ("1.jpg", "café crème")], encoding="latin-1")
    offset = caps.read_bytes().index("é".encode("latin-1"))
    with pytest.raises(
        ConfigError, match=rf"caps.csv is not valid utf-8: byte {offset} \(line 3\).*--encoding latin-1"
    ):
        convert_folder(folder, tmp_path / "out", captions=caps)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["data", "convert", str(folder), "--captions", str(caps), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "--encoding latin-1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

    args = ["data", "convert", str(folder), "--captions", str(caps), "--out", str(tmp_path / "out")]
    manifest = cli_main([*args, "--encoding", "latin-1"])
    assert sorted(s["txt"].decode("utf-8") for s in _samples(manifest)) == ["café crème", "plain"]

    entries = [{"image": "0.jpg", "captions": ["naïve"]}, {"image": "1.jpg", "captions": ["über"]}]
    (tmp_path / "caps.json").write_bytes(json.dumps(entries, ensure_ascii=False).encode("latin-1"))
    with pytest.raises(ConfigError, match=r"caps.json is not valid utf-8: byte \d+ \(line 1\)"):
        read_captions(tmp_path / "caps.json")
    assert read_captions(tmp_path / "caps.json", encoding="latin-1") == {"0.jpg": ["naïve"], "1.jpg": ["über"]}


def test_utf8_bom_and_utf16_captions_are_read(tmp_path):
    """Captions CSV saved as UTF-8 with BOM or UTF-16 (Excel): read without --encoding, text intact."""
    rows = [("0.jpg", "smörgåsbord ☕"), ("1.jpg", "plain")]
    for codec in ("utf-8-sig", "utf-16"):
        caps = _csv(tmp_path / f"{codec}.csv", rows, encoding=codec)
        assert read_captions(caps) == {"0.jpg": ["smörgåsbord ☕"], "1.jpg": ["plain"]}


def test_repeated_caption_rows(tmp_path):
    """One (image, caption) row repeated: an error naming both lines by default; drop counts it; keep keeps it."""
    folder = _images(tmp_path / "imgs", 4)
    rows = [(f"{i}.jpg", f"photo {i}") for i in range(4)] + [("2.jpg", "  photo   2 ")]
    caps = _csv(tmp_path / "caps.csv", rows)
    with pytest.raises(ConfigError, match=r"1 repeated \(image, caption\) row.*line 6 repeats line 4.*--duplicates"):
        convert_folder(folder, tmp_path / "out", captions=caps)
    assert not (tmp_path / "out").exists()

    manifest = convert_folder(folder, tmp_path / "out", captions=caps, duplicates="drop")
    assert manifest.modality == "pair" and manifest.split("train").num_samples == 4
    skipped = json.loads((tmp_path / "out" / "train-skipped.json").read_text())
    assert skipped == [{"image": "2.jpg", "row": "line 6", "reason": "duplicate row (repeats line 4)"}]
    assert manifest.extra["converted"]["train"]["skipped"]["by_reason"] == {"duplicate row": 1}

    with pytest.raises(ConfigError, match="1 of 4 images have several captions.*--modality pair.*--modality retrieval"):
        convert_folder(folder, tmp_path / "out", captions=caps, duplicates="keep")
    kept = convert_folder(folder, tmp_path / "kept", captions=caps, duplicates="keep", modality="pair")
    assert [s["txt"].decode() for s in _samples(kept)].count("photo 2") == 2


def test_mixed_captions_per_image_need_a_modality(tmp_path, caplog):
    """Some images with one caption, some with several and no --modality: ConfigError; all several: retrieval, logged."""
    folder = _images(tmp_path / "imgs", 3)
    mixed = _csv(tmp_path / "mixed.csv", [("0.jpg", "a"), ("1.jpg", "b"), ("1.jpg", "c"), ("2.jpg", "d")])
    with pytest.raises(ConfigError, match="mixed.csv: 1 of 3 images have several captions"):
        convert_folder(folder, tmp_path / "out", captions=mixed)
    manifest = convert_folder(folder, tmp_path / "out", captions=mixed, modality="retrieval")
    assert manifest.split("train").num_samples == 3

    several = _csv(tmp_path / "several.csv", [(f"{i}.jpg", f"{i} {j}") for i in range(3) for j in range(2)])
    with caplog.at_level(logging.INFO, logger="vlp.data.convert"):
        manifest = convert_folder(folder, tmp_path / "out2", captions=several)
    assert manifest.modality == "retrieval"
    assert "modality retrieval (every image has several captions" in caplog.text
