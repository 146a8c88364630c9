"""``uwm demo``: the whole path once, on the embedded default, each stage as the command a user would type.

data (procedural world) -> text + video tokenizers -> processor -> token documents ->
deepspeed on 2 CPU ranks (ZeRO-2) -> Hugging Face folder -> rollout video -> quick eval.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from unified_wm.distributed import free_port
from unified_wm.utils import usable_cpus


def run(cmd: list[str], log: list) -> None:
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    t0 = time.time()
    r = subprocess.run(cmd)
    dt = time.time() - t0
    log.append({"cmd": shlex.join(cmd), "seconds": round(dt, 1), "rc": r.returncode})
    if r.returncode != 0:
        raise SystemExit(f"demo: step failed (exit {r.returncode}): {shlex.join(cmd)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="uwm demo", description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="runs/demo")
    ap.add_argument("--recipe", default="recipes/tiny_cpu.yaml")
    ap.add_argument("--deepspeed-config", default="ds_configs/zero2.json")
    ap.add_argument("--num-ranks", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=None, help="override the recipe's step count")
    a = ap.parse_args(argv)
    w = Path(a.workdir)
    py = sys.executable
    uwm = [py, "-m", "unified_wm.cli"]
    log: list = []
    t_start = time.time()
    if w.exists():
        import shutil

        print(f"demo: starting afresh, removing the previous '{w}'", flush=True)
        shutil.rmtree(w)
    run(uwm + ["data", "gen-world", "--config", "recipes/data/world_tiny.yaml", "--out", str(w / "data")], log)
    run(uwm + ["data", "gen-world", "--config", "recipes/data/world_tiny.yaml", "--out", str(w / "data_val"),
               "--episodes", "16", "--seed", "0", "--split", "val"], log)
    run(uwm + ["data", "gen-world", "--config", "recipes/data/world_tiny.yaml", "--out", str(w / "probe_offscreen"),
               "--episodes", "8", "--split", "probe_offscreen"], log)
    run(uwm + ["tokenizer", "train-text", "--config", "tokenizers/text_captions.yaml", "--data", str(w / "data"),
               "--out", str(w / "tokenizers" / "text.model")], log)
    # the stages run one at a time, so the tokenizer may use every core (its config's 1 thread suits shared cores)
    run(uwm + ["tokenizer", "train-video", "--config", "tokenizers/video_fsq_tiny.yaml", "--data", str(w / "data"),
               "--out", str(w / "tokenizers" / "video"), "--threads", str(usable_cpus())], log)
    run(uwm + ["tokenizer", "build-processor", "--config", "tokenizers/processor.yaml", "--text", str(w / "tokenizers" / "text.model"),
               "--video", str(w / "tokenizers" / "video"), "--out", str(w / "processor")], log)
    run(uwm + ["data", "tokenize", "--data", str(w / "data"), "--processor", str(w / "processor"), "--out", str(w / "tokens")], log)
    ds = shutil_which("deepspeed", py)
    train_cmd = [ds, "--num_gpus", str(a.num_ranks), "--master_port", str(free_port()), "--module", "unified_wm.train",
                 "--recipe", a.recipe, "--deepspeed", a.deepspeed_config, "--output-dir", str(w / "train"),
                 "--set", f"data.tokens={w / 'tokens'}", "--set", f"data.processor={w / 'processor'}"]
    if a.max_steps:
        train_cmd += ["--max-steps", str(a.max_steps)]
    run(train_cmd, log)
    run(uwm + ["export", "--checkpoint", str(w / "train" / "checkpoints"), "--out", str(w / "hf")], log)
    run(uwm + ["rollout", "--model", str(w / "hf"), "--prompt", "a red car drives right", "--actions", "right,right,stay",
               "--frames", "16", "--out", str(w / "rollout.mp4"), "--temperature", "0.8", "--top-k", "50"], log)
    # the controllability probe and the caption baseline learn from the training episodes (never scored)
    run(uwm + ["eval", "--model", str(w / "hf"), "--suite", "eval/quick.yaml", "--out", str(w / "eval"),
               "--data", str(w / "data_val"), "--offscreen-data", str(w / "probe_offscreen"),
               "--train-data", str(w / "data")], log)
    total = time.time() - t_start
    summary = {"workdir": str(w), "wall_seconds": round(total, 1), "steps": log}
    (w / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print("\n=== demo finished in %.1f s ===" % total)
    for s in log:
        print(f"  {s['seconds']:7.1f}s  {s['cmd'][:110]}")
    print(f"\nmodel: {w / 'hf'}\nvideo: {w / 'rollout.mp4'} (+ .gif, .png contact sheet)\neval:  {w / 'eval' / 'results.json'}")
    return 0


def shutil_which(name: str, py: str) -> str:
    cand = Path(py).parent / name
    if cand.exists():
        return str(cand)
    import shutil

    found = shutil.which(name)
    if not found:
        raise SystemExit(f"demo: the '{name}' launcher is not on PATH (pip install deepspeed)")
    return found


