"""vlp's Flamingo against the real OpenFlamingo 2.0.1 package, same weights, fp32, CPU.

    PYTHONPATH=$PWD:/work/ofpkgs python bench/openflamingo_parity.py

For a tiny GPT-2 and a tiny Llama (random weights, built from config) and
``cross_attn_every_n_layers`` 1 and 2: OpenFlamingo's own ``Flamingo`` is built around them
and a tiny open_clip ViT (bench/openflamingo_shims.py), "trained" (gates opened, the
``<image>`` / ``<|endofchunk|>`` embedding rows moved), saved by its own ``save_checkpoint``,
converted by ``vlp.convert.openflamingo.convert_openflamingo`` (what ``vlp convert
openflamingo`` runs) and loaded into a fresh ``vlp.models.Flamingo`` on the same towers.
Printed: the max |logit difference| over the real tokens of two documents with several
images, text before the first image and right padding; whether greedy generations from two
left-padded prompts are equal (OpenFlamingo's ``generate``: HF ``generate`` over its cached
media, position ids passed: see the shims); and the same two checks of tests/reference/openflamingo_reference.py (the
re-implementation the CI tests use) against the real package.

Vision tokens: "ln_post" is the installed open_clip's ``visual(x)[1]`` (vlp
``vision_features: tokens``); "pre-ln_post" is what open_clip 2.16, which OpenFlamingo was
trained with, returned (vlp ``vision_features: prenorm``; the reference computes this one).
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import openflamingo_shims as shims  # noqa: E402

V = 100
EOC, MEDIA, PAD = V, V + 1, V + 2  # OpenFlamingo's factory: <|endofchunk|>, <image>, then <PAD>
LMS = {
    "gpt2": (dict(model_type="gpt2", vocab_size=V, n_positions=64, n_embd=32, n_layer=4, n_head=2), "transformer.h"),
    "llama": (
        dict(
            model_type="llama", vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        ),
        "model.layers",
    ),
}  # fmt: skip
VISION = dict(embed_dim=16, vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16))
# OpenFlamingo hard-codes these (PerceiverResampler(dim=vis_dim), GatedCrossAttentionBlock defaults)
PERCEIVER = dict(depth=6, num_latents=64, num_heads=8, dim_head=64, ff_mult=4)
CROSS_ATTN = dict(num_heads=8, dim_head=64, ff_mult=4)


class Tok:
    """The LM's V tokens, then OpenFlamingo's two special tokens (vlp's tokenizer protocol)."""

    vocab_size = V + 2
    special_tokens = ["<|endofchunk|>", "<image>"]

    def token_id(self, token: str) -> int:
        return {"<image>": MEDIA, "<|endofchunk|>": EOC}[token]


def build(of, family: str, every: int, old_tokens: bool, workdir: str, seed: int = 0):
    """→ (real OpenFlamingo, vlp Flamingo loaded from the converted checkpoint, conversion report)."""
    from vlp.convert.openflamingo import convert_openflamingo
    from vlp.encoders import HFCausalLM, OpenCLIPVisionEncoder
    from vlp.encoders.text import resize_token_embeddings
    from vlp.models import Flamingo
    from vlp.utils.checkpoint import load_state_dict

    config, layers_attr = LMS[family]
    torch.manual_seed(seed)
    vision = OpenCLIPVisionEncoder("ViT-B-32", model_kwargs=VISION)
    lm = HFCausalLM(config=config, attn_implementation="eager")
    # the real factory: len(tokenizer) rows (<|endofchunk|>, <image>, <PAD>) by HF's resize
    real_lm = copy.deepcopy(lm.model)
    real_lm.resize_token_embeddings(V + 3)
    resize_token_embeddings(lm, V + 3)
    lm.model.load_state_dict(real_lm.state_dict())  # the recipe's LM is the real model's frozen LM
    visual = copy.deepcopy(vision.visual)
    real = shims.build_flamingo(
        of, shims.OldOpenCLIPTokens(visual) if old_tokens else visual, real_lm,
        eoc_token_id=EOC, media_token_id=MEDIA, decoder_layers_attr_name=layers_attr,
        cross_attn_every_n_layers=every,
    ).eval()  # fmt: skip
    with torch.no_grad():  # "trained": gates open, the two media rows moved (train.py zeroes the others' grads)
        for name, p in real.named_parameters():
            if name.endswith("_gate"):
                p.uniform_(-1.0, 1.0)
        rows = real.lang_encoder.get_input_embeddings().weight
        rows[[EOC, MEDIA]] += torch.randn(2, rows.shape[1]) * rows[:V].std()
    ckpt = shims.save_checkpoint(real, workdir)

    def vlp_model():
        return Flamingo(
            copy.deepcopy(vision), copy.deepcopy(lm), cross_attn_every_n_layers=every,
            vision_features="prenorm" if old_tokens else "tokens", patch_tokens_only=True,
            perceiver=PERCEIVER, cross_attn=CROSS_ATTN,
        )  # fmt: skip

    out = os.path.join(workdir, "vlp.safetensors")
    report = convert_openflamingo(ckpt, out, vlp_model(), tokenizer=Tok(), strict=True)
    model = vlp_model()
    model.set_tokenizer(Tok())
    model.load_state_dict(load_state_dict(out))
    return real, model.eval(), report


def build_reference(real, family: str, every: int):
    """tests/reference's OpenFlamingo with the real model's weights (its state-dict layout)."""
    from tests.reference.openflamingo_reference import OpenFlamingo

    layers_attr = LMS[family][1]
    visual = real.vision_encoder.visual if isinstance(real.vision_encoder, shims.OldOpenCLIPTokens) else None
    base = type(real.lang_encoder).__mro__[2]  # the LM's own class, under OpenFlamingo's mixin
    lang = base(real.lang_encoder.config)
    lang.load_state_dict(
        {k.replace(".decoder_layer.", "."): v for k, v in real.lang_encoder.state_dict().items()
         if ".gated_cross_attn_layer." not in k and not k.startswith(("old_decoder_blocks.", "gated_cross_attn_layers."))}
    )  # fmt: skip
    ref = OpenFlamingo(
        copy.deepcopy(visual), lang, EOC, MEDIA, vis_dim=visual.transformer.width,
        decoder_layers_attr_name=layers_attr, cross_attn_every_n_layers=every,
        perceiver=dict(depth=6, dim_head=64, heads=8, num_latents=64), cross_attn=dict(dim_head=64, heads=8),
    ).eval()  # fmt: skip
    state = {k: v for k, v in real.state_dict().items() if not k.startswith("vision_encoder.")}
    missing, unexpected = ref.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("vision_encoder.")]
    if missing or unexpected:
        raise RuntimeError(
            f"reference layout differs from the real package: missing {missing}, unexpected {unexpected}"
        )
    return ref


def documents(seed: int = 1):
    """Two documents of 14 tokens: row 0 three images; row 1 two text tokens before its first
    of two images and 4 right pads (OpenFlamingo's <PAD>)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (2, 14), generator=g)
    ids[0, [0, 5, 9]] = MEDIA
    ids[0, [4, 8, 13]] = EOC
    ids[1, [2, 6]] = MEDIA
    ids[1, [5, 9]] = EOC
    ids[1, 10:] = PAD
    mask = torch.ones(2, 14, dtype=torch.long)
    mask[1, 10:] = 0
    images = torch.randn(2, 3, 3, 32, 32, generator=g)
    images_mask = torch.tensor([[True, True, True], [True, True, False]])
    return ids, mask, images, images_mask


def prompts(seed: int = 3):
    """Two left-padded prompts ending after an image: 2 images, and 1 image after 3 pads."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (2, 9), generator=g)
    ids[0, [0, 5]] = MEDIA
    ids[0, 4] = EOC
    ids[1, :3] = PAD
    ids[1, 3] = MEDIA
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    images = torch.randn(2, 2, 3, 32, 32, generator=g)
    return ids, mask, images, torch.tensor([[True, True], [True, False]])


def until_eoc(rows: list[list[int]]) -> list[list[int]]:
    return [row[: row.index(EOC)] if EOC in row else row for row in rows]


@torch.no_grad()
def compare(of, family: str, every: int, old_tokens: bool, new_tokens: int = 12) -> dict:
    with tempfile.TemporaryDirectory(prefix="openflamingo_") as workdir:
        real, model, report = build(of, family, every, old_tokens, workdir)
    ids, mask, images, images_mask = documents()
    real_logits = real(images[:, :, None], ids, attention_mask=mask).logits[..., : V + 2]  # (B, L, V + 2)
    batch = dict(text_ids=ids, text_mask=mask.bool(), media_mask=(ids == MEDIA) & mask.bool(), images=images,
                 images_mask=images_mask)  # fmt: skip
    ours = model.lm_logits(model(batch).hidden)[..., : V + 2]  # (B, L, V + 2)
    keep = mask.bool()
    row = dict(
        lm=family, every=every, tokens="pre-ln_post" if old_tokens else "ln_post",
        loaded=len(report.loaded), vlp_diff=(ours[keep] - real_logits[keep]).abs().max().item(),
        scale=real_logits[keep].std().item(),
    )  # fmt: skip
    p_ids, p_mask, p_images, p_images_mask = prompts()
    real_out = shims.generate(
        real, p_images[:, :, None], p_ids, p_mask, max_new_tokens=new_tokens, num_beams=1,
        do_sample=False, eos_token_id=EOC, pad_token_id=PAD, bad_words_ids=[[MEDIA]],
    )  # fmt: skip
    theirs = until_eoc(real_out[:, p_ids.shape[1] :].tolist())
    mine = model.generate(p_ids, p_mask, p_images, p_images_mask, max_new_tokens=new_tokens, stop_ids=[EOC])
    row.update(gen=f"{sum(a == b for a, b in zip(mine, theirs))}/2", gen_len=[len(r) for r in theirs])
    if old_tokens:
        ref = build_reference(real, family, every)
        ref_logits = ref(images[:, :, None], ids, attention_mask=mask).logits[..., : V + 2]
        row["ref_diff"] = (ref_logits[keep] - real_logits[keep]).abs().max().item()
        ref_out = ref.generate(
            p_images[:, :, None], p_ids, p_mask, max_new_tokens=new_tokens, eos_token_id=EOC, bad_words_ids=[MEDIA]
        )
        row["ref_gen"] = f"{sum(a == b for a, b in zip(until_eoc(ref_out[:, p_ids.shape[1] :].tolist()), theirs))}/2"
    return row


def main() -> int:
    of = shims.import_open_flamingo()
    if of is None:
        print(f"OpenFlamingo is not importable ({shims.IMPORT_ERROR}); nothing to compare.\n{shims.HOW_TO_INSTALL}")
        return 0
    import logging
    import warnings

    import transformers

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    logging.getLogger("vlp").setLevel(logging.WARNING)
    logging.getLogger().setLevel(logging.ERROR)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    rows = [compare(of, family, every, old) for family in LMS for every in (1, 2) for old in (False, True)]
    print(
        f"vlp Flamingo vs open-flamingo {getattr(of, '__version__', '2.0.1')} (torch {torch.__version__}, "
        f"transformers {transformers.__version__}, fp32, CPU); logits over the real tokens of 2 documents"
    )
    head = ("LM", "xattn every", "vision tokens", "tensors", "vlp max|Δ|", "logit std", "greedy =",
            "new tokens", "ref max|Δ|", "ref greedy =")  # fmt: skip
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    worst = 0.0
    for r in rows:
        ref = f"{r['ref_diff']:.2e}" if "ref_diff" in r else "-"
        print(
            f"| {r['lm']} | {r['every']} | {r['tokens']} | {r['loaded']} | {r['vlp_diff']:.2e} | {r['scale']:.2f} | "
            f"{r['gen']} | {r['gen_len']} | {ref} | {r.get('ref_gen', '-')} |"
        )
        worst = max(worst, r["vlp_diff"], r.get("ref_diff", 0.0))
    ok = worst < 1e-4 and all(r["gen"] == "2/2" and r.get("ref_gen", "2/2") == "2/2" for r in rows)
    print("all equal (max |Δ| < 1e-4, every generation equal)" if ok else "MISMATCH: see the rows above")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
