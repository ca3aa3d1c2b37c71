"""A FLAVA training step, vlp against transformers' ``FlavaForPreTraining``, same process.

Both models hold the same weights (``vlp convert flava``'s mapping) and get the same batch,
masks and labels. Rows: a paired step (contrastive on the unmasked inputs, MMM image + text
through the multimodal encoder over the masked inputs; ITM is left out of both, since vlp
draws its own negatives where transformers takes them from the batch), an image-only MIM
step and a text-only MLM step; forward + backward, median time, ``ref/vlp`` > 1 means vlp
is faster. Run by ``bench/run.py --only flava``.
"""

from __future__ import annotations

import torch

FLAVA_SIZES = {  # image px, patch, width, image/text/multimodal depth, heads, batch, text length
    "small": dict(image=96, patch=16, width=256, depth=(4, 4, 2), heads=4, batch=16, length=32),
    "base": dict(image=224, patch=16, width=768, depth=(12, 12, 6), heads=12, batch=32, length=64),
}
TEXT_VOCAB, IMAGE_VOCAB = 30522, 8192


def build_pair(size: str, device, dtype):
    """(transformers model, vlp model, batch) at ``size``, weights shared."""
    import transformers

    from vlp.blocks.transformer import Transformer
    from vlp.convert.flava import flava_to_vlp
    from vlp.encoders import TransformerTextEncoder, ViTEncoder
    from vlp.models import FLAVA
    from vlp.objectives import ITC, MLM, CodebookMIM

    s = FLAVA_SIZES[size]
    D, (di, dt, dm), H = s["width"], s["depth"], s["heads"]
    tower = dict(hidden_size=D, num_attention_heads=H, intermediate_size=4 * D)
    config = transformers.FlavaConfig(
        image_config=dict(tower, num_hidden_layers=di, image_size=s["image"], patch_size=s["patch"], mask_token=True),
        text_config=dict(tower, num_hidden_layers=dt, vocab_size=TEXT_VOCAB, max_position_embeddings=s["length"]),
        multimodal_config=dict(tower, num_hidden_layers=dm),
        hidden_size=D,
        projection_dim=D,
        init_codebook=False,
        itm_weight=0.0,
    )
    ref = transformers.FlavaForPreTraining(config)
    ours = FLAVA(
        ViTEncoder(image_size=s["image"], patch_size=s["patch"], dim=D, depth=di, num_heads=H),
        TransformerTextEncoder(vocab_size=TEXT_VOCAB, max_length=s["length"], dim=D, depth=dt, num_heads=H),
        Transformer(D, dm, H, norm_eps=1e-12),
        [
            ITC(min_temperature=0.01, max_temperature=1.0),
            CodebookMIM(vocab_size=IMAGE_VOCAB),
            MLM(modalities=["text"], distill=False, tie_weights=False),
            CodebookMIM(name="mmm_image", modalities=["pair"], vocab_size=IMAGE_VOCAB),
            MLM(name="mmm_text", distill=False, tie_weights=False),
        ],
        embed_dim=D,
    )
    flava_to_vlp(ref.state_dict(), ours)
    ref, ours = ref.to(device, dtype).train(), ours.to(device, dtype).train()
    g = torch.Generator().manual_seed(0)
    B, L, N = s["batch"], s["length"], (s["image"] // s["patch"]) ** 2
    ids = torch.randint(1000, TEXT_VOCAB, (B, L), generator=g)
    chosen = torch.rand(B, L, generator=g) < 0.15
    batch = {
        "image": torch.randn(B, 3, s["image"], s["image"], generator=g).to(dtype),
        "text_ids": ids,
        "text_mask": torch.ones(B, L, dtype=torch.long),
        "mlm_input_ids": ids.masked_fill(chosen, 103),
        "mlm_labels": ids.masked_fill(~chosen, -100),
        "image_mask": torch.rand(B, N, generator=g) < 0.4,
        "image_token_ids": torch.randint(0, IMAGE_VOCAB, (B, N), generator=g),
        "image_id": torch.arange(B),
    }
    return ref, ours, {k: v.to(device) for k, v in batch.items()}


def steps(ref, ours, batch: dict, modality: str):
    """(vlp step, reference step): forward + backward of the losses of ``modality`` batches."""
    keys = {
        "pair": ("image", "text_ids", "text_mask", "mlm_input_ids", "mlm_labels", "image_mask", "image_token_ids"),
        "image": ("image", "image_mask", "image_token_ids"),
        "text": ("text_ids", "text_mask", "mlm_input_ids", "mlm_labels"),
    }[modality]
    x = {k: batch[k] for k in keys} | {"modality": modality, "image_id": batch["image_id"]}

    def vlp_step():
        loss, _ = ours.compute_objectives(ours(x), x, ours.objectives_for(x))
        loss.backward()
        return loss

    hf_args = {
        "pixel_values": x.get("image"),
        "input_ids": x.get("text_ids"),
        "input_ids_masked": x.get("mlm_input_ids"),
        "attention_mask": x.get("text_mask"),
        "bool_masked_pos": x.get("image_mask"),
        "mlm_labels": x.get("mlm_labels"),
    }

    def ref_step():
        args = dict(hf_args)
        if "image_token_ids" in x:
            args["mim_labels"] = x["image_token_ids"].clone()  # transformers writes into it
            args["bool_masked_pos"] = x["image_mask"].clone()
        if args["mlm_labels"] is not None:
            args["mlm_labels"] = args["mlm_labels"].clone()
        loss = ref(**{k: v for k, v in args.items() if v is not None}).loss
        loss.backward()
        return loss

    return vlp_step, ref_step


def bench_flava(args, device, dtype, table_cls, timeit):
    size = "base" if args.size == "base" else "small"
    ref, ours, batch = build_pair(size, device, dtype)
    s = FLAVA_SIZES[size]
    table = table_cls(
        f"FLAVA training step, forward+backward ({args.dtype}, {size}: {s['image']} px, width {s['width']}, "
        f"depths {s['depth']}, batch {s['batch']}) vs transformers FlavaForPreTraining"
    )
    for modality in ("pair", "image", "text"):
        f_ours, f_ref = steps(ref, ours, batch, modality)
        with torch.no_grad():
            ours.zero_grad(set_to_none=True)
            ref.zero_grad(set_to_none=True)
        diff = (f_ours().detach().float() - f_ref().detach().float()).abs().item()
        what = {"pair": "contrastive + MMM", "image": "MIM", "text": "MLM"}[modality]
        table.add(f"{modality} batch ({what})", timeit(f_ours, device), timeit(f_ref, device), diff)
    return table
