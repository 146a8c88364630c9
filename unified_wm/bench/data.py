"""Benchmark: how fast the data engine makes data, and whether the packed loader keeps up
with training.

One run measures, on this machine:

* generation, frames per second (recorded frames / wall time, episode setup included):
  the procedural world (``recipes/data/world.yaml``), Atari (``recipes/data/atari_pong.yaml``,
  gymnasium + ale-py; warm-up steps are played but not recorded) and Doom
  (``recipes/data/doom.yaml``, ViZDoom); Atari and Doom are skipped, with the reason, when
  their package is not installed;
* storage: :func:`unified_wm.data.episodes.save_episodes` write MB/s and
  :func:`~unified_wm.data.episodes.stream_episodes` read frames/s of the world episodes;
* tokenization (offline, once per dataset): ``tokenize_dataset`` frames/s with a processor
  made here (SentencePiece on the episodes' captions; the FSQ video tokenizer of
  ``tokenizers/video_fsq_tiny.yaml`` at its initial weights: encoding costs the same
  trained or not);
* the packed loader against the model: ``unified_wm.data.packing.PackedBatches`` over those token
  documents with the recipe ``--recipe`` (default ``recipes/tiny_cpu.yaml``), producing
  micro-batches exactly as training does (``prepare_batch``: packing, chunk layout, loss
  weights), in tokens/s; and the recipe's model (``build_model``) consuming such batches,
  one forward + backward per micro-batch, in tokens/s. Both on ``--threads`` torch threads
  (the recipe's ``torch_threads``: what one rank of the demo gets). The loader runs in the
  training process between steps, so the ratio is the share of a step it would cost.

Prints a table and writes JSON (``--out``). Timing lives here, never in tests.

  uwm bench data --out bench_data.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]  # the checkout (recipes/, tokenizers/)


def _rate(n: float, seconds: float) -> float:
    return float(n) / seconds if seconds > 0 else float("inf")


def bench_world(n_episodes: int, config: Path) -> tuple[dict, list[dict]]:
    from unified_wm.data import world as W
    from unified_wm.data.episodes import episode_seeds

    cfg = W.as_config(config)
    seeds = episode_seeds("train", 0, n_episodes)
    t0 = time.perf_counter()
    eps = [W.generate_episode(cfg, s) for s in seeds]
    dt = time.perf_counter() - t0
    frames = sum(len(e["frames"]) for e in eps)
    return {"episodes": n_episodes, "frames": frames, "seconds": dt, "frames_per_s": _rate(frames, dt),
            "config": str(config)}, eps


def _time_source(source, cfg, runs: list[tuple[str, int]]) -> tuple[float, list[tuple[list[dict], float]]]:
    """Seconds to open the source's emulator, then (episodes, seconds) for each (split, count)."""
    from unified_wm.data.episodes import episode_seeds

    t0 = time.perf_counter()
    handle = source.open(cfg)
    t_make = time.perf_counter() - t0
    out = []
    try:
        for split, n in runs:
            t0 = time.perf_counter()
            eps = [source.generate_episode(cfg, s, split, handle) for s in episode_seeds(split, 0, n)]
            out.append((eps, time.perf_counter() - t0))
    finally:
        handle.close()
    return t_make, out


def bench_atari(n_episodes: int, config: Path) -> dict:
    from unified_wm.data import atari

    try:
        atari.require_ale()
    except atari.AtariUnavailable as e:
        return {"skipped": str(e)}
    cfg = atari.as_config(config)
    t_make, [(eps, dt)] = _time_source(atari.ATARI, cfg, [("train", n_episodes)])
    frames = sum(len(e["frames"]) for e in eps)
    steps = frames - n_episodes + n_episodes * cfg.warmup_steps
    return {"game": cfg.game, "episodes": n_episodes, "frames": frames, "seconds": dt, "frames_per_s": _rate(frames, dt),
            "env_steps_per_s": _rate(steps, dt), "warmup_steps": cfg.warmup_steps, "frameskip": cfg.frameskip,
            "make_env_s": t_make, "config": str(config)}


def bench_doom(n_episodes: int, n_probes: int, config: Path) -> dict:
    from unified_wm.data import doom

    try:
        doom.require_vizdoom()
    except doom.DoomUnavailable as e:
        return {"skipped": str(e)}
    cfg = doom.as_config(config)
    t_make, [(eps, dt), (probes, dtp)] = _time_source(doom.DOOM, cfg, [("train", n_episodes), ("probe_revisit", n_probes)])
    frames = sum(len(e["frames"]) for e in eps)
    pframes = sum(len(e["frames"]) for e in probes)
    exact = 0
    for p in probes:
        pr = json.loads(p["state"])["probe"]
        exact += int(np.array_equal(p["frames"][pr["first_visit_t"]], p["frames"][pr["return_t"]]))
    return {"scenario": doom.scenario_name(cfg), "episodes": n_episodes, "frames": frames, "seconds": dt,
            "frames_per_s": _rate(frames, dt), "tics_per_action": cfg.tics_per_action, "resolution": cfg.resolution,
            "make_game_s": t_make, "probe_episodes": n_probes, "probe_frames_per_s": _rate(pframes, dtp),
            "probe_return_frame_exact": exact, "config": str(config)}


def bench_storage(eps: list[dict], work: Path) -> tuple[dict, Path]:
    from unified_wm.data.episodes import save_episodes, stream_episodes

    raw = sum(e["frames"].nbytes for e in eps)
    h, w = eps[0]["frames"].shape[1:3]
    t0 = time.perf_counter()
    out = save_episodes(eps, work / "world", h, w, max_shard_size="16MB")
    dt_w = time.perf_counter() - t0
    on_disk = sum(p.stat().st_size for p in out.glob("data-*.arrow"))
    t0 = time.perf_counter()
    frames = sum(len(e["frames"]) for e in stream_episodes(out))
    dt_r = time.perf_counter() - t0
    return {"episodes": len(eps), "raw_frame_MB": raw / 1e6, "on_disk_MB": on_disk / 1e6, "disk_over_raw": on_disk / raw,
            "shards": len(list(out.glob("data-*.arrow"))), "write_MB_per_s": _rate(on_disk / 1e6, dt_w),
            "stream_read_frames_per_s": _rate(frames, dt_r)}, out


def build_processor(data_dir: Path, work: Path):
    import torch

    from unified_wm.data.episodes import load_episodes, stream_episodes
    from unified_wm.tokenization.actions import action_vocabulary
    from unified_wm.tokenization.processor import UnifiedProcessor
    from unified_wm.tokenization.text import train_text_tokenizer
    from unified_wm.tokenization.video import VideoTokenizer, VideoTokenizerConfig
    from unified_wm.utils import load_config

    texts = [c["text"] for ep in stream_episodes(load_episodes(data_dir), columns=["captions"]) for c in ep["captions"]]
    train_text_tokenizer(texts, work / "text.model", vocab_size=256)
    torch.manual_seed(0)
    vcfg = load_config(VideoTokenizerConfig, ROOT / "tokenizers" / "video_fsq_tiny.yaml")
    VideoTokenizer(vcfg).save_pretrained(work / "video")
    proc = UnifiedProcessor(work / "text.model", action_vocabulary(["pan5", "atari18"]), work / "video", max_chunk_len=64)
    proc.save_pretrained(work / "processor")
    return work / "processor"


def bench_loader_and_model(recipe_path: Path, tokens: Path, processor_dir: Path, work: Path, *, loader_steps: int,
                           train_steps: int, threads: int) -> dict:
    import torch

    from unified_wm.data.tokenize import load_token_documents
    from unified_wm.tokenization.processor import UnifiedProcessor
    from unified_wm.data.packing import PackedBatches, prepare_batch
    from unified_wm.recipe import build_model, load_recipe

    recipe = load_recipe(recipe_path, {"output_dir": str(work / "run"), "data": {"tokens": str(tokens), "processor": str(processor_dir)}})
    torch.set_num_threads(threads or recipe.train.torch_threads or torch.get_num_threads())
    torch.manual_seed(recipe.train.seed)
    processor = UnifiedProcessor.from_pretrained(processor_dir)
    docs = load_token_documents(tokens)
    task_names = list(recipe.tasks)
    model = build_model(recipe, processor)
    L, mbs = recipe.train.seq_len, recipe.train.micro_batch_size
    per_batch = L * mbs

    t0 = time.perf_counter()
    batches = PackedBatches(docs, recipe, 0, 1)
    rows = batches.epoch_rows(0)
    t_pack = time.perf_counter() - t0
    per_epoch = max(1, len(rows) // mbs)
    real = sum(len(r[0]) for r in rows)
    t0 = time.perf_counter()
    for i in range(loader_steps):
        prepare_batch(batches, i % per_epoch, model.config, recipe, task_names)
    t_load = time.perf_counter() - t0
    loader_tps = _rate(loader_steps * per_batch, t_load)
    # the whole epoch, packing included (what a fresh epoch costs, spread over its batches)
    epoch_tps = _rate(per_epoch * per_batch, t_pack + per_epoch * t_load / loader_steps)

    model.train()
    times = []
    for i in range(train_steps + 1):
        ids, labels, weights, _ = prepare_batch(batches, i % per_epoch, model.config, recipe, task_names)
        t0 = time.perf_counter()
        out = model(input_ids=ids, labels=labels, loss_weights=weights)
        out.loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    steady = times[1:]  # the first call pays one-off allocation
    train_tps = _rate(len(steady) * per_batch, sum(steady))
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "recipe": str(recipe_path), "seq_len": L, "micro_batch_size": mbs, "tasks": {n: recipe.tasks[n].weight for n in task_names},
        "attention_backend": recipe.attention.backend, "threads": torch.get_num_threads(), "model_params": n_params,
        "documents": len(docs), "epoch_rows": len(rows), "fill": real / (len(rows) * L), "pack_epoch_s": t_pack,
        "loader_steps": loader_steps, "loader_tokens_per_s": loader_tps, "loader_tokens_per_s_with_packing": epoch_tps,
        "train_steps": len(steady), "train_fwd_bwd_s": float(np.mean(steady)), "train_tokens_per_s": train_tps,
        "loader_over_train": loader_tps / train_tps, "loader_share_of_step": train_tps / loader_tps,
    }


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"
    return str(x)


def table(res: dict) -> str:
    rows = [("source / stage", "rate", "unit", "notes")]
    w = res["world"]
    rows.append(("world generation", _fmt(w["frames_per_s"]), "frames/s", f"{w['episodes']} episodes, {w['frames']} frames, world.yaml"))
    for key, name in (("atari", "atari generation"), ("doom", "doom generation")):
        r = res[key]
        if "skipped" in r:
            rows.append((name, "-", "", f"skipped: {r['skipped'][:80]}"))
        elif key == "atari":
            rows.append((name, _fmt(r["frames_per_s"]), "frames/s",
                         f"{r['game']}, {r['episodes']} eps x {r['frames'] // r['episodes']} frames + {r['warmup_steps']} warm-up steps; "
                         f"{_fmt(r['env_steps_per_s'])} env steps/s"))
        else:
            rows.append((name, _fmt(r["frames_per_s"]), "frames/s",
                         f"{r['scenario']}, {r['episodes']} eps, {r['resolution']} -> 64x64, {r['tics_per_action']} tics/action"))
            rows.append(("doom revisit probes", _fmt(r["probe_frames_per_s"]), "frames/s",
                         f"{r['probe_return_frame_exact']}/{r['probe_episodes']} return frames equal the first view"))
    s = res["storage"]
    rows.append(("episode write", _fmt(s["write_MB_per_s"]), "MB/s", f"{s['shards']} shards, disk/raw frames = {s['disk_over_raw']:.3f}"))
    rows.append(("episode stream read", _fmt(s["stream_read_frames_per_s"]), "frames/s", "stream_episodes"))
    t = res["tokenize"]
    rows.append(("tokenize (offline)", _fmt(t["frames_per_s"]), "frames/s", f"{t['documents']} documents, templates {','.join(t['templates'])}"))
    m = res["loader_vs_model"]
    rows.append(("packed loader", _fmt(m["loader_tokens_per_s"]), "tokens/s",
                 f"prepare_batch, {m['micro_batch_size']}x{m['seq_len']}, fill {m['fill']:.2f}"))
    rows.append(("packed loader + packing", _fmt(m["loader_tokens_per_s_with_packing"]), "tokens/s",
                 f"epoch packing {m['pack_epoch_s']:.3f}s for {m['epoch_rows']} rows"))
    rows.append(("tiny model fwd+bwd", _fmt(m["train_tokens_per_s"]), "tokens/s",
                 f"{m['model_params'] / 1e6:.2f}M params, {m['attention_backend']}, {m['threads']} thread(s), {m['train_fwd_bwd_s']:.2f}s/batch"))
    rows.append(("loader / training", f"{m['loader_over_train']:.0f}x", "", f"the loader costs {100 * m['loader_share_of_step']:.2f}% of a step"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [" | ".join(c.ljust(widths[i]) for i, c in enumerate(r)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="uwm bench data", description="Data engine throughput and packed loader vs model consumption.")
    ap.add_argument("--out", default="bench_data.json", help="JSON results (default bench_data.json)")
    ap.add_argument("--world-episodes", type=int, default=64)
    ap.add_argument("--atari-episodes", type=int, default=8)
    ap.add_argument("--doom-episodes", type=int, default=64)
    ap.add_argument("--doom-probes", type=int, default=32)
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "tiny_cpu.yaml"))
    ap.add_argument("--loader-steps", type=int, default=50)
    ap.add_argument("--train-steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: the recipe's train.torch_threads)")
    ap.add_argument("--work", default=None, help="folder for the intermediate datasets (default: a temporary one, removed)")
    a = ap.parse_args(argv)
    for name in ("world_episodes", "atari_episodes", "doom_episodes", "doom_probes", "loader_steps", "train_steps"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    recipe = Path(a.recipe)
    if not recipe.is_file():
        raise FileNotFoundError(f"recipe '{recipe}' does not exist")
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="uwm-bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        import torch

        from unified_wm.data.tokenize import tokenize_dataset
        from unified_wm.recipe import load_recipe

        res: dict = {"machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
                                 "load_avg_1m_start": os.getloadavg()[0]}}
        torch.set_num_threads(a.threads or load_recipe(recipe, {"output_dir": str(work / "run")}).train.torch_threads or torch.get_num_threads())
        print("world ...", flush=True)
        res["world"], eps = bench_world(a.world_episodes, ROOT / "recipes" / "data" / "world.yaml")
        print("atari ...", flush=True)
        res["atari"] = bench_atari(a.atari_episodes, ROOT / "recipes" / "data" / "atari_pong.yaml")
        print("doom ...", flush=True)
        res["doom"] = bench_doom(a.doom_episodes, a.doom_probes, ROOT / "recipes" / "data" / "doom.yaml")
        print("storage ...", flush=True)
        res["storage"], data_dir = bench_storage(eps, work)
        del eps
        print("processor + tokenize ...", flush=True)
        proc_dir = build_processor(data_dir, work)
        templates = list(load_recipe(recipe, {"output_dir": str(work / "run")}).tasks)  # the recipe's task mixture
        t0 = time.perf_counter()
        tokens = tokenize_dataset(data_dir, proc_dir, work / "tokens", clip_frames=16, templates=templates, progress=False)
        dt = time.perf_counter() - t0
        from unified_wm.data.tokenize import load_token_documents

        n_docs = len(load_token_documents(tokens))
        res["tokenize"] = {"seconds": dt, "frames": res["world"]["frames"], "frames_per_s": _rate(res["world"]["frames"], dt),
                           "documents": n_docs, "templates": templates}
        print("packed loader vs model ...", flush=True)
        res["loader_vs_model"] = bench_loader_and_model(recipe, tokens, proc_dir, work, loader_steps=a.loader_steps,
                                                        train_steps=a.train_steps, threads=a.threads)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    res["machine"]["load_avg_1m_end"] = os.getloadavg()[0]
    print()
    print(table(res))
    m = res["machine"]
    print(f"\n{m['cpus']} CPUs; 1-minute load average {m['load_avg_1m_start']:.1f} at the start, {m['load_avg_1m_end']:.1f} at the end "
          "(other jobs on the machine slow every rate here alike)")
    from unified_wm.utils import write_json

    write_json(a.out, res)
    print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
