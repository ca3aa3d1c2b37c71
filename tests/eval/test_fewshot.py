"""Few-shot in-context evaluation: OpenFlamingo's prompts, demonstrations that depend on the
query alone (random) or on image similarity (RICES, most similar last), class ranking by
continuation log-likelihood, the constant baselines, 1 vs 2 processes, bad options."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import free_port

from tests.eval import fewshot_worker
from tests.eval.fewshot_fixtures import CLASSES, flamingo, manifest, query_batches
from tests.eval.fewshot_fixtures import tokenizer as make_tokenizer
from vlp.errors import ConfigError
from vlp.eval.fewshot import (
    PROMPTS,
    FewShotEvaluator,
    build_prompt,
    postprocess_answer,
    postprocess_caption,
    random_demos,
    rices_demos,
    take,
)
from vlp.eval.vqa import vqa_accuracy
from vlp.models.evaluation import EvalSource

WORKER = Path(__file__).with_name("fewshot_worker.py")


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return flamingo(tok)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fewshot")
    return {
        m: (manifest(root / m / "support", m if m != "retrieval" else "pair", 8), manifest(root / m, m, 5, start=50))
        for m in ("retrieval", "vqa", "image")
    }


def evaluator(modality: str, tok, **options) -> FewShotEvaluator:
    ev = FewShotEvaluator(modality)
    ev.configure(EvalSource(name="toy/test", where="data.test[0]", options={"fewshot": options}, tokenizer=tok))
    return ev


# -- prompts ---------------------------------------------------------------------------------
def test_two_shot_prompts_are_openflamingos():
    demos = [{"caption": "a red circle."}, {"caption": "a blue square."}]
    assert build_prompt(PROMPTS["captioning"], "captioning", demos, {}, zero_shot=False) == (
        "<image>Output:a red circle.<|endofchunk|><image>Output:a blue square.<|endofchunk|><image>Output:"
    )
    qa = [{"question": "what color?", "answer": "red"}, {"question": "how many?", "answer": "2"}]
    assert build_prompt(PROMPTS["vqa"], "vqa", qa, {"question": "is it round?"}, zero_shot=False) == (
        "<image>Question:what color? Short answer:red<|endofchunk|>"
        "<image>Question:how many? Short answer:2<|endofchunk|>"
        "<image>Question:is it round? Short answer:"
    )
    cls = [{"class": "red circle"}, {"class": "blue square"}]
    assert build_prompt(PROMPTS["classification"], "classification", cls, {}, zero_shot=False) == (
        "<image>A photo of a red circle.<|endofchunk|><image>A photo of a blue square.<|endofchunk|><image>A photo of a"
    )
    # 0 shots: the two demonstrations lose their <image>, the query keeps it
    assert build_prompt(PROMPTS["captioning"], "captioning", demos, {}, zero_shot=True) == (
        "Output:a red circle.<|endofchunk|>Output:a blue square.<|endofchunk|><image>Output:"
    )


def test_generations_are_cut_as_openflamingo_cuts_them():
    assert postprocess_caption("a red circle. Output: a blue") == "a red circle."
    assert postprocess_answer("Two, maybe three\nQuestion: x") == "2"
    assert postprocess_answer("the red Question: what") == "red"
    assert postprocess_answer("yes Short answer: no") == "yes"


# -- demonstrations --------------------------------------------------------------------------
def test_random_demos_depend_on_seed_and_key_only():
    a = random_demos(50, 8, 0, "shard-0.tar:s0001")
    assert a == random_demos(50, 8, 0, "shard-0.tar:s0001") and len(set(a)) == 8
    assert a != random_demos(50, 8, 1, "shard-0.tar:s0001")
    assert a != random_demos(50, 8, 0, "shard-0.tar:s0002")
    assert take(a, 4, "random") == a[:4] and take(a, 0, "random") == a[:2]


def test_rices_puts_the_most_similar_last():
    support = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7], [-1.0, 0.0], [0.9, 0.1]])
    query = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # cosine: scale does not matter
    assert rices_demos(query, support, 3) == [[2, 4, 0], [4, 2, 1]]
    # fewer shots keep the most similar, still most similar last
    assert take([2, 4, 0], 2, "rices") == [4, 0]


def _prompts_by_key(model, tok, batches, monkeypatch, **options):
    """The prompts generate() was given, per query key, for a run over ``batches``."""
    seen: dict[str, list[str]] = {}
    real = model.generate

    def spy(ids, mask, *args, **kwargs):
        spy.texts += [tok.decode(r[m.bool()][None])[0] for r, m in zip(ids, mask, strict=True)]
        return real(ids, mask, *args, **kwargs)

    spy.texts = []
    monkeypatch.setattr(model, "generate", spy)
    ev = evaluator("retrieval", tok, **options)
    for b in batches:
        before = len(spy.texts)
        ev.update(model, None, b)
        keys = [str(k) for k in b["keys"]]
        texts = spy.texts[before:]
        for j, k in enumerate(keys):
            seen[k] = texts[j :: len(keys)]  # one prompt per shot count
    monkeypatch.setattr(model, "generate", real)
    return seen, ev


def test_random_demos_do_not_depend_on_batch_order_or_split(model, tok, data, monkeypatch):
    support, query = data["retrieval"]
    opts = dict(support={"manifest": support}, shots=[0, 2], max_new_tokens=1, num_beams=1)
    batches = query_batches(query, "retrieval", tok, batch_size=2)
    singles = query_batches(query, "retrieval", tok, batch_size=1)[::-1]  # other batches, reversed
    a, ev_a = _prompts_by_key(model, tok, batches, monkeypatch, **opts)
    b, ev_b = _prompts_by_key(model, tok, singles, monkeypatch, **opts)
    assert a == b and len(a) == 5
    prompt = next(iter(a.values()))
    assert prompt[0].count("output") == 3 and prompt[1].count("output") == 3  # 2 demonstrations + the query
    assert ev_a.compute() == pytest.approx(ev_b.compute())


# -- scoring ---------------------------------------------------------------------------------
def test_classification_ranks_classes_by_their_continuations_log_likelihood(model, tok, data, monkeypatch):
    support, query = data["image"]
    ev = evaluator("image", tok, support={"manifest": support}, shots=[0, 2])
    target = CLASSES.index("green square")
    favourite = tok([CLASSES[target]])["input_ids"][0][1:-1].tolist()  # its name's word pieces
    calls = []

    def rigged(batch):
        calls.append(batch)
        labels = batch["lm_labels"]
        out = torch.zeros(labels.shape)
        scored = labels != -100
        out[scored] = -1.0  # every continuation token costs 1 ...
        out[scored & torch.isin(labels, torch.tensor(favourite))] = 0.0  # ... but the favourite's
        return out

    monkeypatch.setattr(model, "token_logprobs", rigged)
    for b in query_batches(query, "image", tok):
        ev.update(model, None, b)
    scores = ev.compute()
    labels = torch.cat([b["label"] for b in query_batches(query, "image", tok)])
    want = 100 * float((labels == target).float().mean())
    assert scores["top1@0"] == pytest.approx(want) and scores["top1@2"] == pytest.approx(want)
    assert ev.chance["top1@2"] == pytest.approx(100 / 6) and ev.chance["top5@0"] == pytest.approx(500 / 6)
    batch = calls[-1]
    # only the class name's tokens are labelled; the rows carry 2 demonstrations + the query image
    row = 0
    named = batch["lm_labels"][row][batch["lm_labels"][row] != -100].tolist()
    assert tok.decode(torch.tensor([named]))[0] in CLASSES
    assert batch["images"].shape[1] == 3 and bool(batch["media_mask"][row].sum() == 3)


def test_vqa_scores_and_constant_baseline(model, tok, data):
    support, query = data["vqa"]
    ev = evaluator("vqa", tok, support={"manifest": support}, shots=[0, 1], max_new_tokens=2, num_beams=2)
    batches = query_batches(query, "vqa", tok)
    for b in batches:
        ev.update(model, None, b)
    scores = ev.compute()
    assert set(scores) == {"vqa_acc@0", "vqa_acc@1"}
    assert all(0 <= v <= 100 for v in scores.values())
    # the constant baseline: the support's most frequent normalised answer for every question
    answers = [a for b in batches for a in b["answers"]]
    want = 100 * sum(vqa_accuracy(ev.baseline, a) for a in answers) / len(answers)
    assert ev.baseline == "red" and ev.chance["vqa_acc@1"] == pytest.approx(want)
    assert "vqa_acc" in ev.table(scores, "toy") and "constant" in ev.table(scores, "toy")


def test_captioning_scores_against_every_reference(model, tok, data):
    support, query = data["retrieval"]
    ev = evaluator(
        "retrieval", tok, support={"manifest": support}, shots=[2], max_new_tokens=3, num_beams=1, demos="rices"
    )
    for b in query_batches(query, "retrieval", tok):
        ev.update(model, None, b)
    refs = {k: r["refs"] for k, r in ev.records}
    assert all(len(r) == 3 for r in refs.values())  # the 3 captions of each query image
    scores = ev.compute()
    assert set(scores) == {"cider@2", "bleu4@2"} and set(ev.chance) == set(scores)
    assert ev.chance["cider@2"] > 0 and ev.counts["num_items"] == 5


def test_flamingo_default_evaluator_is_few_shot(model, tok, data):
    support, query = data["image"]
    result = model.evaluate(
        query_batches(query, "image", tok),
        modality="image",
        options={"fewshot": {"support": {"manifest": support}, "shots": [1]}},
        tokenizer=tok,
    )
    assert set(result["scores"]) == {"top1@1", "top5@1"} and result["support"] == "toy_image/train"
    assert model.default_evaluator("interleaved") is None


def test_two_processes_score_like_one(tmp_path, data):
    support, query = data["retrieval"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker runs
    try:
        one = fewshot_worker.evaluate(support, query, rank=0, world=1)
    finally:
        torch.set_num_threads(threads)
    two = _run(tmp_path / "two.pt", support, query, world=2)
    assert one["scores"] == pytest.approx(two["scores"], abs=1e-6)
    assert one["chance"] == pytest.approx(two["chance"], abs=1e-6)
    assert one["num_items"] == two["num_items"] == 5  # the repeated item counts once
    assert one["scores"]["cider@2"] > 50  # the nearest support image's caption fits


def _run(out: Path, support: str, query: str, world: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    env["WORLD_SIZE"] = str(world)
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(out), support, query],
            env={**env, "RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    for p in procs:
        try:
            log = p.communicate(timeout=180)[0]
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a rank did not finish the few-shot evaluation (a collective left waiting)")
        assert p.returncode == 0, log[-3000:]
    return torch.load(out, weights_only=False)


# -- bad options -----------------------------------------------------------------------------
def test_bad_options_are_named(tok, data, tmp_path):
    support, _ = data["retrieval"]
    with pytest.raises(ConfigError, match=r"fewshot\.task must be one of"):
        evaluator("retrieval", tok, task="retrieval", support={"manifest": support})
    with pytest.raises(ConfigError, match=r"fewshot\.shots: 9 demonstrations per query but the support set has 8"):
        evaluator("retrieval", tok, support={"manifest": support}, shots=[0, 9])
    with pytest.raises(ConfigError, match=r"fewshot\.support: needs \{manifest"):
        evaluator("retrieval", tok, shots=[0])
    with pytest.raises(ConfigError, match="manifest file not found"):
        evaluator("retrieval", tok, support={"manifest": str(tmp_path / "missing.yaml")})
    with pytest.raises(ConfigError, match=r"unknown keys \['shot'\]"):
        evaluator("retrieval", tok, support={"manifest": support}, shot=[4])
    with pytest.raises(ConfigError, match="captioning demonstrations come from pair/retrieval"):
        evaluator("retrieval", tok, support={"manifest": data["vqa"][0]})
    with pytest.raises(ConfigError, match=r"fewshot\.demos must be one of"):
        evaluator("retrieval", tok, support={"manifest": support}, demos="nearest")
    with pytest.raises(ConfigError, match=r"needs \{caption\} exactly once"):
        evaluator("retrieval", tok, support={"manifest": support}, prompt="<image>Caption:")
    with pytest.raises(ConfigError, match="in context: set evaluation"):
        FewShotEvaluator("vqa").configure(EvalSource(name="toy/test", tokenizer=tok))


def test_trainer_test_scores_a_source_with_fewshot_options(tok, data, capsys):
    from helpers import quiet_trainer

    from vlp.data import WebDataModule
    from vlp.data.datamodule import Source

    support, query = data["vqa"]
    options = {"fewshot": {"support": {"manifest": support}, "shots": [0, 1], "max_new_tokens": 2, "num_beams": 1}}
    dm = WebDataModule(
        test=[Source(query, split="test", evaluation=options)],
        tokenizer=tok,
        image_size=32,
        batch_size=4,
        num_workers=0,
    )
    model = flamingo(tok)
    quiet_trainer().test(model, datamodule=dm, verbose=False)
    record = model.results["test"]
    assert set(record["scores"]) == {"vqa_acc@0", "vqa_acc@1"} and record["num_items"] == 5
    # the constant "red": all 10 answers on the 2 red queries (1.0), 1 of 10 on the 3 others (0.3)
    assert record["chance"]["vqa_acc@1"] == pytest.approx(100 * (2 * 1.0 + 3 * 0.3) / 5)
    out = capsys.readouterr().out
    assert "fewshot_vqa" in out and "constant" in out


def test_a_prompt_longer_than_the_limit_is_named(model, tok, data):
    support, query = data["retrieval"]
    ev = evaluator("retrieval", tok, support={"manifest": support}, shots=[4], max_prompt_length=12)
    with pytest.raises(ConfigError, match=r"prompt has more than 12 tokens .*fewer shots"):
        ev.update(model, None, query_batches(query, "retrieval", tok)[0])
