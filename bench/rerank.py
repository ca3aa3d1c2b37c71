"""ITM re-ranking evaluation: the plain path against the cached one, on a tiny-ALBEF fusion.

    python bench/rerank.py                          # 200 images x 1000 captions, k = 4, 16, 64
    python bench/rerank.py --ks 4,16 --images 100 --texts 500
    python bench/rerank.py --threads 1              # on a machine shared with other jobs
    python bench/run.py --only rerank               # the same cases in make bench's table

plain: ``rerank_topk`` with a scorer that runs the whole fusion per (image, caption) pair,
as ``ALBEF._eval_epoch_end`` does. cached: ``rerank_with_cache``, which computes each
caption's first self-attention and each image's cross-attention keys/values once and the
last layer for CLS only. Both score the same de-duplicated candidate pairs.

Each (path, k) runs in a fresh subprocess after a small warm-up call, so its peak memory
growth is its own: on CPU the peak resident set size (VmHWM, reset before the call) minus
the resident size before the call; on CUDA the peak allocated memory. The fusion is ``recipes/tiny/albef.yaml``'s
(BertFusion dim 384, depth 2, 12 heads, context 128) with 17 image tokens and 32 text
tokens (lengths 8-32), random weights; five captions per image, ITC similarities from
noisy embeddings so that the two directions share part of their top-k, as a trained model's
do. Nothing is asserted: parity lives in tests/eval/test_rerank_cache.py.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

DIM, DEPTH, HEADS, CONTEXT_DIM, IMAGE_TOKENS, TEXT_TOKENS = 384, 2, 12, 128, 17, 32


def gemm_gflops(device: torch.device, n: int = 1024, repeat: int = 10) -> float:
    """fp32 GEMM throughput (GFLOP/s), to compare machines: the fusion is mostly GEMMs."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    times = []
    for i in range(repeat + 3):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_line(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    return f"vlp bench rerank on {name}, torch {torch.__version__}, fp32 GEMM {gemm_gflops(device):.0f} GFLOP/s"


def build(num_images: int, num_texts: int, device: torch.device, seed: int = 0):
    """Fusion, ITM head, tokens and ITC similarities, the same for every subprocess."""
    from vlp.encoders import BertFusion

    torch.manual_seed(seed)
    fusion = BertFusion(DIM, DEPTH, HEADS, context_dim=CONTEXT_DIM, drop=0.0, attn_drop=0.0).to(device).eval()
    head = torch.nn.Linear(DIM, 2).to(device)
    image_tokens = torch.randn(num_images, IMAGE_TOKENS, CONTEXT_DIM, device=device)  # (Ni, Li, Dv)
    text_tokens = torch.randn(num_texts, TEXT_TOKENS, DIM, device=device)  # (Nt, Lt, D)
    lengths = torch.randint(8, TEXT_TOKENS + 1, (num_texts,), device=device)
    text_mask = torch.arange(TEXT_TOKENS, device=device)[None, :] < lengths[:, None]  # (Nt, Lt)
    owner = torch.arange(num_texts, device=device) % num_images  # (Nt,) image of each caption
    image_embeds = torch.nn.functional.normalize(torch.randn(num_images, 64, device=device), dim=-1)
    text_embeds = torch.nn.functional.normalize(image_embeds[owner] + 0.1 * torch.randn(num_texts, 64, device=device))
    sims = image_embeds @ text_embeds.T  # (Ni, Nt)
    return fusion, head, image_tokens, text_tokens, text_mask, sims


def _rss_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@torch.no_grad()
def run_case(path: str, k: int, num_images: int, num_texts: int, batch_size: int, device: torch.device) -> dict:
    """One re-ranking run in this process: seconds, peak memory growth (MiB), the matrices."""
    from vlp.eval import rerank_topk, rerank_with_cache

    fusion, head, image_tokens, text_tokens, text_mask, sims = build(num_images, num_texts, device)
    score = lambda cls: head(cls)[:, 1]  # noqa: E731  the "match" logit, as ITM.score

    def plain(i: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return score(fusion(text_tokens[t], mask=text_mask[t], context=image_tokens[i])[:, 0])  # (n,)

    def call(ni: int = num_images, nt: int = num_texts):
        if path == "plain":
            return rerank_topk(sims[:ni, :nt], k, plain, batch_size=batch_size)
        return rerank_with_cache(
            sims[:ni, :nt],
            fusion,
            image_tokens[:ni],
            text_tokens[:nt],
            text_mask[:nt],
            score,
            k=k,
            batch_size=batch_size,
        )

    call(min(8, num_images), min(40, num_texts))  # warm-up: thread pools, kernels, allocator
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    before = _rss_kib("VmRSS")
    reset = _reset_peak_rss()
    start = time.perf_counter()
    i2t, t2i = call()
    _sync(device)
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        growth = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    elif before is not None and reset and _rss_kib("VmHWM") is not None:
        growth = (_rss_kib("VmHWM") - before) / 1024
    else:  # peak over the whole process: an upper bound
        growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - (before or 0)) / 1024
    return {"seconds": seconds, "mib": growth, "i2t": i2t.cpu(), "t2i": t2i.cpu()}


def _in_subprocess(path: str, k: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "case.pt"
        cmd = [sys.executable, __file__, "--child", path, "--ks", str(k), "--out", str(out)]
        cmd += ["--images", str(args.images), "--texts", str(args.texts), "--batch-size", str(args.batch_size)]
        cmd += ["--device", str(args.device), "--threads", str(torch.get_num_threads())]
        subprocess.run(cmd, check=True)
        return torch.load(out)


def max_diff(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Largest |difference| over re-ranked entries; inf if the two re-ranked different pairs."""
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        if not torch.equal(torch.isfinite(x), torch.isfinite(y)):
            return float("inf")
        finite = torch.isfinite(x)
        if finite.any():
            worst = max(worst, (x[finite] - y[finite]).abs().max().item())
    return worst


def measure(args):
    """Yield ``{k, pairs, plain_s, cached_s, plain_mib, cached_mib, diff}``, one per k."""
    for k in [int(x) for x in str(args.ks).split(",")]:
        plain, cached = _in_subprocess("plain", k, args), _in_subprocess("cached", k, args)
        pairs = int((torch.isfinite(plain["i2t"]) | torch.isfinite(plain["t2i"]).T).sum())  # distinct fused pairs
        yield {
            "k": k,
            "pairs": pairs,
            "plain_s": plain["seconds"],
            "cached_s": cached["seconds"],
            "plain_mib": plain["mib"],
            "cached_mib": cached["mib"],
            "diff": max_diff((plain["i2t"], plain["t2i"]), (cached["i2t"], cached["t2i"])),
        }


def show(rows, args) -> None:
    """Print the table, each row as soon as it is measured."""
    print(
        f"\nITM re-ranking, {args.images} images x {args.texts} captions, fusion dim {DIM} depth {DEPTH} "
        f"heads {HEADS}, {IMAGE_TOKENS} image / {TEXT_TOKENS} text tokens, batch {args.batch_size}, fp32"
    )
    mem = "CUDA peak MiB" if str(args.device).startswith("cuda") else "RSS growth MiB"
    print(
        f"  {'k':>4} {'pairs':>7} {'plain s':>9} {'cached s':>9} {'plain/cached':>13} "
        f"{mem + ' plain':>22} {'cached':>7} {'max |diff|':>11}",
        flush=True,
    )
    for r in rows:
        print(
            f"  {r['k']:4d} {r['pairs']:7d} {r['plain_s']:9.2f} {r['cached_s']:9.2f} "
            f"{r['plain_s'] / r['cached_s']:13.2f} {r['plain_mib']:22.0f} {r['cached_mib']:7.0f} {r['diff']:11.2e}",
            flush=True,
        )
    print("  pairs: distinct (image, caption) pairs fused (a pair in the top-k of both directions once)")


def bench_rerank(args, device, dtype):
    """``bench/run.py --only rerank``: the same cases as a ``Table`` (vlp = cached, ref = plain)."""
    from run import Table

    ns = argparse.Namespace(
        images=200, texts=1000, batch_size=128, device=device, ks=getattr(args, "rerank_ks", "4,16,64")
    )
    table = Table(
        f"ITM re-ranking, 200 images x 1000 captions, tiny-ALBEF fusion, fp32 (ref = plain fusion per pair, "
        f"vlp = rerank_with_cache; MiB = {'peak CUDA' if device.type == 'cuda' else 'peak RSS growth'})"
    )
    for r in measure(ns):
        table.add(
            f"k = {r['k']} ({r['pairs']} pairs)",
            r["cached_s"],
            r["plain_s"],
            r["diff"],
            (r["cached_mib"], r["plain_mib"]),
        )
    return table


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--texts", type=int, default=1000)
    p.add_argument("--ks", default="4,16,64", help="comma-separated candidates per query")
    p.add_argument("--batch-size", type=int, default=128, help="pairs per fusion call (ALBEF's default)")
    p.add_argument("--child", choices=("plain", "cached"), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's); 1 on a machine shared with other jobs")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        torch.save(run_case(args.child, int(args.ks), args.images, args.texts, args.batch_size, device), args.out)
        return
    print(machine_line(device), flush=True)
    show(measure(args), args)
    print(f"  fp32 GEMM after the runs: {gemm_gflops(device):.0f} GFLOP/s (a shared machine's load changes)")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for `import vlp`
    main()
