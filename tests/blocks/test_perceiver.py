"""PerceiverResampler: input layouts, per-item independence, a reference, OpenFlamingo keys."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from vlp.blocks import PerceiverResampler

B, T, F, V, D, N = 2, 3, 2, 5, 32, 4


def resampler(**kwargs) -> PerceiverResampler:
    torch.manual_seed(0)
    kwargs = {"depth": 2, "num_latents": N, "num_heads": 4, "dim_head": 8, **kwargs}
    return PerceiverResampler(D, **kwargs).eval()


def test_input_layouts():
    model = resampler(max_num_media=T, max_num_frames=F)
    x = torch.randn(B, T, F, V, D)
    assert model(x).shape == (B, T, N, D)
    # (B, T, v, D) is one frame per item; (B, v, D) is one item
    assert_close(model(x[:, :, 0]), model(x[:, :, :1]))
    assert_close(model(x[:, 0, 0]), model(x[:, :1, :1])[:, 0])
    assert model(x[:, 0, 0]).shape == (B, N, D)
    with pytest.raises(ValueError, match="max_num_frames"):
        model(torch.randn(B, T, F + 1, V, D))
    with pytest.raises(ValueError, match="max_num_media"):
        model(torch.randn(B, T + 1, F, V, D))
    with pytest.raises(ValueError, match="expects"):
        model(torch.randn(V, D))


def test_media_items_are_resampled_independently():
    model = resampler(max_num_media=T, max_num_frames=F)
    x = torch.randn(B, T, F, V, D)
    x2 = x.clone()
    x2[:, 1] = torch.randn(B, F, V, D)
    out, out2 = model(x), model(x2)
    assert_close(out[:, 0], out2[:, 0])
    assert_close(out[:, 2], out2[:, 2])
    assert not torch.allclose(out[:, 1], out2[:, 1])


def reference(model: PerceiverResampler, x: torch.Tensor) -> torch.Tensor:
    """Flamingo's resampler written out with an explicit softmax, for (B, T, F, v, D)."""
    b, t, f, v, d = x.shape
    x = (x + model.frame_embs[:f, None]).reshape(b, t, f * v, d) + model.media_time_embs[:t]
    latents = model.latents.expand(b, t, -1, -1)
    for attn, ff in model.layers:
        media, lat = attn.norm_media(x), attn.norm_latents(latents)
        h, hd = attn.num_heads, attn.dim_head
        q = attn.to_q(lat).unflatten(-1, (h, hd))  # (b, t, n, h, hd)
        k, v_ = attn.to_kv(torch.cat([media, lat], -2)).unflatten(-1, (2, h, hd)).unbind(-3)
        sim = torch.einsum("btihd,btjhd->bthij", q, k) * hd**-0.5
        out = torch.einsum("bthij,btjhd->btihd", sim.softmax(-1), v_).flatten(-2)
        latents = latents + attn.to_out(out)
        latents = latents + ff(latents)
    return model.norm(latents)


def test_matches_reference():
    model = resampler(max_num_media=T, max_num_frames=F)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(B, T, F, V, D)
    assert_close(model(x), reference(model, x))


def test_parameter_layout_follows_open_flamingo():
    model = resampler(depth=1, max_num_media=T, max_num_frames=F)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    inner = 4 * 8
    assert shapes == {
        "latents": (N, D),
        "frame_embs": (F, D),
        "media_time_embs": (T, 1, D),
        "layers.0.0.norm_media.weight": (D,),
        "layers.0.0.norm_media.bias": (D,),
        "layers.0.0.norm_latents.weight": (D,),
        "layers.0.0.norm_latents.bias": (D,),
        "layers.0.0.to_q.weight": (inner, D),
        "layers.0.0.to_kv.weight": (2 * inner, D),
        "layers.0.0.to_out.weight": (D, inner),
        "layers.0.1.0.weight": (D,),
        "layers.0.1.0.bias": (D,),
        "layers.0.1.1.weight": (4 * D, D),
        "layers.0.1.3.weight": (D, 4 * D),
        "norm.weight": (D,),
        "norm.bias": (D,),
    }
    plain = resampler(depth=1)
    assert plain.frame_embs is None and plain.media_time_embs is None
