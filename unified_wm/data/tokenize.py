"""Pre-tokenize an episode dataset into token documents (Hugging Face ``datasets``, Arrow).

Each episode is cut into clips of at most ``clip_frames`` frames; each clip becomes one
document per task template. Columns: ``input_ids`` (int32), ``loss_mask`` (int8: which
tokens are targets in this template), ``template``, ``episode_id``, ``seed``, ``split``.
Training packs documents into fixed-length rows (``unified_wm.train``).

``tokenize_dataset`` cuts the episodes into fixed ranges (``shard_episodes`` episodes each)
and tokenizes the ranges in ``workers`` processes. Each finished range is written, as one
Arrow file renamed into place, into a work folder next to the output
(``.<out name>.work/``). When every range is done the shards are joined, in episode order,
into one dataset that is renamed into place as ``out``, and the work folder is removed. The
result does not depend on the number of workers. After an interruption (Ctrl-C, a crash,
a bad episode) the output does not exist yet and the work folder keeps the finished shards:
the same command with ``resume=True`` (``--resume``) tokenizes only the missing ranges. The
work folder records the inputs (dataset, processor, clip length, templates, shard size); a
resume with other inputs is refused with a message naming what changed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from unified_wm.sequence import DEFAULT_TEMPLATES, TEMPLATES, StreamBuilder
from unified_wm.utils import OVERWRITE_HELP

WORK_FORMAT = 1
SHARD_PATTERN = "shard-{:05d}.arrow"


def token_features():
    import datasets

    return datasets.Features({
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "loss_mask": datasets.Sequence(datasets.Value("int8")),
        "template": datasets.Value("string"),
        "episode_id": datasets.Value("string"),
        "seed": datasets.Value("int64"),
        "split": datasets.Value("string"),
    })


def episode_documents(processor, ep: dict, templates=DEFAULT_TEMPLATES, clip_frames: int = 16, frame_ids=None):
    """Yield token documents (dict rows) for one episode."""
    if getattr(processor, "tokens_per_action", 1) != 1:
        raise ValueError(
            f"episode datasets hold named actions (one token per <act> segment), but this processor's <act> segments "
            f"hold {processor.tokens_per_action} tokens (a continuous action space); tokenize with a processor "
            f"whose tokens_per_action is 1"
        )
    builder = StreamBuilder(processor)
    if frame_ids is None:
        frame_ids = processor.encode_frames(ep["frames"])
    actions = [processor.encode_actions([a]) for a in ep["actions"]]
    T = len(frame_ids)
    step = max(1, clip_frames)
    for start in range(0, max(1, T - 1), step):
        end = min(T, start + clip_frames)
        if end - start < 2:
            break
        caps = [{"t": int(c["t"]) - start, "text": c["text"]} for c in ep["captions"] if start <= int(c["t"]) < end]
        if not any(c["t"] == 0 for c in caps):  # keep the episode description as the clip's prompt
            first = [c for c in ep["captions"] if int(c["t"]) == 0]
            if first:
                caps.insert(0, {"t": 0, "text": first[0]["text"]})
        for tpl in templates:
            doc = builder.build(tpl, frame_ids[start:end], actions[start:end - 1], caps, _unit_weights())
            yield {
                "input_ids": doc.input_ids,
                "loss_mask": [1 if w > 0 else 0 for w in doc.loss_weight],
                "template": tpl,
                "episode_id": ep["episode_id"],
                "seed": int(ep["seed"]),
                "split": ep["split"],
            }


def _unit_weights():
    from unified_wm.sequence import TaskWeights

    return TaskWeights()


# ----------------------------------------------------------------------------- work folder


def work_dir_for(out_dir) -> Path:
    """The folder next to ``out_dir`` that holds finished shards until the dataset is complete."""
    out = Path(out_dir)
    return out.parent / f".{out.name}.work"


def _hash_files(paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        p = Path(p)
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def _processor_fingerprint(processor_dir: Path) -> str:
    from unified_wm.tokenization.processor import CONFIG_NAME

    files = [processor_dir / CONFIG_NAME, processor_dir / "text.model"]
    vt = processor_dir / "video_tokenizer"
    files += sorted(p for p in vt.iterdir() if p.is_file()) if vt.is_dir() else []
    return _hash_files([f for f in files if f.is_file()])


def _dataset_fingerprint(data_dir: Path, n: int) -> str:
    meta = [f for f in (data_dir / "state.json", data_dir / "dataset_info.json") if f.is_file()]
    return f"{n}:{_hash_files(meta)}"


def _shard_ranges(n: int, shard_episodes: int) -> list[tuple[int, int]]:
    return [(s, min(n, s + shard_episodes)) for s in range(0, n, shard_episodes)]


def _write_shard(processor, ds, lo: int, hi: int, path: Path, templates, clip_frames: int, data_dir, on_episode=None) -> int:
    """Tokenize episodes [lo, hi) into one Arrow file at ``path`` (written to a temp name, then renamed)."""
    from datasets.arrow_writer import ArrowWriter

    from unified_wm.data.episodes import get_episode

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    n_docs = 0
    try:
        with ArrowWriter(features=token_features(), path=str(tmp)) as writer:
            for i in range(lo, hi):
                ep = get_episode(ds, i)
                try:
                    for doc in episode_documents(processor, ep, templates, clip_frames):
                        writer.write(doc)
                        n_docs += 1
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"episode '{ep.get('episode_id', i)}' (row {i} of '{data_dir}'): {e}") from e
                if on_episode is not None:
                    on_episode()
            writer.finalize()
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    return n_docs


def _worker_main(data_dir: str, processor_dir: str, work: str, templates, clip_frames: int, threads: int,
                 tasks, events) -> None:
    """A worker process: take shard jobs from ``tasks`` until None; report to ``events``."""
    shard = None
    try:
        import torch

        torch.set_num_threads(max(1, threads))
        from unified_wm.data.episodes import load_episodes
        from unified_wm.tokenization.processor import UnifiedProcessor

        ds = load_episodes(data_dir)
        processor = UnifiedProcessor.from_pretrained(processor_dir)
        while True:
            job = tasks.get()
            if job is None:
                break
            shard, lo, hi = job
            n = _write_shard(processor, ds, lo, hi, Path(work) / SHARD_PATTERN.format(shard), templates, clip_frames,
                             data_dir, on_episode=lambda: events.put(("episode", 1)))
            events.put(("shard", shard, n))
            shard = None
        events.put(("exit", os.getpid()))
    except BaseException as e:  # report, the parent raises
        events.put(("error", shard, f"{type(e).__name__}: {e}", traceback.format_exc()))


def _run_workers(todo, ranges, data_dir, processor_dir, work, templates, clip_frames, workers, threads, bar) -> None:
    import multiprocessing as mp
    import queue

    # fork where the platform has it (as torch's DataLoader workers do; each worker sets its own
    # torch thread count before any work), spawn elsewhere, and spawn when JAX (the metrics
    # extra) is loaded in this process: forking JAX's running threads can deadlock the child
    use_fork = "fork" in mp.get_all_start_methods() and "jax" not in sys.modules
    ctx = mp.get_context("fork" if use_fork else "spawn")
    tasks, events = ctx.Queue(), ctx.Queue()
    for k in todo:
        tasks.put((k, *ranges[k]))
    n_proc = min(workers, len(todo))
    for _ in range(n_proc):
        tasks.put(None)
    procs = [ctx.Process(target=_worker_main, daemon=True,
                         args=(str(data_dir), str(processor_dir), str(work), list(templates), clip_frames, threads, tasks, events))
             for _ in range(n_proc)]
    for p in procs:
        p.start()
    exited = 0
    try:
        while exited < n_proc:
            try:
                ev = events.get(timeout=1.0)
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"a tokenize worker died (exit code {dead[0].exitcode}); finished shards are kept "
                                       f"in '{work}', re-run with --resume") from None
                continue
            if ev[0] == "episode":
                bar.update(ev[1])
            elif ev[0] == "shard":
                bar.set_postfix(shards_done=len([p for p in Path(work).glob("shard-*.arrow")]))
            elif ev[0] == "exit":
                exited += 1
            elif ev[0] == "error":
                _, shard, msg, tb = ev
                where = f" on shard {shard} (episodes {ranges[shard][0]}..{ranges[shard][1] - 1})" if shard is not None else ""
                print(tb, file=sys.stderr)
                raise RuntimeError(f"tokenize worker failed{where}: {msg}. Finished shards are kept in '{work}'; "
                                   f"fix the input and re-run with --resume")
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=10)
        for stale in Path(work).glob(".shard-*.tmp-*"):  # a terminated worker's unfinished shard
            stale.unlink(missing_ok=True)


def tokenize_dataset(data_dir, processor_dir, out_dir, *, clip_frames: int = 16, templates=DEFAULT_TEMPLATES,
                     progress: bool = True, workers: int = 1, resume: bool = False, shard_episodes: int = 64,
                     threads_per_worker: int | None = None) -> Path:
    """Write the token documents of every episode in ``data_dir`` to ``out_dir`` (see the module doc).

    ``workers`` processes tokenize ranges of ``shard_episodes`` episodes; ``workers=1`` runs in
    this process. ``resume=True`` keeps the finished shards of an interrupted run (the work
    folder next to ``out_dir``); without it an old work folder is discarded. The output is
    renamed into place only when complete; it is the same whatever ``workers`` is.
    ``threads_per_worker``: torch threads in each worker process (default 1; with
    ``workers=1`` the default leaves this process's setting alone).
    """
    from tqdm import tqdm

    from unified_wm.data.episodes import load_episodes
    from unified_wm.tokenization.processor import UnifiedProcessor
    from unified_wm.utils import atomic_dir, write_json

    templates = list(templates)
    bad = [t for t in templates if t not in TEMPLATES]
    if bad:
        raise ValueError(f"unknown task template '{bad[0]}'; valid templates: {', '.join(TEMPLATES)}")
    if not templates:
        raise ValueError("no task templates given")
    if clip_frames < 2:
        raise ValueError(f"clip_frames must be >= 2 (a clip needs two frames and the action between them), got {clip_frames}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if shard_episodes < 1:
        raise ValueError(f"shard_episodes must be >= 1, got {shard_episodes}")
    data_dir, processor_dir, out = Path(data_dir), Path(processor_dir), Path(out_dir)
    ds = load_episodes(data_dir)
    processor = UnifiedProcessor.from_pretrained(processor_dir)  # fails early, naming the folder
    n = len(ds)
    ranges = _shard_ranges(n, shard_episodes)
    manifest = {
        "format": WORK_FORMAT, "data": str(data_dir.resolve()), "data_fingerprint": _dataset_fingerprint(data_dir, n),
        "processor_fingerprint": _processor_fingerprint(processor_dir), "clip_frames": clip_frames,
        "templates": templates, "shard_episodes": shard_episodes, "episodes": n, "shards": len(ranges),
    }
    work = work_dir_for(out)
    if work.exists() and not resume:
        shutil.rmtree(work)
    if work.exists():
        mf = work / "manifest.json"
        old = json.loads(mf.read_text()) if mf.is_file() else {}
        changed = [k for k in manifest if k != "data" and old.get(k) != manifest[k]]
        if changed:
            k = changed[0]
            raise ValueError(
                f"cannot resume from '{work}': its '{k}' is {old.get(k)!r}, this run's is {manifest[k]!r} "
                f"(changed: {', '.join(changed)}); re-run without --resume to start over"
            )
    else:
        work.mkdir(parents=True)
        write_json(work / "manifest.json", manifest)
    done = {k for k in range(len(ranges)) if (work / SHARD_PATTERN.format(k)).is_file()}
    todo = [k for k in range(len(ranges)) if k not in done]
    for stale in work.glob(".shard-*.tmp-*"):  # a write that was cut off
        stale.unlink()

    skipped = sum(hi - lo for k, (lo, hi) in enumerate(ranges) if k in done)
    bar = tqdm(total=n, initial=skipped, desc="tokenize", disable=not progress, unit="ep", dynamic_ncols=True)
    t0 = time.time()
    try:
        if todo and workers == 1:
            if threads_per_worker:
                import torch

                torch.set_num_threads(threads_per_worker)
            for k in todo:
                lo, hi = ranges[k]
                _write_shard(processor, ds, lo, hi, work / SHARD_PATTERN.format(k), templates, clip_frames, data_dir,
                             on_episode=lambda: bar.update(1))
        elif todo:
            _run_workers(todo, ranges, data_dir, processor_dir, work, templates, clip_frames, workers, threads_per_worker or 1, bar)
    finally:
        bar.close()

    import datasets

    parts = [datasets.Dataset.from_file(str(work / SHARD_PATTERN.format(k))) for k in range(len(ranges))]
    if parts:
        joined = datasets.concatenate_datasets(parts)
    else:
        joined = datasets.Dataset.from_dict({k: [] for k in token_features()}, features=token_features())
    with atomic_dir(out) as tmp:
        joined.save_to_disk(str(tmp))
        from unified_wm.fingerprint import KEY, token_space

        write_json(tmp / "tokenize_info.json", {**manifest, "documents": len(joined), "workers": workers,
                                                "resumed_shards": len(done), "seconds": time.time() - t0,
                                                KEY: token_space(processor)})
    del joined, parts
    shutil.rmtree(work, ignore_errors=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="uwm data tokenize", description="Pre-tokenize an episode dataset into token documents.")
    ap.add_argument("--data", required=True, help="episode dataset folder")
    ap.add_argument("--processor", required=True, help="processor folder (save_pretrained)")
    ap.add_argument("--out", required=True, help="output folder for the token documents")
    ap.add_argument("--clip-frames", type=int, default=16)
    ap.add_argument("--templates", default=",".join(DEFAULT_TEMPLATES), help=f"comma-separated, from: {', '.join(TEMPLATES)}")
    ap.add_argument("--workers", type=int, default=1, help="worker processes (each tokenizes whole shards)")
    ap.add_argument("--shard-episodes", type=int, default=64, help="episodes per shard (the unit of resume)")
    ap.add_argument("--threads-per-worker", type=int, default=None,
                    help="torch threads in each worker (default 1 with several workers, torch's default with one)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the finished shards of an interrupted run (in .<out>.work next to --out)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    a = ap.parse_args(argv)
    from unified_wm.utils import guarded_out

    with guarded_out(a.out, "data tokenize", a.overwrite):
        out = tokenize_dataset(a.data, a.processor, a.out, clip_frames=a.clip_frames,
                               templates=[t for t in a.templates.split(",") if t], progress=not a.no_progress,
                               workers=a.workers, resume=a.resume, shard_episodes=a.shard_episodes,
                               threads_per_worker=a.threads_per_worker)
    n = len(load_token_documents(out))
    print(f"wrote {n} documents to {out}")
    return 0


def load_token_documents(path):
    import datasets

    p = Path(path)
    if not (p / "dataset_info.json").exists():
        raise FileNotFoundError(f"token dataset '{p}' does not exist (expected a folder written by `uwm data tokenize`)")
    return datasets.load_from_disk(str(p))


def lengths(ds) -> np.ndarray:
    return np.array([len(x) for x in ds["input_ids"]])
