"""Memory benchmark (``uwm bench memory``): one training step with and without activation
checkpointing (``train.gradient_checkpointing``).

Each configuration runs in a fresh spawned process: build the model (the tiny_cpu shape
by default; ``moc`` = the compiled ``gather`` kernel on CPU), warm up on a short row, then
one forward + backward on a ``--seq-len`` stream (the synthetic layout of ``uwm bench
train``) and report:

* ``peak_rss_mb``: the process's peak resident memory (``ru_maxrss``) minus its resident
  memory just before the step. Everything the step touched: activations kept for the
  backward, the backward's own buffers, gradients, allocator caching. (torch has no
  allocator statistics on CPU; tracemalloc does not see torch's allocations.)
* ``saved_mb``: bytes of the tensors autograd saved for the backward during the forward
  (each storage counted once, via ``torch.autograd.graph.saved_tensors_hooks``): exactly
  the memory checkpointing is meant to cut (with it, only each Block's input is saved).
* ``step_s``: seconds of the step (the recompute costs about one extra forward).

  uwm bench memory --seq-len 8192 --out bench_memory.json
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time

import torch


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _measure(job: dict) -> dict:
    from unified_wm.bench.train import layout, our_model, synthetic_stream
    from unified_wm.train import enable_checkpointing

    torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    lay = layout()
    shape = dict(hidden_size=job["hidden"], intermediate_size=job["intermediate"], num_hidden_layers=job["layers"],
                 num_attention_heads=job["heads"], num_key_value_heads=job["kv_heads"],
                 max_position_embeddings=max(job["seq_len"], 2048))
    model = our_model(shape, job["backend"], job["top_k"], lay)
    if job["checkpointing"]:
        enable_checkpointing(model)
    model.train()
    warm = synthetic_stream(256, lay)
    model(input_ids=warm, labels=warm).loss.backward()  # first-call costs (kernel load, allocator)
    model.zero_grad(set_to_none=False)  # gradient buffers exist before the measurement in both runs
    ids = synthetic_stream(job["seq_len"], lay)
    saved: dict[int, int] = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            saved[st.data_ptr()] = st.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    base = _rss_mb()
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=ids, labels=ids)
    saved_mb = sum(saved.values()) / 2**20
    out.loss.backward()
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"checkpointing": job["checkpointing"], "peak_rss_mb": max(peak - base, 0.0), "saved_mb": saved_mb,
            "step_s": dt, "loss": float(out.loss.detach())}


def _run(job: dict) -> dict:
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_measure, (job,))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="uwm bench memory", description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--backend", default="moc", help="attention backend (moc: the compiled gather kernel on CPU)")
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write results as JSON here")
    a = ap.parse_args(argv)
    if a.seq_len <= 256:
        raise ValueError(f"--seq-len must be > 256 (the warm-up row), got {a.seq_len}")
    job = dict(seq_len=a.seq_len, backend=a.backend, top_k=a.top_k, hidden=a.hidden, intermediate=a.intermediate,
               layers=a.layers, heads=a.heads, kv_heads=a.kv_heads, threads=a.threads)
    rows = [_run(dict(job, checkpointing=c)) for c in (False, True)]
    print(f"one training step, {a.seq_len} tokens, {a.layers} layers x {a.hidden} wide, attention {a.backend}")
    print(f"{'checkpointing':>13} {'peak RSS MB':>12} {'saved MB':>9} {'step s':>7} {'loss':>8}")
    for r in rows:
        print(f"{str(r['checkpointing']):>13} {r['peak_rss_mb']:12.1f} {r['saved_mb']:9.1f} {r['step_s']:7.2f} {r['loss']:8.4f}")
    off, on = rows
    print(f"checkpointing: peak RSS x{on['peak_rss_mb'] / max(off['peak_rss_mb'], 1e-9):.2f}, "
          f"saved activations x{on['saved_mb'] / max(off['saved_mb'], 1e-9):.2f}, step time x{on['step_s'] / off['step_s']:.2f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"config": job, "results": rows}, f, indent=2)
    return 0
