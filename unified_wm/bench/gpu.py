"""The prepared GPU check (``uwm bench gpu``): one command, about 5 minutes on one GPU.

1. ``correctness``: the ``triton`` MoC backend vs the ``reference`` oracle (fp32, dense
   mask) in bf16 at real shapes on packed rows (two documents, text prompts, uneven last
   chunks): max abs error of the output and of dq, dk, dv.
2. ``speed``: forward + backward time (CUDA events, median of ``--repeats``) and peak
   memory (``torch.cuda.max_memory_allocated`` above the inputs) of one attention call,
   Triton MoC vs dense causal SDPA, at ``--lengths`` tokens; ``top_k`` is chosen per
   length (as in ``uwm bench attention``) for ``--sparsity`` of the causal pairs pruned,
   and the measured sparsity (routing statistics) is reported.
3. ``train``: ``--steps`` steps of a tiny_cpu-shaped recipe in bf16 (ZeRO-2) through the
   ``deepspeed`` launcher on one GPU (NCCL), on a tiny generated world dataset with an
   untrained video tokenizer (what tests/conftest.py builds); reports the loss and step time.

Writes one JSON file (``--out``) and prints a table. Without CUDA it exits with status 1
and says it needs a GPU. It has not been run on a GPU yet.

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
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=512, help="frame chunk length (tokens)")
    ap.add_argument("--text", type=int, default=64, help="text prompt tokens")
    ap.add_argument("--sparsity", type=float, default=0.85, help="target share of causal pairs pruned")
    ap.add_argument("--check-len", type=int, default=8192, help="tokens per row of the correctness check")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=50, help="deepspeed training steps")
    ap.add_argument("--recipe", default="recipes/tiny_cpu.yaml")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: correctness,speed,train")
    ap.add_argument("--out", default="bench_gpu.json")
    a = ap.parse_args(argv)
    a.lengths = [int(x) for x in a.lengths.split(",") if x]
    a.skip = {s for s in a.skip.split(",") if s}
    bad = a.skip - {"correctness", "speed", "train"}
    if bad:
        raise ValueError(f"--skip: unknown part '{sorted(bad)[0]}'; valid: correctness, speed, train")
    if a.heads % a.kv_heads:
        raise ValueError(f"--heads ({a.heads}) must be a multiple of --kv-heads ({a.kv_heads})")
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


def correctness(a) -> dict:
    from unified_wm.bench.attention import choose_k
    from unified_wm.model.attention import AttentionSettings, attend

    dev = torch.device("cuda")
    n = a.check_len
    meta = _packed_meta(n, a.chunk, a.text, dev)
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(1, h, n, a.head_dim, device=dev, generator=g, dtype=torch.bfloat16).requires_grad_()
               for h in (a.heads, a.kv_heads, a.kv_heads))
    top_k = choose_k(n, a.chunk, a.text, a.sparsity)
    cot = torch.randn(1, a.heads, n, a.head_dim, device=dev, generator=g)
    res = {}
    for name, qq, kk, vv in (("triton", q, k, v), ("reference", *(t.detach().float().requires_grad_() for t in (q, k, v)))):
        out = attend(qq, kk, vv, meta, meta, AttentionSettings(backend=name, top_k=top_k, n_sink=1))
        grads = torch.autograd.grad((out.float() * cot).sum(), (qq, kk, vv))
        res[name] = [t.detach().float() for t in (out, *grads)]
    err = {f"max_abs_err_{nm}": float((x - y).abs().max()) for nm, x, y in zip(("out", "dq", "dk", "dv"), res["triton"], res["reference"])}
    scale = {f"max_abs_{nm}": float(y.abs().max()) for nm, y in zip(("out", "dq", "dk", "dv"), res["reference"])}
    return {"tokens": n, "top_k": top_k, "dtype": "bf16 (oracle fp32)", **err, **scale}


def _time(fn, repeats: int) -> tuple[float, float]:
    """(median ms of fn(), peak MB allocated above the memory held before the calls)."""
    fn()  # compile / warm up
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    return times[len(times) // 2], (torch.cuda.max_memory_allocated() - base) / 2**20


def speed(a) -> list[dict]:
    import torch.nn.functional as F

    from unified_wm.bench.attention import choose_k, layout
    from unified_wm.model.attention import AttentionSettings, attend

    dev = torch.device("cuda")
    rows = []
    for n in a.lengths:
        meta = layout(n, a.chunk, a.text)
        meta = type(meta)(*(t.to(dev) for t in (meta.chunk_ids, meta.doc_ids, meta.is_text, meta.pos_in_doc, meta.positions)))
        top_k = choose_k(n, a.chunk, a.text, a.sparsity)
        q, k, v = (torch.randn(1, h, n, a.head_dim, device=dev, dtype=torch.bfloat16).requires_grad_()
                   for h in (a.heads, a.kv_heads, a.kv_heads))
        s = AttentionSettings(backend="triton", top_k=top_k, n_sink=1)
        stats: dict = {}
        with torch.no_grad():
            attend(q, k, v, meta, meta, s, stats=stats)

        def moc():
            attend(q, k, v, meta, meta, s, training=True).backward(torch.ones(q.shape, device=dev, dtype=q.dtype))

        def dense():
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).backward(
                torch.ones(q.shape, device=dev, dtype=q.dtype))

        row = {"tokens": n, "top_k": top_k, "measured_sparsity": stats["moc_sparsity"]}
        for name, fn in (("triton_moc", moc), ("dense_sdpa", dense)):
            try:
                ms, mb = _time(fn, a.repeats)
                row[f"{name}_ms"], row[f"{name}_peak_mb"] = ms, mb
            except torch.cuda.OutOfMemoryError:
                row[f"{name}_ms"] = row[f"{name}_peak_mb"] = None
            q.grad = k.grad = v.grad = None
            torch.cuda.empty_cache()
        rows.append(row)
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
        ds = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
        cmd = [ds, "--num_gpus", "1", "--master_port", str(free_port()), "--module", "unified_wm.train",
               "--recipe", str(ROOT / a.recipe), "--deepspeed", str(ROOT / "ds_configs/zero2_bf16.json"),
               "--output-dir", str(work / "train"), "--max-steps", str(a.steps),
               "--set", f"data.tokens={tokens}", "--set", f"data.processor={processor}",
               "--set", "train.save_every=0", "--set", "train.torch_threads=0", "--set", "train.log_every=10"]
        t0 = time.time()
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        wall = time.time() - t0
        log = r.stdout + r.stderr
        losses = [float(x) for x in re.findall(r"step\s+\d+ loss ([0-9.]+)", log)]
        return {"cmd": " ".join(cmd), "rc": r.returncode, "wall_s": wall, "steps": a.steps,
                "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
                "log_tail": log[-3000:]}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_GPU, file=sys.stderr)
        return 1
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "args": {
        k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(a).items()}}
    if "correctness" not in a.skip:
        result["correctness"] = c = correctness(a)
        print(f"correctness ({c['tokens']} tokens, bf16 vs fp32 oracle): max abs err out {c['max_abs_err_out']:.3g} "
              f"dq {c['max_abs_err_dq']:.3g} dk {c['max_abs_err_dk']:.3g} dv {c['max_abs_err_dv']:.3g}")
    if "speed" not in a.skip:
        result["speed"] = rows = speed(a)
        print(f"{'tokens':>8} {'top_k':>6} {'sparsity':>9} {'MoC ms':>9} {'MoC MB':>9} {'SDPA ms':>9} {'SDPA MB':>9}")
        f = lambda x: f"{x:9.1f}" if x is not None else f"{'OOM':>9}"  # noqa: E731
        for r in rows:
            print(f"{r['tokens']:>8} {r['top_k']:>6} {r['measured_sparsity']:9.3f} {f(r['triton_moc_ms'])} "
                  f"{f(r['triton_moc_peak_mb'])} {f(r['dense_sdpa_ms'])} {f(r['dense_sdpa_peak_mb'])}")
    if "train" not in a.skip:
        result["train"] = t = train(a)
        print(f"deepspeed, 1 GPU, bf16, {t['steps']} steps: exit {t['rc']}, {t['wall_s']:.1f} s, "
              f"loss {t['first_loss']} -> {t['last_loss']}")
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {a.out}")
    ok = result.get("train", {}).get("rc", 0) == 0
    return 0 if ok else 1
