"""Tiny shards, manifests, query batches and a tiny Flamingo for the few-shot tests
(shared by test_fewshot.py and fewshot_worker.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from helpers import MINILM, jpeg_bytes, write_tar

from vlp.data.collate import Collator
from vlp.data.manifest import Manifest, Split, expand_urls
from vlp.data.pipeline import SampleDecoder, Skipped, read_shards
from vlp.data.tokenization import HFTokenizer
from vlp.data.transforms import ImageTransform

SIZE = 32
COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}
KINDS = ["circle", "square"]
CLASSES = [f"{c} {k}" for c in COLORS for k in KINDS]  # 6 classes


def tokenizer() -> HFTokenizer:
    return HFTokenizer(MINILM, max_length=32, special_tokens=["<image>", "<|endofchunk|>"])


def _sample(modality: str, i: int) -> dict:
    color = list(COLORS)[i % 3]
    kind = KINDS[(i // 3) % 2]
    rgb = tuple(min(255, v + 3 * i) for v in COLORS[color])
    key = f"s{i:04d}"
    image = jpeg_bytes(rgb, size=(SIZE, SIZE))
    if modality == "pair":
        return {"__key__": key, "jpg": image, "txt": f"a {color} {kind}."}
    if modality == "retrieval":
        caps = [f"a {color} {kind}.", f"one {kind} in {color}.", f"the {color} shape."]
        return {"__key__": key, "jpg": image, "json": {"image_id": i, "captions": caps}}
    if modality == "vqa":
        question = f"what color is the {kind}?"
        return {
            "__key__": key,
            "jpg": image,
            "json": {"image_id": i, "question": question, "answers": [color] * 9 + ["red"], "question_type": "color"},
        }
    return {"__key__": key, "jpg": image, "cls": str(CLASSES.index(f"{color} {kind}"))}


def manifest(folder: Path, modality: str, n: int, start: int = 0, name: str | None = None) -> str:
    """A one-split (``train`` and ``test`` alike) manifest over one tar of ``n`` samples."""
    folder.mkdir(parents=True, exist_ok=True)
    url = write_tar(folder / f"{modality}-{start}.tar", [_sample(modality, i) for i in range(start, start + n)])
    extra = {}
    if modality == "image":
        classes = folder / "classes.json"
        classes.write_text(json.dumps({"classnames": CLASSES, "templates": ["a photo of a {}."]}))
        extra = {"classes": str(classes)}
    split = Split(urls=url, num_samples=n)
    m = Manifest(name=name or f"toy_{modality}", modality=modality, splits={"train": split, "test": split}, extra=extra)
    path = folder / f"{modality}-{start}.yaml"
    m.save(path)
    return str(path)


def query_batches(path: str, modality: str, tok, batch_size: int = 3) -> list[dict]:
    """The test split of ``path`` collated as the datamodule collates it, images normalised."""
    from vlp.data.manifest import load_manifest

    m = load_manifest(path)
    transform = ImageTransform(SIZE, norm="clip", normalize=False)
    decode = SampleDecoder(modality, m.fields, transform)
    examples = [e for s in read_shards(expand_urls(m.split("test").urls)) if not isinstance(e := decode(s), Skipped)]
    collate = Collator(modality, tok)
    out = []
    for s in range(0, len(examples), batch_size):
        batch = collate(examples[s : s + batch_size])
        batch["image"] = transform.normalize_batch(batch["image"])
        out.append(batch)
    return out


def flamingo(tok, seed: int = 0):
    from vlp.encoders import HFCausalLM, ViTEncoder
    from vlp.models import Flamingo
    from vlp.objectives import CausalLM

    torch.manual_seed(seed)
    config = dict(model_type="gpt2", vocab_size=tok.vocab_size, n_positions=512, n_embd=32, n_layer=2, n_head=2)
    lm = HFCausalLM(config=config, attn_implementation="eager")
    vit = ViTEncoder(image_size=SIZE, patch_size=16, dim=24, depth=1, num_heads=2)
    model = Flamingo(
        vit,
        lm,
        [CausalLM()],
        perceiver=dict(depth=1, num_latents=4, num_heads=2, dim_head=8),
        cross_attn=dict(num_heads=2, dim_head=8),
    )
    model.set_tokenizer(tok)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_gate"):
                p.fill_(0.5)  # the images change the text
    return model.eval()
