"""NLVR2- and SNLI-VE-style tasks: the synthetic generator's labels re-derived from the
stored scenes, label balance and baselines, and the pipeline from shards to batches
(keys, shapes, dtypes, on-device normalisation of both images, bad samples counted)."""

from __future__ import annotations

import io
import json
import logging
import re
from collections import Counter, defaultdict

import pytest
import torch
from helpers import jpeg_bytes, write_tar
from PIL import Image
from webdataset import tariterators

from vlp.data import Manifest, Source, Split, WebDataModule
from vlp.data.commands import _guess_modality, data_main
from vlp.data.manifest import expand_urls, load_manifest
from vlp.data.pipeline import LABELS, SampleDecoder, Skipped
from vlp.data.synth import (
    INVERSE,
    NLVR2_TEMPLATES,
    VE_LABELS,
    Scene,
    relation_holds,
    render_scene,
    write_shapes,
)
from vlp.data.transforms import ImageTransform

SIZE, IMG = 1000, 32
NUMBERS = {"no": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    return out, write_shapes(out, seed=0, size=SIZE, samples_per_shard=300)


def _read(out, modality: str) -> dict[str, list[dict]]:
    manifest = load_manifest(out / "manifests" / f"shapes_{modality}.yaml")
    result = {}
    for split in manifest.splits:
        urls = [{"url": u} for u in expand_urls(manifest.split(split).urls)]
        result[split] = [{**s, "json": json.loads(s["json"])} for s in tariterators.tarfile_samples(urls)]
    return result


@pytest.fixture(scope="module")
def nlvr2(shapes):
    return _read(shapes[0], "nlvr2")


@pytest.fixture(scope="module")
def ve(shapes):
    return _read(shapes[0], "ve")


def _jpeg(scene: Scene) -> bytes:
    buf = io.BytesIO()
    render_scene(scene, 64).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _articles_agree(text: str) -> bool:
    return all((w[0] in "aeiou") == (a == "an") for a, w in re.findall(r"\b(an?) (\w+)", text))


# -- the generator ------------------------------------------------------------------------------
def _count(scene: Scene, noun: str) -> int:
    return sum(noun in ("shape", s.kind) for s in scene.shapes)


def _centre_order(a, b, rel: str) -> bool:
    """a is on the rel side of b by centres (the loosest reading of rel)."""
    return {"left of": a.x < b.x, "right of": a.x > b.x, "above": a.y < b.y, "below": a.y > b.y}[rel]


def _nlvr2_truth(sentence: str, scenes: dict[str, Scene]) -> bool:
    """Re-derive the truth of a sentence from the scenes (independently of the generator);
    asserts that false sentences are clearly false."""
    left, right = scenes["left"], scenes["right"]
    if m := re.fullmatch(
        r"the (left|right) image has more (shape|circle|square|triangle)s than the (left|right) image", sentence
    ):
        assert m[1] != m[3]
        n, k = _count(scenes[m[1]], m[2]), _count(scenes[m[3]], m[2])
        assert n + k > 0
        return n > k
    if m := re.fullmatch(r"both images contain an? (\w+) (circle|square|triangle)", sentence):
        present = [any((s.color, s.kind) == (m[1], m[2]) for s in sc.shapes) for sc in (left, right)]
        assert any(present)
        return all(present)
    if m := re.fullmatch(
        r"the (left|right) image contains an? (\w+) shape (left of|right of|above|below) an? (\w+) shape", sentence
    ):
        scene, rel = scenes[m[1]], m[3]
        pairs = [
            (a, b) for a in scene.shapes for b in scene.shapes if a is not b and (a.color, b.color) == (m[2], m[4])
        ]
        if any(relation_holds(a, b, rel) for a, b in pairs):
            return True
        assert not any(_centre_order(a, b, rel) for a, b in pairs), sentence  # clearly false
        other = scenes["right" if m[1] == "left" else "left"]  # the relation is drawn, on the other side
        assert any(
            relation_holds(a, b, rel) and (a.color, b.color) == (m[2], m[4]) for a in other.shapes for b in other.shapes
        )
        return False
    if m := re.fullmatch(r"exactly one image contains an? (?:(small|large) )?(circle|square|triangle)", sentence):
        present = [any(s.kind == m[2] and m[1] in (None, s.size) for s in sc.shapes) for sc in (left, right)]
        assert any(present)  # false means: in both
        return present[0] != present[1]
    m = re.fullmatch(r"the two images contain (\w+) (shape|circle|square|triangle)s? in total", sentence)
    assert m, sentence
    n, total = NUMBERS[m[1]], _count(left, m[2]) + _count(right, m[2])
    assert n == total or abs(n - total) == 1
    return n == total


def test_nlvr2_sentences_are_true_or_false_as_labelled(nlvr2):
    by_template = Counter()
    for samples in nlvr2.values():
        for x in samples:
            meta = x["json"]
            assert set(x) - {"__key__", "__url__", "__local_path__"} == {"left.jpg", "right.jpg", "json"}
            assert {"sentence", "label", "template", "id", "scenes"} <= set(meta)
            left, right = (Scene.from_dict(d) for d in meta["scenes"])
            assert _nlvr2_truth(meta["sentence"], {"left": left, "right": right}) == bool(meta["label"]), meta
            assert meta["label"] in (0, 1) and _articles_agree(meta["sentence"])
            by_template[meta["template"]] += 1
            if by_template[meta["template"]] <= 20:  # the images are the renderings of the scenes
                assert x["left.jpg"] == _jpeg(left) and x["right.jpg"] == _jpeg(right)
    assert set(by_template) == set(NLVR2_TEMPLATES)
    assert min(by_template.values()) >= 200, by_template


def _ve_label(hypothesis: str, scene: Scene) -> tuple[int, str]:
    """(label, type) re-derived from the scene."""
    named = {f"{s.color} {s.kind}": s for s in scene.shapes}
    neutral = (
        r"the (\w+ \w+) (?:is made of (\w+)|is (?:warm|cold) to the touch|was drawn by an? \w+|was drawn (first|last))"
    )
    if m := re.fullmatch(neutral, hypothesis):
        assert m[1] in named  # about a drawn shape, but nothing drawing shows
        if m[3]:
            assert len(scene.shapes) > 1
        kind = "material" if m[2] else "order" if m[3] else "author" if "drawn by" in hypothesis else "temperature"
        return 1, kind
    if m := re.fullmatch(r"there is an? (\w+) (circle|square|triangle)", hypothesis):
        if f"{m[1]} {m[2]}" in named:
            return 0, "exist"
        assert any(s.kind == m[2] for s in scene.shapes)  # a drawn shape, colour changed
        return 2, "exist"
    if m := re.fullmatch(r"there (is|are) (\w+) (shape|circle|square|triangle)s?", hypothesis):
        n, count = NUMBERS[m[2]], _count(scene, m[3])
        assert (m[1] == "is") == (n == 1) and abs(n - count) <= 1
        return (0 if n == count else 2), "count"
    m = re.fullmatch(r"the (\w+ \w+) is (left of|right of|above|below) the (\w+ \w+)", hypothesis)
    assert m, hypothesis
    a, b = named[m[1]], named[m[3]]
    if relation_holds(a, b, m[2]):
        return 0, "relation"
    assert relation_holds(a, b, INVERSE[m[2]]), hypothesis  # reversed: clearly false
    return 2, "relation"


def test_ve_hypotheses_have_the_labels_the_scenes_give(ve):
    types = Counter()
    for samples in ve.values():
        for i, x in enumerate(samples):
            meta = x["json"]
            assert set(x) - {"__key__", "__url__", "__local_path__"} == {"jpg", "json"}
            assert {"hypothesis", "label", "id"} <= set(meta)
            scene = Scene.from_dict(meta["scene"])
            label, kind = _ve_label(meta["hypothesis"], scene)
            assert (label, kind) == (meta["label"], meta["type"]), meta
            assert _articles_agree(meta["hypothesis"])
            types[kind] += 1
            if i < 30:
                assert x["jpg"] == _jpeg(scene)
    assert set(types) == {"exist", "count", "relation", "material", "temperature", "author", "order"}


def test_labels_are_balanced_and_the_baselines_recorded(shapes, nlvr2, ve):
    out, info = shapes
    assert len(nlvr2["test"]) >= 500 and len(ve["test"]) >= 498
    chance = info["chance"]
    for split, samples in nlvr2.items():
        labels = defaultdict(list)
        for x in samples:
            labels[x["json"]["template"]].append(x["json"]["label"])
        assert {t: sum(v) / len(v) for t, v in labels.items()} == {t: 0.5 for t in NLVR2_TEMPLATES}
        assert chance["nlvr2"]["label_balance"][split] == {**{t: 0.5 for t in sorted(NLVR2_TEMPLATES)}, "overall": 0.5}
    for split in ("val", "test"):
        got = chance["nlvr2"]["majority_baseline"][split]
        assert set(got["majority_answer"]) == set(NLVR2_TEMPLATES)
        assert all(got[t] == 0.5 for t in NLVR2_TEMPLATES) and got["overall"] == 0.5
        # reading the sentence alone is no better than chance
        assert chance["nlvr2"]["sentence_only"][split]["overall"] < 0.6
    for split, samples in ve.items():
        counts = Counter(x["json"]["label"] for x in samples)
        assert counts[0] == counts[1] == counts[2] == len(samples) // 3
        assert chance["ve"]["label_balance"][split] == [1 / 3] * 3
    for split in ("val", "test"):
        assert chance["ve"]["majority_baseline"][split]["accuracy"] == pytest.approx(1 / 3)
        only = chance["ve"]["sentence_only"][split]
        assert only["material"] == only["order"] == 1.0  # neutral hypotheses show in the text...
        assert all(only[t] < 0.7 for t in ("exist", "count", "relation"))  # ...the others do not
    manifest = load_manifest(out / "manifests" / "shapes_nlvr2.yaml")
    assert manifest.extra["majority_baseline"] == chance["nlvr2"]["majority_baseline"]
    assert load_manifest(out / "manifests" / "shapes_ve.yaml").extra["labels"] == list(VE_LABELS)


def test_no_scene_holds_a_relation_of_the_held_out_retrieval_groups(shapes, nlvr2, ve):
    out, _ = shapes
    held_out = set()
    for samples in _read(out, "retrieval").values():
        for x in samples:
            held_out |= Scene.from_dict(x["json"]["scene"]).relation_keys()
    seen = set()
    for samples in nlvr2.values():
        for x in samples:
            for d in x["json"]["scenes"]:
                seen |= Scene.from_dict(d).relation_keys()
    for samples in ve.values():
        for x in samples:
            seen |= Scene.from_dict(x["json"]["scene"]).relation_keys()
    assert len(held_out) == 700 and len(seen) > 500 and not seen & held_out


# -- the pipeline ---------------------------------------------------------------------------------
def _dm(tokenizer, **kwargs) -> WebDataModule:
    defaults = dict(tokenizer=tokenizer, image_size=IMG, batch_size=4, num_workers=0, shuffle_buffer=4)
    return WebDataModule(**{**defaults, **kwargs})


def _first_batch(dm: WebDataModule, stage: str = "test") -> dict:
    dm.setup(stage)
    loader = dm.test_dataloader() if stage == "test" else dm.train_dataloader()
    return dm.on_before_batch_transfer(next(iter(loader)), 0)


def test_nlvr2_batches(shapes, nlvr2, tokenizer):
    out, _ = shapes
    manifest = str(out / "manifests" / "shapes_nlvr2.yaml")
    batch = _first_batch(_dm(tokenizer, test=[Source(manifest, split="val")]))
    assert batch["modality"] == "nlvr2" and batch["num_skipped"] == 0
    for key in ("image", "image2"):
        assert batch[key].shape == (4, 3, IMG, IMG) and batch[key].dtype == torch.uint8
    assert batch["text_ids"].shape[0] == 4 and batch["text_mask"].shape == batch["text_ids"].shape
    assert batch["label"].dtype == torch.int64 and batch["label"].shape == (4,)
    assert batch["image_id"].dtype == torch.int64 and batch["image_id"].shape == (4,)
    first = [x["json"] for x in nlvr2["val"][:4]]  # evaluation reads in order
    assert batch["label"].tolist() == [m["label"] for m in first]
    assert batch["task_type"] == [m["template"] for m in first]
    assert batch["image_id"].tolist() == [m["id"] for m in first]
    assert not torch.equal(batch["image"], batch["image2"])
    # the right image is right.jpg through the same transform as the left one
    tf = ImageTransform(IMG, norm="clip", normalize=False)
    right = torch.stack([tf(Image.open(io.BytesIO(x["right.jpg"])).convert("RGB")) for x in nlvr2["val"][:4]])
    assert torch.equal(batch["image2"], right)
    # a training batch too (random crops of both images)
    train = _first_batch(_dm(tokenizer, train=[Source(manifest)], epoch_length=8), "fit")
    assert train["image2"].shape == train["image"].shape == (4, 3, IMG, IMG)


def test_image2_is_normalised_on_the_device_like_image(shapes, tokenizer):
    out, _ = shapes
    manifest = str(out / "manifests" / "shapes_nlvr2.yaml")
    got = {}
    for on_device in (True, False):
        dm = _dm(tokenizer, test=[Source(manifest, split="test")], normalize_on_device=on_device)
        got[on_device] = dm.on_after_batch_transfer(_first_batch(dm), 0)
    for key in ("image", "image2"):
        assert got[True][key].dtype == got[False][key].dtype == torch.float32
        torch.testing.assert_close(got[True][key], got[False][key], atol=1e-5, rtol=0)
    assert got[True]["image2"].mean().abs() < 2  # normalised, not 0..255


def test_ve_batches(shapes, ve, tokenizer):
    out, _ = shapes
    manifest = str(out / "manifests" / "shapes_ve.yaml")
    dm = _dm(tokenizer, test=[Source(manifest, split="test")])
    batch = _first_batch(dm)
    assert batch["modality"] == "ve" and batch["num_skipped"] == 0 and "image2" not in batch
    assert batch["image"].shape == (4, 3, IMG, IMG) and batch["image"].dtype == torch.uint8
    assert batch["text_ids"].shape[0] == 4 and batch["text_mask"].shape == batch["text_ids"].shape
    assert batch["label"].dtype == torch.int64 and batch["image_id"].dtype == torch.int64
    first = [x["json"] for x in ve["test"][:4]]
    assert batch["label"].tolist() == [m["label"] for m in first] == [0, 1, 2, 0]
    assert batch["image_id"].tolist() == [m["image_id"] for m in first]
    texts = dm.tokenizer.tok.batch_decode(batch["text_ids"], skip_special_tokens=True)
    assert [t.split()[:2] for t in texts] == [m["hypothesis"].split()[:2] for m in first]
    assert dm.on_after_batch_transfer(batch, 0)["image"].dtype == torch.float32


def _write_manifest(tmp_path, modality: str, samples: list[dict]) -> str:
    url = write_tar(tmp_path / f"{modality}.tar", samples)
    path = tmp_path / f"{modality}.yaml"
    Manifest(name=f"toy_{modality}", modality=modality, splits={"test": Split(url, len(samples))}).save(path)
    return str(path)


def _nlvr2_sample(key: str, label=1, right: bool = True, **meta) -> dict:
    sample = {
        "__key__": key,
        "left.jpg": jpeg_bytes((200, 0, 0)),
        "json": {"sentence": "both images are red", "label": label, **meta},
    }
    if right:
        sample["right.png"] = jpeg_bytes((0, 0, 200))  # any image extension of the manifest
    return sample


def test_bad_pair_task_samples_are_counted_and_logged(tmp_path, tokenizer, caplog):
    nlvr2 = [_nlvr2_sample(f"good{i}", label=i % 2) for i in range(6)] + [
        _nlvr2_sample("noright", right=False),
        _nlvr2_sample("labelthree", label=3),
        _nlvr2_sample("labelword", label="maybe"),
        {**_nlvr2_sample("nolabel"), "json": {"sentence": "x"}},
    ]
    ve = [
        {"__key__": f"good{i}", "jpg": jpeg_bytes(), "json": {"hypothesis": "a red thing", "label": i % 3}}
        for i in range(6)
    ]
    ve += [
        {"__key__": "minusone", "jpg": jpeg_bytes(), "json": {"hypothesis": "h", "label": -1}},
        {"__key__": "three", "jpg": jpeg_bytes(), "json": {"hypothesis": "h", "label": 3}},
        {"__key__": "nohypothesis", "jpg": jpeg_bytes(), "json": {"label": 0}},
    ]
    expected = {
        "nlvr2": ({"no right image": 1, "label out of range": 2, "no label in json": 1}, ["noright", "labelthree"]),
        "ve": ({"label out of range": 2, "empty hypothesis": 1}, ["minusone", "three"]),
    }
    for modality, samples in (("nlvr2", nlvr2), ("ve", ve)):
        path = _write_manifest(tmp_path, modality, samples)
        dm = _dm(tokenizer, test=[Source(path, split="test")], max_skip_fraction=0.5, min_samples_for_skip_check=1)
        dm.setup("test")
        caplog.clear()
        good = skipped = 0
        with caplog.at_level(logging.WARNING, logger="vlp.data"):
            for b in dm.test_dataloader():
                b = dm.on_before_batch_transfer(b, 0)
                good += len(b["keys"])
                skipped += b["num_skipped"]
                assert b["label"].tolist() == [int(k.rsplit("good", 1)[1]) % len(LABELS[modality]) for k in b["keys"]]
        reasons, keys = expected[modality]
        assert (good, skipped) == (6, sum(reasons.values()))
        assert dict(dm.stats["train"]["reasons"]) == reasons
        for key in keys:  # logged by sample key, with the reason
            assert re.search(rf"skipped \S*:{key}: ", caplog.text), caplog.text
        assert "label out of range (got 3" in caplog.text


def _raw(sample: dict) -> dict:
    return {k: json.dumps(v).encode() if k == "json" else v for k, v in sample.items()}


def test_labels_by_name_and_decoder_reasons():
    decode = SampleDecoder("nlvr2", Manifest("m", "nlvr2", {}).fields, ImageTransform(16, normalize=False))
    for label, want in ((True, 1), ("False", 0), (" 1 ", 1), (0, 0)):
        example = decode(_raw(_nlvr2_sample("k", label=label, id="dev-850-0-0", template="more")))
        assert not isinstance(example, Skipped) and example["label"] == want
        assert example["template"] == "more" and example["image2"].shape == (3, 16, 16)
    assert decode(_raw(_nlvr2_sample("k", id="dev-850-0-0")))["image_id"] == example["image_id"]  # from the id
    assert decode(_raw(_nlvr2_sample("k", label=1.0))).reason.startswith("label out of range")
    no_left = decode(_raw({k: v for k, v in _nlvr2_sample("k").items() if k != "left.jpg"}))
    assert isinstance(no_left, Skipped) and no_left.reason.startswith("no left image (looked for left.jpg/left.jpeg")
    assert decode(_raw(_nlvr2_sample("k", right=False))).key == "?:k"
    ve = SampleDecoder("ve", Manifest("m", "ve", {}).fields, ImageTransform(16, normalize=False))
    for label, want in (("contradiction", 2), ("Entailment", 0), ("neutral", 1), (2, 2)):
        example = ve(_raw({"__key__": "k", "jpg": jpeg_bytes(), "json": {"hypothesis": "h", "label": label}}))
        assert example["label"] == want
    bad = ve(_raw({"__key__": "k", "jpg": jpeg_bytes(), "json": {"hypothesis": "h", "label": True}}))
    assert isinstance(bad, Skipped) and "label out of range" in bad.reason  # booleans only for nlvr2


def test_inspect_knows_the_new_modalities(shapes, capsys):
    out, _ = shapes
    assert _guess_modality(Counter({"left.jpg": 3, "right.jpg": 3, "json": 3})) == "nlvr2"
    report = data_main(["inspect", str(out / "manifests" / "shapes_nlvr2.yaml"), "--split", "val", "-n", "1"])
    assert report["shapes_nlvr2/val"]["samples"] == 200
    shown = capsys.readouterr().out
    assert "image2: tensor(3, 64, 64)" in shown and "template:" in shown
    report = data_main(["inspect", str(out / "nlvr2" / "val-000000.tar"), "-n", "1"])
    assert next(iter(report.values()))["modality"] == "nlvr2"


def test_committed_manifests_for_the_real_datasets():
    nlvr2 = load_manifest("data_manifests/nlvr2.yaml")
    assert nlvr2.modality == "nlvr2"
    assert {k: v.num_samples for k, v in nlvr2.splits.items()} == {"train": 86373, "val": 6982, "test": 6967}
    snli_ve = load_manifest("data_manifests/snli_ve.yaml")
    assert snli_ve.modality == "ve"
    assert {k: v.num_samples for k, v in snli_ve.splits.items()} == {"train": 529527, "val": 17858, "test": 17901}
    for m in (nlvr2, snli_ve):
        assert m.citation and m.homepage and m.license and m.description
        for split in m.splits.values():
            assert split.urls.startswith(f"${{VLP_DATA_ROOT:-data}}/{m.name}/")
    shapes = {m: load_manifest(f"data_manifests/shapes_{m}.yaml") for m in ("nlvr2", "ve")}
    assert shapes["nlvr2"].split("test").num_samples >= 500 and shapes["ve"].split("test").num_samples >= 498
    assert shapes["nlvr2"].extra["majority_baseline"]["test"]["overall"] == 0.5
