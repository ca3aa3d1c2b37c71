"""vlp's FLAVA against transformers' ``FlavaForPreTraining`` (the reference implementation,
built from a tiny random config here: no download): the converter loads its weights, and
on identical inputs, masks and labels the towers, the multimodal encoder, the contrastive
logits, the ITM logits and every loss agree."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

transformers = pytest.importorskip("transformers")

from vlp.blocks.transformer import Transformer  # noqa: E402
from vlp.convert.flava import flava_to_vlp  # noqa: E402
from vlp.encoders import TransformerTextEncoder, ViTEncoder  # noqa: E402
from vlp.models import FLAVA  # noqa: E402
from vlp.objectives import ITC, ITM, MLM, CodebookMIM  # noqa: E402

D, HEADS, LAYERS, IMAGE, PATCH, TEXT_VOCAB, IMAGE_VOCAB, MAXLEN = 32, 4, 2, 32, 8, 90, 40, 16
B, L, N = 4, 10, (IMAGE // PATCH) ** 2


def hf_flava() -> torch.nn.Module:
    tower = dict(
        hidden_size=D,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=4 * D,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    config = transformers.FlavaConfig(
        image_config=dict(tower, image_size=IMAGE, patch_size=PATCH, vocab_size=IMAGE_VOCAB, mask_token=True),
        text_config=dict(tower, vocab_size=TEXT_VOCAB, max_position_embeddings=MAXLEN),
        multimodal_config=dict(tower, num_hidden_layers=1),
        hidden_size=D,
        projection_dim=24,
        init_codebook=False,
    )
    torch.manual_seed(0)
    model = transformers.FlavaForPreTraining(config).eval()
    with torch.no_grad():  # HF's init (std 0.02, zero tokens) makes every sample look alike: O(1) signals
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embeddings" not in name and "token" not in name:
                p.normal_(std=p[0].numel() ** -0.5)
            else:
                p.normal_(std=0.5).add_(1.0 if "norm" in name.lower() and name.endswith("weight") else 0.0)
    return model


def vlp_flava() -> FLAVA:
    tower = dict(dim=D, depth=LAYERS, num_heads=HEADS)
    return FLAVA(
        ViTEncoder(image_size=IMAGE, patch_size=PATCH, **tower),
        TransformerTextEncoder(vocab_size=TEXT_VOCAB, max_length=MAXLEN, **tower),
        Transformer(D, 1, HEADS, norm_eps=1e-12),
        [
            ITC(min_temperature=0.01, max_temperature=1.0),
            CodebookMIM(vocab_size=IMAGE_VOCAB),
            MLM(modalities=["text"], distill=False, tie_weights=False),
            CodebookMIM(name="mmm_image", modalities=["pair"], vocab_size=IMAGE_VOCAB),
            MLM(name="mmm_text", distill=False, tie_weights=False),
            ITM(hard_negatives=False, pooler=True),
        ],
        embed_dim=24,
    ).eval()


@pytest.fixture(scope="module")
def pair():
    hf, ours = hf_flava(), vlp_flava()
    report = flava_to_vlp(hf.state_dict(), ours)
    return hf, ours, report


def inputs(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, TEXT_VOCAB, (B, L), generator=g)
    lengths = torch.tensor([L, 7, 5, 9])
    mask = (torch.arange(L)[None] < lengths[:, None]).long()
    ids = ids * mask  # pad id 0
    ids[:, 0] = 2  # a CLS id
    chosen = (torch.rand(B, L, generator=g) < 0.3) & mask.bool()
    chosen[:, 1] = True
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    masked = torch.where(chosen, torch.full_like(ids, 3), ids)
    patch_mask = torch.rand(B, N, generator=g) < 0.4
    patch_mask[:, 0] = True
    return {
        "image": torch.randn(B, 3, IMAGE, IMAGE, generator=g),
        "text_ids": ids,
        "text_mask": mask,
        "mlm_input_ids": masked,
        "mlm_labels": labels,
        "image_mask": patch_mask,
        "image_token_ids": torch.randint(0, IMAGE_VOCAB, (B, N), generator=g),
        "image_id": torch.arange(B),
        "modality": "pair",
    }


def test_the_converter_fills_every_weight(pair):
    _, _, report = pair
    assert report.unknown == [] and report.missing == [], report.summary()
    assert all("pooler" in k for k in report.unused), report.unused  # only the towers' unused poolers


def test_towers_and_multimodal_encoder_match(pair):
    hf, ours, _ = pair
    x = inputs()
    with torch.no_grad():
        ref = hf.flava(
            input_ids=x["mlm_input_ids"],
            pixel_values=x["image"],
            attention_mask=x["text_mask"],
            bool_masked_pos=x["image_mask"],
            output_hidden_states=True,
        )
        image = ours.encode_image(x["image"], x["image_mask"])
        text = ours.text_encoder(x["mlm_input_ids"], x["text_mask"])
        out = ours(x)
    real = x["text_mask"].bool()
    assert_close(image.tokens, ref.image_embeddings, atol=1e-5, rtol=1e-4)
    assert_close(text.tokens[real], ref.text_embeddings[real], atol=1e-5, rtol=1e-4)
    assert_close(image.hidden, ref.image_output.hidden_states[-1], atol=1e-5, rtol=1e-4)
    keep = torch.cat([torch.ones(B, 2 + N, dtype=torch.bool), real], dim=1)  # padding rows are not compared
    assert_close(out.fused_tokens[keep], ref.multimodal_embeddings[keep], atol=1e-5, rtol=1e-4)


def test_paired_losses_and_logits_match(pair):
    hf, ours, _ = pair
    x = inputs()
    with torch.no_grad():
        ref = hf(
            input_ids=x["text_ids"],
            input_ids_masked=x["mlm_input_ids"],
            pixel_values=x["image"],
            attention_mask=x["text_mask"],
            bool_masked_pos=x["image_mask"].clone(),
            mim_labels=x["image_token_ids"].clone(),
            mlm_labels=x["mlm_labels"].clone(),
            itm_labels=torch.ones(B, dtype=torch.long),
        )
        out = ours(x)
        itc = ours.objectives["itc"]
        logits_i2t, logits_t2i = itc.logits(out.image_embeds, out.text_embeds)
        values = {}
        for name in ("itc", "mmm_image", "mmm_text"):
            values.update(ours.objectives[name](out, x, ours))
        itm_logits = ours.objectives["itm"].head(out.fused_cls)
    losses = ref.loss_info
    assert_close(logits_i2t, ref.contrastive_logits_per_image, atol=1e-4, rtol=1e-4)
    assert_close(logits_t2i, ref.contrastive_logits_per_text, atol=1e-4, rtol=1e-4)
    assert_close(values["itc_loss"], losses.global_contrastive, atol=1e-5, rtol=1e-5)
    assert_close(values["mmm_image_loss"], losses.mmm_image, atol=1e-5, rtol=1e-5)
    assert_close(values["mmm_text_loss"], losses.mmm_text, atol=1e-5, rtol=1e-5)
    assert_close(itm_logits, ref.itm_logits, atol=1e-5, rtol=1e-4)
    itm_loss = torch.nn.functional.cross_entropy(itm_logits, torch.ones(B, dtype=torch.long))
    assert_close(itm_loss, losses.itm, atol=1e-5, rtol=1e-5)


def test_unimodal_losses_match(pair):
    hf, ours, _ = pair
    x = inputs(2)
    image_only = {"image": x["image"], "image_mask": x["image_mask"], "image_token_ids": x["image_token_ids"]}
    text_only = {k: x[k] for k in ("text_ids", "text_mask", "mlm_input_ids", "mlm_labels")}
    with torch.no_grad():
        ref_mim = hf(
            pixel_values=x["image"], bool_masked_pos=x["image_mask"].clone(), mim_labels=x["image_token_ids"].clone()
        ).loss_info.mim
        ref_mlm = hf(
            input_ids=x["text_ids"],
            input_ids_masked=x["mlm_input_ids"],
            attention_mask=x["text_mask"],
            mlm_labels=x["mlm_labels"].clone(),
        ).loss_info.mlm
        mim = ours.objectives["mim"](ours({**image_only, "modality": "image"}), image_only, ours)
        mlm = ours.objectives["mlm"](ours({**text_only, "modality": "text"}), text_only, ours)
    assert_close(mim["mim_loss"], ref_mim, atol=1e-5, rtol=1e-5)
    assert_close(mlm["mlm_loss"], ref_mlm, atol=1e-5, rtol=1e-5)


def test_mim_targets_from_the_converted_codebook_match():
    """transformers computes the MIM labels with its dVAE codebook from ``codebook_pixel_values``;
    vlp's DalleTokenizer, filled by the converter from ``image_codebook.*``, gives the same codes
    from the same view (``image_codebook``), and so the same MIM loss."""
    from vlp.tokenizers import DalleTokenizer

    hf = hf_flava()
    codebook_config = dict(hidden_size=8, num_groups=4, num_blocks_per_group=1, vocab_size=IMAGE_VOCAB)
    torch.manual_seed(3)
    hf.image_codebook = transformers.FlavaImageCodebook(transformers.FlavaImageCodebookConfig(**codebook_config)).eval()
    ours = vlp_flava()
    ours.image_tokenizer = DalleTokenizer.from_state_dict(
        {k: torch.zeros_like(v) for k, v in hf.image_codebook.state_dict().items()}
    )
    report = flava_to_vlp(hf.state_dict(), ours)
    assert report.unknown == [] and report.missing == [], report.summary()
    x = inputs(4)
    view = torch.rand(B, 3, 8 * (IMAGE // PATCH), 8 * (IMAGE // PATCH), generator=torch.Generator().manual_seed(5))
    mapped = view * 0.8 + 0.1  # transformers' image processor applies the dVAE's pixel map; vlp's tokenizer does
    image_only = {"image": x["image"], "image_mask": x["image_mask"], "image_codebook": view, "modality": "image"}
    with torch.no_grad():
        ref = hf(pixel_values=x["image"], bool_masked_pos=x["image_mask"].clone(), codebook_pixel_values=mapped)
        out = ours(image_only)
        mim = ours.objectives["mim"](out, image_only, ours)
    assert torch.equal(out.image_token_ids, hf.image_codebook.get_codebook_indices(mapped).flatten(1))
    assert_close(mim["mim_loss"], ref.loss_info.mim, atol=1e-5, rtol=1e-5)
