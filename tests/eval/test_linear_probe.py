"""The linear probe (vlp.eval.classification): multinomial logistic regression with an L2
penalty chosen on held-out training features; cases with known answers, determinism, the
probe inside the evaluator, the order of gathered features, bad input."""

from __future__ import annotations

import pytest
import torch

from tests.eval.test_zeroshot import FixedEmbeddings, image_batch
from vlp.errors import ConfigError
from vlp.eval.classification import ProbeFeatures, fit_linear_probe, logistic_regression


def separable(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes around well-apart centres in 4-d."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    centres = torch.tensor([[4.0, 0, 0, 0], [0, 4.0, 0, 0], [0, 0, 4.0, 0]])
    return centres[y] + 0.3 * torch.randn(n, 4, generator=g), y


def test_separable_data_is_classified_perfectly():
    x, y = separable(60, 0)
    probe = fit_linear_probe(x, y, 3)
    xt, yt = separable(30, 1)
    assert (probe.logits(x).argmax(1) == y).all() and (probe.logits(xt).argmax(1) == yt).all()
    assert set(probe.held_out) == {1e-4, 1e-3, 1e-2, 1e-1, 1.0} and max(probe.held_out.values()) == 100.0
    assert probe.l2 == 1.0  # every penalty separates the held-out fifth: ties go to the largest


def test_constant_features_give_the_class_frequencies():
    """With nothing to read in the features (standardised to 0) the optimum is the prior:
    softmax(bias) = the class frequencies, whatever the penalty."""
    y = torch.tensor([0] * 6 + [1] * 3 + [2] * 1)
    probe = fit_linear_probe(torch.ones(10, 5), y, 3, l2_grid=(0.1,))
    torch.testing.assert_close(probe.bias.softmax(0), torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64))
    torch.testing.assert_close(probe.weight, torch.zeros(3, 5, dtype=torch.float64))


def test_two_symmetric_points_have_the_known_weight():
    """x = +1 (class 1) and x = -1 (class 0): by symmetry W = (-w, w) and equal biases; the
    stationarity of mean CE + l2/2 |W|^2 in w is 1 - sigmoid(2w) = l2 * w."""
    x, y = torch.tensor([[1.0], [-1.0]], dtype=torch.float64), torch.tensor([1, 0])
    w, b = logistic_regression(x, y, 2, 0.5)
    margin = float(w[1, 0] - w[0, 0])  # logit difference at x = 1
    torch.testing.assert_close(w[0, 0], -w[1, 0])
    p = torch.sigmoid(torch.tensor(margin, dtype=torch.float64))
    assert float(-(1 - p) + 0.5 * w[1, 0]) == pytest.approx(0.0, abs=1e-7)
    assert float(b[0] - b[1]) == pytest.approx(0.0, abs=1e-9)


def test_fitting_is_deterministic():
    x, y = separable(40, 2)
    x = x + torch.randn(40, 4, generator=torch.Generator().manual_seed(3))  # overlapping
    a, b = fit_linear_probe(x, y, 3), fit_linear_probe(x.clone(), y.clone(), 3)
    assert a.l2 == b.l2 and a.held_out == b.held_out
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


def test_bad_probe_input_is_named():
    with pytest.raises(ConfigError, match=r"labels must be in 0\.\.2"):
        fit_linear_probe(torch.zeros(3, 2), torch.tensor([0, 1, 3]), 3)
    with pytest.raises(ConfigError, match="N > 0"):
        fit_linear_probe(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), 3)
    with pytest.raises(ConfigError, match="probe_l2"):
        fit_linear_probe(torch.zeros(3, 2), torch.tensor([0, 1, 2]), 3, l2_grid=(-1.0,))


def test_gathered_features_are_ordered_by_key():
    model = FixedEmbeddings(torch.eye(2))
    x, y = separable(6, 4)
    batches = [image_batch(x[:3].tolist(), y[:3].tolist(), 0), image_batch(x[3:].tolist(), y[3:].tolist(), 3)]
    first, second = ProbeFeatures(), ProbeFeatures()
    for b in batches:
        first.update(model, model(b), b)
    for b in batches[::-1]:
        second.update(model, model(b), b)
    assert torch.equal(first.features()[0], second.features()[0]) and torch.equal(first.features()[1], y)
    without_keys = {k: v for k, v in batches[0].items() if k != "keys"}
    with pytest.raises(ConfigError, match="key"):
        ProbeFeatures().update(model, model(without_keys), without_keys)


def test_probe_next_to_zero_shot_in_one_record():
    """Zero-shot off, the probe on: image rows are the features (FixedEmbeddings)."""
    model = FixedEmbeddings(torch.eye(3))
    x, y = separable(30, 5)
    xt, yt = separable(9, 6)
    record = model.evaluate(
        [image_batch(xt.tolist(), yt.tolist())],
        modality="image",
        options={"zero_shot": False, "probe_l2": 0.01},
        probe_train=[image_batch(x.tolist(), y.tolist(), 100)],
    )
    assert record["scores"] == {"probe_top1": 100.0}  # 3 classes: no top-5
    assert record["chance"] == pytest.approx({"probe_top1": 100 / 3})
    assert record["probe_train_images"] == 30 and record["probe_l2"] == 0.01 and record["num_classes"] == 3
    with pytest.raises(ConfigError, match="nothing to score"):
        model.evaluate([image_batch(xt.tolist(), yt.tolist())], modality="image", options={"zero_shot": False})
