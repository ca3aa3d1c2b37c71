"""vlp.models.FLAVA on its own: modality routing, padding invariance of the multimodal
encoder, MIM targets on masked patches only, gradients on the paired path, unequal tower
widths, the image tokenizer kept out of the optimiser."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlp.blocks.transformer import Transformer
from vlp.encoders import TransformerTextEncoder, ViTEncoder
from vlp.errors import ConfigError
from vlp.models import FLAVA
from vlp.objectives import ITC, ITM, MLM, CodebookMIM
from vlp.tokenizers import ImageTokenizer

B, L, IMAGE, PATCH, VOCAB, CODES = 4, 8, 16, 4, 60, 12
N = (IMAGE // PATCH) ** 2


class ColourTokenizer(ImageTokenizer):
    """A frozen toy tokenizer: the code of a patch is its mean red value, binned."""

    num_codes, patch_size = CODES, PATCH

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))  # a parameter that must stay frozen
        self.freeze()

    def tokenize(self, pixels: torch.Tensor) -> torch.Tensor:
        red = F.avg_pool2d(pixels[:, :1] * self.scale, PATCH)[:, 0]  # (B, h, w) in [0, 1]
        return (red * CODES).long().clamp_(0, CODES - 1)


def objectives() -> list:
    return [
        ITC(min_temperature=0.01, max_temperature=1.0),
        CodebookMIM(),
        MLM(modalities=["text"], distill=False, tie_weights=False),
        CodebookMIM(name="mmm_image", modalities=["pair"]),
        MLM(name="mmm_text", distill=False, tie_weights=False),
        ITM(hard_negatives=False, pooler=True),
    ]


def flava(image_dim=24, text_dim=20, mm_dim=16, tokenizer=True) -> FLAVA:
    torch.manual_seed(0)
    return FLAVA(
        ViTEncoder(image_size=IMAGE, patch_size=PATCH, dim=image_dim, depth=2, num_heads=4),
        TransformerTextEncoder(vocab_size=VOCAB, max_length=L, dim=text_dim, depth=2, num_heads=4),
        Transformer(mm_dim, 2, 4, norm_eps=1e-12),
        objectives(),
        embed_dim=12,
        image_tokenizer=ColourTokenizer() if tokenizer else None,
    )


def batch(modality: str = "pair", seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out: dict = {"modality": modality}
    if modality in ("pair", "image"):
        out["image"] = torch.randn(B, 3, IMAGE, IMAGE, generator=g)
        out["image_mask"] = torch.rand(B, N, generator=g) < 0.4
        out["image_mask"][:, 0] = True
    if modality in ("pair", "text"):
        mask = (torch.arange(L)[None] < torch.tensor([L, 6, 5, 7])[:, None]).long()
        ids = torch.randint(4, VOCAB, (B, L), generator=g) * mask
        chosen = (torch.rand(B, L, generator=g) < 0.3) & mask.bool()
        chosen[:, 2] = True
        out.update(
            text_ids=ids,
            text_mask=mask,
            mlm_input_ids=torch.where(chosen, 3, ids),
            mlm_labels=torch.where(chosen, ids, -100),
        )
    if modality == "pair":
        out["image_id"] = torch.arange(B)
    return out


def test_the_batch_modality_routes_the_objectives():
    model = flava()
    routed = {m: [o.name for o in model.objectives_for(batch(m))] for m in ("pair", "image", "text")}
    assert routed == {"pair": ["itc", "mmm_image", "mmm_text", "itm"], "image": ["mim"], "text": ["mlm"]}
    model.train()
    for m in ("pair", "image", "text"):
        loss, values = model.compute_objectives(model(batch(m)), batch(m), model.objectives_for(batch(m)))
        assert torch.isfinite(loss)
        assert {k for k in values if k.endswith("_loss")} == {f"{o}_loss" for o in routed[m]}


def test_heads_take_the_width_of_the_stream_they_read():
    model = flava(image_dim=24, text_dim=20, mm_dim=16)
    o = model.objectives
    assert o["mim"].head.dense.in_features == 24  # image tower (image batches)
    assert o["mlm"].head.dense.in_features == 20  # text tower (text batches)
    assert o["mmm_image"].head.dense.in_features == o["mmm_text"].head.dense.in_features == 16  # multimodal
    assert o["mim"].head.bias.numel() == CODES and o["mlm"].head.bias.numel() == VOCAB


def test_multimodal_encoder_ignores_text_padding():
    model = flava().eval()
    x = batch("pair")
    longer = {k: v for k, v in x.items()}
    pad = torch.zeros(B, 3, dtype=torch.long)
    for key in ("text_ids", "text_mask", "mlm_input_ids"):
        longer[key] = torch.cat([x[key], pad], dim=1)
    longer["mlm_labels"] = torch.cat([x["mlm_labels"], pad - 100], dim=1)
    model.text_encoder.embed.position = torch.nn.Embedding.from_pretrained(
        torch.cat([model.text_encoder.embed.position.weight, torch.randn(3, 20)]), freeze=False
    )
    with torch.no_grad():
        a, b = model(x), model(longer)
    assert torch.allclose(a.fused_cls, b.fused_cls, atol=1e-5)
    real = x["text_mask"].bool()
    assert torch.allclose(a.mlm_hidden[real], b.mlm_hidden[:, :L][real], atol=1e-5)
    for name in ("mmm_text", "mmm_image"):
        assert torch.allclose(
            model.objectives[name](a, x, model)[f"{name}_loss"],
            model.objectives[name](b, longer, model)[f"{name}_loss"],
            atol=1e-5,
        )


def test_mim_loss_is_cross_entropy_over_masked_patches_only():
    model = flava().eval()
    x = batch("image")
    with torch.no_grad():
        out = model(x)
        got = model.objectives["mim"](out, x, model)["mim_loss"]
        head = model.objectives["mim"].head
        logits = head(out.mim_hidden)  # (B, N, K) every patch
        codes = model.image_tokenizer.encode(x["image"], norm="clip", grid=(IMAGE // PATCH,) * 2).flatten(1)
        picked = torch.stack(
            [-logits[b, n].log_softmax(-1)[codes[b, n]] for b in range(B) for n in range(N) if x["image_mask"][b, n]]
        )
    assert torch.allclose(got, picked.mean(), atol=1e-6)
    # the codes of unmasked patches do not matter
    other = dict(x, image_token_ids=torch.where(x["image_mask"], codes, (codes + 1) % CODES))
    with torch.no_grad():
        again = model.objectives["mim"](model(other), other, model)["mim_loss"]
    assert torch.allclose(got, again, atol=1e-6)


def test_masked_patches_see_the_mask_token_not_their_pixels():
    model = flava().eval()
    x = batch("image")
    side = IMAGE // PATCH
    pixels = x["image_mask"].view(B, 1, side, side).repeat_interleave(PATCH, 2).repeat_interleave(PATCH, 3)
    changed = dict(x, image=torch.where(pixels, torch.randn(B, 3, IMAGE, IMAGE), x["image"]))  # masked pixels redrawn
    with torch.no_grad():
        a = model.encode_image(x["image"], x["image_mask"]).tokens
        b = model.encode_image(changed["image"], x["image_mask"]).tokens
    assert torch.allclose(a, b, atol=1e-6)


def test_every_parameter_of_the_paired_path_gets_a_gradient():
    model = flava().train()
    x = batch("pair")
    loss, _ = model.compute_objectives(model(x), x, model.objectives_for(x))
    loss.backward()
    unimodal_heads = ("objectives.mim.", "objectives.mlm.")
    for name, p in model.named_parameters():
        if name.startswith("image_tokenizer.") or name.startswith(unimodal_heads):
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_image_tokenizer_stays_frozen_and_out_of_the_optimiser():
    model = flava().train()
    assert not model.image_tokenizer.training
    assert not any(p.requires_grad for p in model.image_tokenizer.parameters())
    optimiser = model.configure_optimizers()
    optimiser = optimiser["optimizer"] if isinstance(optimiser, dict) else optimiser
    ids = {id(p) for g in optimiser.param_groups for p in g["params"]}
    assert id(model.image_tokenizer.scale) not in ids


def test_contrastive_on_the_masked_pass_skips_the_unmasked_towers():
    model = flava()
    model.contrastive_on = "masked"
    model.train()
    calls = []
    model.image_encoder.register_forward_hook(lambda *a: calls.append("image"))
    model.text_encoder.register_forward_hook(lambda *a: calls.append("text"))
    model(batch("pair"))
    assert calls == ["image", "text"]  # one pass each (the masked ones)
    calls.clear()
    model.contrastive_on = "unmasked"
    model(batch("pair"))
    assert sorted(calls) == ["image", "image", "text", "text"]
    calls.clear()
    model(batch("image"))  # MIM only: no contrastive features, so no unmasked pass
    model(batch("text"))
    assert calls == ["image", "text"]


def test_image_batches_without_targets_or_tokenizer_get_a_sentence():
    with pytest.raises(ConfigError, match="image_vocab"):
        flava(tokenizer=False)  # MIM heads cannot be sized without a tokenizer or vocab_size
    model = FLAVA(
        ViTEncoder(image_size=IMAGE, patch_size=PATCH, dim=16, depth=1, num_heads=4),
        TransformerTextEncoder(vocab_size=VOCAB, max_length=L, dim=16, depth=1, num_heads=4),
        Transformer(16, 1, 4),
        [CodebookMIM(vocab_size=CODES)],
    )
    with pytest.raises(ConfigError, match="image_tokenizer or batch key image_token_ids"):
        model(batch("image"))


def test_itc_starts_at_the_paper_temperature():
    model = flava()
    assert math.isclose(float(model.objectives["itc"].scale().detach()), 1 / 0.07, rel_tol=1e-6)


def test_mim_targets_come_from_the_tokenizers_view_when_the_batch_has_one():
    model = flava().eval()
    x = batch("image")
    view = torch.rand(B, 3, IMAGE, IMAGE)  # [0, 1] pixels of "the same crop"
    with torch.no_grad():
        from_view = model(dict(x, image_codebook=view)).image_token_ids
        from_image = model(x).image_token_ids
    assert torch.equal(from_view, model.image_tokenizer(view).flatten(1))
    assert torch.equal(from_image, model.image_tokenizer.encode(x["image"], norm="clip", grid=(4, 4)).flatten(1))
    assert not torch.equal(from_view, from_image)


def test_mean_pooled_text_tower_averages_the_real_tokens_only():
    enc = TransformerTextEncoder(vocab_size=VOCAB, max_length=L + 3, dim=16, depth=1, num_heads=4, pool="mean").eval()
    x = batch("text")
    with torch.no_grad():
        out = enc(x["text_ids"], x["text_mask"])
        padded = enc(torch.cat([x["text_ids"], torch.zeros(B, 3, dtype=torch.long)], 1), F.pad(x["text_mask"], (0, 3)))
    m = x["text_mask"].float()[..., None]
    assert torch.allclose(out.pooled, (out.tokens * m).sum(1) / m.sum(1), atol=1e-6)
    assert torch.allclose(out.pooled, padded.pooled, atol=1e-5)
    with pytest.raises(ConfigError, match="pool"):
        TransformerTextEncoder(vocab_size=VOCAB, dim=16, depth=1, num_heads=4, pool="max")
