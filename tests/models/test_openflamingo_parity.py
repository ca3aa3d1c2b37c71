"""vlp's Flamingo computes what OpenFlamingo computes: a re-implementation of OpenFlamingo
(tests/reference/openflamingo_reference.py) with random weights, saved in its checkpoint
format, converted with ``vlp convert openflamingo``'s function, gives the same logits and the
same greedy generations on the same frozen towers (tiny GPT-2 / Llama, a tiny open_clip ViT)."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

from tests.reference.openflamingo_reference import (  # noqa: E402
    OpenFlamingo,
    openflamingo_checkpoint,
    trainable_setup,
)
from vlp.convert.openflamingo import openflamingo_to_vlp  # noqa: E402
from vlp.encoders import HFCausalLM, OpenCLIPVisionEncoder  # noqa: E402
from vlp.encoders.text import resize_token_embeddings  # noqa: E402
from vlp.models import Flamingo  # noqa: E402

V = 100
EOC, MEDIA, PAD = V, V + 1, V + 2  # OpenFlamingo's order: <|endofchunk|>, <image>, then <PAD>
LMS = {
    "gpt2": (dict(model_type="gpt2", vocab_size=V, n_positions=64, n_embd=32, n_layer=4, n_head=2), "transformer.h"),
    "llama": (
        dict(
            model_type="llama",
            vocab_size=V,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        ),
        "model.layers",
    ),
}
VISION = dict(
    embed_dim=16, vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16)
)  # fmt: skip


class Tok:
    """The LM's 100 tokens, then the two special tokens in OpenFlamingo's order."""

    vocab_size = V + 2
    special_tokens = ["<|endofchunk|>", "<image>"]

    def token_id(self, token: str) -> int:
        return {"<image>": MEDIA, "<|endofchunk|>": EOC}[token]


def build_pair(family: str, every: int, immediate: bool, seed: int = 0):
    """(reference OpenFlamingo, vlp Flamingo loaded from its converted checkpoint, report)."""
    config, layers_attr = LMS[family]
    torch.manual_seed(seed)
    vision = OpenCLIPVisionEncoder("ViT-B-32", model_kwargs=VISION)
    lm = HFCausalLM(config=config, attn_implementation="eager")
    ref_tower = HFCausalLM(config=config, attn_implementation="eager")
    ref_tower.model.load_state_dict(lm.model.state_dict())  # the same frozen towers on both sides
    # OpenFlamingo: len(tokenizer) rows, <PAD> included; an untied head's new rows (never
    # trained nor saved by OpenFlamingo) are the mean rows the recipe's LM gets too
    resize_token_embeddings(ref_tower, V + 3)
    ref_lm = ref_tower.model
    ref = OpenFlamingo(
        copy.deepcopy(vision.visual),
        ref_lm,
        EOC,
        MEDIA,
        vis_dim=32,
        decoder_layers_attr_name=layers_attr,
        cross_attn_every_n_layers=every,
        perceiver=dict(depth=2, dim_head=8, heads=2, num_latents=4),
        cross_attn=dict(dim_head=8, heads=2),
        only_attend_immediate_media=immediate,
    ).eval()
    trainable_setup(ref)
    with torch.no_grad():  # "trained": gates open, the media rows moved, every other row as it was
        for name, p in ref.named_parameters():
            if name.endswith("_gate"):
                p.uniform_(-1.0, 1.0)
        ref_lm.get_input_embeddings().weight[[EOC, MEDIA, PAD]] += torch.randn(3, 32)
    model = Flamingo(
        vision,
        lm,
        cross_attn_every_n_layers=every,
        vision_features="prenorm",
        patch_tokens_only=True,
        perceiver=dict(depth=2, num_latents=4, num_heads=2, dim_head=8),
        cross_attn=dict(num_heads=2, dim_head=8),
        only_attend_immediate_media=immediate,
    )
    model.set_tokenizer(Tok())
    report = openflamingo_to_vlp(openflamingo_checkpoint(ref), model)
    return ref, model.eval(), report


def documents(lead_text: bool, seed: int = 1):
    """Two documents of 12 tokens, 3 image slots each; row 1 has 2 images and 3 right pads
    (``lead_text``: row 1 starts with two text tokens, before its first image)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (2, 12), generator=g)
    ids[0, [0, 5, 9]] = MEDIA
    ids[0, [4, 8]] = EOC
    ids[1, [2, 6] if lead_text else [0, 6]] = MEDIA
    ids[1, 5] = EOC
    ids[1, 9:] = 0
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0
    images = torch.randn(2, 3, 3, 32, 32, generator=g)
    images_mask = torch.tensor([[True, True, True], [True, True, False]])
    return ids, mask, images, images_mask


def vlp_logits(model, ids, mask, images, images_mask):
    batch = dict(
        text_ids=ids,
        text_mask=mask.bool(),
        media_mask=(ids == MEDIA) & mask.bool(),
        images=images,
        images_mask=images_mask,
    )
    with torch.no_grad():
        return model.lm_logits(model(batch).hidden)  # (B, L, V + 2)


@pytest.mark.parametrize("family", sorted(LMS))
@pytest.mark.parametrize("every", [1, 2])
@pytest.mark.parametrize("immediate", [True, False])
def test_logits_match_openflamingo(family, every, immediate):
    ref, model, report = build_pair(family, every, immediate)
    assert not report.unknown and not report.missing, report.summary()
    # OpenFlamingo's mode False lets text before the first image attend to every image
    # (test_text_before_the_first_image_diverges); with it, documents start with an image
    ids, mask, images, images_mask = documents(lead_text=immediate)
    with torch.no_grad():
        theirs = ref(images[:, :, None], ids, attention_mask=mask).logits[..., : V + 2]  # (B, L, V + 2)
    ours = vlp_logits(model, ids, mask, images, images_mask)
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=1e-5)
    assert theirs[real].std() > 0.1  # not a degenerate comparison


def test_cross_attention_placement_is_openflamingos():
    ref, model, _ = build_pair("gpt2", 2, True)
    theirs = [i for i, layer in enumerate(ref.lang_encoder.transformer.h) if layer.gated_cross_attn_layer is not None]
    ours = [i for i, layer in enumerate(model.lang_model.decoder_layers()) if layer.gated_cross_attn_layer is not None]
    assert theirs == ours == [1, 3]  # (idx + 1) % 2 == 0


def test_text_before_the_first_image_diverges_only_in_mode_false():
    """OpenFlamingo with only_attend_immediate_media=False masks text before any image with
    -finfo.max everywhere, so its softmax is uniform over all images (later ones too); vlp
    (and OpenFlamingo's mode True) gives those tokens no cross-attention."""
    ref, model, _ = build_pair("gpt2", 1, False)
    ids, mask, images, images_mask = documents(lead_text=True)
    with torch.no_grad():
        theirs = ref(images[:, :, None], ids, attention_mask=mask).logits[..., : V + 2]
    ours = vlp_logits(model, ids, mask, images, images_mask)
    torch.testing.assert_close(ours[0], theirs[0])  # row 0 starts with an image: equal
    assert not torch.allclose(ours[1, :2], theirs[1, :2], atol=1e-3)  # the two leading tokens differ


def generation_prompts():
    """Two left-padded prompts ending after an image, 2 and 1 images."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (2, 8), generator=g)
    ids[0, [0, 4]] = MEDIA
    ids[0, 3] = EOC
    ids[1, :3] = 0
    ids[1, 3] = MEDIA
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    images = torch.randn(2, 2, 3, 32, 32, generator=g)
    return ids, mask, images, torch.tensor([[True, True], [True, False]])


@pytest.mark.parametrize("family", sorted(LMS))
def test_greedy_generations_equal_openflamingos(family):
    ref, model, _ = build_pair(family, 2, True)
    ids, mask, images, images_mask = generation_prompts()
    # <image> is banned on both sides (vlp never generates it); <PAD> is no token of vlp's vocabulary
    out = ref.generate(images[:, :, None], ids, mask, max_new_tokens=8, bad_words_ids=[MEDIA, PAD])
    theirs = []
    for row in out[:, ids.shape[1] :].tolist():
        theirs.append(row[: row.index(EOC)] if EOC in row else row)
    ours = model.generate(ids, mask, images, images_mask, max_new_tokens=8, stop_ids=[EOC])
    assert ours == theirs
    assert any(len(row) > 0 for row in ours)


def test_reference_cached_generation_equals_its_uncached_argmax_loop():
    """The reference's cached decoding (OpenFlamingo's _use_cached_vision_x path) against
    re-running its full forward on the growing sequence."""
    ref, _, _ = build_pair("gpt2", 1, True)
    ids, mask, images, _ = generation_prompts()
    cached = ref.generate(images[:, :, None], ids, mask, max_new_tokens=5, eos_token_id=-1, bad_words_ids=[MEDIA, PAD])
    seq, m = ids, mask
    for _ in range(5):
        position = (m.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = ref(images[:, :, None], seq, attention_mask=m, position_ids=position).logits[:, -1]
        logits[:, [MEDIA, PAD]] = float("-inf")
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
        m = torch.cat([m, m.new_ones(2, 1)], dim=1)
    assert cached.tolist() == seq.tolist()
