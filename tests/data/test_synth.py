"""The shapes benchmark: layout and counts, determinism, captions that say what the image
shows, hard-negative groups, train/eval disjointness and chance levels."""

from __future__ import annotations

import io
import json
import re
from collections import Counter, defaultdict
from math import comb
from pathlib import Path

import pytest
from PIL import Image
from webdataset import tariterators

from vlp.data.manifest import MODALITIES, expand_urls, load_manifest
from vlp.data.synth import (
    CLASSES,
    TEMPLATES,
    Scene,
    Shape,
    caption,
    relation_holds,
    render_scene,
    shapes_manifests,
    write_shapes,
)
from vlp.errors import ConfigError

SIZE = 2000
FILES = {  # modality -> the files of every sample
    "pair": {"jpg", "txt", "json"},
    "image": {"jpg", "cls", "json"},
    "text": {"txt"},
    "vqa": {"jpg", "json"},
    "retrieval": {"jpg", "json"},
    "nlvr2": {"left.jpg", "right.jpg", "json"},
    "ve": {"jpg", "json"},
    "pair_cls": {"jpg", "json"},
    "text_pair": {"json"},
}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    info = write_shapes(out, seed=0, size=SIZE, samples_per_shard=700)
    return out, info


@pytest.fixture(scope="module")
def samples(shapes):
    """modality -> split -> list of raw samples (json decoded), read through the manifests."""
    out, info = shapes
    result = {}
    for modality in MODALITIES:
        manifest = load_manifest(out / "manifests" / f"shapes_{modality}.yaml")
        result[modality] = {split: _read(expand_urls(manifest.split(split).urls)) for split in manifest.splits}
    return result


def _read(urls: list[str]) -> list[dict]:
    out = []
    for s in tariterators.tarfile_samples([{"url": u} for u in urls]):
        if "json" in s:
            s["json"] = json.loads(s["json"])
        out.append(s)
    return out


def test_every_modality_and_split_with_the_counts_the_manifests_claim(shapes, samples):
    out, info = shapes
    # the manifests list every shard written, and nothing else was left behind (no
    # temporary or partial tars); how long writing takes is bench/'s business, not a test's
    listed = {
        Path(u)
        for m in MODALITIES
        for s in load_manifest(out / "manifests" / f"shapes_{m}.yaml").splits.values()
        for u in expand_urls(s.urls)
    }
    assert {p for p in out.rglob("*") if p.is_file() and p.suffix != ".yaml" and p.parent != out} == listed
    for modality in MODALITIES:
        manifest = load_manifest(out / "manifests" / f"shapes_{modality}.yaml")
        assert manifest.modality == modality and manifest.license == "CC0-1.0 (generated)"
        for split, s in manifest.splits.items():
            got = samples[modality][split]
            assert len(got) == s.num_samples == info["splits"][modality][split]["num_samples"] > 0
            assert len({x["__key__"] for x in got}) == len(got)
            per_shard = Counter(x["__url__"] for x in got)
            assert [per_shard[u] for u in expand_urls(s.urls)] == s.shard_sizes
            for x in got:
                files = {k for k in x if not k.startswith("__")}
                if modality == "interleaved":
                    n = x["json"]["num_images"]
                    assert x["json"]["text"].count("<image>") == n and n in (2, 3)
                    assert files == {"json"} | {f"{i}.jpg" for i in range(n)}
                else:
                    assert files == FILES[modality], (modality, split, files)
    counts = {m: {k: v["num_samples"] for k, v in s.items()} for m, s in info["splits"].items()}
    assert counts == {
        "pair": {"train": SIZE, "support": 256},  # support: few-shot demonstrations
        "text": {"train": SIZE},
        "interleaved": {"train": SIZE // 10},
        "retrieval": {"val": 200, "test": 500},
        "image": {"train": SIZE // 4, "test": 480, "support": 24 * 8},
        "vqa": {"train": SIZE // 2, "val": 200, "test": 500, "support": 256},
        "nlvr2": {"train": SIZE // 2, "val": 200, "test": 500},  # multiples of 10: balanced
        "ve": {"train": 999, "val": 198, "test": 498},  # multiples of 3
        "pair_cls": {"train": SIZE // 2, "val": 200, "test": 500},  # even: balanced
        "text_pair": {"train": SIZE // 2, "val": 200, "test": 500},  # even: balanced
    }
    for x in samples["pair"]["train"][:5]:
        assert Image.open(io.BytesIO(x["jpg"])).size == (64, 64)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    def files(path):
        return {
            p.relative_to(path): p.read_bytes()
            for p in sorted(path.rglob("*"))
            if p.is_file() and "manifests" not in p.parts
        }  # manifests name the out path

    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        write_shapes(tmp_path / name, seed=seed, size=100, samples_per_shard=60)
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert len(a) > 10 and a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a if k.suffix == ".tar")


def _pattern(template: str) -> re.Pattern:
    """A regex for one caption template; repeated slots must repeat the same words."""
    seen, out = set(), ""
    for part in re.split(r"(\{\w+\})", template):
        slot = part[1:-1] if part.startswith("{") else None
        if slot is None:
            out += re.escape(part)
        elif slot in seen:
            out += f"(?P={slot})"
        else:
            seen.add(slot)
            what = (
                r"(?:small|large) \w+ (?:circle|square|triangle)" if slot in "ABC" else "left of|right of|above|below"
            )
            out += f"(?P<{slot}>{what})"
    return re.compile(out + "$")


def _statements(caption_text: str, num_shapes: int, template: int) -> list[tuple[str, str, str]]:
    """(x, rel, y) claims parsed back from a caption."""
    m = _pattern(TEMPLATES[num_shapes][template]).match(caption_text)
    assert m, (caption_text, TEMPLATES[num_shapes][template])
    g = m.groupdict()
    claims = [
        ("A", "rel", "B"),
        ("B", "inv", "A"),
        ("A", "r1", "B"),
        ("B", "inv1", "A"),
        ("C", "r2", "B"),
        ("B", "inv2", "C"),
    ]
    return [(g[x], g[r], g[y]) for x, r, y in claims if g.get(r)] or [(g["A"], "", "")]


def test_captions_parse_back_to_the_drawn_scene(samples):
    kinds = Counter()
    for x in samples["pair"]["train"][:600]:
        scene, t = Scene.from_dict(x["json"]["scene"]), x["json"]["template"]
        text = x["txt"].decode()
        assert text == caption(scene, t)
        by_name = {s.name: s for s in scene.shapes}
        claims = _statements(text, len(scene.shapes), t)
        mentioned = {n for a, _, b in claims for n in (a, b) if n}
        assert mentioned == set(by_name), text  # every shape, nothing else
        for a, rel, b in claims:
            if rel:
                assert relation_holds(by_name[a], by_name[b], rel), (text, scene)
        # the image is exactly the rendering of the recorded scene
        buf = io.BytesIO()
        render_scene(scene, 64).save(buf, format="JPEG", quality=90)
        assert buf.getvalue() == x["jpg"]
        kinds[len(scene.shapes)] += 1
    assert set(kinds) == {1, 2, 3}


def test_relations_are_unambiguous():
    a, b = Shape("small", "red", "circle", 0.2, 0.5), Shape("large", "blue", "square", 0.7, 0.55)
    assert relation_holds(a, b, "left of") and relation_holds(b, a, "right of")
    assert not any(relation_holds(a, b, r) for r in ("right of", "above", "below"))
    assert not relation_holds(a, Shape("large", "blue", "square", 0.45, 0.5), "left of")  # too close
    scene = Scene((a, b), ((0, "left of", 1),))
    texts = {caption(scene, i) for i in range(len(TEMPLATES[2]))}
    assert "a small red circle left of a large blue square" in texts
    assert "a large blue square right of a small red circle" in texts and len(texts) == len(TEMPLATES[2])


def test_retrieval_groups_are_bag_of_words_hard_negatives(samples, shapes):
    _, info = shapes
    for split in ("val", "test"):
        groups = defaultdict(list)
        for x in samples["retrieval"][split]:
            groups[x["json"]["group_id"]].append(x["json"])
        assert len(groups) == info["hard_negatives"]["groups"][split] and {len(g) for g in groups.values()} == {4}
        for members in groups.values():
            scenes = [Scene.from_dict(m["scene"]) for m in members]
            assert len({s.key() for s in scenes}) == 4
            assert len({(s.x, s.y) for sc in scenes for s in sc.shapes}) == 2  # one layout
            for j in range(info["captions_per_image"]):
                bags = {tuple(sorted(m["captions"][j].split())) for m in members}
                assert len(bags) == 1, [m["captions"][j] for m in members]
            for m, sc in zip(members, scenes, strict=True):
                assert len(m["captions"]) == len(set(m["captions"])) == info["captions_per_image"]
                assert m["captions"] == [caption(sc, t) for t in m["templates"]]


def test_no_evaluation_scene_or_relation_is_seen_in_training(samples):
    def relations(xs, key="scene"):
        out = set()
        for x in xs:
            for d in x["json"][key] if key == "scenes" else [x["json"][key]]:
                out |= Scene.from_dict(d).relation_keys()
        return out

    val, test = relations(samples["retrieval"]["val"]), relations(samples["retrieval"]["test"])
    assert len(val) == 200 and len(test) == 500 and not val & test
    train = relations(samples["pair"]["train"]) | relations(samples["vqa"]["train"])
    train |= relations(samples["interleaved"]["train"], "scenes")
    train |= relations(samples["pair"]["support"]) | relations(samples["vqa"]["support"])  # few-shot demonstrations
    assert len(train) > 500 and not train & (val | test)


def test_chance_levels_match_the_formulas(samples, shapes):
    _, info = shapes
    for split in ("val", "test"):
        n, c = len(samples["retrieval"][split]), info["captions_per_image"]
        chance = info["chance"]["retrieval"][split]
        assert (chance["images"], chance["captions"]) == (n, n * c)
        for k in (1, 5, 10):
            assert chance[f"t2i_r{k}"] == pytest.approx(k / n)
            assert chance[f"i2t_r{k}"] == pytest.approx(1 - comb(n * c - c, k) / comb(n * c, k))
        assert chance["i2t_r1"] == pytest.approx(1 / n)
    bow = info["hard_negatives"]["bag_of_words_best"]
    assert bow["t2i_r1"] == 0.25 and bow["t2i_r5"] == 1.0
    assert bow["i2t_r5"] == pytest.approx(1 - comb(15, 5) / comb(20, 5))
    assert info["chance"]["image"]["top1"] == pytest.approx(1 / len(CLASSES))
    train = Counter((x["json"]["question_type"], x["json"]["answers"][0]) for x in samples["vqa"]["train"])
    for split in ("val", "test"):
        got = info["chance"]["vqa"][split]
        for qtype, answer in got["majority_answer"].items():
            assert train[(qtype, answer)] == max(v for (t, _), v in train.items() if t == qtype)
            rows = [x["json"] for x in samples["vqa"][split] if x["json"]["question_type"] == qtype]
            assert got[qtype] == pytest.approx(sum(r["answers"][0] == answer for r in rows) / len(rows))
        assert 0.4 < got["exist"] < 0.6  # yes/no balanced


def test_vqa_answers_are_right(samples):
    types = Counter()
    for x in samples["vqa"]["train"][:500] + samples["vqa"]["test"]:
        q, answers, qtype = x["json"]["question"], x["json"]["answers"], x["json"]["question_type"]
        scene = Scene.from_dict(x["json"]["scene"])
        assert len(answers) == 10 and len(set(answers)) == 1
        types[qtype] += 1
        named = {f"{s.color} {s.kind}": s for s in scene.shapes}
        if m := re.fullmatch(r"what color is the (?:(small|large) )?(\w+)\?", q):
            hits = [s for s in scene.shapes if s.kind == m[2] and m[1] in (None, s.size)]
            assert [s.color for s in hits] == answers[:1], q
        elif m := re.fullmatch(r"how many (\w+?)s are there\?", q):
            n = len(scene.shapes) if m[1] == "shape" else sum(s.kind == m[1] for s in scene.shapes)
            assert answers[0] == str(n)
        elif m := re.fullmatch(r"is there a (\w+ \w+)\?", q):
            assert answers[0] == ("yes" if m[1] in named else "no")
        elif m := re.fullmatch(r"is the (\w+ \w+) (left of|right of|above|below) the (\w+ \w+)\?", q):
            assert answers[0] == ("yes" if relation_holds(named[m[1]], named[m[3]], m[2]) else "no")
        else:
            m = re.fullmatch(r"what is (left of|right of|above|below) the (\w+ \w+)\?", q)
            assert m, q
            hits = [n for n, s in named.items() if relation_holds(s, named[m[2]], m[1])]
            assert hits == answers[:1], q
    assert set(types) == {"color", "count", "exist", "spatial"}


def test_image_split_and_classes(samples, shapes):
    out, info = shapes
    classes = json.loads((out / "classes.json").read_text())
    assert classes["classnames"] == list(CLASSES) == info["classes"] and "a photo of a {}." in classes["templates"]
    for x in samples["image"]["train"][:200]:
        label, shape = int(x["cls"]), Scene.from_dict(x["json"]["scene"]).shapes[0]
        assert CLASSES[label] == x["json"]["label_name"] == f"{shape.color} {shape.kind}"
    assert set(Counter(int(x["cls"]) for x in samples["image"]["test"]).values()) == {480 // len(CLASSES)}


def test_few_shot_support_splits_are_small_training_draws_of_their_own(samples):
    """Captioning, VQA and classification demonstrations: the training distribution (no
    held-out relation, checked in test_no_evaluation_scene_or_relation_is_seen_in_training),
    other scenes than the training split's, classes balanced."""
    for modality in ("pair", "vqa", "image"):
        support, train = samples[modality]["support"], samples[modality]["train"]
        assert len(support) < len(train) // 2
        scenes = {json.dumps(x["json"]["scene"], sort_keys=True) for x in train}
        fresh = [json.dumps(x["json"]["scene"], sort_keys=True) not in scenes for x in support]
        assert sum(fresh) > 0.9 * len(support), modality  # a few 1-shape scenes recur by chance
    ids = [x["json"]["image_id"] for m in ("pair", "vqa", "image") for x in samples[m]["support"]]
    assert len(set(ids)) == len(ids)  # and above every other split's (the next test)
    assert all(x["txt"] == x["txt"].strip() and x["txt"] for x in samples["pair"]["support"])  # one caption each
    assert set(Counter(int(x["cls"]) for x in samples["image"]["support"]).values()) == {8}


def test_support_splits_come_after_every_other_split(samples):
    """Written last, from generators of their own: the other splits keep the ids (and, each
    split drawing from its own seed, the bytes) they had before support splits existed."""
    support = [x["json"]["image_id"] for m in ("pair", "vqa", "image") for x in samples[m]["support"]]
    others = [
        i
        for m, splits in samples.items()
        for split, xs in splits.items()
        if split != "support"
        for x in xs
        for i in (
            [x["json"]["image_id"]] if "image_id" in x.get("json", {}) else x.get("json", {}).get("image_ids", [])
        )
    ]
    assert max(others) < min(support)


def test_manifests_for_the_repo(shapes, monkeypatch):
    _, info = shapes
    manifests = shapes_manifests("${VLP_DATA_ROOT:-data}/shapes", info)
    assert set(manifests) == set(MODALITIES)
    pair = manifests["pair"].split("train")
    assert pair.urls == "${VLP_DATA_ROOT:-data}/shapes/pair/train-{000000..000002}.tar"
    monkeypatch.setenv("VLP_DATA_ROOT", "/mnt/d")
    assert expand_urls(pair.urls)[-1] == "/mnt/d/shapes/pair/train-000002.tar"
    assert manifests["retrieval"].extra["chance"]["test"]["images"] == 500


def test_bad_arguments():
    with pytest.raises(ConfigError, match="captions_per_image"):
        write_shapes("unused", captions_per_image=9)
    with pytest.raises(ConfigError, match="size"):
        write_shapes("unused", size=0)


def test_pair_cls_sentences_are_true_or_false_as_labelled(samples):
    """The binary pair split: label 1 sentences are VE's contradictions of their scene, label 0
    its entailments; balanced; the sentence alone does not tell (the recorded baseline)."""
    for split, rows in samples["pair_cls"].items():
        labels = [x["json"]["label"] for x in rows]
        assert sum(labels) * 2 == len(labels), split
        types = {x["json"]["type"] for x in rows}
        assert len(types) > 1
