"""Memory benchmark (``uwm bench memory``): one training step with and without activation
checkpointing (``train.gradient_checkpointing``); with ``--sp 1,2`` also sequence parallelism
(``train.sequence_parallel``, P gloo processes, each measured) and tiled MLP + loss
(``train.tiled_mlp`` / ``train.tiled_loss``).

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

With ``--sp``, each configuration of sequence-parallel degree x tiling x checkpointing runs
as P fresh processes (a gloo group, DeepSpeed's sequence-parallel groups); the figures are per
rank (the largest over the ranks), and the loss is the whole row's (the same on every rank).

  uwm bench memory --seq-len 8192 --out bench_memory.json
  uwm bench memory --seq-len 16384 --sp 1,2 --layers 2 --out bench_memory_sp.json
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


def _measure(job: dict, rank: int = 0, port: int = 0, queue=None) -> dict:
    from unified_wm import parallel
    from unified_wm.bench.train import layout, our_model, synthetic_stream
    from unified_wm.distributed import release_shm_buffer
    from unified_wm.train import enable_checkpointing

    sp = parallel.SequenceParallel()
    if job.get("sp", 1) > 1:
        import os

        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(job["sp"]), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
        release_shm_buffer(rank, job["sp"])
        sp, _ = parallel.init_sequence_parallel(job["sp"], rank, job["sp"])
    torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    lay = layout()
    shape = dict(hidden_size=job["hidden"], intermediate_size=job["intermediate"], num_hidden_layers=job["layers"],
                 num_attention_heads=job["heads"], num_key_value_heads=job["kv_heads"],
                 max_position_embeddings=max(job["seq_len"], 2048))
    model = our_model(shape, job["backend"], job["top_k"], lay)
    if job["checkpointing"]:
        enable_checkpointing(model)
    tiled = job.get("tiled", False)
    parallel.enable(model, sp, tiled_mlp=tiled, tiled_loss=tiled, tile_tokens=job.get("tile_tokens", 1024))
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
    res = {"sp": job.get("sp", 1), "tiled": tiled, "checkpointing": job["checkpointing"], "peak_rss_mb": max(peak - base, 0.0),
           "saved_mb": saved_mb, "step_s": dt, "loss": float(out.loss.detach())}
    if queue is not None:
        queue.put((rank, res))
    return res


def _run(job: dict) -> dict:
    ctx = mp.get_context("spawn")
    if job.get("sp", 1) <= 1:
        with ctx.Pool(1) as pool:
            return pool.apply(_measure, (job,))
    from unified_wm.distributed import free_port

    port = free_port()
    queue = ctx.Queue()
    procs = [ctx.Process(target=_measure, args=(job, r, port, queue)) for r in range(job["sp"])]
    for p in procs:
        p.start()
    got = dict(queue.get() for _ in procs)
    for p in procs:
        p.join()
    rows = [got[r] for r in sorted(got)]
    worst = max(rows, key=lambda r: r["peak_rss_mb"])
    return {**worst, "saved_mb": max(r["saved_mb"] for r in rows), "step_s": max(r["step_s"] for r in rows),
            "per_rank": rows}


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
    ap.add_argument("--sp", default=None, help="sequence-parallel degrees to compare, e.g. 1,2 (adds tiling on/off)")
    ap.add_argument("--tile-tokens", type=int, default=1024, help="tokens per tile of the tiled MLP and loss")
    ap.add_argument("--out", default=None, help="write results as JSON here")
    a = ap.parse_args(argv)
    if a.seq_len <= 256:
        raise ValueError(f"--seq-len must be > 256 (the warm-up row), got {a.seq_len}")
    job = dict(seq_len=a.seq_len, backend=a.backend, top_k=a.top_k, hidden=a.hidden, intermediate=a.intermediate,
               layers=a.layers, heads=a.heads, kv_heads=a.kv_heads, threads=a.threads)
    if a.sp:
        return _main_sp(a, job)
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


def _main_sp(a, job: dict) -> int:
    degrees = [int(x) for x in str(a.sp).split(",")]
    for d in degrees:
        from unified_wm.parallel import check_sequence_parallel

        check_sequence_parallel(d, seq_len=a.seq_len, heads=a.heads, kv_heads=a.kv_heads)
    rows = []
    for d in degrees:
        for tiled in (False, True):
            for ckpt in (False, True):
                rows.append(_run(dict(job, sp=d, tiled=tiled, tile_tokens=a.tile_tokens, checkpointing=ckpt,
                                      threads=max(1, a.threads // d))))
    print(f"one training step, {a.seq_len} tokens, {a.layers} layers x {a.hidden} wide, attention {a.backend}; per rank")
    print(f"{'SP':>3} {'tiled':>6} {'ckpt':>6} {'peak RSS MB':>12} {'saved MB':>9} {'step s':>7} {'loss':>8}")
    for r in rows:
        print(f"{r['sp']:>3} {str(r['tiled']):>6} {str(r['checkpointing']):>6} {r['peak_rss_mb']:12.1f} {r['saved_mb']:9.1f} "
              f"{r['step_s']:7.2f} {r['loss']:8.4f}")
    base = {(r["tiled"], r["checkpointing"]): r for r in rows if r["sp"] == 1}
    for r in rows:
        b = base.get((r["tiled"], r["checkpointing"]))
        if r["sp"] > 1 and b is not None:
            print(f"SP={r['sp']} vs SP=1 (tiled={r['tiled']}, checkpointing={r['checkpointing']}): peak RSS per rank "
                  f"x{r['peak_rss_mb'] / max(b['peak_rss_mb'], 1e-9):.2f}, saved activations per rank "
                  f"x{r['saved_mb'] / max(b['saved_mb'], 1e-9):.2f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"config": {**job, "sp": degrees, "tile_tokens": a.tile_tokens}, "results": rows}, f, indent=2)
    return 0
