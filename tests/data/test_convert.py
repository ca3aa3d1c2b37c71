"""The folder converter on real photos (Flickr8k, ImageNet samples under ``../shared/data``
or ``$VLP_SHARED_DATA``: see ``helpers.shared_data_dir``; skipped where absent, failed
under ``CI``) and on broken input: what goes in comes out, and what is skipped is named."""

from __future__ import annotations

import csv
import io
import json
import logging
import tarfile
from pathlib import Path

import pytest
from helpers import shared_data_dir
from PIL import Image
from webdataset import tariterators

from vlp.data.convert import ShardSink, convert_folder, read_captions
from vlp.data.manifest import expand_urls, load_manifest
from vlp.errors import ConfigError, DataError


@pytest.fixture
def flickr() -> Path:
    return shared_data_dir("flickr8k_1k")


@pytest.fixture
def imagenet() -> Path:
    return shared_data_dir("imagenet_sample_1k")


def _read(manifest, split: str = "train") -> list[dict]:
    urls = expand_urls(manifest.split(split).urls)
    out = list(tariterators.tarfile_samples([{"url": u} for u in urls]))
    for s in out:
        if "json" in s:
            s["json"] = json.loads(s["json"])
    assert len(out) == manifest.split(split).num_samples
    assert len({s["__key__"] for s in out}) == len(out)
    return out


def _write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_flickr_csv_gives_a_retrieval_split(flickr, tmp_path):
    full = read_captions(flickr / "captions.csv")
    assert len(full) == 1000 and {len(c) for c in full.values()} == {5}
    assert read_captions(flickr / "captions.json") == full
    with open(flickr / "captions.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:250]  # 50 images x 5 captions
    csv_path = _write_csv(tmp_path / "caps.csv", rows[::-1])  # caption_index restores the order
    manifest = convert_folder(flickr / "images", tmp_path / "out", captions=csv_path, samples_per_shard=20)
    assert manifest.modality == "retrieval" and manifest.split("train").num_samples == 50
    assert len(expand_urls(manifest.split("train").urls)) == 3
    assert load_manifest(tmp_path / "out" / "manifest.yaml").split("train") == manifest.split("train")
    images = list(full)[:50][::-1]  # first-seen order of the reversed CSV
    for s in _read(manifest):
        assert set(s) - {"__key__", "__url__"} == {"jpg", "json"}
        meta = s["json"]
        assert meta["image"] == images[meta["image_id"]]
        assert meta["captions"] == [" ".join(c.split()) for c in full[meta["image"]]]
        assert s["jpg"] == (flickr / "images" / meta["image"]).read_bytes()  # JPEG kept as is
    assert manifest.extra["converted"]["train"]["skipped"]["count"] == 0


def test_flickr_json_as_pairs_resized(flickr, tmp_path):
    entries = json.loads((flickr / "captions.json").read_text())[:8]
    (tmp_path / "caps.json").write_text(json.dumps(entries))
    manifest = convert_folder(
        flickr / "images",
        tmp_path / "out",
        captions=tmp_path / "caps.json",
        modality="pair",
        max_image_size=128,
        name="flickr_pairs",
    )
    assert (manifest.name, manifest.modality, manifest.split("train").num_samples) == (
        "flickr_pairs",
        "pair",
        40,
    )
    samples = _read(manifest)
    for s in samples:
        entry = entries[s["json"]["image_id"]]
        assert s["txt"].decode() == entry["captions"][s["json"]["caption_index"]].strip()
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.format == "JPEG" and max(img.size) == 128
        ratio = entry["width"] / entry["height"]
        assert img.size[0] / img.size[1] == pytest.approx(ratio, rel=0.02)


def test_imagenet_labels_give_an_image_split(imagenet, tmp_path):
    with open(imagenet / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))[::25]  # 40 classes
    csv_path = _write_csv(tmp_path / "labels.csv", rows)
    manifest = convert_folder(
        imagenet / "images",
        tmp_path / "out",
        labels=csv_path,
        classnames=imagenet / "classnames_templates.json",
    )
    names = json.loads((imagenet / "classnames_templates.json").read_text())["classnames"]
    assert manifest.modality == "image" and manifest.split("train").num_samples == 40
    saved = json.loads((tmp_path / "out" / "classes.json").read_text())
    assert saved["classnames"] == names and "a photo of a {}." in saved["templates"]
    by_image = {r["image"]: r for r in rows}
    for s in _read(manifest):
        row = by_image[s["json"]["image"]]
        assert int(s["cls"]) == int(row["label"])
        assert s["json"]["label_name"] == names[int(row["label"])] == row["clip_classname"]
        assert s["json"]["wnid"] == row["wnid"]
        assert s["jpg"] == (imagenet / "images" / row["image"]).read_bytes()


def _photo() -> Image.Image:
    folder = shared_data_dir("flickr8k_1k", required=False)  # a real photo where there is one
    photos = sorted((folder / "images").glob("*.jpg"))[:1] if folder is not None else []
    if photos:
        return Image.open(photos[0]).convert("RGB")
    return Image.linear_gradient("L").resize((300, 211)).convert("RGB")


def test_odd_formats_pass_broken_input_is_skipped_and_named(tmp_path, caplog):
    folder = tmp_path / "imgs"
    folder.mkdir()
    photo = _photo()
    photo.convert("L").save(folder / "gray.png")
    photo.convert("RGBA").save(folder / "alpha.png")
    photo.convert("CMYK").save(folder / "cmyk.jpg")
    photo.save(folder / "plain.jpg", quality=80)
    (folder / "broken.jpg").write_bytes(b"not an image at all")
    (folder / "truncated.jpg").write_bytes((folder / "plain.jpg").read_bytes()[:2000])
    rows = [
        ("gray.png", 'A dog\'s "ball", in the park!'),
        ("alpha.png", "  two   spaces  "),
        ("cmyk.jpg", "naïve café ☕"),
        ("plain.jpg", "a photo"),
        ("plain2.jpg", "never there"),
        ("broken.jpg", "a caption"),
        ("truncated.jpg", "a caption"),
        ("cmyk.jpg", ""),
    ]
    _write_csv(tmp_path / "caps.csv", [{"image": i, "caption": c} for i, c in rows])
    with caplog.at_level(logging.WARNING):
        manifest = convert_folder(
            folder,
            tmp_path / "out",
            captions=tmp_path / "caps.csv",
            modality="pair",
            max_skip_fraction=0.5,
        )
    samples = _read(manifest)
    texts = {s["json"]["image"]: s["txt"].decode() for s in samples}
    assert texts == {
        "gray.png": 'A dog\'s "ball", in the park!',
        "alpha.png": "two spaces",
        "cmyk.jpg": "naïve café ☕",
        "plain.jpg": "a photo",
    }
    for s in samples:
        assert Image.open(io.BytesIO(s["jpg"])).format == "JPEG"
    skipped = json.loads((tmp_path / "out" / "train-skipped.json").read_text())
    reasons = {(s["image"], s["reason"].split(" (")[0]) for s in skipped}
    assert reasons == {
        ("plain2.jpg", "missing image file"),
        ("broken.jpg", "undecodable image"),
        ("truncated.jpg", "undecodable image"),
        ("cmyk.jpg", "empty caption"),
    }
    assert manifest.extra["converted"]["train"]["skipped"]["count"] == 4
    for name in ("plain2.jpg", "broken.jpg", "truncated.jpg", "cmyk.jpg"):
        assert name in caplog.text


def test_too_many_lost_images_is_an_error(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    _photo().save(folder / "ok.jpg")
    (folder / "bad.jpg").write_bytes(b"\xff\xd8garbage")
    rows = [{"image": "ok.jpg", "caption": "fine"}, {"image": "gone.jpg", "caption": "x"}]
    _write_csv(tmp_path / "missing.csv", rows)
    with pytest.raises(DataError, match="1 of 2 listed image.*gone.jpg"):
        convert_folder(folder, tmp_path / "out", captions=tmp_path / "missing.csv")
    _write_csv(tmp_path / "bad.csv", [rows[0], {"image": "bad.jpg", "caption": "x"}])
    with pytest.raises(DataError, match="bad.jpg"):
        convert_folder(folder, tmp_path / "out", captions=tmp_path / "bad.csv")


def test_labels_by_name_and_invalid_labels(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        _photo().resize((40 + i, 30)).save(folder / f"{i}.png")
    rows = [
        {"image": "0.png", "label": "dog"},
        {"image": "1.png", "label": "cat"},
        {"image": "2.png", "label": "dog"},
        {"image": "3.png", "label": ""},
    ]
    _write_csv(tmp_path / "labels.csv", rows)
    manifest = convert_folder(folder, tmp_path / "out", labels=tmp_path / "labels.csv", max_skip_fraction=0.3)
    got = {s["json"]["image"]: (int(s["cls"]), s["json"]["label_name"]) for s in _read(manifest)}
    assert got == {"0.png": (1, "dog"), "1.png": (0, "cat"), "2.png": (1, "dog")}
    assert manifest.extra["converted"]["train"]["skipped"]["by_reason"] == {"invalid label ''": 1}


def test_splits_share_one_manifest(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        _photo().resize((50, 30 + i)).save(folder / f"{i}.jpg")
    train = [{"image": f"{i}.jpg", "caption": f"photo {i}"} for i in range(3)]
    test = [
        {"image": f"{i}.jpg", "caption_index": j, "caption": f"photo {i} take {j}"} for i in range(3) for j in range(2)
    ]
    (tmp_path / "a.json").write_text(json.dumps(train))  # [{image, caption}]
    convert_folder(folder, tmp_path / "out", captions=tmp_path / "a.json")
    manifest = convert_folder(folder, tmp_path / "out", captions=_write_csv(tmp_path / "b.csv", test), split="test")
    assert manifest.modality == "pair" and manifest.modality_of("test") == "retrieval"
    assert {k: v.num_samples for k, v in manifest.splits.items()} == {"train": 3, "test": 3}
    assert load_manifest(tmp_path / "out" / "manifest.yaml").modality_of("test") == "retrieval"
    assert set(manifest.extra["converted"]) == {"train", "test"}


def test_argument_errors(tmp_path):
    (tmp_path / "caps.csv").write_text("picture,text\na.jpg,hello\n")
    with pytest.raises(ConfigError, match="exactly one"):
        convert_folder(tmp_path, tmp_path / "o", captions="c.csv", labels="l.csv")
    with pytest.raises(ConfigError, match="modality"):
        convert_folder(tmp_path, tmp_path / "o", captions=tmp_path / "caps.csv", modality="image")
    with pytest.raises(ConfigError, match=r"missing column\(s\) \['image', 'caption'\]"):
        convert_folder(tmp_path, tmp_path / "o", captions=tmp_path / "caps.csv")
    with pytest.raises(ConfigError, match="image folder not found"):
        convert_folder(tmp_path / "nope", tmp_path / "o", captions=tmp_path / "caps.csv")


def test_shard_sink_writes_standard_deterministic_tars(tmp_path):
    for name in ("a", "b"):
        with ShardSink(tmp_path / name, "train", per_shard=2) as sink:
            for i in range(5):
                sink.write(
                    {
                        "__key__": f"k{i}",
                        "jpg": b"\xff" * (i * 300),
                        "txt": f"ü {i}",
                        "json": {"i": i},
                    }
                )
        assert (sink.count, sink.num_shards) == (5, 3)
    a, b = sorted((tmp_path / "a").iterdir()), sorted((tmp_path / "b").iterdir())
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    with tarfile.open(a[0]) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == [
            "k0.jpg",
            "k0.json",
            "k0.txt",
            "k1.jpg",
            "k1.json",
            "k1.txt",
        ]
        assert members[3].size == 300 and members[0].mtime == 0 and members[0].isfile()
        assert tar.extractfile(members[5]).read().decode() == "ü 1"
    samples = list(tariterators.tarfile_samples([{"url": str(p)} for p in a]))
    assert [s["__key__"] for s in samples] == [f"k{i}" for i in range(5)]
    assert json.loads(samples[4]["json"]) == {"i": 4}
    with pytest.raises(ValueError, match="must not contain"):
        ShardSink(tmp_path / "c", "x").write({"__key__": "a.b", "txt": "x"})
