"""BLEU-1..4 and CIDEr-D match pycocoevalcap (the reference implementation of COCO caption
evaluation) on pre-tokenized captions; hand-computed 1- and 2-item cases; the tokenizer's
stand-in for PTB; CaptionMetric drops duplicate ids and gives the numbers of 1 process on
2 (gloo, CPU), uneven shares and a rank holding nothing."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import free_port

# not importorskip: without the reference these tests must fail (pycocoevalcap is in the dev extra)
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from vlp.errors import ConfigError, DataError
from vlp.eval import captioning
from vlp.eval.captioning import CaptionMetric, bleu, cider_d, tokenize

# pre-tokenized: lengths 0..10, repeated n-grams (2, 4), no overlap (3), a 1-word candidate (5)
CANDIDATES = {
    1: "a man riding a wave on top of a surfboard",
    2: "a dog a dog a dog",
    3: "the quick brown fox",
    4: "a plate of food with broccoli and rice and broccoli",
    5: "people",
    6: "",
    7: "a cat on a couch",
}
REFERENCES = {
    1: [
        "a man riding a wave on a surfboard",
        "a surfer rides a large wave in the ocean",
        "a person on a surfboard riding a wave",
    ],
    2: ["a dog running on the grass", "a brown dog plays in a field of grass", "a dog"],
    3: ["zebras grazing in a field", "two zebras eating grass"],
    4: [
        "a plate of food with broccoli",
        "a white plate topped with rice and broccoli and chicken",
        "food on a plate",
        "a meal of rice and vegetables on a plate",
    ],
    5: ["a group of people standing in a street", "people"],
    6: ["a cat sitting on a couch", "a cat on a sofa"],
    7: ["a cat sitting on a couch", "a cat laying on a red couch next to a remote"],
}


def _coco(scorer, candidates=CANDIDATES, references=REFERENCES):
    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its counts
        return scorer.compute_score(
            {i: list(r) for i, r in references.items()}, {i: [c] for i, c in candidates.items()}
        )


@pytest.mark.parametrize("sigma", [6.0, 2.0])
def test_cider_d_matches_pycocoevalcap(sigma):
    want, want_items = _coco(Cider(sigma=sigma))
    got, got_items = cider_d(CANDIDATES, REFERENCES, sigma=sigma)
    assert got == pytest.approx(float(want), rel=1e-9, abs=1e-12)
    assert list(got_items) == list(CANDIDATES)
    assert list(got_items.values()) == pytest.approx([float(x) for x in want_items], rel=1e-9, abs=1e-12)
    assert got_items[3] == 0.0 and got_items[1] > 1.0  # no overlap; a good caption


def test_bleu_matches_pycocoevalcap():
    want, want_items = _coco(Bleu(4))
    got, got_items = bleu(CANDIDATES, REFERENCES)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
    for k in range(4):
        assert [got_items[i][k] for i in CANDIDATES] == pytest.approx(want_items[k], rel=1e-9, abs=1e-12)
    assert 0 < got[3] < got[2] < got[1] < got[0] < 1


def test_subset_changes_document_frequencies_as_in_pycocoevalcap():
    subset = [1, 2, 7]
    cands, refs = {i: CANDIDATES[i] for i in subset}, {i: REFERENCES[i] for i in subset}
    want, _ = _coco(Cider(), cands, refs)
    assert cider_d(cands, refs)[0] == pytest.approx(float(want), rel=1e-9)
    assert cider_d(cands, refs)[0] != pytest.approx(cider_d(CANDIDATES, REFERENCES)[0])


def test_one_item_by_hand():
    scores, items = bleu({"a": "a b c d"}, {"a": ["a b c d"]})
    assert scores == pytest.approx([1.0] * 4, abs=1e-8) and items["a"] == pytest.approx(scores)
    # p1..p4 = 3/4, 2/3, 1/2, 0/1; equal lengths, no brevity penalty
    scores, _ = bleu({"a": "a b c d"}, {"a": ["a b c e"]})
    assert scores[:3] == pytest.approx([0.75, math.sqrt(0.5), (0.25) ** (1 / 3)], rel=1e-8)
    assert scores[3] < 1e-3
    # brevity penalty exp(1 - r / c): 2 words against 4
    assert bleu({"a": "a b"}, {"a": ["a b c d"]})[0][0] == pytest.approx(math.exp(-1), rel=1e-8)
    # closest reference length, a tie going to the shorter one (2 of 2 and 4): no penalty
    assert bleu({"a": "a b c"}, {"a": ["x y", "a b c d"]})[0][0] == pytest.approx(1.0, abs=1e-8)
    # every n-gram is in the references of every item of a 1-item corpus: idf 0, CIDEr-D 0
    assert cider_d({"a": "a b c d"}, {"a": ["a b c d", "a b c d"]}) == (0.0, {"a": 0.0})


def test_two_items_by_hand():
    # idf log 2 for every n-gram; a: cosines 1, 1 (uni, bigrams), 0, 0 -> 10 * 2 / 4; b: 10 * 1 / 4
    score, items = cider_d({"a": "a b", "b": "c"}, {"a": ["a b"], "b": ["c"]})
    assert items == pytest.approx({"a": 5.0, "b": 2.5}) and score == pytest.approx(3.75)
    # the Gaussian length penalty counts bigrams: 1 against 3 -> exp(-4 / 72) on the cosines
    _, items = cider_d({"a": "a b", "b": "c"}, {"a": ["a b x y"], "b": ["c"]})
    cos1, cos2 = 2 / (math.sqrt(2) * 2), 1 / math.sqrt(3)
    assert items["a"] == pytest.approx(10 * (cos1 + cos2) / 4 * math.exp(-4 / 72), rel=1e-12)


def test_tokenize_removes_ptb_punctuation():
    assert tokenize("A man riding a wave on top of a surfboard.") == "a man riding a wave on top of a surfboard".split()
    assert tokenize("Don't, can't! The dog's ball (red)...") == [
        "do",
        "n't",
        "ca",
        "n't",
        "the",
        "dog",
        "'s",
        "ball",
        "red",
    ]
    assert tokenize('A "black-and-white" photo; 3.5 in. -- at 10:30\nin the U.S.?') == [
        "a", "black-and-white", "photo", "3.5", "in", "at", "10:30", "in", "the", "u.s.",
    ]  # fmt: skip
    assert tokenize("cats' toys {x} and/or $5 50%") == ["cats", "toys", "x", "and/or", "$", "5", "50", "%"]
    assert tokenize("'' ' `` ` ( ) { } . ? ! , : - -- ... ;") == []  # the raw forms of PTB_PUNCTUATION
    with pytest.raises(DataError, match="string"):
        tokenize(["a", "list"])


def test_bad_input_is_named():
    with pytest.raises(DataError, match=r"without references \[2\].*without a candidate \[3\]"):
        bleu({1: "a", 2: "b"}, {1: ["a"], 3: ["c"]})
    with pytest.raises(DataError, match="empty"):
        cider_d({}, {})
    with pytest.raises(DataError, match="candidate of id 1 must be one string"):
        cider_d({1: ["a b"]}, {1: ["a b"]})
    with pytest.raises(DataError, match="references of id 1 must be a non-empty list"):
        bleu({1: "a"}, {1: []})
    with pytest.raises(DataError, match="references of id 1 must be a non-empty list"):
        bleu({1: "a"}, {1: "a"})
    with pytest.raises(ConfigError, match="sigma"):
        cider_d({1: "a"}, {1: ["a"]}, sigma=0)
    with pytest.raises(ConfigError, match="n "):
        bleu({1: "a"}, {1: ["a"]}, n=0)


RAW_CANDIDATES = {
    1: "A man riding a wave on top of a surfboard.",
    2: "A dog, a dog, a dog!",
    3: "The quick brown fox.",
    4: "A plate of food with broccoli and rice and broccoli.",
    5: "People",
    6: "",
    7: "A cat on a couch.",
}


def _raw_refs() -> dict:
    return {i: [r.capitalize() + "." for r in refs] for i, refs in REFERENCES.items()}


def test_caption_metric_tokenizes_and_drops_duplicate_ids():
    metric, refs = CaptionMetric(), _raw_refs()
    assert all(math.isnan(v) for v in metric.compute().values()) and metric.num_items == 0
    ids = list(RAW_CANDIDATES)
    metric.update(torch.tensor(ids[:4]), [RAW_CANDIDATES[i] for i in ids[:4]], [refs[i] for i in ids[:4]])
    metric.update(ids[3:], [RAW_CANDIDATES[i] for i in ids[3:]], [refs[i] for i in ids[3:]])  # id 4 twice
    scores = metric.compute()
    assert metric.num_items == 7 and list(scores) == ["bleu1", "bleu2", "bleu3", "bleu4", "cider"]
    bleus, _ = bleu(CANDIDATES, REFERENCES)
    assert [scores[f"bleu{k}"] for k in range(1, 5)] == pytest.approx([100 * b for b in bleus], rel=1e-12)
    assert scores["cider"] == pytest.approx(100 * cider_d(CANDIDATES, REFERENCES)[0], rel=1e-12)
    metric.reset()
    metric.update([1], ["a b"], [["a b"]])
    assert metric.gathered() == ({1: "a b"}, {1: ["a b"]})


def test_caption_metric_refuses_bad_updates():
    metric = CaptionMetric(tokenize=False)
    with pytest.raises(DataError, match="2 ids, 1 candidates, 2 reference lists"):
        metric.update([1, 2], ["a"], [["a"], ["b"]])
    with pytest.raises(DataError, match="references of id 1"):
        metric.update([1], ["a"], ["a"])
    with pytest.raises(DataError, match="candidate of id 1 must be a string"):
        metric.update([1], [None], [["a"]])
    metric.update([1, 1], ["a", "a"], [["a"], ["b"]])
    with pytest.raises(DataError, match="id 1 appears twice with different references"):
        metric.compute()


WORKER = r"""
import importlib.util, json, sys, torch, torch.distributed as dist
rank, world, data, out, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
# the module by its path: vlp.eval's __init__ imports torchmetrics, seconds per rank on a busy CPU
spec = importlib.util.spec_from_file_location("captioning", path)
captioning = importlib.util.module_from_spec(spec)
spec.loader.exec_module(captioning)
CaptionMetric = captioning.CaptionMetric
dist.init_process_group("gloo", rank=rank, world_size=world)
cands, refs = json.load(open(data))
ids = sorted(cands, key=int)
# uneven: rank 1 has 3 items and a padded duplicate of rank 0's first; empty: rank 1 has none
shares = {"uneven": [ids[:4], ids[4:] + ids[:1]], "empty": [ids, []]}
result = {}
for split, share in shares.items():
    metric = CaptionMetric()
    mine = share[rank]
    if mine:
        metric.update(torch.tensor([int(i) for i in mine]), [cands[i] for i in mine], [refs[i] for i in mine])
    result[split] = {**metric.compute(), "num_items": metric.num_items}
json.dump(result, open(out + str(rank), "w"))
"""


def test_two_processes_give_the_numbers_of_one(tmp_path):
    refs = _raw_refs()
    one = CaptionMetric()
    one.update(list(RAW_CANDIDATES), list(RAW_CANDIDATES.values()), [refs[i] for i in RAW_CANDIDATES])
    want = {**one.compute(), "num_items": 7}
    data, out = tmp_path / "data.json", tmp_path / "out"
    data.write_text(json.dumps([RAW_CANDIDATES, refs]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(r), "2", str(data), str(out), captioning.__file__],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    logs = [p.communicate(timeout=120)[0] for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    for rank in range(2):  # every rank gets the scores
        got = json.loads((tmp_path / f"out{rank}").read_text())
        for split in ("uneven", "empty"):
            assert got[split] == pytest.approx(want, rel=1e-12), (rank, split)
