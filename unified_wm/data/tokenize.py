"""Pre-tokenize an episode dataset into token documents (Hugging Face ``datasets``, Arrow).

Each episode is cut into clips of at most ``clip_frames`` frames; each clip becomes one
document per task template. Columns: ``input_ids`` (int32), ``loss_mask`` (int8: which
tokens are targets in this template), ``template``, ``episode_id``, ``seed``, ``split``.
Training packs documents into fixed-length rows (``unified_wm.train``).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from unified_wm.sequence import TEMPLATES, StreamBuilder


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


def episode_documents(processor, ep: dict, templates=TEMPLATES, clip_frames: int = 16, frame_ids=None):
    """Yield token documents (dict rows) for one episode."""
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


def tokenize_dataset(data_dir, processor_dir, out_dir, *, clip_frames: int = 16, templates=TEMPLATES,
                     progress: bool = True) -> Path:
    """Write the token documents of every episode in ``data_dir``; atomic (no half-written output)."""
    import datasets
    from tqdm import tqdm

    from unified_wm.data.episodes import get_episode, load_episodes
    from unified_wm.tokenization.processor import UnifiedProcessor
    from unified_wm.utils import atomic_dir

    ds = load_episodes(data_dir)
    processor = UnifiedProcessor.from_pretrained(processor_dir)
    bad = [t for t in templates if t not in TEMPLATES]
    if bad:
        raise ValueError(f"unknown task template '{bad[0]}'; valid templates: {', '.join(TEMPLATES)}")

    def gen():
        for i in tqdm(range(len(ds)), desc="tokenize", disable=not progress, unit="ep"):
            yield from episode_documents(processor, get_episode(ds, i), templates, clip_frames)

    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        tok = datasets.Dataset.from_generator(gen, features=token_features(), cache_dir=str(tmp / ".cache"))
        tok.save_to_disk(str(tmp / "data"))
        import shutil

        shutil.rmtree(tmp / ".cache", ignore_errors=True)
        for f in (tmp / "data").iterdir():
            os.replace(f, tmp / f.name)
        (tmp / "data").rmdir()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="uwm data tokenize", description="Pre-tokenize an episode dataset into token documents.")
    ap.add_argument("--data", required=True, help="episode dataset folder")
    ap.add_argument("--processor", required=True, help="processor folder (save_pretrained)")
    ap.add_argument("--out", required=True, help="output folder for the token documents")
    ap.add_argument("--clip-frames", type=int, default=16)
    ap.add_argument("--templates", default=",".join(TEMPLATES))
    a = ap.parse_args(argv)
    out = tokenize_dataset(a.data, a.processor, a.out, clip_frames=a.clip_frames, templates=a.templates.split(","))
    import datasets

    n = len(datasets.load_from_disk(str(out)))
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
