"""Benchmark: Mixture-of-Contexts ``gather`` backend vs dense causal SDPA (CPU training).

For each sequence length N the stream is one document: a text prompt chunk followed by
frame chunks of ``--chunk`` tokens; ``top_k`` is chosen from N so that the routed mask
prunes about ``--sparsity`` of the causal token pairs. Each measurement (forward +
backward of one attention call with ``--heads`` query heads, ``--kv-heads`` KV heads,
head dim ``--head-dim``) runs in a fresh spawned process so that its peak memory is the
increase of that process's peak RSS (``ru_maxrss``) over its RSS just before the call.

Prints a table and writes JSON (``--out``). Timing lives here, never in tests.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time

import torch
import torch.nn.functional as F

from unified_wm.model import attention as A
from unified_wm.model.attention_cpu_kernel import KERNEL_SEGMENT, cpu_kernel
from unified_wm.model.attention_gather import _tile_plan
from unified_wm.model.attention_routing import plan_routing


def layout(n: int, chunk: int, text: int) -> A.StreamMeta:
    """One document: ``text`` prompt tokens (one text chunk), then frames of ``chunk`` tokens."""
    idx = torch.arange(n)
    cid = torch.where(idx < text, torch.zeros_like(idx), 1 + (idx - text).clamp(min=0) // chunk)
    is_text = idx < text
    z = torch.zeros(1, n, dtype=torch.long)
    return A.StreamMeta(cid[None].contiguous(), z, is_text[None], idx[None].contiguous(), idx[None].contiguous())


def allowed_pairs(n: int, chunk: int, text: int, k: int, n_sink: int = 1) -> float:
    """Routed-mask token pairs per head for :func:`layout` (text and sink are one chunk)."""
    total = text * (text + 1) / 2
    n_frames = (n - text + chunk - 1) // chunk
    for f in range(n_frames):
        L = min(chunk, n - text - f * chunk)
        total += L * (L + 1) / 2 + L * max(text, min(n_sink, 1)) + L * min(k, f) * chunk
    return total


def choose_k(n: int, chunk: int, text: int, sparsity: float) -> int:
    causal = n * (n + 1) / 2
    best = min(range(1, n // chunk + 2), key=lambda k: abs(1 - allowed_pairs(n, chunk, text, k) / causal - sparsity))
    return best


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _measure(job: dict) -> dict:
    """Child process: build inputs, time forward and backward, report peak RSS increase."""
    torch.set_num_threads(job["threads"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[job["dtype"]]
    n, H, Hkv, D = job["n"], job["heads"], job["kv_heads"], job["head_dim"]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, n, D, generator=g).to(dtype).requires_grad_() for h in (H, Hkv, Hkv))
    meta = layout(n, job["chunk"], job["text"])
    settings = A.AttentionSettings(backend="gather", top_k=job["k"], n_sink=1,
                                   gather_tile=job["tile"], gather_block=job["block"])
    stats: dict = {}

    def call(stats_out=None):
        if job["method"] == "dense":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != Hkv)
        return A.attend(q, k, v, meta, meta, settings, training=True, stats=stats_out)

    if job["method"] == "gather":  # warm-up on a small row (first-call costs of the kernels)
        wm = layout(4 * job["chunk"] + job["text"], job["chunk"], job["text"])
        wq, wk = torch.randn(1, H, wm.chunk_ids.shape[1], D, dtype=dtype), torch.randn(1, Hkv, wm.chunk_ids.shape[1], D, dtype=dtype)
        A.attend(wq.requires_grad_(), wk, wk, wm, wm, settings, training=True).sum().backward()
    else:
        F.scaled_dot_product_attention(q[:, :, :256], k[:, :, :256], v[:, :, :256], is_causal=True, enable_gqa=H != Hkv).sum().backward()
        q.grad = k.grad = v.grad = None
    base = _rss_mb()
    t0 = time.perf_counter()
    out = call(stats)
    t1 = time.perf_counter()
    out.backward(torch.ones_like(out))
    t2 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res = {"fwd_s": t1 - t0, "bwd_s": t2 - t1, "total_s": t2 - t0, "peak_mb": max(peak - base, 0.0),
           "first_call_s": t2 - t0}
    times = []  # the same call again: training's steady state (allocations reused, pages mapped)
    for _ in range(job.get("repeats", 0)):
        q.grad = k.grad = v.grad = None
        t0 = time.perf_counter()
        o = call()
        t1 = time.perf_counter()
        o.backward(torch.ones_like(o))
        times.append((t1 - t0, time.perf_counter() - t1))
    if times:  # the median call by total time
        fwd, bwd = sorted(times, key=sum)[len(times) // 2]
        res.update(fwd_s=fwd, bwd_s=bwd, total_s=fwd + bwd)
    if job["method"] == "gather":
        res["sparsity"] = stats["moc_sparsity"]
        with torch.no_grad():  # work actually done, chunk padding included
            r = plan_routing(q, k, meta, meta, settings, False, None)
            ext = cpu_kernel() if q.shape[-1] % 16 == 0 else None
            if ext is not None:  # (query row, chunk) pairs x the chunk length padded to 16
                t = r.table
                _, rows = ext.moc_plan(r.sel.contiguous(), r.qslot, r.qdoc, t.doc, t.mand_count, Hkv, KERNEL_SEGMENT)
                res["computed_pairs"] = float(rows.numel() * ((max(t.lmax, 1) + 15) // 16 * 16))
                res["path"] = "compiled kernel"
            else:  # torch tiles: padded tiles x chunk length
                plan = _tile_plan(q, k, meta, meta, r, settings, 1.0)
                res["computed_pairs"] = float(plan.rows.numel() * plan.shape[7])
                res["path"] = "torch tiles"
        res["causal_pairs"] = stats["moc_causal_pairs"]
        if job.get("breakdown") and res.get("path") == "compiled kernel":
            res["breakdown_s"] = _kernel_breakdown(q, k, v, meta, settings, Hkv)
    return res


def _kernel_breakdown(q, k, v, meta, settings, Hkv) -> dict:
    """Seconds of each piece of one compiled-kernel call: routing (+ statistics), work
    lists, forward, backward (the same calls `attend` makes, timed one by one)."""
    ext = cpu_kernel()
    out: dict = {}

    def tm(name, fn):
        t0 = time.perf_counter()
        r = fn()
        out[name] = time.perf_counter() - t0
        return r

    with torch.no_grad():
        st: dict = {}
        r = tm("routing_and_stats", lambda: plan_routing(q, k, meta, meta, settings, True, st))
        t = r.table
        ptr, rows = tm("work_lists", lambda: ext.moc_plan(r.sel.contiguous(), r.qslot, r.qdoc, t.doc, t.mand_count,
                                                          Hkv, KERNEL_SEGMENT))
        qf = (q.detach().float() * (1.0 / q.shape[-1] ** 0.5)).contiguous()
        kf, vf = k.detach().float().contiguous(), v.detach().float().contiguous()
        o, lse = tm("forward", lambda: ext.moc_forward(qf, kf, vf, ptr, rows, t.start, t.length, t.key_mand, t.lmax))
        do = torch.ones_like(o)
        delta = (do * o).sum(-1)
        tm("backward", lambda: ext.moc_backward(qf, kf, vf, do, lse, delta, ptr, rows, t.start, t.length, t.key_mand, t.lmax))
    return out


def _run(job: dict) -> dict:
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_measure, (job,))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="uwm bench attention", description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="4096,8192,16384,32768", help="comma-separated sequence lengths")
    ap.add_argument("--heads", type=int, default=8, help="query heads")
    ap.add_argument("--kv-heads", type=int, default=2, help="key/value heads")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=64, help="frame chunk length (tokens)")
    ap.add_argument("--text", type=int, default=32, help="text prompt tokens at the start")
    ap.add_argument("--sparsity", type=float, default=0.85, help="target share of causal pairs pruned")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    ap.add_argument("--tile", type=int, default=A.AttentionSettings.gather_tile, help="gather_tile")
    ap.add_argument("--block", type=int, default=A.AttentionSettings.gather_block, help="gather_block")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed calls after the first (whose memory is reported); the time is their median "
                         "(0: the first call's time, page faults and first allocations included)")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time the compiled kernel's pieces (routing, work lists, forward, backward)")
    ap.add_argument("--out", default=None, help="write results as JSON here")
    args = ap.parse_args(argv)
    try:
        lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--lengths must be comma-separated integers, got {args.lengths!r}")
    if not lengths or min(lengths) <= args.text + args.chunk:
        ap.error(f"--lengths must be larger than --text + --chunk ({args.text + args.chunk})")
    if args.repeats < 0:
        ap.error(f"--repeats must be >= 0, got {args.repeats}")
    if not 0.0 < args.sparsity < 1.0:
        ap.error(f"--sparsity must be in (0, 1), got {args.sparsity}")

    rows = []
    hdr = (f"{'N':>6} {'chunk':>5} {'k':>4} {'sparsity':>8} {'flops/dense':>11} {'computed/dense':>14} "
           f"{'dense s':>8} {'gather s':>8} {'speedup':>7} {'dense MB':>8} {'gather MB':>9}")
    kernel = "compiled CPU kernel" if cpu_kernel() is not None and args.head_dim % 16 == 0 else "torch tiles"
    print(f"# MoC gather ({kernel}) vs dense causal SDPA, fwd+bwd, {args.dtype}, heads {args.heads}/{args.kv_heads}, "
          f"head dim {args.head_dim}, threads {args.threads}, "
          + (f"median of {args.repeats} calls after the first" if args.repeats else "the first call"))
    print(hdr)
    for n in lengths:
        k = choose_k(n, args.chunk, args.text, args.sparsity)
        job = dict(n=n, k=k, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim, chunk=args.chunk,
                   text=args.text, dtype=args.dtype, threads=args.threads, tile=args.tile, block=args.block,
                   breakdown=args.breakdown, repeats=args.repeats)
        dense = _run(dict(job, method="dense"))
        gat = _run(dict(job, method="gather"))
        row = {
            "N": n, "chunk": args.chunk, "top_k": k, "sparsity": gat["sparsity"],
            "attn_flops_ratio": 1.0 - gat["sparsity"],
            "computed_pairs_ratio": gat["computed_pairs"] / gat["causal_pairs"],
            "dense": dense, "gather": gat, "speedup": dense["total_s"] / gat["total_s"],
        }
        rows.append(row)
        print(f"{n:>6} {args.chunk:>5} {k:>4} {row['sparsity']:>8.3f} {row['attn_flops_ratio']:>11.3f} "
              f"{row['computed_pairs_ratio']:>14.3f} {dense['total_s']:>8.2f} {gat['total_s']:>8.2f} "
              f"{row['speedup']:>6.2f}x {dense['peak_mb']:>8.0f} {gat['peak_mb']:>9.0f}", flush=True)
        if "breakdown_s" in gat:
            print("        kernel pieces (s): " + ", ".join(f"{a} {b:.2f}" for a, b in gat["breakdown_s"].items()), flush=True)
    result = {"config": vars(args), "memory": "peak RSS increase of a fresh process during fwd+bwd (ru_maxrss)",
              "rows": rows}
    if args.out:
        from unified_wm.utils import write_json

        write_json(args.out, result)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
