"""The CLIP family: shapes, gradients, objective checks, optimiser groups, pure eval."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from vlp.encoders import HFTextEncoder, TimmVisionEncoder
from vlp.errors import ConfigError
from vlp.models import CLIP, OptimConfig
from vlp.models.base import lr_lambda
from vlp.objectives import ITC, Objective

VOCAB = 100


def tiny_clip(**kwargs) -> CLIP:
    torch.manual_seed(0)
    image = TimmVisionEncoder(
        "vit_tiny_patch16_224",
        img_size=32,
        pool="cls",
        model_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
    )
    text = HFTextEncoder(
        config={
            "model_type": "bert",
            "vocab_size": VOCAB,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "max_position_embeddings": 32,
        }
    )
    return CLIP(image, text, embed_dim=16, **kwargs)


def batch(b: int = 4, length: int = 7) -> dict:
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(b, length, dtype=torch.long)
    mask[0, 5:] = 0
    return {
        "modality": "pair",
        "image": torch.randn(b, 3, 32, 32, generator=g),
        "text_ids": torch.randint(1, VOCAB, (b, length), generator=g),
        "text_mask": mask,
        "image_id": torch.arange(b),
        "text_image_id": torch.arange(b),
    }


def test_forward_shapes_and_normalised_embeddings():
    out = tiny_clip()(batch())
    assert out.image_embeds.shape == (4, 16) and out.text_embeds.shape == (4, 16)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(out.text_embeds.norm(dim=-1), torch.ones(4))


def test_every_parameter_gets_a_gradient():
    model = tiny_clip()
    loss = model.training_step(batch(), 0)
    loss.backward()
    missing = [
        n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)
    ]
    assert not missing, missing


def test_padding_does_not_change_text_embeddings():
    model = tiny_clip().eval()
    b = batch()
    ids = b["text_ids"].clone()
    ids[0, 5:] = 3  # different tokens at padded positions
    e1 = model.encode_text(b["text_ids"], b["text_mask"])
    e2 = model.encode_text(ids, b["text_mask"])
    torch.testing.assert_close(e1, e2)


def test_objective_needing_missing_outputs_fails_at_construction():
    class NeedsFusion(Objective):
        name = "itm"
        requires = ("fused_tokens",)

    with pytest.raises(ConfigError, match=r"needs model outputs \['fused_tokens'\].*DualEncoderOutput"):
        tiny_clip(objectives=[NeedsFusion()])


def test_objective_missing_batch_key_fails_on_first_batch():
    with pytest.raises(ConfigError, match=r"needs batch keys \['image_id'\]"):
        b = batch()
        del b["image_id"]
        tiny_clip(objectives=[ITC(positives="same_id")]).training_step(b, 0)


def test_dropping_an_objective_drops_its_parameters():
    with_itc = {n for n, _ in tiny_clip().named_parameters()}
    without = {n for n, _ in tiny_clip(objectives=[]).named_parameters()}
    assert with_itc - without == {"objectives.itc.logit_scale"}


def test_param_groups_decay_and_lr_mult():
    model = tiny_clip(optim=OptimConfig(lr=1e-3, weight_decay=0.1, lr_mult={"text_encoder": 5.0}))
    groups = model.param_groups()
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["image_proj.weight"]["weight_decay"] == 0.1
    assert by_name["objectives.itc.logit_scale"]["weight_decay"] == 0.0
    assert by_name["image_encoder.model.cls_token"]["weight_decay"] == 0.0  # timm no_weight_decay()
    assert by_name["image_encoder.model.blocks.0.norm1.weight"]["weight_decay"] == 0.0
    text_lrs = {g["lr"] for n, g in by_name.items() if n.startswith("text_encoder.")}
    assert text_lrs == {5e-3}
    assert by_name["image_proj.weight"]["lr"] == 1e-3
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)
    with pytest.raises(ConfigError, match="match no trainable parameter"):
        tiny_clip(optim=OptimConfig(lr_mult={"fusion": 5.0})).param_groups()


def test_freeze_patterns_take_parameters_out_of_training():
    model = tiny_clip(optim=OptimConfig(freeze=["text_encoder.*word_embeddings*", "image_proj.*"]))
    names = {n for g in model.param_groups() for n in g["names"]}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"text_encoder.model.embeddings.word_embeddings.weight", "image_proj.weight"}
    assert not names & frozen and len(names) + len(frozen) == len(list(model.parameters()))
    model.train()
    model.training_step({**batch(), "modality": "pair"}, 0).backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)
    assert model.text_proj.weight.grad is not None
    with pytest.raises(ConfigError, match=r"optim.freeze patterns match no parameter: \['fusion\.\*'\]"):
        tiny_clip(optim=OptimConfig(freeze=["fusion.*"])).param_groups()


def test_schedule_warmup_then_cosine():
    kw = dict(warmup=10, total=110, schedule="cosine", min_ratio=0.1)
    assert lr_lambda(0, **kw) == pytest.approx(0.1)
    assert lr_lambda(9, **kw) == pytest.approx(1.0)
    assert lr_lambda(60, **kw) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_lambda(110, **kw) == pytest.approx(0.1)


def test_lock_image_freezes_the_tower_and_keeps_it_in_eval_mode():
    model = tiny_clip(lock_image=0)
    assert not any(p.requires_grad for p in model.image_encoder.parameters())
    model.train()
    assert not model.image_encoder.training or not any(m.training for m in model.image_encoder.modules())
    names = {n for g in model.param_groups() for n in g["names"]}
    assert not any(n.startswith("image_encoder.") for n in names)


def test_evaluation_leaves_the_model_untouched():
    model = tiny_clip().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    b = {**batch(), "modality": "retrieval"}
    model.evaluate([b, b], stage="val")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_outputs_are_typed():
    fields = {f.name for f in dataclasses.fields(CLIP.output_type)}
    assert {"image_embeds", "text_embeds"} <= fields
    assert isinstance(tiny_clip().objectives, nn.ModuleDict)
