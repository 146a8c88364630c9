"""One interface for episode sources (the procedural world, Atari, ViZDoom).

A source is its typed config, ``generate_episode(cfg, seed, split[, handle])`` and, for sources that
drive an emulator, ``open(cfg)`` (an env or game, reused across episodes and closed at the end).
On top of that, written once for every source: the episodes iterable (:class:`SourceEpisodes`),
dataset generation (:func:`generate_dataset`: seeds per split, atomic sharded Arrow output) and the
``uwm data gen-<source>`` command (:func:`generator_main`)."""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from unified_wm.data.episodes import episode_seeds, save_episodes
from unified_wm.utils import OVERWRITE_HELP, guarded_out, load_config


class ProbeError(RuntimeError):
    """A source's settings leave no room for a probe episode (e.g. a world too small to look away)."""


@dataclass(frozen=True)
class EpisodeSource:
    name: str                                   # "world": the command is `uwm data gen-world`
    description: str                            # the command's one-line help
    config_cls: type
    as_config: Callable[[Any], Any]             # a config object, a YAML path or a dict -> config
    generate_episode: Callable[..., dict]       # (cfg, seed, split[, handle]) -> episode dict
    splits: tuple[str, ...]
    frame_hw: Callable[[Any], tuple[int, int]]  # cfg -> (height, width) of the frames
    label: Callable[[Any], str]                 # cfg -> what the progress bar and the summary call it
    example_config: str
    open: Callable[[Any], Any] | None = None    # cfg -> a handle with .close(), passed to generate_episode
    check: Callable[[Any], None] | None = None  # fails (missing package, unknown game...) before any output
    probe_splits: tuple[str, ...] = ()          # splits whose default size is the config's probe_episodes
    listing: tuple[str, str, Callable[[], list[str]]] | None = None  # (flag, help, names)

    def default_split(self, cfg) -> str:
        return getattr(cfg, "split", None) or "train"

    def default_episodes(self, cfg, split: str) -> int:
        return cfg.probe_episodes if split in self.probe_splits else cfg.n_episodes


class SourceEpisodes:
    """A re-iterable stream of a source's episodes with a length (``save_episodes`` takes any
    iterable; this one also knows its size). A source's handle is opened inside ``__iter__`` and
    closed when the stream ends."""

    def __init__(self, source: EpisodeSource, cfg, seeds: list[int], split: str, progress: bool = False,
                 desc: str | None = None):
        self.source, self.cfg, self.seeds, self.split, self.progress = source, cfg, list(seeds), split, progress
        self.desc = desc or f"{source.label(cfg)} {split}"

    def __len__(self) -> int:
        return len(self.seeds)

    def __iter__(self) -> Iterator[dict]:
        from tqdm.auto import tqdm

        handle = self.source.open(self.cfg) if self.source.open is not None else None
        try:
            for s in tqdm(self.seeds, desc=self.desc, unit="ep", disable=not self.progress):
                if handle is None:
                    yield self.source.generate_episode(self.cfg, s, self.split)
                else:
                    yield self.source.generate_episode(self.cfg, s, self.split, handle)
        finally:
            if handle is not None:
                handle.close()


def generate_dataset(source: EpisodeSource, config, out_dir: str | os.PathLike, *, n_episodes: int | None = None,
                     seed: int | None = None, split: str | None = None, progress: bool = True,
                     max_shard_size: int | str = "500MB") -> Path:
    """Write ``n_episodes`` episodes of ``split`` (default: the config's) at ``out_dir`` (atomic; Arrow
    shards of at most ``max_shard_size``). Seeds: the split's range plus ``seed`` (default: the config's)."""
    cfg = source.as_config(config)
    if source.check is not None:
        source.check(cfg)
    split = split or source.default_split(cfg)
    if split not in source.splits:
        raise ValueError(f"split must be one of {list(source.splits)}, got {split!r}")
    n = source.default_episodes(cfg, split) if n_episodes is None else n_episodes
    seeds = episode_seeds(split, cfg.seed if seed is None else seed, n)
    h, w = source.frame_hw(cfg)
    return save_episodes(SourceEpisodes(source, cfg, seeds, split), out_dir, h, w, max_shard_size=max_shard_size,
                         progress=progress, desc=f"{source.label(cfg)} {split}")


def generator_main(source: EpisodeSource, argv: list[str] | None = None) -> int:
    """``uwm data gen-<source> --config C --out DIR [--episodes N] [--seed S] [--split ...]``."""
    ap = argparse.ArgumentParser(prog=f"uwm data gen-{source.name}", description=source.description)
    need = f"; required unless {source.listing[0]}" if source.listing else ""
    ap.add_argument("--config", required=source.listing is None, help=f"{source.name} YAML (e.g. {source.example_config}){need}")
    ap.add_argument("--out", required=source.listing is None, help=f"output episode dataset folder{need}")
    ap.add_argument("--episodes", type=int, default=None,
                    help="number of episodes (default: n_episodes" + (", or probe_episodes for probes)" if source.probe_splits else ")"))
    ap.add_argument("--seed", type=int, default=None, help="base seed (default: the config's seed)")
    ap.add_argument("--split", default=None, choices=list(source.splits), help="default: the config's split, else train")
    ap.add_argument("--max-shard-size", default="500MB", help="largest Arrow shard, e.g. 500MB or 1GB (default 500MB)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    if source.listing:
        ap.add_argument(source.listing[0], action="store_true", dest="listing", help=source.listing[1])
    args = ap.parse_args(argv)
    if source.listing and args.listing:
        print("\n".join(source.listing[2]()))
        return 0
    if not args.config or not args.out:
        ap.error(f"--config and --out are required (or {source.listing[0]})")
    t0 = time.perf_counter()
    with guarded_out(args.out, f"data gen-{source.name}", args.overwrite):  # a bad --out first, before any work
        cfg = load_config(source.config_cls, args.config)
        split = args.split or source.default_split(cfg)
        out = generate_dataset(source, cfg, args.out, n_episodes=args.episodes, seed=args.seed, split=split,
                               progress=not args.no_progress, max_shard_size=args.max_shard_size)
    n = args.episodes or source.default_episodes(cfg, split)
    print(f"wrote {n} {source.label(cfg)} {split} episodes to {out} in {time.perf_counter() - t0:.1f}s")
    return 0
