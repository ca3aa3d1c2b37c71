"""Flamingo-lite: gates at zero equal the LM, media masking, what trains, cached generation."""

from __future__ import annotations

import pytest
import torch

from vlp.data.interleaved import lm_labels
from vlp.encoders import HFCausalLM, ViTEncoder
from vlp.errors import CheckpointError, ConfigError
from vlp.models import Flamingo
from vlp.objectives import CausalLM

V, MEDIA, EOC = 100, 100, 101

LMS = {
    "gpt2": dict(model_type="gpt2", vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=2),
    "llama": dict(
        model_type="llama",
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    ),
    "gpt_neox": dict(
        model_type="gpt_neox",
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    ),
    "opt": dict(
        model_type="opt",
        vocab_size=V,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        word_embed_proj_dim=32,
    ),
}


class Tok:
    """The two special tokens at the end of a 100-token vocabulary."""

    vocab_size = V + 2
    special_tokens = ["<image>", "<|endofchunk|>"]

    def token_id(self, token: str) -> int:
        return {"<image>": MEDIA, "<|endofchunk|>": EOC}[token]


def build(family: str = "gpt2", seed: int = 0, **kwargs) -> Flamingo:
    torch.manual_seed(seed)
    lm = HFCausalLM(config=LMS[family], attn_implementation="eager")
    vit = ViTEncoder(image_size=32, patch_size=16, dim=24, depth=1, num_heads=2)
    kwargs.setdefault("perceiver", dict(depth=1, num_latents=4, num_heads=2, dim_head=8))
    kwargs.setdefault("cross_attn", dict(num_heads=2, dim_head=8))
    model = Flamingo(vit, lm, [CausalLM()], **kwargs)
    model.set_tokenizer(Tok())
    return model.eval()


def open_gates(model: Flamingo, value: float = 0.7) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_gate"):
                p.fill_(value)


def batch(seed: int = 1) -> dict:
    """Two documents: row 0 `t t <image> t t <eoc> <image> t t t`, row 1 with 2 pads."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (2, 10), generator=g)
    ids[:, 2] = MEDIA
    ids[:, 5] = EOC
    ids[:, 6] = MEDIA
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 8:] = False
    media = (ids == MEDIA) & mask
    images = torch.randn(2, 2, 3, 32, 32, generator=g)
    return dict(
        text_ids=ids,
        text_mask=mask,
        media_mask=media,
        images=images,
        images_mask=torch.ones(2, 2, dtype=torch.bool),
        lm_labels=lm_labels(ids, mask, media),
        modality="interleaved",
    )


@pytest.mark.parametrize("family", sorted(LMS))
def test_gates_at_zero_equal_the_language_model(family):
    model = build(family)
    b = batch()
    ours = model.lm_logits(model(b).hidden)  # (B, L, V + 2)
    plain = model.lang_model.model  # the same weights, no media: HF's own forward, layers wrapped
    with torch.no_grad():
        ref = _unwrapped_logits(model, b["text_ids"], b["text_mask"])
    real = b["text_mask"]
    torch.testing.assert_close(ours[real], ref[real], atol=1e-5, rtol=1e-5)
    assert plain is model.lang_model.model


def _unwrapped_logits(model: Flamingo, ids, mask):
    """The HF LM's logits with its original (unwrapped) layers: the reference."""
    layers = model.lang_model.decoder_layers()
    wrapped = list(layers)
    try:
        for i, layer in enumerate(wrapped):
            layers[i] = layer.decoder_layer
        return model.lang_model.model(input_ids=ids, attention_mask=mask.long()).logits
    finally:
        for i, layer in enumerate(wrapped):
            layers[i] = layer


def test_frozen_gates_stay_the_language_model_after_training_steps():
    model = build(freeze_gates=True).train()
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith("_gate"))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    b = batch()
    for _ in range(2):
        loss, _ = model.compute_objectives(model(b), b, list(model.objectives.values()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    # media rows trained, so compare on text without media tokens
    ids = b["text_ids"].clone()
    ids[ids >= V] = 3
    plain = {**b, "text_ids": ids, "media_mask": torch.zeros_like(b["media_mask"])}
    with torch.no_grad():
        ours = model.lm_logits(model({**plain, "media_mask": (ids == MEDIA)}).hidden)
        ref = _unwrapped_logits(model, ids, b["text_mask"])
    torch.testing.assert_close(ours[:, :, :V], ref[:, :, :V], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("immediate", [True, False])
def test_each_token_sees_the_images_the_masking_allows(immediate):
    """Row 0: tokens 0-1 precede every image, 2-5 follow image 1, 6-9 follow image 2."""
    model = build(only_attend_immediate_media=immediate)
    open_gates(model)
    b = batch()
    with torch.no_grad():
        base = model(b).hidden
        first = b["images"].clone()
        first[:, 0] += 1.0  # change image 1 only
        moved = model({**b, "images": first}).hidden
    diff = (moved - base).abs().amax(-1)[0]  # (L,) row 0
    assert torch.all(diff[:2] == 0), "text before the first image sees no image"
    assert torch.all(diff[2:6] > 1e-4), "text after image 1 sees it"
    if immediate:
        # tokens after image 2 attend only to it — but through the LM's self-attention they read
        # earlier positions, which saw image 1: compare the cross-attention inputs instead
        out = _xattn_outputs(model, b, first)
        assert torch.all(out[6:] == 0)
    else:
        assert torch.all(diff[6:] > 1e-4)


def _xattn_outputs(model: Flamingo, b: dict, images: torch.Tensor) -> torch.Tensor:
    """Per-position change of the first cross-attention block's output when image 1 changes."""
    block = model.lang_model.decoder_layers()[0].gated_cross_attn_layer
    seen = []
    hook = block.attn.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    try:
        with torch.no_grad():
            model(b)
            model({**b, "images": images})
    finally:
        hook.remove()
    return (seen[1] - seen[0]).abs().amax(-1)[0]


def test_only_perceiver_cross_attention_and_media_rows_train():
    model = build().train()
    open_gates(model, 0.5)
    b = batch()
    loss, _ = model.compute_objectives(model(b), b, list(model.objectives.values()))
    loss.backward()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    for name in trained:
        assert name.startswith(("perceiver.", "media_")) or ".gated_cross_attn_layer." in name, name
    assert any(n.startswith("perceiver.") for n in trained) and "media_embeddings" in trained
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
        else:
            assert p.grad is None, f"frozen {name} got a gradient"
    # frozen parts stay in eval mode while training
    assert not model.vision_encoder.training and model.perceiver.training
    assert not model.lang_model.decoder_layers()[0].decoder_layer.training


def test_media_rows_start_as_the_grown_rows_and_drive_their_logits():
    model = build()
    table = model.lang_model.model.get_input_embeddings().weight
    torch.testing.assert_close(model.media_embeddings, table[[MEDIA, EOC]])
    with torch.no_grad():
        model.media_head[1] += 1.0
    h = torch.randn(3, model.lm_dim)
    logits = model.lm_logits(h)
    torch.testing.assert_close(logits[:, EOC], h @ model.media_head[1])
    torch.testing.assert_close(logits[:, :V], model.lang_model.logits(h)[:, :V])


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    grads = []
    for enable in (False, True):
        model = build(gradient_checkpointing=enable).train()
        open_gates(model, 0.3)
        b = batch()
        loss, _ = model.compute_objectives(model(b), b, list(model.objectives.values()))
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for name, g in grads[0][1].items():
        torch.testing.assert_close(g, grads[1][1][name], msg=name)


def test_causal_lm_loss_by_hand_and_on_a_batch_without_labels():
    model = build()
    open_gates(model, 0.2)
    b = batch()
    out = model(b)
    values = model.objectives["lm"](out, b, model)
    logits = model.lm_logits(out.hidden)  # (B, L, V + 2)
    labels = b["lm_labels"]
    logp = logits.log_softmax(-1)
    picked = [-logp[i, t, labels[i, t]] for i in range(2) for t in range(10) if labels[i, t] != -100]
    torch.testing.assert_close(values["lm_loss"], torch.stack(picked).mean(), atol=1e-5, rtol=1e-5)
    assert values["lm_tokens"] == len(picked)
    # <|endofchunk|> is a target, <image> never is
    assert (labels == EOC).any() and not (labels == MEDIA).any()
    none = {**b, "lm_labels": torch.full_like(labels, -100)}
    zero = model.objectives["lm"](model(none), none, model)["lm_loss"]
    assert zero.item() == 0.0 and zero.requires_grad


def test_text_only_batches_train_every_next_token():
    model = build(train_lm=True)
    ids = torch.randint(0, V, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 4:] = False
    b = dict(text_ids=ids, text_mask=mask, modality="text")
    out = model(b)
    assert out.media is None
    assert model.objectives["lm"](out, b, model)["lm_tokens"] == 3 + 5
    assert all(p.requires_grad for p in model.lang_model.model.get_input_embeddings().parameters())


def _prompt():
    """Two prompts of different length, right-padded: `t <image> t t` and `t t <image> t t t`."""
    ids = torch.tensor([[5, MEDIA, 7, 8, 0, 0], [9, 4, MEDIA, 3, 2, 6]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    images = torch.randn(2, 1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    return ids, mask, images


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cached_greedy_generation_equals_teacher_forcing(family):
    model = build(family)
    open_gates(model, 0.9)
    ids, mask, images = _prompt()
    tokens, scores = model.generate(ids, mask, images, max_new_tokens=6, stop_ids=[], return_scores=True)
    assert all(len(t) == 6 for t in tokens)
    for i in range(2):
        n = int(mask[i].sum())
        full = torch.cat([ids[i, :n], torch.tensor(tokens[i])])[None]  # prompt + generated, no padding
        fmask = torch.ones_like(full, dtype=torch.bool)
        b = dict(text_ids=full, text_mask=fmask, media_mask=full == MEDIA, images=images[i : i + 1])
        with torch.no_grad():
            logits = model.lm_logits(model(b).hidden)[0].float()  # (n + 6, V + 2)
        logits[:, MEDIA] = float("-inf")
        logp = logits.log_softmax(-1)
        steps = logp[n - 1 : n + 5]  # the positions that predicted each new token
        assert steps.argmax(-1).tolist() == tokens[i]
        want = steps.gather(-1, torch.tensor(tokens[i])[:, None]).sum()
        assert abs(float(want) - scores[i]) < 1e-4


def test_beam_search_finds_at_least_the_greedy_score_and_one_beam_is_greedy():
    model = build()
    open_gates(model, 0.9)
    ids, mask, images = _prompt()
    greedy, g_scores = model.generate(ids, mask, images, max_new_tokens=4, stop_ids=[], return_scores=True)
    one, _ = model.generate(ids, mask, images, max_new_tokens=4, stop_ids=[], num_beams=1, return_scores=True)
    assert one == greedy
    beams, b_scores = model.generate(
        ids, mask, images, max_new_tokens=4, stop_ids=[], num_beams=4, length_penalty=0.0, return_scores=True
    )
    assert all(len(t) == 4 for t in beams)
    for g, b in zip(g_scores, b_scores):
        assert b >= g - 1e-5


def test_generation_stops_at_a_stop_token_and_never_writes_image(monkeypatch):
    model = build()
    open_gates(model, 0.9)
    ids, mask, images = _prompt()
    free = model.generate(ids, mask, images, max_new_tokens=5, stop_ids=[])
    stop = free[0][2]
    cut = model.generate(ids, mask, images, max_new_tokens=5, stop_ids=[stop])
    assert cut[0] == free[0][: free[0].index(stop)]
    assert model.default_stop_ids()[0] == EOC
    original = model.lm_logits

    def image_first(hidden):  # <image> the most likely token everywhere
        logits = original(hidden)
        logits[..., MEDIA] = 1e4
        return logits

    monkeypatch.setattr(model, "lm_logits", image_first)
    tokens = model.generate(ids, mask, images, max_new_tokens=3, stop_ids=[], num_beams=2)
    assert all(len(t) == 3 and MEDIA not in t for t in tokens)


def test_checkpoints_hold_only_what_trains(tmp_path):
    model = build()
    state = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(state)
    kept = set(state["state_dict"])
    assert kept == model.trainable_keys()
    assert not any(k.startswith("vision_encoder.") for k in kept)
    other = build(seed=5)
    other.on_load_checkpoint(state)
    other.load_state_dict(state["state_dict"])
    torch.testing.assert_close(other.perceiver.latents, model.perceiver.latents)
    # the frozen LM of `other` is its own (the recipe's), not model's
    assert set(state["state_dict"]) == set(other.state_dict())
    short = {"state_dict": {k: v for k, v in list(state["state_dict"].items())[1:]}, "vlp_frozen": {}}
    with pytest.raises(CheckpointError, match="lacks"):
        other.on_load_checkpoint(short)


def test_bad_configuration_is_named():
    with pytest.raises(ConfigError, match="cross_attn_every_n_layers"):
        build(cross_attn_every_n_layers=3)
    with pytest.raises(ConfigError, match="model.perceiver: unknown keys"):
        build(perceiver=dict(latents=3))
    with pytest.raises(ConfigError, match="projection"):
        build(projection="mlp")

    class NoMedia(Tok):
        def token_id(self, token):
            raise ConfigError("no such token")

    model = build()
    with pytest.raises(ConfigError, match="special_tokens"):
        model.set_tokenizer(NoMedia())


@pytest.mark.parametrize("every,expected", [(1, [0, 1, 2, 3]), (2, [1, 3]), (4, [3])])
def test_cross_attention_every_n_layers(every, expected):
    torch.manual_seed(0)
    lm = HFCausalLM(config={**LMS["gpt2"], "n_layer": 4})
    vit = ViTEncoder(image_size=32, patch_size=16, dim=24, depth=1, num_heads=2)
    Flamingo(vit, lm, [CausalLM()], cross_attn_every_n_layers=every, perceiver=dict(depth=1, num_latents=2))
    have = [i for i, layer in enumerate(lm.decoder_layers()) if layer.gated_cross_attn_layer is not None]
    assert have == expected


def test_linear_projection_keeps_every_patch_token():
    model = build(projection="linear", perceiver=None)
    b = batch()
    media = model(b).media
    assert media.shape == (2, 2, 4, 24)  # 4 patches of a 32 px image at 16 px, no CLS
