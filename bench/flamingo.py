"""Flamingo-lite against OpenFlamingo, same process, same weights (``vlp convert openflamingo``).

The reference is the faithful re-implementation of OpenFlamingo 2.0.1 in
tests/reference/openflamingo_reference.py (the pip release does not run on transformers 5).
Rows: a training step (forward + causal-LM loss + backward + AdamW step over what trains),
and greedy generation over the KV cache (images encoded once on both sides); ``ref/vlp`` > 1
means vlp is faster. Run by ``bench/run.py --only flamingo``.
"""

from __future__ import annotations

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


class _Tok:
    vocab_size = VOCAB + 2
    special_tokens = ["<|endofchunk|>", "<image>"]

    def token_id(self, token: str) -> int:
        return {"<image>": MEDIA, "<|endofchunk|>": EOC}[token]


def build_pair(size: str, device, dtype):
    """(reference OpenFlamingo, vlp Flamingo) at ``size`` with the same weights."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.reference.openflamingo_reference import OpenFlamingo, openflamingo_checkpoint, trainable_setup
    from vlp.convert.openflamingo import openflamingo_to_vlp
    from vlp.encoders import HFCausalLM, OpenCLIPVisionEncoder
    from vlp.encoders.text import resize_token_embeddings
    from vlp.models import Flamingo
    from vlp.objectives import CausalLM

    s = SIZES[size]
    config = dict(model_type="gpt2", vocab_size=VOCAB, n_positions=512, n_embd=s["d"], n_layer=s["layers"])
    config.update(n_head=s["heads"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # no dropout on either side
    vcfg = dict(image_size=s["image"], patch_size=s["patch"], width=s["vwidth"], layers=s["vlayers"], head_width=64)
    vision = OpenCLIPVisionEncoder("ViT-B-32", model_kwargs=dict(embed_dim=64, vision_cfg=vcfg))
    lm = HFCausalLM(config=config, attn_implementation="sdpa")
    ref_tower = HFCausalLM(config=config, attn_implementation="sdpa")
    ref_tower.model.load_state_dict(lm.model.state_dict())
    resize_token_embeddings(ref_tower, VOCAB + 2)
    sizes = dict(perceiver=dict(depth=2, dim_head=64, heads=8, num_latents=64), cross_attn=dict(dim_head=64, heads=8))
    import copy

    ref = OpenFlamingo(
        copy.deepcopy(vision.visual), ref_tower.model, EOC, MEDIA, vis_dim=s["vwidth"],
        decoder_layers_attr_name="transformer.h", cross_attn_every_n_layers=1, **sizes,
    )  # fmt: skip
    trainable_setup(ref)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("_gate"):
                p.fill_(0.5)
    model = Flamingo(
        vision, lm, [CausalLM()], cross_attn_every_n_layers=1,
        perceiver=dict(depth=2, num_latents=64, num_heads=8, dim_head=64), cross_attn=dict(num_heads=8, dim_head=64),
    )  # fmt: skip
    model.set_tokenizer(_Tok())
    openflamingo_to_vlp(openflamingo_checkpoint(ref), model)
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
    ref, ours = build_pair(size, device, dtype)
    ids, mask, images, labels = batch(size, device, dtype)
    s = SIZES[size]
    table = table_cls(
        f"Flamingo-lite ({args.dtype}, {size}: GPT-2 {s['d']}x{s['layers']}, ViT {s['image']} px width {s['vwidth']}, "
        f"batch {s['batch']} x {s['length']} tokens, {s['images']} images/row) vs OpenFlamingo 2.0.1 "
        "(faithful re-implementation, tests/reference)"
    )
    ours.eval(), ref.eval()
    n_new = 16
    prompt, pmask = ids[:4, : s["length"] // 2], mask[:4, : s["length"] // 2]
    pimages = images[:4]

    def vlp_gen():
        return ours.generate(prompt, pmask, pimages, max_new_tokens=n_new, stop_ids=[])

    def ref_gen():
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
    opt_ref = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-5)

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
