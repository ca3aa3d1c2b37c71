"""ITC against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlp.errors import ConfigError
from vlp.models.outputs import DualEncoderOutput
from vlp.objectives import ITC


def _out(img, txt):
    return DualEncoderOutput(image_embeds=torch.tensor(img), text_embeds=torch.tensor(txt))


def test_itc_matches_hand_computed_value():
    itc = ITC(temperature=0.5, max_temperature=1.0)
    out = _out([[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.6, 0.8]])
    res = itc(out, {})
    # scale 2: i2t logits [[2, 1.2], [0, 1.6]], t2i logits [[2, 0], [1.2, 1.6]]
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731  softplus: -log sigmoid(-x)
    i2t = (sp(-0.8) + sp(-1.6)) / 2
    t2i = (sp(-2.0) + sp(-0.4)) / 2
    assert res["itc_loss"].item() == pytest.approx((i2t + t2i) / 2, rel=1e-6)
    assert res["itc_acc"].item() == 1.0
    assert res["itc_temperature"].item() == pytest.approx(0.5)


def test_same_id_positives_are_soft_targets():
    itc = ITC(temperature=1.0, positives="same_id")
    out = _out([[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]])
    res = itc(out, {"image_id": torch.tensor([7, 7])})
    # both columns positive for both rows: target (0.5, 0.5); logits [[1, 0], [0, 1]]
    lse = math.log(math.e + 1)
    expected = 0.5 * (lse - 1) + 0.5 * (lse - 0)
    assert res["itc_loss"].item() == pytest.approx(expected, rel=1e-6)


def test_temperature_is_clamped_without_mutating_the_parameter():
    itc = ITC(temperature=0.07, min_temperature=0.05)
    with torch.no_grad():
        itc.logit_scale.fill_(math.log(1 / 0.001))
    before = itc.logit_scale.clone()
    assert itc.scale().item() == pytest.approx(20.0)
    assert torch.equal(itc.logit_scale, before)


def test_gradient_reaches_features_and_temperature():
    img = F.normalize(torch.randn(4, 8), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(4, 8), dim=-1).requires_grad_()
    itc = ITC()
    itc(DualEncoderOutput(image_embeds=img, text_embeds=txt), {})["itc_loss"].backward()
    assert img.grad.abs().sum() > 0 and txt.grad.abs().sum() > 0
    assert itc.logit_scale.grad is not None and itc.logit_scale.grad != 0


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError):
        ITC(positives="nope")
    with pytest.raises(ConfigError):
        ITC(temperature=2.0, max_temperature=1.0)
