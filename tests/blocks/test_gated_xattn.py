"""MaskedCrossAttention's media masking and GatedCrossAttentionDense's zero-init gates."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from vlp.blocks import GatedCrossAttentionDense, MaskedCrossAttention

B, L, T, N, D, DM = 2, 8, 3, 4, 32, 24
# <image> tokens: sample 0 at positions 1, 4, 6; sample 1 at 0 and 5 (its third image unused)
LOCATIONS = torch.zeros(B, L, dtype=torch.bool)
LOCATIONS[0, [1, 4, 6]] = True
LOCATIONS[1, [0, 5]] = True


def xattn(immediate: bool = True) -> MaskedCrossAttention:
    torch.manual_seed(0)
    return MaskedCrossAttention(D, DM, num_heads=4, dim_head=8, only_attend_immediate_media=immediate).eval()


def data():
    torch.manual_seed(1)
    return torch.randn(B, L, D), torch.randn(B, T, N, DM)


def with_new_image(media: torch.Tensor, t: int) -> torch.Tensor:
    media = media.clone()
    media[:, t] = torch.randn_like(media[:, t])
    return media


def test_shapes_and_no_biases():
    model = xattn()
    x, media = data()
    assert model(x, media, media_locations=LOCATIONS).shape == (B, L, D)
    assert model(x, media).shape == (B, L, D)
    assert model.to_q.bias is None and model.to_kv.bias is None and model.to_out.bias is None


@pytest.mark.parametrize("immediate", [True, False])
def test_tokens_before_the_first_image_get_zero_output(immediate):
    model = xattn(immediate)
    x, media = data()
    out = model(x, media, media_locations=LOCATIONS)
    assert torch.equal(out[0, 0], torch.zeros(D))  # sample 0: position 0 precedes image 1
    assert out[0, 1:].abs().sum(-1).gt(0).all() and out[1].abs().sum(-1).gt(0).all()


@pytest.mark.parametrize("immediate", [True, False])
def test_later_images_do_not_change_earlier_tokens(immediate):
    model = xattn(immediate)
    x, media = data()
    out = model(x, media, media_locations=LOCATIONS)
    out2 = model(x, with_new_image(media, 2), media_locations=LOCATIONS)  # 3rd image: pos 6
    assert_close(out[0, :6], out2[0, :6])
    assert not torch.allclose(out[0, 6:], out2[0, 6:])
    assert_close(out[1], out2[1])  # sample 1 has no third <image> token


def test_immediate_media_only_attends_to_the_latest_image():
    x, media = data()
    media2 = with_new_image(media, 0)  # first image: sample 0 positions 1-3, sample 1 0-4
    model = xattn(immediate=True)
    out, out2 = (model(x, m, media_locations=LOCATIONS) for m in (media, media2))
    assert_close(out[0, 4:], out2[0, 4:])
    assert_close(out[1, 5:], out2[1, 5:])
    assert not torch.allclose(out[0, 1:4], out2[0, 1:4])
    # attending to all earlier media: every later token sees the first image
    model = xattn(immediate=False)
    out, out2 = (model(x, m, media_locations=LOCATIONS) for m in (media, media2))
    assert not torch.allclose(out[0, 4:], out2[0, 4:])


@pytest.mark.parametrize("immediate", [True, False])
def test_matches_explicit_softmax_reference(immediate):
    model = xattn(immediate)
    x, media = data()
    h, hd = model.num_heads, model.dim_head
    q = model.to_q(model.norm(x)).unflatten(-1, (h, hd))  # (B, L, h, hd)
    k, v = model.to_kv(media.flatten(1, 2)).unflatten(-1, (2, h, hd)).unbind(-3)
    sim = torch.einsum("bihd,bjhd->bhij", q, k) * hd**-0.5  # (B, h, L, T * N)
    text_time = LOCATIONS.cumsum(-1)[:, None, :, None]  # (B, 1, L, 1)
    media_time = torch.arange(1, T + 1).repeat_interleave(N)  # (T * N,)
    allowed = text_time == media_time if immediate else text_time >= media_time
    attn = sim.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
    ref = model.to_out(torch.einsum("bhij,bjhd->bihd", attn, v).flatten(-2))
    assert_close(model(x, media, media_locations=LOCATIONS), ref)
    # without locations every token attends to every latent
    ref = model.to_out(torch.einsum("bhij,bjhd->bihd", sim.softmax(-1), v).flatten(-2))
    assert_close(model(x, media), ref)


def test_gated_block_is_identity_at_init_and_only_gates_learn():
    torch.manual_seed(0)
    block = GatedCrossAttentionDense(D, DM, num_heads=4, dim_head=8)
    assert torch.equal(block.attn_gate, torch.zeros(1)) and block.ff_gate.shape == (1,)
    x, media = data()
    x.requires_grad_(True)
    out = block(x, media, media_locations=LOCATIONS)
    assert torch.equal(out, x)
    (out * torch.randn_like(out)).sum().backward()
    for name, p in block.named_parameters():
        if name in ("attn_gate", "ff_gate"):
            assert p.grad.abs().max() > 0, name
        else:
            assert p.grad is None or not p.grad.any(), name


def test_gated_block_formula():
    torch.manual_seed(0)
    block = GatedCrossAttentionDense(D, DM, num_heads=4, dim_head=8, ff_mult=2)
    with torch.no_grad():
        block.attn_gate.fill_(0.5)
        block.ff_gate.fill_(-0.3)
    x, media = data()
    h = block.attn(x, media, media_locations=LOCATIONS) * torch.tanh(torch.tensor(0.5)) + x
    ref = block.ff(h) * torch.tanh(torch.tensor(-0.3)) + h
    assert_close(block(x, media, media_locations=LOCATIONS), ref)
    assert block.ff[1].out_features == 2 * D
