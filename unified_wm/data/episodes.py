"""The episode dataset: the one on-disk format every data source writes and every stage reads.

An episode dataset is a Hugging Face ``datasets`` folder (the ``save_to_disk`` layout:
``data-0000k-of-0000n.arrow`` shards, ``state.json``, ``dataset_info.json``; open it with
``datasets.load_from_disk``) with one row per episode and these columns:

  episode_id    str      unique within the dataset
  source        str      "world", "atari:Pong", "doom:my_way_home", ...
  seed          int      the generator seed (eval suites refuse seeds seen in training)
  split         str      "train", "val", "probe_offscreen", "probe_revisit", ...
  action_space  str      name of the discrete action set (see unified_wm.tokenization.actions)
  frames        uint8    [T, H, W, 3]
  actions       list[str]  length T-1; actions[t] acts between frame t and frame t+1
  rewards       list[float] length T-1 (0.0 where the source has none)
  captions      list[{t: int, text: str}]  caption that holds from frame t on (t=0 describes the episode)
  state         str      JSON: ground-truth per-frame state ({"frames": [...]}), "{}" if unknown

Frames of all episodes in one dataset share H and W; T may vary.

On disk, ``frames`` is stored as the raw bytes of the C-ordered uint8 array (a
``large_binary`` column) next to a ``frame_shape`` column ``[T, H, W, 3]``: one byte per
pixel channel. (Older datasets stored ``frames`` as a ``datasets.Array4D`` with a variable
first dimension, which Arrow keeps as four levels of nested lists with an int32 offset per
innermost list: about 2.4x the raw size. :func:`get_episode`, :func:`iter_episodes` and
:func:`stream_episodes` read both layouts and always hand back ``np.uint8 [T,H,W,3]``.)

Writing (:func:`save_episodes`) streams: episodes go straight from any iterable (a list,
a generator, a re-iterable generator object) into Arrow shards of at most
``max_shard_size`` bytes, without a cache copy, without pickling the input, and
atomically (a temporary folder renamed into place; nothing half-written is left behind).
Reading a large set as a stream: :func:`stream_episodes`.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

REQUIRED_COLUMNS = ("episode_id", "source", "seed", "split", "action_space", "frames", "actions", "rewards", "captions", "state")
DEFAULT_MAX_SHARD_SIZE = "500MB"

# Every dataset's episodes have distinct seeds per split: a split owns [offset, offset + span), so
# training, validation and probe episodes never share a seed (the eval's held-out check relies on it).
SPLIT_SEED_OFFSETS: dict[str, int] = {"train": 0, "val": 500_000, "probe_offscreen": 1_000_000, "probe_revisit": 2_000_000}
SPLIT_SEED_SPAN = 500_000


def episode_features(height: int, width: int):
    """The dataset's features. Frames are raw bytes with a per-row ``frame_shape``, so the
    features do not depend on ``height`` x ``width`` (kept in the signature for callers;
    :func:`save_episodes` checks every episode against them and writes them into the
    dataset's description)."""
    import datasets

    return datasets.Features(
        {
            "episode_id": datasets.Value("string"),
            "source": datasets.Value("string"),
            "seed": datasets.Value("int64"),
            "split": datasets.Value("string"),
            "action_space": datasets.Value("string"),
            "frames": datasets.Value("large_binary"),
            "frame_shape": datasets.Sequence(datasets.Value("int32")),
            "actions": datasets.Sequence(datasets.Value("string")),
            "rewards": datasets.Sequence(datasets.Value("float32")),
            "captions": datasets.Sequence({"t": datasets.Value("int32"), "text": datasets.Value("string")}),
            "state": datasets.Value("string"),
        }
    )


def check_episode(ep: dict, height: int | None = None, width: int | None = None) -> None:
    """A clear ValueError naming the episode if it does not fit the schema (or the dataset's H x W)."""
    missing = [c for c in REQUIRED_COLUMNS if c not in ep]
    if missing:
        raise ValueError(f"episode {ep.get('episode_id', '?')}: missing fields {missing}")
    frames = np.asarray(ep["frames"])
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"episode {ep['episode_id']}: frames must be uint8 [T,H,W,3], got {frames.dtype} {frames.shape}")
    if len(frames) < 1:
        raise ValueError(f"episode {ep['episode_id']}: has no frames")
    if height is not None and width is not None and frames.shape[1:3] != (height, width):
        raise ValueError(
            f"episode {ep['episode_id']}: frames are {frames.shape[1]}x{frames.shape[2]} (HxW), "
            f"the dataset's are {height}x{width}; all episodes of one dataset share H and W"
        )
    if len(ep["actions"]) != len(frames) - 1:
        raise ValueError(f"episode {ep['episode_id']}: {len(frames)} frames need {len(frames) - 1} actions, got {len(ep['actions'])}")
    if len(ep["rewards"]) != len(frames) - 1:
        raise ValueError(f"episode {ep['episode_id']}: {len(frames)} frames need {len(frames) - 1} rewards, got {len(ep['rewards'])}")


def _to_row(ep: dict) -> dict:
    frames = np.ascontiguousarray(np.asarray(ep["frames"], dtype=np.uint8))
    caps = ep["captions"]
    if isinstance(caps, dict):  # already columnar
        caps = [{"t": t, "text": s} for t, s in zip(caps["t"], caps["text"])]
    state = ep["state"]
    return {
        "episode_id": str(ep["episode_id"]),
        "source": str(ep["source"]),
        "seed": int(ep["seed"]),
        "split": str(ep["split"]),
        "action_space": str(ep["action_space"]),
        "frames": frames.tobytes(),
        "frame_shape": list(frames.shape),
        "actions": [str(a) for a in ep["actions"]],
        "rewards": [float(r) for r in ep["rewards"]],
        # datasets' Sequence-of-struct wants a dict of lists
        "captions": {"t": [int(c["t"]) for c in caps], "text": [str(c["text"]) for c in caps]},
        "state": state if isinstance(state, str) else json.dumps(state, separators=(",", ":")),
    }


def _shard_size_bytes(max_shard_size: int | str) -> int:
    from datasets.utils.py_utils import convert_file_size_to_int

    try:
        n = int(convert_file_size_to_int(max_shard_size))
    except (ValueError, TypeError):
        raise ValueError(f"max_shard_size must be a byte count or a size like '500MB', got {max_shard_size!r}") from None
    if n <= 0:
        raise ValueError(f"max_shard_size must be positive, got {max_shard_size!r}")
    return n


def save_episodes(
    episodes: Iterable[dict],
    out_dir: str | os.PathLike,
    height: int,
    width: int,
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    num_shards: int | None = None,
    progress: bool = False,
    desc: str | None = None,
) -> Path:
    """Write episodes (dicts with REQUIRED_COLUMNS) as a sharded Arrow dataset, atomically.

    ``episodes`` may be any iterable, a plain generator included; it is consumed once,
    episode by episode (memory holds one write batch, not the dataset). A shard is closed
    when it reaches ``max_shard_size`` bytes of frames and fields (``500MB``, ``1GB`` or an
    int); ``num_shards`` instead splits into that many shards of equal episode counts and
    needs ``len(episodes)``. ``progress`` shows a tqdm bar (episodes, shards, MB written).
    Returns ``out_dir``, which ``datasets.load_from_disk`` / :func:`load_episodes` open.
    """
    import datasets
    from datasets.arrow_writer import ArrowWriter
    from tqdm.auto import tqdm

    from unified_wm.utils import atomic_dir

    if height < 1 or width < 1:
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    limit = _shard_size_bytes(max_shard_size)
    per_shard = None
    if num_shards is not None:
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        try:
            total = len(episodes)  # type: ignore[arg-type]
        except TypeError:
            raise ValueError("num_shards needs an iterable with a length (a list, or an object with __len__); "
                             "for a generator pass max_shard_size instead") from None
        per_shard = max(1, -(-total // num_shards))
    features = episode_features(height, width)
    out = Path(out_dir)
    try:
        total_hint = len(episodes)  # type: ignore[arg-type]
    except TypeError:
        total_hint = None

    with atomic_dir(out) as tmp:
        files: list[str] = []
        writer = None
        shard_bytes = shard_rows = n_rows = 0
        written = 0
        seen_ids: set[str] = set()
        bar = tqdm(total=total_hint, desc=desc or f"write {out.name}", unit="ep", disable=not progress)

        def close_shard():
            nonlocal writer, shard_bytes, shard_rows
            if writer is not None:
                writer.finalize()
                writer.close()
                writer = None
            shard_bytes = shard_rows = 0

        try:
            for ep in episodes:
                check_episode(ep, height, width)
                eid = str(ep["episode_id"])
                if eid in seen_ids:
                    raise ValueError(f"episode id '{eid}' occurs twice; episode ids must be unique within a dataset")
                seen_ids.add(eid)
                row = _to_row(ep)
                size = len(row["frames"]) + len(row["state"]) + 64 * (len(row["actions"]) + len(row["captions"]["t"]) + 8)
                full = (per_shard is not None and shard_rows >= per_shard) or (
                    per_shard is None and shard_rows > 0 and shard_bytes + size > limit)
                if writer is not None and full:
                    close_shard()
                if writer is None:
                    path = tmp / f"shard-{len(files):05d}.arrow"
                    files.append(path.name)
                    # a write batch of about 64 MB: memory stays bounded however large the set
                    batch = max(1, min(1000, (64 << 20) // max(1, size)))
                    writer = ArrowWriter(features=features, path=str(path), writer_batch_size=batch)
                writer.write(row)
                shard_bytes += size
                shard_rows += 1
                n_rows += 1
                written += size
                bar.update(1)
                bar.set_postfix(shards=len(files), MB=f"{written / 1e6:.1f}", refresh=False)
            close_shard()
        finally:
            if writer is not None:  # an error mid-shard: release the file; atomic_dir removes the folder
                try:
                    writer.close()
                except Exception:
                    pass
            bar.close()
        if n_rows == 0:
            raise ValueError(f"no episodes to write to '{out}' (the iterable was empty)")
        names = [f"data-{k:05d}-of-{len(files):05d}.arrow" for k in range(len(files))]
        for old, new in zip(files, names):
            os.replace(tmp / old, tmp / new)
        info = datasets.DatasetInfo(
            features=features,
            description=f"unified_wm episode dataset: {n_rows} episodes; frames uint8 [T,{height},{width},3] "
                        f"as raw bytes (column 'frames') with their shape (column 'frame_shape')",
        )
        info.write_to_directory(str(tmp), pretty_print=True)
        state = {
            "_data_files": [{"filename": n} for n in names],
            "_fingerprint": uuid.uuid4().hex[:16],
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": None,
        }
        (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
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


def _frames_are_bytes(features) -> bool:
    f = features.get("frames") if features is not None else None
    return getattr(f, "dtype", None) in ("large_binary", "binary")


def _decode_row(row: dict) -> dict:
    """A raw row (python values) -> an episode dict: frames np.uint8 [T,H,W,3], captions [{t, text}]."""
    ep = dict(row)
    if "frames" in ep and isinstance(ep["frames"], (bytes, bytearray, memoryview)):
        shape = [int(x) for x in ep.pop("frame_shape")]
        ep["frames"] = np.frombuffer(ep["frames"], dtype=np.uint8).reshape(shape).copy()
    else:
        ep.pop("frame_shape", None)
        if "frames" in ep:
            ep["frames"] = np.asarray(ep["frames"], dtype=np.uint8)
    caps = ep.get("captions")
    if isinstance(caps, dict):
        ep["captions"] = [{"t": int(t), "text": s} for t, s in zip(caps["t"], caps["text"])]
    return ep


def iter_episodes(ds) -> Iterator[dict]:
    """Rows as dicts with frames as np.uint8 [T,H,W,3] and captions as a list of {t, text}."""
    if _frames_are_bytes(ds.features):
        for row in ds.with_format(None):
            yield _decode_row(row)
    else:
        for i in range(len(ds)):
            yield get_episode(ds, i)


def get_episode(ds, i: int) -> dict:
    """Episode ``i`` of a loaded episode dataset (either storage layout)."""
    if _frames_are_bytes(ds.features):
        return _decode_row(ds.with_format(None)[int(i)])
    row = ds.with_format("numpy", columns=["frames"])[i]
    rest = ds.select_columns([c for c in ds.column_names if c != "frames"])[i]
    ep = _decode_row(dict(rest))
    ep["frames"] = np.asarray(row["frames"], dtype=np.uint8)
    return ep


def stream_episodes(data, *, columns: list[str] | None = None, rank: int = 0, world_size: int = 1) -> Iterator[dict]:
    """Episodes of a dataset folder (or loaded dataset) one at a time, as an iterable stream.

    Goes through ``Dataset.to_iterable_dataset`` over the memory-mapped shards: one episode's
    frames are in memory at a time. ``columns`` keeps only those columns (leave out
    ``"frames"`` to read captions/state without touching the pixels). ``rank``/``world_size``
    give each of several readers a disjoint part (``datasets.distributed.split_dataset_by_node``).
    """
    if isinstance(data, (str, os.PathLike)):
        data = load_episodes(data)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
    if columns is not None:
        unknown = [c for c in columns if c not in data.column_names]
        if unknown:
            raise ValueError(f"unknown episode column(s) {unknown}; columns: {', '.join(c for c in data.column_names if c != 'frame_shape')}")
        keep = list(columns)
        if "frames" in keep and "frame_shape" in data.column_names and "frame_shape" not in keep:
            keep.append("frame_shape")
        data = data.select_columns(keep)
    if "frames" in data.column_names and not _frames_are_bytes(data.features):
        # the older Array4D layout: per-row numpy reads (its nested lists are slow as python values)
        for i in range(rank, len(data), world_size):
            yield get_episode(data, i)
        return
    it = data.to_iterable_dataset(num_shards=max(world_size, min(len(data), len(data.cache_files) or 1)))
    if world_size > 1:
        from datasets.distributed import split_dataset_by_node

        it = split_dataset_by_node(it, rank=rank, world_size=world_size)
    for row in it:
        yield _decode_row(dict(row))


def caption_at(captions: list[dict], t: int) -> str | None:
    """The caption that starts exactly at frame t, if any."""
    for c in captions:
        if int(c["t"]) == t:
            return c["text"]
    return None


def episode_caption(ep: dict) -> str:
    """The episode's description: its caption at frame 0 ("" when it has none), the prompt a
    rollout of the episode starts from."""
    return caption_at(ep["captions"], 0) or ""


def episode_seeds(split: str, seed: int, n: int) -> list[int]:
    """The seeds of a dataset's episodes: SPLIT_SEED_OFFSETS[split] + seed + i."""
    if split not in SPLIT_SEED_OFFSETS:
        raise ValueError(f"split must be one of {list(SPLIT_SEED_OFFSETS)}, got {split!r}")
    if seed < 0 or n < 1 or seed + n > SPLIT_SEED_SPAN:
        raise ValueError(
            f"seed={seed} with {n} episodes leaves the split's seed range [0, {SPLIT_SEED_SPAN}); "
            f"seeds of different splits would overlap"
        )
    off = SPLIT_SEED_OFFSETS[split]
    return [off + seed + i for i in range(n)]


def seeds_of(dataset) -> set[int]:
    """The set of episode seeds of a dataset (a path or a loaded ``datasets.Dataset``)."""
    if isinstance(dataset, (str, os.PathLike)):
        dataset = load_episodes(dataset)
    return {int(s) for s in dataset["seed"]}
