"""Task heads (VQA, VE) shared by the fusion families: losses against hand-computed values,
answer vocabularies, evaluation tables, and a METER fine-tuning step on each modality."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from vlp.errors import ConfigError
from vlp.objectives import VE, VQA
from vlp.objectives.tasks import load_answer_vocab


class Out:
    def __init__(self, fused):
        self.fused_cls = fused


def test_answer_vocab_from_list_json_and_text(tmp_path):
    assert load_answer_vocab(["Yes", "two", "red"]) == ["yes", "2", "red"]
    (tmp_path / "info.json").write_text(json.dumps({"vqa_answers": ["cat", "dog"], "other": 1}))
    (tmp_path / "map.json").write_text(json.dumps({"dog": 1, "cat": 0}))
    (tmp_path / "answers.txt").write_text("cat\n\ndog\n")
    for name in ("info.json", "map.json", "answers.txt"):
        assert load_answer_vocab(str(tmp_path / name)) == ["cat", "dog"]
    with pytest.raises(ConfigError, match="empty after normalisation: \\['the'\\]"):
        load_answer_vocab(["the", "dog"])
    with pytest.raises(ConfigError, match="equal after normalisation"):
        load_answer_vocab(["two", "2"])
    with pytest.raises(ConfigError, match="not found"):
        load_answer_vocab(str(tmp_path / "missing.json"))


def test_vqa_loss_by_hand():
    torch.manual_seed(0)
    head = VQA(dim=4, answers=["yes", "no", "2"])
    fused = torch.randn(2, 4)
    answers = [["yes"] * 3 + ["no"], ["two"] * 10]  # scores: yes 0.9, no 0.3 | 2 1.0
    out = head(Out(fused), {"answers": answers})
    logits = head.head(fused)
    target = torch.tensor([[0.9, 0.3, 0.0], [0.0, 0.0, 1.0]])
    bce = -(target * F.logsigmoid(logits) + (1 - target) * F.logsigmoid(-logits)).mean() * 3
    torch.testing.assert_close(out["vqa_loss"], bce)
    best = logits.argmax(-1)
    torch.testing.assert_close(out["vqa_score"], target[torch.arange(2), best].mean())
    assert float(out["vqa_oov"]) == 0.0
    assert float(head(Out(fused), {"answers": [["maybe"], ["yes"]]})["vqa_oov"]) == 0.5
    out["vqa_loss"].backward()
    assert all(p.grad is not None for p in head.parameters())


def test_vqa_evaluation_table_by_question_type():
    head = VQA(dim=4, answers=["yes", "no"], question_types=["exist", "count"], baseline={"overall": 50.0})
    metric = head.new_metric()
    fused = torch.randn(3, 4)
    pred = head.predict(fused)
    flip = {"yes": "no", "no": "yes"}
    answers = [[pred[0]] * 10, [flip[pred[1]]] * 10, [pred[2]] * 10]
    head.evaluate(metric, Out(fused), {"answers": answers, "question_type": ["exist", "exist", "colour"]})
    scores, table = head.summarize(metric, title="t")
    assert scores == pytest.approx({"overall": 200 / 3, "exist": 50.0, "other": 100.0})
    assert table.splitlines()[0] == "t" and "baseline" in table and "50.00" in table


def test_ve_loss_and_accuracy():
    head = VE(dim=4)
    fused = torch.randn(5, 4)
    label = torch.tensor([0, 1, 2, 0, 1])
    out = head(Out(fused), {"label": label})
    logits = head.head(fused)
    torch.testing.assert_close(out["ve_loss"], F.cross_entropy(logits, label))
    metric = head.new_metric()
    head.evaluate(metric, Out(fused), {"label": label})
    scores, table = head.summarize(metric)
    assert scores["acc"] == pytest.approx(100 * float((logits.argmax(-1) == label).float().mean()))
    assert "chance 33.33" in table
