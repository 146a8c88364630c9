"""The episode dataset: the one on-disk format every data source writes and every stage reads.

An episode dataset is a Hugging Face ``datasets`` folder (``save_to_disk``, Arrow) with
one row per episode and these columns:

  episode_id    str      unique within the dataset
  source        str      "world", "atari:Pong", ...
  seed          int      the generator seed (eval suites refuse seeds seen in training)
  split         str      "train", "val", "probe_offscreen", "probe_revisit", ...
  action_space  str      name of the discrete action set (see unified_wm.tokenization.actions)
  frames        uint8    [T, H, W, 3]
  actions       list[str]  length T-1; actions[t] acts between frame t and frame t+1
  rewards       list[float] length T-1 (0.0 where the source has none)
  captions      list[{t: int, text: str}]  caption that holds from frame t on (t=0 describes the episode)
  state         str      JSON: ground-truth per-frame state ({"frames": [...]}), "{}" if unknown

Frames of all episodes in one dataset share H and W; T may vary.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

REQUIRED_COLUMNS = ("episode_id", "source", "seed", "split", "action_space", "frames", "actions", "rewards", "captions", "state")


def episode_features(height: int, width: int):
    import datasets

    return datasets.Features(
        {
            "episode_id": datasets.Value("string"),
            "source": datasets.Value("string"),
            "seed": datasets.Value("int64"),
            "split": datasets.Value("string"),
            "action_space": datasets.Value("string"),
            "frames": datasets.Array4D(shape=(None, height, width, 3), dtype="uint8"),
            "actions": datasets.Sequence(datasets.Value("string")),
            "rewards": datasets.Sequence(datasets.Value("float32")),
            "captions": datasets.Sequence({"t": datasets.Value("int32"), "text": datasets.Value("string")}),
            "state": datasets.Value("string"),
        }
    )


def check_episode(ep: dict) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in ep]
    if missing:
        raise ValueError(f"episode {ep.get('episode_id', '?')}: missing fields {missing}")
    frames = np.asarray(ep["frames"])
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"episode {ep['episode_id']}: frames must be uint8 [T,H,W,3], got {frames.dtype} {frames.shape}")
    if len(ep["actions"]) != len(frames) - 1:
        raise ValueError(f"episode {ep['episode_id']}: {len(frames)} frames need {len(frames) - 1} actions, got {len(ep['actions'])}")


def save_episodes(episodes: Iterable[dict], out_dir: str | os.PathLike, height: int, width: int) -> Path:
    """Write episodes (dicts with REQUIRED_COLUMNS) as an Arrow dataset, atomically."""
    import datasets

    from unified_wm.utils import atomic_dir

    def gen():
        for ep in episodes:
            check_episode(ep)
            row = dict(ep)
            # datasets' Sequence-of-struct wants a dict of lists
            caps = row["captions"]
            if isinstance(caps, list):
                row["captions"] = {"t": [int(c["t"]) for c in caps], "text": [str(c["text"]) for c in caps]}
            if not isinstance(row["state"], str):
                row["state"] = json.dumps(row["state"])
            yield row

    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        ds = datasets.Dataset.from_generator(gen, features=episode_features(height, width), cache_dir=str(tmp / ".cache"))
        ds.save_to_disk(str(tmp / "data"))
        import shutil

        shutil.rmtree(tmp / ".cache", ignore_errors=True)
        # move the saved files up so that the folder itself is the dataset
        for f in (tmp / "data").iterdir():
            os.replace(f, tmp / f.name)
        (tmp / "data").rmdir()
    return out


def load_episodes(path: str | os.PathLike):
    """Load an episode dataset folder; a clear error if it is missing or not an episode dataset."""
    import datasets

    p = Path(path)
    if not (p / "dataset_info.json").exists() and not (p / "state.json").exists():
        raise FileNotFoundError(f"episode dataset '{p}' does not exist (expected a folder written by `uwm data gen-world` or `save_episodes`)")
    ds = datasets.load_from_disk(str(p))
    missing = [c for c in REQUIRED_COLUMNS if c not in ds.column_names]
    if missing:
        raise ValueError(f"'{p}' is not an episode dataset: columns {missing} are missing")
    return ds


def iter_episodes(ds) -> Iterator[dict]:
    """Rows as dicts with frames as np.uint8 [T,H,W,3] and captions as a list of {t, text}."""
    for i in range(len(ds)):
        yield get_episode(ds, i)


def get_episode(ds, i: int) -> dict:
    row = ds.with_format("numpy", columns=["frames"])[i]
    rest = ds.select_columns([c for c in ds.column_names if c != "frames"])[i]
    ep = dict(rest)
    ep["frames"] = np.asarray(row["frames"], dtype=np.uint8)
    caps = ep["captions"]
    if isinstance(caps, dict):
        ep["captions"] = [{"t": int(t), "text": s} for t, s in zip(caps["t"], caps["text"])]
    return ep


def caption_at(captions: list[dict], t: int) -> str | None:
    """The caption that starts exactly at frame t, if any."""
    for c in captions:
        if int(c["t"]) == t:
            return c["text"]
    return None
