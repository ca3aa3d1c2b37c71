"""The shapes ``text_pair`` split: captions of one scene or of its swaps, balanced, and
with the same bag of words for both labels (a bag-of-words model is at chance), while the
label follows from the word order."""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import pytest
import torch

from vlp.data import Source, WebDataModule
from vlp.data.manifest import expand_urls, load_manifest
from vlp.data.pipeline import read_shards
from vlp.data.shapes.scenes import INVERSE, TEMPLATES
from vlp.data.shapes.textpair import TEXT_PAIR_KINDS, _describe, make_text_pair
from vlp.data.synth import write_shapes


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes") / "shapes"
    info = write_shapes(out, seed=0, size=2000, samples_per_shard=400)
    return out, info


def _samples(out, split: str) -> list[dict]:
    manifest = load_manifest(out / "manifests" / "shapes_text_pair.yaml")
    return [json.loads(s["json"]) for s in read_shards(expand_urls(manifest.split(split).urls))]


def _statement(text: str) -> tuple[str, str, str]:
    """(A, rel, B) with A rel B in canonical form (left of / above), parsed from a caption."""
    for t in TEMPLATES[2]:
        pattern = t.replace("{A}", "(?P<A>\\w+ \\w+ \\w+)").replace("{B}", "(?P<B>\\w+ \\w+ \\w+)")
        pattern = pattern.replace("{rel}", "(?P<rel>left of|right of|above|below)")
        pattern = pattern.replace("{inv}", "(?P<inv>left of|right of|above|below)")
        m = re.fullmatch(pattern, text)
        if m:
            a, b = m["A"], m["B"]
            rel = m.groupdict().get("rel") or INVERSE[m["inv"]]
            return (a, rel, b) if rel in ("left of", "above") else (b, INVERSE[rel], a)
    raise AssertionError(f"no template parses {text!r}")


def test_labels_follow_from_word_order_and_are_balanced(shapes):
    out, info = shapes
    assert info["chance"]["text_pair"] == {"acc": 50.0, "bag_of_words_best": 50.0}
    for split, n in (("train", 1000), ("val", 200), ("test", 500)):
        samples = _samples(out, split)
        assert len(samples) == n and Counter(s["label"] for s in samples) == {0: n // 2, 1: n // 2}
        for s in samples:
            same = _statement(s["text"]) == _statement(s["text_b"])
            assert same == (s["label"] == 1) == (s["kind"] == "same"), s
            assert s["text"] != s["text_b"] and s["templates"][0] != s["templates"][1]
            # the bag of words of b is that of a's scene in b's template, whatever the label
            scene = (tuple(s["scene"][0].split()), s["scene"][1], tuple(s["scene"][2].split()))
            assert Counter(s["text_b"].split()) == Counter(_describe(scene, s["templates"][1]).split())
        kinds = Counter(s["kind"] for s in samples if s["label"] == 0)
        assert set(kinds) == set(TEXT_PAIR_KINDS[1:]) and min(kinds.values()) > n / 2 / 3 * 0.6


def test_a_bag_of_words_model_is_at_chance():
    """Logistic regression on the word counts of a, of b and their difference: chance on a
    held-out sample."""
    import numpy as np
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    def draw(seed: int, n: int) -> list[dict]:
        rng = random.Random(seed)
        return [make_text_pair(rng, i % 2) for i in range(n)]

    train, test = draw(0, 4000), draw(1, 2000)
    bags = CountVectorizer(token_pattern=r"\S+").fit([s["text"] + " " + s["text_b"] for s in train])

    def features(samples):
        a = bags.transform([s["text"] for s in samples]).toarray()
        b = bags.transform([s["text_b"] for s in samples]).toarray()
        return np.hstack([a, b, np.abs(a - b)])

    model = LogisticRegression(max_iter=2000).fit(features(train), [s["label"] for s in train])
    acc = model.score(features(test), [s["label"] for s in test])
    assert 0.45 < acc < 0.55, acc


def test_text_pair_batches(shapes, tokenizer):
    out, _ = shapes
    dm = WebDataModule(
        tokenizer=tokenizer,
        batch_size=8,
        num_workers=0,
        test=[Source(str(out / "manifests" / "shapes_text_pair.yaml"), split="test")],
    )
    dm.setup("test")
    batch = dm.on_before_batch_transfer(next(iter(dm.test_dataloader())), 0)
    assert batch["modality"] == "text_pair" and batch["num_skipped"] == 0 and "image" not in batch
    assert batch["text_pair_ids"].shape == batch["text_pair_types"].shape and batch["text_pair_ids"].shape[0] == 8
    assert batch["label"].tolist() == [0, 1] * 4 and batch["label"].dtype == torch.long
    assert dm.eval_source_modalities("test") == ["text_pair"]
