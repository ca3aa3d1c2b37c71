"""Vision towers on tiny random models: token layouts, pooling, gradients, lock(), and
loading weights offline from local files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from vlp.encoders import OpenCLIPVisionEncoder, TimmVisionEncoder
from vlp.errors import CheckpointError, ConfigError

VIT = {
    "name": "vit_tiny_patch16_224",
    "img_size": 32,
    "model_kwargs": {"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2},
}
SWIN = {
    "name": "swin_tiny_patch4_window7_224",
    "img_size": 32,
    "model_kwargs": {
        "patch_size": 4,
        "window_size": 4,
        "embed_dim": 16,
        "depths": (1, 1),
        "num_heads": (1, 2),
    },
}
# zero_init_last=False: with timm's zero-initialised last BN of each block, the block's
# last conv gets an exactly-zero gradient at init, which the gradient check would flag.
RESNET = {
    "name": "resnet18",
    "model_kwargs": {
        "layers": (1, 1, 1, 1),
        "channels": (8, 16, 32, 64),
        "stem_width": 8,
        "zero_init_last": False,
    },
}
OPENCLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 4, "vocab_size": 10, "width": 8, "heads": 1, "layers": 1},
}


def images(b: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(0))


def timm_encoder(cfg: dict, **kwargs) -> TimmVisionEncoder:
    torch.manual_seed(0)
    return TimmVisionEncoder(**{**cfg, **kwargs})


# -- timm -------------------------------------------------------------------------------
@pytest.mark.parametrize("pool", ["model", "cls", "avg"])
def test_vit_tokens_and_pooling(pool):
    enc = timm_encoder(VIT, pool=pool).eval()
    out = enc(images())
    assert out.tokens.shape == (2, 1 + 16, 64) and out.pooled.shape == (2, 64) and out.mask is None
    assert (enc.dim, enc.pooled_dim, enc.num_prefix_tokens, enc.grid_size) == (64, 64, 1, (4, 4))
    expected = {
        "model": enc.model.forward_head(out.tokens, pre_logits=True),
        "cls": out.tokens[:, 0],
        "avg": out.tokens[:, 1:].mean(1),
    }[pool]
    torch.testing.assert_close(out.pooled, expected)


def test_swin_nhwc_features_become_row_major_tokens():
    enc = timm_encoder(SWIN).eval()
    x = images()
    out, features = enc(x), enc.model.forward_features(x)  # features: (B, h, w, C)
    assert features.shape == (2, 4, 4, 32)
    assert out.tokens.shape == (2, 16, 32) and out.pooled.shape == (2, 32)
    assert enc.grid_size == (4, 4) and enc.num_prefix_tokens == 0
    torch.testing.assert_close(out.tokens[:, 1], features[:, 0, 1])  # token 1 = row 0, column 1
    torch.testing.assert_close(out.tokens[:, 4], features[:, 1, 0])


def test_swin_with_the_average_token_in_front_as_meter():
    enc = timm_encoder({**SWIN, "pool": "avg", "prepend_pooled": True}).eval()
    x = images()
    out, features = enc(x), enc.model.forward_features(x)  # (B, 4, 4, C)
    assert out.tokens.shape == (2, 17, 32)
    torch.testing.assert_close(out.tokens[:, 0], features.mean((1, 2)))  # METER's avgpool token
    torch.testing.assert_close(out.tokens[:, 0], out.pooled)
    torch.testing.assert_close(out.tokens[:, 2], features[:, 0, 1])


def test_convnet_nchw_features_become_row_major_tokens():
    enc = timm_encoder(RESNET).eval()
    x = images(size=64)
    out, features = enc(x), enc.model.forward_features(x)  # features: (B, C, h, w)
    assert features.shape == (2, 64, 2, 2)
    assert out.tokens.shape == (2, 4, 64) and out.pooled.shape == (2, 64) and enc.dim == 64
    torch.testing.assert_close(out.tokens[:, 1], features[:, :, 0, 1])
    torch.testing.assert_close(out.pooled, features.mean((2, 3)))  # the model's global average pool


@pytest.mark.parametrize("cfg", [VIT, SWIN, RESNET], ids=["vit", "swin", "resnet"])
def test_timm_every_parameter_gets_a_gradient(cfg, checks):
    enc = timm_encoder(cfg, drop_path_rate=0.1)
    checks.grads(enc, checks.loss(enc(images())))


@pytest.mark.parametrize(("cfg", "n_groups"), [(VIT, 4), (SWIN, 4), (RESNET, 5)], ids=["vit", "swin", "resnet"])
def test_timm_lock(cfg, n_groups, checks):
    checks.lock(lambda: timm_encoder(cfg), n_groups)


def test_vit_layer_groups_are_stem_blocks_head():
    enc = timm_encoder(VIT)
    stem, block0, block1, top = (
        {n for n, p in enc.model.named_parameters() if any(p is q for q in g.parameters())} for g in enc.layer_groups()
    )
    assert stem == {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    assert all(n.startswith("blocks.0.") for n in block0) and all(n.startswith("blocks.1.") for n in block1)
    assert top == {"norm.weight", "norm.bias"}


def test_frozen_batchnorm_keeps_its_statistics():
    enc = timm_encoder(RESNET).lock(0).train()
    before = enc.model.bn1.running_mean.clone()
    enc(images())
    torch.testing.assert_close(enc.model.bn1.running_mean, before)


def test_grad_checkpointing_gives_the_same_gradients():
    x = images()
    grads = []
    for enable in (False, True):
        enc = timm_encoder(VIT).train()
        enc.set_grad_checkpointing(enable)
        enc(x).pooled.square().sum().backward()
        grads.append(enc.model.patch_embed.proj.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_loads_local_weights_offline(tmp_path, monkeypatch, offline, suffix):
    source = timm_encoder(VIT).eval()
    state = source.model.state_dict()
    path = tmp_path / f"weights{suffix}"
    save_file(state, path) if suffix == ".safetensors" else torch.save({"state_dict": state}, path)
    monkeypatch.setenv("VLP_TEST_WEIGHTS", str(tmp_path))
    for where in (str(path), "${VLP_TEST_WEIGHTS}"):  # a file, or a folder holding one
        torch.manual_seed(1)  # a different random init, overwritten by the weights
        loaded = TimmVisionEncoder(**VIT, pretrained=where).eval()
        x = images()
        torch.testing.assert_close(loaded(x).tokens, source(x).tokens)


def test_timm_bad_weights_are_named(tmp_path):
    with pytest.raises(ConfigError, match="nowhere.safetensors"):
        TimmVisionEncoder(**VIT, pretrained=str(tmp_path / "nowhere.safetensors"))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="garbage.safetensors"):
        TimmVisionEncoder(**VIT, pretrained=str(garbage))
    pickled = tmp_path / "pickled.pth"
    torch.save({"state_dict": {}, "hook": ConfigError("arbitrary object")}, pickled)
    with pytest.raises(CheckpointError, match=r"pickled\.pth.*weights_only=True"):
        TimmVisionEncoder(**VIT, pretrained=str(pickled))
    state = timm_encoder(VIT).model.state_dict()
    del state["blocks.1.mlp.fc2.weight"]
    partial = tmp_path / "partial.safetensors"
    save_file(state, partial)
    with pytest.raises(CheckpointError, match=r"partial\.safetensors does not fit.*blocks\.1\.mlp\.fc2\.weight"):
        TimmVisionEncoder(**VIT, pretrained=str(partial))
    resnet = tmp_path / "resnet.safetensors"
    save_file(timm_encoder(RESNET).model.state_dict(), resnet)
    with pytest.raises(CheckpointError, match="resnet.safetensors"):
        TimmVisionEncoder(**VIT, pretrained=str(resnet))


def test_timm_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="no_such_model"):
        TimmVisionEncoder("no_such_model")
    with pytest.raises(ConfigError, match="pool"):
        TimmVisionEncoder(**VIT, pool="max")
    with pytest.raises(ConfigError, match="class token"):
        TimmVisionEncoder(**RESNET, pool="cls")


# -- open_clip --------------------------------------------------------------------------
def openclip_encoder(**kwargs) -> OpenCLIPVisionEncoder:
    torch.manual_seed(0)
    return OpenCLIPVisionEncoder("ViT-B-32", model_kwargs=OPENCLIP, **kwargs)


@pytest.mark.parametrize("use_proj", [True, False])
def test_openclip_shapes_and_gradients(use_proj, checks):
    enc = openclip_encoder(use_proj=use_proj)
    out = enc(images())
    assert out.tokens.shape == (2, 1 + 16, 32) and out.mask is None
    assert (enc.dim, enc.pooled_dim, enc.grid_size) == (32, 16 if use_proj else 32, (4, 4))
    assert out.pooled.shape == (2, enc.pooled_dim)
    cls = out.tokens[:, 0] @ enc.visual.proj if use_proj else out.tokens[:, 0]
    torch.testing.assert_close(out.pooled, cls)  # tokens are after ln_post, class token first
    checks.grads(enc, checks.loss(out))


def test_openclip_lock_and_checkpointing(checks):
    checks.lock(openclip_encoder, n_groups=4)  # stem, 2 blocks, ln_post + proj
    enc = openclip_encoder()
    enc.set_grad_checkpointing(True)
    assert enc.visual.transformer.grad_checkpointing


def test_openclip_loads_a_local_checkpoint_offline(tmp_path, offline):
    import open_clip

    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-32", **OPENCLIP).eval()
    state = {f"module.{k}": v for k, v in clip.state_dict().items()}  # DDP training checkpoint
    torch.save({"epoch": 3, "state_dict": state}, tmp_path / "epoch_3.pt")
    torch.manual_seed(1)
    enc = OpenCLIPVisionEncoder("ViT-B-32", pretrained=str(tmp_path / "epoch_3.pt"), model_kwargs=OPENCLIP)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(enc.eval()(x).pooled, clip.encode_image(x))
    assert all(n.startswith("visual.") for n, _ in enc.named_parameters())  # text tower dropped


def test_openclip_bad_names_and_paths(tmp_path):
    with pytest.raises(ConfigError, match="ViT-Nope"):
        OpenCLIPVisionEncoder("ViT-Nope")
    with pytest.raises(ConfigError, match="nowhere.pt"):
        OpenCLIPVisionEncoder("ViT-B-32", pretrained=str(tmp_path / "nowhere.pt"), model_kwargs=OPENCLIP)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        OpenCLIPVisionEncoder("ViT-B-32", pretrained=str(garbage), model_kwargs=OPENCLIP)
    torch.save({"state_dict": {"visual.proj": torch.zeros(1)}}, tmp_path / "wrong.pt")
    with pytest.raises(CheckpointError, match="wrong.pt"):
        OpenCLIPVisionEncoder("ViT-B-32", pretrained=str(tmp_path / "wrong.pt"), model_kwargs=OPENCLIP)


@pytest.mark.parametrize("tower", ["timm", "open_clip"])
def test_masked_patches_are_replaced_before_the_transformer(tower):
    """MIM input masking: the masked patches' embeddings become the mask token before the
    position embeddings; recomputed by hand from the tower's own parts."""
    enc = (timm_encoder(VIT) if tower == "timm" else openclip_encoder(use_proj=False)).eval()
    x = images()
    token = torch.randn(enc.dim)
    with torch.no_grad():
        if tower == "timm":
            m = enc.model
            e = m.patch_embed(x)  # (B, N, D)
            mask = torch.zeros(e.shape[:2], dtype=torch.bool)
            mask[0, 1] = mask[1, 0] = True
            h = m.norm_pre(m.patch_drop(m._pos_embed(torch.where(mask[..., None], token, e))))
            want = m.norm(m.blocks(h))
        else:
            v = enc.visual
            e = v.conv1(x).flatten(2).transpose(1, 2)  # (B, N, W)
            mask = torch.zeros(e.shape[:2], dtype=torch.bool)
            mask[0, 1] = mask[1, 0] = True
            e = torch.where(mask[..., None], token, e)
            cls = v.class_embedding.expand(len(x), 1, -1)
            h = v.ln_pre(torch.cat([cls, e], dim=1) + v.positional_embedding)
            want = v.ln_post(v.transformer(h))
        got = enc(x, patch_mask=mask, mask_token=token).tokens
        torch.testing.assert_close(got, want)
        assert not torch.allclose(got, enc(x).tokens)
        nothing = torch.zeros_like(mask)
        torch.testing.assert_close(enc(x, patch_mask=nothing, mask_token=token).tokens, enc(x).tokens)
    with pytest.raises(ConfigError, match="does not fit"):
        enc(x, patch_mask=torch.zeros(2, mask.shape[1] + 1, dtype=torch.bool), mask_token=token)


def test_openclip_keeps_the_first_blocks():
    """METER runs 11 of CLIP-ViT-B's 12 blocks: ``num_layers`` truncates the tower."""
    torch.manual_seed(0)
    full = openclip_encoder(use_proj=False).eval()
    torch.manual_seed(0)
    cut = openclip_encoder(use_proj=False, num_layers=1).eval()
    assert len(cut.visual.transformer.resblocks) == 1
    v = full.visual
    with torch.no_grad():
        x = images()
        h = v.ln_pre(
            torch.cat([v.class_embedding.expand(2, 1, -1), v.conv1(x).flatten(2).transpose(1, 2)], 1)
            + v.positional_embedding
        )
        want = v.ln_post(v.transformer.resblocks[0](h))
        torch.testing.assert_close(cut(x).tokens, want)
    with pytest.raises(ConfigError, match="num_layers must be in 1..2"):
        openclip_encoder(num_layers=3)


def test_init_from_interpolates_open_clip_position_embeddings():
    from vlp.utils.checkpoint import fit_state_to_model, interpolate_pos_embed

    class Holder(torch.nn.Module):
        def __init__(self, size: int) -> None:
            super().__init__()
            cfg = {**OPENCLIP, "vision_cfg": {**OPENCLIP["vision_cfg"], "image_size": size}}
            self.image_encoder = OpenCLIPVisionEncoder("ViT-B-32", use_proj=False, model_kwargs=cfg)

    small, big = Holder(32), Holder(48)  # 4x4 and 6x6 patches of 8 px
    key = "image_encoder.visual.positional_embedding"
    state, notes = fit_state_to_model(small.state_dict(), big, where="test")
    assert state[key].shape == big.state_dict()[key].shape == (1 + 36, 32)
    torch.testing.assert_close(state[key], interpolate_pos_embed(small.state_dict()[key][None], (6, 6))[0])
    assert notes == [f"{key}: 4x4 -> 6x6 patches (bicubic, prefix tokens kept)"]
    big.load_state_dict(state)
