"""Flamingo-lite against OpenFlamingo, same process, same weights (``vlp convert openflamingo``).

The other side is the real OpenFlamingo 2.0.1 package when it is importable (run with
``PYTHONPATH=$PWD:/path/to/open_flamingo``; bench/openflamingo_shims.py makes it run on
transformers 5), else the faithful re-implementation in tests/reference/openflamingo_reference.py;
the table title says which. Both use OpenFlamingo's fixed perceiver / cross-attention sizes
(depth 6, 64 latents, 8 heads of 64). Rows: a training step (forward + causal-LM loss +
backward + AdamW over what trains: OpenFlamingo's optimiser holds the whole input embedding,
vlp's only the two media rows) and greedy generation over the KV cache (images encoded once on
both sides; the real package through HF ``generate``); ``ref/vlp`` > 1 means vlp is faster.
Run by ``bench/run.py --only flamingo``.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

SIZES = {  # LM width / layers / heads, vision px / patch / width / layers, batch, tokens, images per row
    "small": dict(d=256, layers=4, heads=4, image=64, patch=16, vwidth=128, vlayers=2, batch=8, length=64, images=3),
    "base": dict(
        d=768, layers=12, heads=12, image=224, patch=16, vwidth=768, vlayers=12, batch=8, length=256, images=3
    ),
}
VOCAB = 1000
EOC, MEDIA = VOCAB, VOCAB + 1
PERCEIVER = dict(depth=6, num_latents=64, num_heads=8, dim_head=64)  # OpenFlamingo's (hard-coded there)
CROSS_ATTN = dict(num_heads=8, dim_head=64)


class _Tok:
    vocab_size = VOCAB + 2
    special_tokens = ["<|endofchunk|>", "<image>"]

    def token_id(self, token: str) -> int:
        return {"<image>": MEDIA, "<|endofchunk|>": EOC}[token]


def _towers(size: str):
    from vlp.encoders import HFCausalLM, OpenCLIPVisionEncoder

    s = SIZES[size]
    config = dict(model_type="gpt2", vocab_size=VOCAB, n_positions=512, n_embd=s["d"], n_layer=s["layers"])
    config.update(n_head=s["heads"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # no dropout on either side
    vcfg = dict(image_size=s["image"], patch_size=s["patch"], width=s["vwidth"], layers=s["vlayers"], head_width=64)
    vision = OpenCLIPVisionEncoder("ViT-B-32", model_kwargs=dict(embed_dim=64, vision_cfg=vcfg))
    return vision, HFCausalLM(config=config, attn_implementation="sdpa")


def _vlp(vision, lm, state: dict, vision_features: str):
    from vlp.convert.openflamingo import openflamingo_to_vlp
    from vlp.models import Flamingo
    from vlp.objectives import CausalLM

    model = Flamingo(
        vision, lm, [CausalLM()], cross_attn_every_n_layers=1, vision_features=vision_features,
        perceiver=PERCEIVER, cross_attn=CROSS_ATTN,
    )  # fmt: skip
    model.set_tokenizer(_Tok())
    openflamingo_to_vlp(state, model)
    return model


def build_real_pair(of, size: str, device, dtype):
    """(the real OpenFlamingo, vlp Flamingo) at ``size`` with the same weights."""
    import openflamingo_shims as shims

    from vlp.encoders.text import resize_token_embeddings

    vision, lm = _towers(size)
    real_lm = copy.deepcopy(lm.model)
    real_lm.resize_token_embeddings(VOCAB + 2, mean_resizing=False)
    resize_token_embeddings(lm, VOCAB + 2)
    lm.model.load_state_dict(real_lm.state_dict())
    real = shims.build_flamingo(
        of, copy.deepcopy(vision.visual), real_lm, eoc_token_id=EOC, media_token_id=MEDIA,
        decoder_layers_attr_name="transformer.h", cross_attn_every_n_layers=1,
    )  # fmt: skip
    with torch.no_grad():
        for name, p in real.named_parameters():
            if name.endswith("_gate"):
                p.fill_(0.5)
    # the installed open_clip returns tokens after ln_post: vlp's "tokens"
    model = _vlp(vision, lm, shims.trainable_state_dict(real), "tokens")
    return real.to(device, dtype), model.to(device, dtype)


def build_pair(size: str, device, dtype):
    """(reference OpenFlamingo, vlp Flamingo) at ``size`` with the same weights."""
    from tests.reference.openflamingo_reference import OpenFlamingo, openflamingo_checkpoint, trainable_setup
    from vlp.encoders import HFCausalLM
    from vlp.encoders.text import resize_token_embeddings

    vision, lm = _towers(size)
    ref_tower = HFCausalLM(config=lm.model.config.to_dict(), attn_implementation="sdpa")
    ref_tower.model.load_state_dict(lm.model.state_dict())
    resize_token_embeddings(ref_tower, VOCAB + 2)
    ref = OpenFlamingo(
        copy.deepcopy(vision.visual), ref_tower.model, EOC, MEDIA, vis_dim=SIZES[size]["vwidth"],
        decoder_layers_attr_name="transformer.h", cross_attn_every_n_layers=1,
        perceiver=dict(depth=6, dim_head=64, heads=8, num_latents=64), cross_attn=dict(dim_head=64, heads=8),
    )  # fmt: skip
    trainable_setup(ref)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("_gate"):
                p.fill_(0.5)
    model = _vlp(vision, lm, openflamingo_checkpoint(ref), "prenorm")
    return ref.to(device, dtype), model.to(device, dtype)


def batch(size: str, device, dtype):
    s = SIZES[size]
    g = torch.Generator().manual_seed(0)
    B, L, T = s["batch"], s["length"], s["images"]
    ids = torch.randint(0, VOCAB, (B, L), generator=g)
    for t in range(T):  # <image> text ... <|endofchunk|> per chunk
        ids[:, t * (L // T)] = MEDIA
        ids[:, (t + 1) * (L // T) - 1] = EOC
    mask = torch.ones(B, L, dtype=torch.long)
    images = torch.randn(B, T, 3, s["image"], s["image"], generator=g).to(dtype)
    labels = ids.masked_fill(ids == MEDIA, -100)
    return ids.to(device), mask.to(device), images.to(device), labels.to(device)


def bench_flamingo(args, device, dtype, table_cls, timeit):
    from vlp.data.interleaved import lm_labels

    size = "base" if args.size == "base" else "small"
    sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
    import openflamingo_shims as shims

    of = shims.import_open_flamingo()
    if of is not None:
        ref, ours = build_real_pair(of, size, device, dtype)
        against = "the real open-flamingo 2.0.1 package (bench/openflamingo_shims.py)"
    else:
        ref, ours = build_pair(size, device, dtype)
        against = f"OpenFlamingo 2.0.1 (faithful re-implementation, tests/reference; the package: {shims.IMPORT_ERROR})"
    ids, mask, images, labels = batch(size, device, dtype)
    s = SIZES[size]
    table = table_cls(
        f"Flamingo-lite ({args.dtype}, {size}: GPT-2 {s['d']}x{s['layers']}, ViT {s['image']} px width {s['vwidth']}, "
        f"perceiver 6 x 64 latents, batch {s['batch']} x {s['length']} tokens, {s['images']} images/row) vs {against}"
    )
    ours.eval(), ref.eval()
    n_new = 16
    prompt, pmask = ids[:4, : s["length"] // 2], mask[:4, : s["length"] // 2]
    pimages = images[:4]

    def vlp_gen():
        return ours.generate(prompt, pmask, pimages, max_new_tokens=n_new, stop_ids=[])

    def ref_gen():
        if of is not None:  # HF generate with its cached media; eos out of the vocabulary: n_new tokens
            return shims.generate(
                ref, pimages[:, :, None], prompt, pmask, max_new_tokens=n_new,
                eos_token_id=VOCAB + 2, pad_token_id=0, bad_words_ids=[[MEDIA]], do_sample=False, num_beams=1,
            )  # fmt: skip
        return ref.generate(
            pimages[:, :, None], prompt, pmask, max_new_tokens=n_new, eos_token_id=-1, bad_words_ids=[MEDIA]
        )

    same = sum(a == b for a, b in zip(vlp_gen(), ref_gen()[:, prompt.shape[1] :].tolist()))
    table.add(
        f"greedy generation, 4 prompts x {n_new} new tokens ({same}/4 equal)",
        timeit(vlp_gen, device, warmup=1, repeat=3),
        timeit(ref_gen, device, warmup=1, repeat=3),
    )
    ours.train(), ref.train()
    ref.vision_encoder.eval()
    x = dict(
        text_ids=ids, text_mask=mask.bool(), media_mask=ids == MEDIA, images=images, modality="interleaved",
        images_mask=torch.ones(images.shape[:2], dtype=torch.bool, device=device),
    )  # fmt: skip
    x["lm_labels"] = lm_labels(ids, mask.bool(), x["media_mask"])  # shifted: labels[t] = ids[t + 1]
    hf_labels = torch.full_like(ids, -100)  # HF shifts inside its loss: the same targets unshifted
    hf_labels[:, 1:] = x["lm_labels"][:, :-1]
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-5)
    opt_ref = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-5)  # + its input embedding

    def vlp_step():
        loss, _ = ours.compute_objectives(ours(x), x, list(ours.objectives.values()))
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)
        return loss

    def ref_step():
        loss = ref(images[:, :, None], ids, attention_mask=mask, labels=hf_labels).loss
        loss.backward()
        opt_ref.step()
        opt_ref.zero_grad(set_to_none=True)
        return loss

    diff = (vlp_step().detach() - ref_step().detach()).abs().item()  # the first step, same weights
    table.add("training step (fwd + bwd + AdamW)", timeit(vlp_step, device), timeit(ref_step, device), diff)
    return table
