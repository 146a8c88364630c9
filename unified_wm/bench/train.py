"""Training benchmark (``uwm bench train``): one run, three questions, on this machine.

1. ``vs_llama``: tokens/s of one training step (forward + backward + AdamW) of our model
   with the ``dense`` attention backend vs transformers' ``LlamaForCausalLM`` of the same
   shape (hidden, layers, heads, KV heads, MLP, vocabulary, tied embeddings) at the same
   sequence length, both with SDPA attention. Target >= 1.0x.
2. ``moc_vs_dense``: the same step of our model with ``moc`` (the ``gather`` backend on
   CPU) vs ``dense`` at a long context (default 16384 tokens). Target >= 2x.
3. ``zero_memory``: per-rank bytes of parameters + optimizer state under ZeRO-0 vs ZeRO-3
   with 2 ranks (the real ``deepspeed`` launcher, CPU/gloo). Counted from the tensors each
   rank holds after two training steps: the module's parameters (ZeRO-3: their
   ``ds_tensor`` partitions and any persistent full copies), the wrapped torch optimizer's
   parameters (fp32 master partitions) and its state (Adam moments), each storage counted
   once. The peak RSS of each rank is reported beside it, for context. Target <= 0.6x.

Input: a synthetic stream built by the processor's layout rules (``stream_layout`` in the
model file): ``<bos> <text> ... </text>``, then repeated ``<frame>`` + 64 video codes and
``<act> a </act>``, so every frame is one 64-token MoC chunk. Prints a table, writes JSON.

  uwm bench train --out bench_train.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from unified_wm.distributed import free_port

N_SPECIAL = 16
PAD, BOS, EOS, TEXT_OPEN, TEXT_CLOSE, ACT_OPEN, ACT_CLOSE, FRAME = range(8)


def layout(n_text: int = 256, n_actions: int = 32, n_codes: int = 1000) -> dict:
    t0 = N_SPECIAL
    a0 = t0 + n_text
    v0 = a0 + n_actions
    return dict(vocab_size=v0 + n_codes, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, text_open_id=TEXT_OPEN,
                text_close_id=TEXT_CLOSE, act_open_id=ACT_OPEN, act_close_id=ACT_CLOSE, frame_id=FRAME,
                text_range=[t0, a0], action_range=[a0, v0], video_range=[v0, v0 + n_codes],
                tokens_per_frame=64, tokens_per_action=1, max_chunk_len=64)


def synthetic_stream(n: int, lay: dict, batch: int = 1, seed: int = 0, text_len: int = 30) -> torch.Tensor:
    """``[batch, n]`` ids: one document per row, a caption then (frame of 64 codes, action) pairs."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        t0, t1 = lay["text_range"]
        a0, a1 = lay["action_range"]
        v0, v1 = lay["video_range"]
        ids = [BOS, TEXT_OPEN] + torch.randint(t0, t1, (text_len,), generator=g).tolist() + [TEXT_CLOSE]
        while len(ids) < n:
            ids += [FRAME] + torch.randint(v0, v1, (64,), generator=g).tolist()
            ids += [ACT_OPEN, int(torch.randint(a0, a1, (1,), generator=g)), ACT_CLOSE]
        rows.append(ids[:n])
    return torch.tensor(rows)


def our_model(shape: dict, backend: str, top_k: int, lay: dict):
    from unified_wm.model.modeling_uwm import UnifiedWMConfig, UnifiedWMForCausalLM

    cfg = UnifiedWMConfig(**shape, **lay, attention={"backend": backend, "top_k": top_k, "n_sink": 1})
    return UnifiedWMForCausalLM(cfg)


def llama_model(shape: dict, lay: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=lay["vocab_size"], hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
                      num_hidden_layers=shape["num_hidden_layers"], num_attention_heads=shape["num_attention_heads"],
                      num_key_value_heads=shape["num_key_value_heads"], max_position_embeddings=shape["max_position_embeddings"],
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
                      pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg)


def time_steps(model, ids: torch.Tensor, warmup: int, steps: int) -> dict:
    """Seconds per training step (forward + backward + AdamW), median of ``steps`` after ``warmup``."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
    times.sort()
    med = times[len(times) // 2]
    return {"s_per_step": med, "tokens_per_s": ids.numel() / med, "all_s": times, "loss": float(out.loss.detach())}


def moc_sparsity(model, ids) -> float | None:
    from unified_wm.model.attention_routing import summarize_routing

    with torch.no_grad():
        out = model(input_ids=ids, return_routing_stats=True)
    return summarize_routing(out.routing_stats or {}).get("moc_sparsity")


# ----------------------------------------------------------------------------- ZeRO memory (2 ranks)
def _storage_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor) or t.numel() == 0:
            continue
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def _inner_torch_optimizer(opt):
    """The torch optimizer DeepSpeed wraps (ZeRO optimizers keep it in ``.optimizer``)."""
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


def zero_worker(a) -> int:
    """One rank under the deepspeed launcher: train two steps under ZeRO ``a.stage``, count bytes."""
    import deepspeed

    from unified_wm.distributed import setup_distributed

    torch.set_num_threads(1)
    rank, world = setup_distributed()
    shape = json.loads(a.shape)
    lay = layout()
    torch.manual_seed(0)
    model = our_model(shape, "dense", 4, lay)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": world,
           "gradient_clipping": 1.0, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
           "zero_optimization": {"stage": a.stage}}
    if a.stage == 3:  # partition every weight (DeepSpeed keeps params under 1e5 elements whole by default)
        cfg["zero_optimization"].update(stage3_param_persistence_threshold=10 * shape["hidden_size"])
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    ids = synthetic_stream(a.seq_len, lay, seed=rank)
    for _ in range(2):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    params = []
    for p in engine.module.parameters():
        params.append(p.data)
        params.append(getattr(p, "ds_tensor", None))
    inner = _inner_torch_optimizer(engine.optimizer)
    masters = [p for g in inner.param_groups for p in g["params"]]
    states = [v for st in inner.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    rec = {"rank": rank, "stage": a.stage, "n_params": n_params,
           "param_bytes": _storage_bytes(params),
           "param_plus_master_bytes": _storage_bytes(params + masters),
           "optimizer_state_bytes": _storage_bytes(states),
           "total_bytes": _storage_bytes(params + masters + states),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    Path(a.worker_out).mkdir(parents=True, exist_ok=True)
    (Path(a.worker_out) / f"stage{a.stage}_rank{rank}.json").write_text(json.dumps(rec))
    return 0


def zero_memory(shape: dict, seq_len: int, tmp: Path) -> dict:
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    if not Path(deepspeed).exists():
        import shutil

        deepspeed = shutil.which("deepspeed") or "deepspeed"
    out: dict = {}
    for stage in (0, 3):
        port = free_port()
        cmd = [deepspeed, "--num_gpus", "2", "--master_port", str(port), "--module", "unified_wm.bench.train",
               "--zero-worker", "--stage", str(stage), "--shape", json.dumps(shape), "--seq-len", str(seq_len),
               "--worker-out", str(tmp)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            raise RuntimeError(f"ZeRO-{stage} worker failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        out[f"zero{stage}"] = [json.loads((tmp / f"stage{stage}_rank{k}.json").read_text()) for k in range(2)]
    z0 = max(x["total_bytes"] for x in out["zero0"])
    z3 = max(x["total_bytes"] for x in out["zero3"])
    out["ratio_zero3_over_zero0"] = z3 / z0
    return out


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="uwm bench train", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench_train.json", help="JSON results")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the single-process timings")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--seq-len", type=int, default=2048, help="sequence length of the Llama comparison")
    ap.add_argument("--batch", type=int, default=2, help="rows per step in the Llama comparison")
    ap.add_argument("--long", type=int, default=16384, help="sequence length of the MoC vs dense comparison")
    ap.add_argument("--long-hidden", type=int, default=192, help="model width at the long context (tiny_cpu shape)")
    ap.add_argument("--long-layers", type=int, default=4)
    ap.add_argument("--long-heads", type=int, default=6)
    ap.add_argument("--long-intermediate", type=int, default=512)
    ap.add_argument("--top-k", type=int, default=4, help="MoC routed chunks per query (the recipes' value)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--long-steps", type=int, default=2)
    ap.add_argument("--zero-seq-len", type=int, default=512)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: llama,long,zero")
    # internal: one rank of the ZeRO memory measurement (started by the deepspeed launcher)
    ap.add_argument("--zero-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--stage", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--shape", default="{}", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default="", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.zero_worker:
        return zero_worker(a)
    skip = {s for s in a.skip.split(",") if s}
    bad = skip - {"llama", "long", "zero"}
    if bad:
        raise ValueError(f"--skip: unknown part '{sorted(bad)[0]}'; valid: llama, long, zero")
    torch.set_num_threads(a.threads)
    lay = layout()
    shape = dict(hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=a.layers,
                 num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, max_position_embeddings=max(a.seq_len, a.long))
    res: dict = {"machine": {"threads": a.threads, "cpus": os.cpu_count(), "torch": torch.__version__},
                 "stream": "caption of 30 text tokens, then (<frame> + 64 codes, <act> a </act>) repeated"}
    rows = []
    if "llama" not in skip:
        ids = synthetic_stream(a.seq_len, lay, batch=a.batch)
        torch.manual_seed(0)
        ours = time_steps(our_model(shape, "dense", a.top_k, lay), ids, a.warmup, a.steps)
        torch.manual_seed(0)
        llama = time_steps(llama_model(shape, lay), ids, a.warmup, a.steps)
        res["vs_llama"] = {"shape": shape, "seq_len": a.seq_len, "batch": a.batch, "ours_dense": ours, "llama": llama,
                           "speedup": ours["tokens_per_s"] / llama["tokens_per_s"]}
        rows.append((f"ours dense vs LlamaForCausalLM, {a.batch}x{a.seq_len} tok", f"{ours['tokens_per_s']:.0f}",
                     f"{llama['tokens_per_s']:.0f}", f"{res['vs_llama']['speedup']:.2f}x", ">= 1.0x"))
        print(f"[vs_llama] ours {ours['tokens_per_s']:.0f} tok/s, llama {llama['tokens_per_s']:.0f} tok/s", flush=True)
    if "long" not in skip:
        lshape = dict(hidden_size=a.long_hidden, intermediate_size=a.long_intermediate, num_hidden_layers=a.long_layers,
                      num_attention_heads=a.long_heads, num_key_value_heads=2, max_position_embeddings=a.long)
        ids = synthetic_stream(a.long, lay, batch=1)
        torch.manual_seed(0)
        moc_model = our_model(lshape, "moc", a.top_k, lay)
        sparsity = moc_sparsity(moc_model, ids)
        moc = time_steps(moc_model, ids, a.warmup, a.long_steps)
        del moc_model
        torch.manual_seed(0)
        dense = time_steps(our_model(lshape, "dense", a.top_k, lay), ids, a.warmup, a.long_steps)
        res["moc_vs_dense"] = {"shape": lshape, "seq_len": a.long, "top_k": a.top_k, "moc_sparsity": sparsity,
                               "moc": moc, "dense": dense, "speedup": moc["tokens_per_s"] / dense["tokens_per_s"]}
        sp = f", sparsity {sparsity:.2f}" if sparsity is not None else ""
        rows.append((f"ours moc vs ours dense, 1x{a.long} tok (k={a.top_k}{sp})", f"{moc['tokens_per_s']:.0f}",
                     f"{dense['tokens_per_s']:.0f}", f"{res['moc_vs_dense']['speedup']:.2f}x", ">= 2.0x"))
        print(f"[moc_vs_dense] moc {moc['tokens_per_s']:.0f} tok/s, dense {dense['tokens_per_s']:.0f} tok/s", flush=True)
    if "zero" not in skip:
        with tempfile.TemporaryDirectory() as tmp:
            z = zero_memory(shape, a.zero_seq_len, Path(tmp))
        res["zero_memory"] = z
        z0 = max(x["total_bytes"] for x in z["zero0"]) / 2**20
        z3 = max(x["total_bytes"] for x in z["zero3"]) / 2**20
        rows.append(("params+optimizer per rank, ZeRO-3 vs ZeRO-0 (2 ranks), MiB", f"{z3:.1f}", f"{z0:.1f}",
                     f"{z['ratio_zero3_over_zero0']:.2f}x", "<= 0.6x"))
    w = max([len(r[0]) for r in rows] + [10])
    print(f"\n{'comparison':<{w}} | {'ours/new':>10} | {'baseline':>10} | {'ratio':>7} | target")
    print("-" * (w + 48))
    for r in rows:
        print(f"{r[0]:<{w}} | {r[1]:>10} | {r[2]:>10} | {r[3]:>7} | {r[4]}")
    if "zero_memory" in res:
        for st in ("zero0", "zero3"):
            for x in res["zero_memory"][st]:
                print(f"  {st} rank {x['rank']}: params {x['param_bytes'] / 2**20:.1f} MiB, params+fp32 master "
                      f"{x['param_plus_master_bytes'] / 2**20:.1f} MiB, optimizer state {x['optimizer_state_bytes'] / 2**20:.1f} MiB, "
                      f"peak RSS {x['peak_rss_mb']:.0f} MB")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    tmp_out = Path(a.out).with_name(f".{Path(a.out).name}.tmp")
    tmp_out.write_text(json.dumps(res, indent=2, default=float))
    os.replace(tmp_out, a.out)
    print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
