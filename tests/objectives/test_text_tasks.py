"""The text-task head (GLUE) on every family's text tower: losses by hand, gradients reach
the tower, token types used, metrics (accuracy, F1, MCC, Pearson, Spearman) by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.models.test_albef import tiny_albef
from tests.models.test_clip import tiny_clip
from tests.models.test_meter import tiny_meter
from vlp.errors import ConfigError, DataError
from vlp.eval.text import TextClassificationMetrics, TextRegressionMetrics, average_ranks
from vlp.objectives import ITM, TextTask

B, L = 6, 9


def text_batch(label: torch.Tensor, pairs: bool = True, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 50, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, 6:] = 0
    batch = {
        "modality": "text_pair",
        "text_pair_ids": ids,
        "text_pair_mask": mask,
        "label": label,
        "keys": list("abcdef"),
    }
    if pairs:
        types = torch.zeros(B, L, dtype=torch.long)
        types[:, 4:] = 1
        batch["text_pair_types"] = types * mask
    return batch


def test_classification_loss_by_hand_and_gradient_reaches_the_text_tower():
    model = tiny_clip(objectives=[TextTask(num_labels=3, name="nli")]).eval()  # no dropout: exact values
    head = model.objectives["nli"]
    assert head.head[0].in_features == model.text_encoder.pooled_dim == model.feature_dims()["text"]
    label = torch.tensor([0, 1, 2, 0, 1, 2])
    batch = text_batch(label)
    out = head(model(batch), batch, model)
    pooled = model.text_encoder(batch["text_pair_ids"], batch["text_pair_mask"], batch["text_pair_types"]).pooled
    logits = head.head(pooled)
    expected = -(logits.log_softmax(-1)[torch.arange(B), label]).mean()
    torch.testing.assert_close(out["nli_loss"], expected)
    torch.testing.assert_close(out["nli_acc"], (logits.argmax(-1) == label).float().mean())
    out["nli_loss"].backward()
    tower = dict(model.text_encoder.named_parameters())
    assert all(p.grad is not None for n, p in tower.items() if "pooler" not in n), [
        n for n, p in tower.items() if p.grad is None
    ]
    assert tower["model.embeddings.token_type_embeddings.weight"].grad[1].abs().sum() > 0  # type 1 was used
    assert all(p.grad is None for p in model.image_encoder.parameters())  # a text task leaves the image side


def test_token_types_change_the_features_and_singles_have_none():
    model = tiny_clip(objectives=[TextTask()]).eval()
    batch = text_batch(torch.zeros(B, dtype=torch.long))
    with_types = model.text_features(batch["text_pair_ids"], batch["text_pair_mask"], batch["text_pair_types"])
    without = model.text_features(batch["text_pair_ids"], batch["text_pair_mask"])
    assert with_types.shape == (B, 32) and not torch.allclose(with_types, without)
    bad = batch["text_pair_types"] * 2
    with pytest.raises(ConfigError, match="token type 2 given, but the text model has type_vocab_size 2"):
        model.text_features(batch["text_pair_ids"], batch["text_pair_mask"], bad)


def test_regression_loss_by_hand():
    model = tiny_clip(objectives=[TextTask(task="stsb")]).eval()
    head = model.objectives["text_task"]
    assert head.regression and head.metrics == ("pearson", "spearman") and head.head[-1].out_features == 1
    label = torch.tensor([0.0, 1.5, 5.0, 2.25, 3.0, 4.0])
    batch = text_batch(label)
    out = head(model(batch), batch, model)
    pooled = model.text_encoder(batch["text_pair_ids"], batch["text_pair_mask"], batch["text_pair_types"]).pooled
    pred = head.head(pooled)[:, 0]
    torch.testing.assert_close(out["text_task_loss"], ((pred - label) ** 2).mean())


@pytest.mark.parametrize("family", ["clip", "albef", "meter", "flava"])
def test_every_family_trains_and_evaluates_text_tasks(family):
    """The head needs only the "text" capability: one step and an evaluation on each family,
    beside that family's own pretraining objectives (which text_pair batches do not run)."""
    task = TextTask(task="mrpc")
    if family == "clip":
        model = tiny_clip(objectives=[task])
    elif family == "albef":
        model = tiny_albef(objectives=[task, ITM(dim=32)])
    elif family == "meter":
        model = tiny_meter(objectives=[task, ITM(dim=64, hard_negatives=False)])
    else:
        from vlp.encoders import MultimodalEncoder, TransformerTextEncoder, ViTEncoder
        from vlp.models import FLAVA

        tower = {"dim": 32, "depth": 1, "num_heads": 2}
        model = FLAVA(
            ViTEncoder(image_size=32, patch_size=16, **tower),
            TransformerTextEncoder(vocab_size=60, max_length=16, **tower),
            MultimodalEncoder(**tower),
            [task, ITM(hard_negatives=False, pooler=True)],
            embed_dim=16,
        )
    assert task.head[0].in_features == model.text_encoder.pooled_dim
    batch = text_batch(torch.tensor([0, 1, 1, 0, 1, 0]))
    loss = model.training_step(batch, 0)
    assert torch.isfinite(loss) and loss.requires_grad
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.text_encoder.parameters())
    model.eval()
    result = model.evaluate([batch, text_batch(torch.tensor([1, 1, 0, 0, 1, 1]), seed=1)], modality="text_pair")
    assert set(result["scores"]) == {"acc", "f1"} and 0 <= result["scores"]["acc"] <= 100
    assert result["chance"] == {"acc": 50.0}


def test_labels_are_checked():
    model = tiny_clip(objectives=[TextTask(num_labels=2)])
    head = model.objectives["text_task"]
    with pytest.raises(DataError, match=r"num_labels 2 but the batch has labels \[2\] \(samples \['c'\]\)"):
        head(None, text_batch(torch.tensor([0, 1, 2, 0, 1, 0])), model)
    with pytest.raises(DataError, match="fractional labels \\[0.5\\].*num_labels: 1"):
        head(None, text_batch(torch.tensor([0.0, 0.5, 1.0, 0.0, 1.0, 0.0])), model)
    with pytest.raises(ConfigError, match=r"metrics \['pearson'\] do not fit classification"):
        TextTask(metrics=["pearson"])
    with pytest.raises(ConfigError, match="f1 is the F1 of class 1 of a binary task"):
        TextTask(num_labels=3, metrics=["acc", "f1"])
    with pytest.raises(ConfigError, match="unknown GLUE task 'squad'"):
        TextTask(task="squad")
    with pytest.raises(
        ConfigError, match=r"\(TextTask\) has dim 16, but CLIP's text features are 32 wide: set TextTask\(dim: 32\)"
    ):
        tiny_clip(objectives=[TextTask(dim=16)])


# -- metrics by hand ------------------------------------------------------------------------------
def test_binary_metrics_by_hand():
    """target 1 1 1 0 0 0 1 0, pred 1 0 1 0 1 0 1 0: TP 3, FN 1, FP 1, TN 3."""
    metric = TextClassificationMetrics(2, ("acc", "f1", "mcc"))
    target, pred = torch.tensor([1, 1, 1, 0, 0, 0, 1, 0]), torch.tensor([1, 0, 1, 0, 1, 0, 1, 0])
    metric.update(pred[:5], target[:5])
    metric.update(pred[5:], target[5:])
    got = metric.compute()
    assert got["acc"] == pytest.approx(75.0)
    assert got["f1"] == pytest.approx(100 * 2 * 3 / (2 * 3 + 1 + 1))  # 75
    assert got["mcc"] == pytest.approx(100 * (3 * 3 - 1 * 1) / math.sqrt(4 * 4 * 4 * 4))  # 50
    # the states are sums: two ranks' halves merge into the whole
    a, b = TextClassificationMetrics(2, ("acc", "f1", "mcc")), TextClassificationMetrics(2, ("acc", "f1", "mcc"))
    a.update(pred[:3], target[:3])
    b.update(pred[3:], target[3:])
    assert metric._reductions["confusion"].__name__ == "dim_zero_sum"
    a.merge_state(b)
    assert a.compute() == pytest.approx(got)
    constant = TextClassificationMetrics(2, ("mcc",))
    constant.update(torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 0, 1]))
    assert constant.compute() == {"mcc": 0.0}  # a constant prediction: 0, as sklearn


def test_multiclass_mcc_matches_sklearn():
    from sklearn.metrics import matthews_corrcoef

    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 3, (50,), generator=g)
    pred = torch.where(torch.rand(50, generator=g) < 0.6, target, torch.randint(0, 3, (50,), generator=g))
    metric = TextClassificationMetrics(3, ("mcc", "acc"))
    metric.update(F.one_hot(pred, 3).float(), target)  # scores work too
    got = metric.compute()
    assert got["mcc"] == pytest.approx(100 * matthews_corrcoef(target, pred))
    assert got["acc"] == pytest.approx(100 * float((pred == target).float().mean()))


def test_correlations_by_hand():
    pred, gold = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([2.0, 4.0, 5.0, 9.0])
    metric = TextRegressionMetrics()
    metric.update(pred[:2], gold[:2])
    metric.update(pred[2:], gold[2:])
    got = metric.compute()
    # pearson: x - mean = (-1.5, -.5, .5, 1.5), y - mean = (-3, -1, 0, 4): 11 / sqrt(5 * 26)
    assert got["pearson"] == pytest.approx(100 * 11 / math.sqrt(5 * 26))
    assert got["spearman"] == pytest.approx(100.0)  # monotone
    assert average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    from scipy.stats import spearmanr

    tied = TextRegressionMetrics(("spearman",))
    x, y = torch.tensor([1.0, 2.0, 2.0, 3.0, 0.0]), torch.tensor([1.0, 3.0, 2.0, 2.0, 1.0])
    tied.update(x, y)
    assert tied.compute()["spearman"] == pytest.approx(100 * spearmanr(x, y).statistic)
