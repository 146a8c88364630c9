"""The prepared GPU check (``uwm bench gpu``): one command, a few minutes on one GPU.

1. ``correctness``: the ``triton`` MoC backend vs the ``reference`` oracle (fp32, dense
   mask) at real shapes on packed rows (two documents, text prompts, uneven last chunks),
   in bf16 at ``--check-len`` tokens and in fp32 at a quarter of that: max abs and
   relative (||got - ref|| / ||ref||) error of the output and of dq, dk, dv.
2. ``speed``: forward + backward time (CUDA events, median of ``--repeats``) and peak
   memory (``torch.cuda.max_memory_allocated`` above the inputs) of one attention call,
   Triton MoC vs dense causal SDPA (and the ``flex`` MoC backend at ``--flex-lengths``),
   at ``--lengths`` tokens; ``top_k`` is chosen per length (as in ``uwm bench attention``)
   for ``--sparsity`` of the causal pairs pruned. Routing is per query, so what the kernel
   pays for is the union of the key blocks over each block of queries: the table gives the
   measured token-pair sparsity and the share of causal key blocks the kernel visits, for
   random queries and for queries that are coherent within a block (as a trained model's
   neighbouring queries are).
3. ``train``: ``--steps`` steps of a tiny_cpu-shaped recipe in bf16 (ZeRO-2) through the
   ``deepspeed`` launcher on one GPU (NCCL), on a tiny generated world dataset with an
   untrained video tokenizer (what tests/conftest.py builds); reports the loss and step time.

Each part that fails is recorded (error and traceback) and the next one still runs; the
JSON file (``--out``) is rewritten after every part, so a run cut short keeps what it
measured. ``--deadline-s`` skips whatever would start after that many seconds. Without CUDA
it exits with status 1 and says it needs a GPU (``--device cpu`` runs the same code at small
sizes under Triton's interpreter: that is how the tests keep this script working).

  uwm bench gpu --out bench_gpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]  # the checkout (recipes/, ds_configs/)
NO_GPU = "uwm bench gpu needs a CUDA GPU (torch.cuda.is_available() is False here); nothing was run"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="uwm bench gpu", description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="32768,65536,131072", help="comma-separated sequence lengths (speed)")
    ap.add_argument("--flex-lengths", default="32768", help="lengths at which the flex backend is timed too ('' for none)")
    ap.add_argument("--queries", default="random,coherent",
                    help="query kinds for the MoC timings: random, coherent (shared within each block of 64)")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=512, help="frame chunk length (tokens)")
    ap.add_argument("--text", type=int, default=64, help="text prompt tokens")
    ap.add_argument("--sparsity", type=float, default=0.85, help="target share of causal pairs pruned")
    ap.add_argument("--check-len", type=int, default=8192, help="tokens per row of the bf16 correctness check")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--breakdown", action="store_true",
                    help="also time the Triton MoC call's stages: routing, block lists, forward kernel, backward kernels")
    ap.add_argument("--steps", type=int, default=50, help="deepspeed training steps")
    ap.add_argument("--recipe", default="recipes/tiny_cpu.yaml")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: correctness,speed,train")
    ap.add_argument("--deadline-s", type=float, default=0.0,
                    help="skip any part or length that would start after this many seconds (0: no deadline)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: the same code at small sizes under TRITON_INTERPRET=1 (a dry run; no timings worth reading)")
    ap.add_argument("--out", default="bench_gpu.json")
    a = ap.parse_args(argv)
    ints = lambda x: [int(v) for v in x.split(",") if v]  # noqa: E731
    a.lengths, a.flex_lengths = ints(a.lengths), ints(a.flex_lengths)
    a.queries = [q for q in a.queries.split(",") if q]
    a.skip = {s for s in a.skip.split(",") if s}
    bad = a.skip - {"correctness", "speed", "train"}
    if bad:
        raise ValueError(f"--skip: unknown part '{sorted(bad)[0]}'; valid: correctness, speed, train")
    badq = set(a.queries) - {"random", "coherent"}
    if badq or not a.queries:
        raise ValueError(f"--queries: unknown kind '{sorted(badq)[0] if badq else ''}'; valid: random, coherent")
    if a.heads % a.kv_heads:
        raise ValueError(f"--heads ({a.heads}) must be a multiple of --kv-heads ({a.kv_heads})")
    if a.repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {a.repeats}")
    return a


def _packed_meta(n: int, chunk: int, text: int, dev):
    """One row of two documents (60 % / 40 %), each a text chunk then frame chunks."""
    from unified_wm.model.attention import StreamMeta

    cut = int(n * 0.6)
    cid, doc, is_text, pid = [], [], [], []
    c = 0
    for d, (s0, s1) in enumerate(((0, cut), (cut, n))):
        i = torch.arange(s1 - s0)
        cid.append(c + torch.where(i < text, 0, 1 + (i - text).clamp(min=0) // chunk))
        c = int(cid[-1].max()) + 1
        doc.append(torch.full_like(i, d))
        is_text.append(i < text)
        pid.append(i)
    cat = lambda xs: torch.cat(xs)[None].to(dev)  # noqa: E731
    return StreamMeta(cat(cid), cat(doc), cat(is_text), cat(pid), torch.arange(n, device=dev)[None])


def _errors(got: list[torch.Tensor], ref: list[torch.Tensor]) -> dict:
    res = {}
    for nm, x, y in zip(("out", "dq", "dk", "dv"), got, ref):
        x, y = x.double(), y.double()
        res[f"max_abs_err_{nm}"] = float((x - y).abs().max())
        res[f"rel_err_{nm}"] = float((x - y).norm() / y.norm().clamp(min=1e-30))
        res[f"max_abs_{nm}"] = float(y.abs().max())
        res[f"finite_{nm}"] = bool(torch.isfinite(x).all())
    return res


def correctness(a, dev) -> list[dict]:
    """Triton vs the fp32 reference: bf16 at ``check_len`` tokens, fp32 at a quarter of it."""
    from unified_wm.bench.attention import choose_k
    from unified_wm.model.attention import AttentionSettings, attend

    rows = []
    for dtype, n in ((torch.bfloat16, a.check_len), (torch.float32, max(a.check_len // 4, 2 * a.chunk))):
        meta = _packed_meta(n, a.chunk, a.text, dev)
        g = torch.Generator(device=dev).manual_seed(n)
        q, k, v = (torch.randn(1, h, n, a.head_dim, device=dev, generator=g).to(dtype).requires_grad_()
                   for h in (a.heads, a.kv_heads, a.kv_heads))
        top_k = choose_k(n, a.chunk, a.text, a.sparsity)
        cot = torch.randn(1, a.heads, n, a.head_dim, device=dev, generator=g)
        res = {}
        for name, qq, kk, vv in (("triton", q, k, v), ("reference", *(t.detach().float().requires_grad_() for t in (q, k, v)))):
            out = attend(qq, kk, vv, meta, meta, AttentionSettings(backend=name, top_k=top_k, n_sink=1))
            grads = torch.autograd.grad((out.float() * cot).sum(), (qq, kk, vv))
            res[name] = [t.detach().float() for t in (out, *grads)]
        rows.append({"tokens": n, "top_k": top_k, "dtype": f"{str(dtype).split('.')[-1]} (oracle fp32)",
                     **_errors(res["triton"], res["reference"])})
        del q, k, v, res
    return rows


def _time(fn, repeats: int, dev) -> tuple[float, float | None]:
    """(median ms of fn(), peak MB allocated above the memory held before the calls; None on CPU)."""
    fn()  # compile / warm up
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        if cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    times.sort()
    return times[len(times) // 2], ((torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else None)


def _breakdown(q, k, v, meta, settings, dout, repeats: int, dev) -> dict:
    """Median ms (and peak MB above the inputs on CUDA) of each stage of one Triton MoC call."""
    from unified_wm.model.attention_routing import plan_routing
    from unified_wm.model.attention_triton import TritonMoC, plan

    with torch.no_grad():
        r = plan_routing(q, k, meta, meta, settings, True, None)
        p = plan(q, k, meta, meta, r)
    stages = {
        "routing": lambda: plan_routing(q, k, meta, meta, settings, True, None),
        "block_lists": lambda: plan(q, k, meta, meta, r),
        "forward": lambda: TritonMoC.apply(q.detach(), k.detach(), v.detach(), p),
        "forward_backward": lambda: TritonMoC.apply(q, k, v, p).backward(dout),
    }
    res = {}
    for name, fn in stages.items():
        with torch.no_grad() if name != "forward_backward" else torch.enable_grad():
            ms, mb = _time(fn, repeats, dev)
        res[f"{name}_ms"], res[f"{name}_peak_mb"] = ms, mb
    res["backward_ms"] = res["forward_backward_ms"] - res["forward_ms"]
    return res


def speed(a, dev, deadline) -> list[dict]:
    import torch.nn.functional as F

    from unified_wm.bench.attention import choose_k, layout
    from unified_wm.bench.routing import sample_queries, tile_share
    from unified_wm.model.attention import AttentionSettings, attend

    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    rows = []
    for n in a.lengths:
        row: dict = {"tokens": n}
        rows.append(row)
        if deadline():
            row["skipped"] = "deadline"
            continue
        meta = layout(n, a.chunk, a.text)
        meta = type(meta)(*(t.to(dev) for t in (meta.chunk_ids, meta.doc_ids, meta.is_text, meta.pos_in_doc, meta.positions)))
        top_k = choose_k(n, a.chunk, a.text, a.sparsity)
        row["top_k"] = top_k
        k, v = (torch.randn(1, a.kv_heads, n, a.head_dim, device=dev).to(dtype).requires_grad_() for _ in range(2))
        dout = torch.randn(1, a.heads, n, a.head_dim, device=dev).to(dtype)
        methods = [(f"triton_{kind}", kind, "triton") for kind in a.queries] + [("dense_sdpa", "random", None)]
        if dev.type == "cuda" and n in a.flex_lengths:
            methods.append(("flex_random", "random", "flex"))
        for name, kind, backend in methods:
            q = sample_queries((1, a.heads, n, a.head_dim), kind, device=dev).to(dtype).requires_grad_()
            try:
                if backend is None:
                    fn = lambda: F.scaled_dot_product_attention(  # noqa: E731
                        q, k, v, is_causal=True, enable_gqa=a.heads != a.kv_heads).backward(dout)
                else:
                    s = AttentionSettings(backend=backend, top_k=top_k, n_sink=1)
                    if backend == "triton":
                        stats: dict = {}
                        with torch.no_grad():
                            attend(q, k, v, meta, meta, s, stats=stats)
                        row[f"{name}_sparsity"] = stats["moc_sparsity"]
                        row[f"{name}_block_share"] = tile_share(q, k, meta, meta, s)[1]
                        if a.breakdown:
                            row[f"{name}_breakdown"] = _breakdown(q, k, v, meta, s, dout, a.repeats, dev)
                            q.grad = k.grad = v.grad = None
                    fn = lambda: attend(q, k, v, meta, meta, s, training=True).backward(dout)  # noqa: E731
                ms, mb = _time(fn, a.repeats, dev)
                row[f"{name}_ms"], row[f"{name}_peak_mb"] = ms, mb
            except Exception as e:  # noqa: BLE001 -- recorded, the other methods still run
                if dev.type == "cuda" and isinstance(e, torch.cuda.OutOfMemoryError):
                    row[f"{name}_ms"] = "OOM"
                else:
                    row[f"{name}_error"] = f"{type(e).__name__}: {e}"[:500]
            q = k.grad = v.grad = None  # free this method's queries and gradients before the next one
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def tiny_processor(data: Path, root: Path) -> Path:
    """``root/processor``: a SentencePiece model trained on ``data``'s captions and an untrained tiny
    video tokenizer (the processor the tests and the GPU check use)."""
    import torch

    from unified_wm.data.episodes import iter_episodes, load_episodes
    from unified_wm.tokenization.actions import action_vocabulary
    from unified_wm.tokenization.processor import UnifiedProcessor
    from unified_wm.tokenization.text import train_text_tokenizer
    from unified_wm.tokenization.video import FSQConfig, QuantizerConfig, VideoTokenizer, VideoTokenizerConfig

    texts = [c["text"] for ep in iter_episodes(load_episodes(data)) for c in ep["captions"]]
    train_text_tokenizer(texts, root / "text.model", vocab_size=96)
    torch.manual_seed(0)
    vcfg = VideoTokenizerConfig(image_size=64, downsample=8, patch_size=2, channels=[8, 16, 16],
                                quantizer=QuantizerConfig(kind="fsq", fsq=FSQConfig(levels=[4, 4, 4])))
    VideoTokenizer(vcfg).save_pretrained(root / "video")
    proc = UnifiedProcessor(root / "text.model", action_vocabulary(["pan5", "atari18"]), root / "video", max_chunk_len=64)
    proc.save_pretrained(root / "processor")
    return root / "processor"


def _tiny_world(root: Path) -> tuple[Path, Path]:
    """Token documents and a processor: a small generated world and :func:`tiny_processor`."""
    from unified_wm.data.tokenize import tokenize_dataset
    from unified_wm.data.world import generate_world

    data = root / "data"
    generate_world(ROOT / "recipes/data/world_tiny.yaml", data, n_episodes=24, seed=0, split="train", progress=False)
    processor = tiny_processor(data, root)
    tokenize_dataset(data, processor, root / "tokens", clip_frames=16, progress=False)
    return root / "tokens", processor


def train(a) -> dict:
    from unified_wm.distributed import free_port

    work = Path(tempfile.mkdtemp(prefix="uwm_bench_gpu_"))
    try:
        tokens, processor = _tiny_world(work)
        ds = shutil.which("deepspeed")
        launcher = [ds] if ds else [sys.executable, "-m", "deepspeed.launcher.runner"]
        cmd = [*launcher, "--num_gpus", "1", "--master_port", str(free_port()), "--module", "unified_wm.train",
               "--recipe", str(ROOT / a.recipe), "--deepspeed", str(ROOT / "ds_configs/zero2_bf16.json"),
               "--output-dir", str(work / "train"), "--max-steps", str(a.steps), "--no-progress",
               "--set", f"data.tokens={tokens}", "--set", f"data.processor={processor}",
               "--set", "train.save_every=0", "--set", "train.torch_threads=0", "--set", "train.log_every=10"]
        t0 = time.time()
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        wall = time.time() - t0
        log = r.stdout + r.stderr
        losses = [float(x) for x in re.findall(r"step\s+\d+ loss ([0-9.]+)", log)]
        tps = [float(x) for x in re.findall(r"([0-9.]+) tok/s", log)]
        return {"cmd": " ".join(cmd), "rc": r.returncode, "wall_s": wall, "steps": a.steps,
                "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
                "tokens_per_s": tps[-1] if tps else None, "log_tail": log[-3000:]}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _print_part(name: str, res) -> None:
    if isinstance(res, dict) and "error" in res:
        print(f"{name}: FAILED {res['error']}", flush=True)
    elif name == "correctness":
        for c in res:
            errs = " ".join(f"{nm} {c[f'max_abs_err_{nm}']:.3g}/{c[f'rel_err_{nm}']:.2g}" for nm in ("out", "dq", "dk", "dv"))
            print(f"correctness {c['tokens']} tokens {c['dtype']}, max abs / relative error: {errs}", flush=True)
    elif name == "speed":
        f = lambda x: f"{x:9.1f}" if isinstance(x, (int, float)) else f"{str(x or '-'):>9}"  # noqa: E731
        print(f"{'tokens':>7} {'top_k':>5} {'method':>15} {'sparsity':>8} {'blocks':>6} {'ms':>9} {'peak MB':>9}")
        for r in res:
            if "skipped" in r:
                print(f"{r['tokens']:>7} skipped ({r['skipped']})")
                continue
            for m in sorted({k.rsplit("_", 1)[0] for k in r if k.endswith(("_ms", "_error"))}):
                sp, bs = r.get(f"{m}_sparsity"), r.get(f"{m}_block_share")
                sp = f"{sp:8.3f}" if sp is not None else f"{'-':>8}"
                bs = f"{bs:6.3f}" if bs is not None else f"{'-':>6}"
                err = f"  {r[f'{m}_error']}" if f"{m}_error" in r else ""
                print(f"{r['tokens']:>7} {r['top_k']:>5} {m:>15} {sp} {bs} {f(r.get(f'{m}_ms'))} {f(r.get(f'{m}_peak_mb'))}{err}",
                      flush=True)
                if f"{m}_breakdown" in r:
                    b = r[f"{m}_breakdown"]
                    print("        stages ms (peak MB): " + ", ".join(
                        f"{st} {b[f'{st}_ms']:.1f}" + (f" ({b[f'{st}_peak_mb']:.0f})" if b.get(f"{st}_peak_mb") is not None else "")
                        for st in ("routing", "block_lists", "forward", "backward")), flush=True)
    elif name == "train":
        print(f"deepspeed, 1 GPU, bf16, {res['steps']} steps: exit {res['rc']}, {res['wall_s']:.1f} s, "
              f"loss {res['first_loss']} -> {res['last_loss']}, {res['tokens_per_s']} tok/s", flush=True)
        if res["rc"]:
            print(res["log_tail"], flush=True)


def main(argv: list[str] | None = None) -> int:
    import traceback

    a = parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print(NO_GPU, file=sys.stderr)
        return 1
    if a.device == "cpu":
        from unified_wm.model.attention_triton import interpreted

        if not interpreted():
            raise ValueError("uwm bench gpu --device cpu runs the Triton kernels under their interpreter: set TRITON_INTERPRET=1")
        a.skip.add("train")
    dev = torch.device(a.device)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t_start = time.time()
    deadline = lambda: bool(a.deadline_s) and time.time() - t_start > a.deadline_s  # noqa: E731
    result: dict = {"device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu (Triton interpreter)",
                    "torch": torch.__version__, "args": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(a).items()}}
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        result["triton"] = None
    out = Path(a.out)
    ok = True
    parts = {"correctness": lambda: correctness(a, dev), "speed": lambda: speed(a, dev, deadline), "train": lambda: train(a)}
    for name, fn in parts.items():
        if name in a.skip:
            continue
        if deadline():
            result[name] = {"error": "skipped: --deadline-s passed"}
        else:
            t0 = time.time()
            try:
                result[name] = fn()
            except Exception as e:  # noqa: BLE001 -- recorded; the next part still runs
                result[name] = {"error": f"{type(e).__name__}: {e}"[:1000], "traceback": traceback.format_exc()[-4000:]}
                print(result[name]["traceback"], file=sys.stderr, flush=True)
            result[f"{name}_s"] = round(time.time() - t0, 1)
        _print_part(name, result[name])
        ok = ok and not (isinstance(result[name], dict) and ("error" in result[name] or result[name].get("rc", 0)))
        out.write_text(json.dumps(result, indent=2))
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0 if ok else 1
