"""Real third-party data: Atari episodes through gymnasium + ale-py (the ROMs ship in ale-py).

Optional: ``pip install unified_wm[atari]`` (gymnasium, ale-py). Each episode resets the
environment with its own seed, plays ``warmup_steps`` unrecorded steps with the same
policy, then records ``frames`` observations resized to ``width`` x ``height`` (PIL, area
filter) and the ``frames - 1`` actions between them. If the game ends inside an episode,
the episode ends there (T may be shorter). The policy is sticky-random: at each step it
keeps its previous action with probability ``sticky_prob``, else draws a new one uniformly
from the game's (minimal) action set; ``repeat_action_probability`` is the emulator's own
sticky-action noise (v5 default 0.25).

Columns: source ``"atari:<Game>"``, action_space ``"atari:<Game>"``, action names are the
env's ``get_action_meanings()`` lower-cased ("noop", "fire", "right", "left", ...), the
meanings list is in ``state["action_meanings"]``, rewards are the env's. Captions: t=0
``"pong"``; at frame t+1 after a reward r at step t: ``"pong: the agent scores"`` (r > 0) or
``"pong: the opponent scores"`` (r < 0); ``"pong: game over"`` when the game ends.
Episode seeds follow :func:`unified_wm.data.world.episode_seeds` (train 0 + seed + i,
val 500_000 + seed + i).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np

from unified_wm.utils import from_dict, load_config


class AtariUnavailable(ImportError):
    """gymnasium / ale-py are not installed."""


@dataclass
class AtariConfig:
    game: str = "Pong"  # ALE game name, as in "ALE/Pong-v5"
    n_episodes: int = 64
    frames: int = 32  # T, recorded frames per episode
    frameskip: int = 4
    repeat_action_probability: float = 0.25  # emulator sticky actions
    sticky_prob: float = 0.75  # policy: keep the previous action with this probability
    warmup_steps: int = 60  # unrecorded steps after reset (Pong's first ~60 steps show no ball)
    width: int = 64
    height: int = 64
    seed: int = 0
    full_action_space: bool = False
    split: Literal["train", "val"] = "train"

    def validate(self) -> None:
        if not self.game or "/" in self.game:
            raise ValueError(f"game must be an ALE game name like 'Pong', got {self.game!r}")
        if self.frames < 2:
            raise ValueError(f"frames must be >= 2, got {self.frames}")
        if self.n_episodes < 1 or self.frameskip < 1 or self.warmup_steps < 0:
            raise ValueError("need n_episodes >= 1, frameskip >= 1 and warmup_steps >= 0")
        if not 0 <= self.sticky_prob <= 1 or not 0 <= self.repeat_action_probability <= 1:
            raise ValueError("sticky_prob and repeat_action_probability must be in [0, 1]")
        if self.width < 8 or self.height < 8:
            raise ValueError(f"width x height = {self.width}x{self.height}; both must be at least 8")


def as_config(config) -> AtariConfig:
    if config is None:
        return AtariConfig()
    if isinstance(config, AtariConfig):
        return config
    if isinstance(config, dict):
        return from_dict(AtariConfig, config)
    return load_config(AtariConfig, config)


def _import_ale():
    try:
        import ale_py
        import gymnasium
    except Exception as e:  # ImportError, or a broken binary wheel
        raise AtariUnavailable(
            f"Atari data needs gymnasium and ale-py, which could not be imported ({type(e).__name__}: {e}); "
            "install them with: pip install unified_wm[atari]"
        ) from None
    gymnasium.register_envs(ale_py)
    return gymnasium


def atari_games() -> list[str]:
    """The ALE game names this install can make (``"Pong"``, ``"Breakout"``, ...), sorted."""
    gym = _import_ale()
    return sorted(k[len("ALE/"):-len("-v5")] for k in gym.registry if k.startswith("ALE/") and k.endswith("-v5"))


def check_game(game: str) -> None:
    """A ValueError naming ``game`` and the close matches (and all valid names) if ALE has no such game."""
    import difflib

    games = atari_games()
    if game in games:
        return
    by_lower = {g.lower(): g for g in games}
    close = [by_lower[game.lower()]] if game.lower() in by_lower else difflib.get_close_matches(game, games, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(
        f"unknown Atari game {game!r} (config key 'game').{hint} Valid games ({len(games)}): {', '.join(games)}"
    )


def make_env(cfg: AtariConfig):
    gym = _import_ale()
    check_game(cfg.game)
    env_id = f"ALE/{cfg.game}-v5"
    try:
        return gym.make(
            env_id,
            render_mode=None,
            frameskip=cfg.frameskip,
            repeat_action_probability=cfg.repeat_action_probability,
            full_action_space=cfg.full_action_space,
        )
    except Exception as e:
        raise ValueError(f"cannot make Atari env '{env_id}' (config key 'game' = {cfg.game!r}): {e}") from None


def _resize(obs: np.ndarray, w: int, h: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(obs).resize((w, h), Image.BOX), dtype=np.uint8)


def _score_captions(game: str, r: float) -> str | None:
    g = game.lower()
    if r > 0:
        return f"{g}: the agent scores"
    if r < 0:
        return f"{g}: the opponent scores" if g == "pong" else f"{g}: the agent loses points"
    return None


def generate_episode(cfg: AtariConfig, seed: int, split: str = "train", env=None) -> dict:
    """One Atari episode with the episode dataset's columns (deterministic in cfg and seed)."""
    cfg = as_config(cfg)
    own = env is None
    env = env or make_env(cfg)
    try:
        meanings = [m.lower() for m in env.unwrapped.get_action_meanings()]
        rng = np.random.default_rng([int(seed), 7])
        obs, _ = env.reset(seed=int(seed))
        env.action_space.seed(int(seed))
        a = 0

        def act():
            nonlocal a
            if rng.uniform() >= cfg.sticky_prob:
                a = int(rng.integers(len(meanings)))
            return a

        ended = False
        for _ in range(cfg.warmup_steps):
            obs, r, term, trunc, _ = env.step(act())
            if term or trunc:
                obs, _ = env.reset(seed=int(seed) + 1)
        g = cfg.game.lower()
        frames = [_resize(obs, cfg.width, cfg.height)]
        actions, rewards, captions = [], [], [{"t": 0, "text": g}]
        score = [0.0, 0.0]
        scores = [list(score)]
        for t in range(cfg.frames - 1):
            ai = act()
            obs, r, term, trunc, _ = env.step(ai)
            actions.append(meanings[ai])
            rewards.append(float(r))
            if r > 0:
                score[0] += float(r)
            elif r < 0:
                score[1] -= float(r)
            frames.append(_resize(obs, cfg.width, cfg.height))
            scores.append(list(score))
            texts = [c for c in [_score_captions(cfg.game, float(r))] if c]
            if term or trunc:
                texts.append(f"{g}: game over")
                ended = True
            if texts:
                captions.append({"t": t + 1, "text": "; ".join(texts)})
            if ended:
                break
    finally:
        if own:
            env.close()
    state = {
        "game": cfg.game,
        "env_id": f"ALE/{cfg.game}-v5",
        "action_meanings": meanings,
        "frameskip": cfg.frameskip,
        "repeat_action_probability": cfg.repeat_action_probability,
        "source_shape": list(np.asarray(obs).shape),
        "game_over": ended,
        "frames": [{"score": s} for s in scores],
    }
    name = f"atari:{cfg.game}"
    return {
        "episode_id": f"atari-{cfg.game.lower()}-{split}-{seed:08d}",
        "source": name,
        "seed": int(seed),
        "split": split,
        "action_space": name,
        "frames": np.stack(frames).astype(np.uint8),
        "actions": actions,
        "rewards": rewards,
        "captions": captions,
        "state": json.dumps(state, separators=(",", ":")),
    }


class AtariEpisodes:
    """A re-iterable stream of episodes with a length; the env is made inside ``__iter__``
    and closed when the stream ends."""

    def __init__(self, cfg: AtariConfig, seeds: list[int], split: str, progress: bool = True):
        self.cfg, self.seeds, self.split, self.progress = cfg, list(seeds), split, progress

    def __len__(self) -> int:
        return len(self.seeds)

    def __iter__(self) -> Iterator[dict]:
        from tqdm.auto import tqdm

        env = make_env(self.cfg)
        try:
            for s in tqdm(self.seeds, desc=f"atari {self.cfg.game} {self.split}", unit="ep", disable=not self.progress):
                yield generate_episode(self.cfg, s, self.split, env=env)
        finally:
            env.close()


def iter_atari(cfg: AtariConfig, seeds: list[int], split: str, progress: bool = True) -> AtariEpisodes:
    return AtariEpisodes(cfg, seeds, split, progress)


def generate_atari(config, out_dir: str | os.PathLike, *, n_episodes: int | None = None, seed: int | None = None, split: str | None = None,
                   progress: bool = True, max_shard_size: int | str = "500MB") -> Path:
    """Write an Atari episode dataset at ``out_dir`` (atomic; Arrow shards of at most ``max_shard_size``)."""
    from unified_wm.data.episodes import save_episodes
    from unified_wm.data.world import episode_seeds

    cfg = as_config(config)
    check_game(cfg.game)  # fail (missing packages, unknown game) before creating anything
    split = split or cfg.split
    seeds = episode_seeds(split, cfg.seed if seed is None else seed, cfg.n_episodes if n_episodes is None else n_episodes)
    return save_episodes(iter_atari(cfg, seeds, split, progress=False), out_dir, cfg.height, cfg.width,
                         max_shard_size=max_shard_size, progress=progress, desc=f"atari {cfg.game} {split}")


def main(argv: list[str] | None = None) -> int:
    """`uwm data gen-atari --config C --out DIR [--episodes N] [--seed S] [--split train|val]` (or `--list-games`)."""
    ap = argparse.ArgumentParser(prog="uwm data gen-atari", description="Record Atari episodes (gymnasium + ale-py) as an episode dataset.")
    ap.add_argument("--config", help="Atari YAML (e.g. recipes/data/atari_pong.yaml); required unless --list-games")
    ap.add_argument("--out", help="output episode dataset folder; required unless --list-games")
    ap.add_argument("--episodes", type=int, default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--split", default=None, choices=["train", "val"])
    ap.add_argument("--max-shard-size", default="500MB", help="largest Arrow shard, e.g. 500MB or 1GB (default 500MB)")
    ap.add_argument("--list-games", action="store_true", help="print the valid game names and exit")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.list_games:
        print("\n".join(atari_games()))
        return 0
    if not args.config or not args.out:
        ap.error("--config and --out are required (or --list-games)")
    cfg = load_config(AtariConfig, args.config)
    t0 = time.perf_counter()
    out = generate_atari(cfg, args.out, n_episodes=args.episodes, seed=args.seed, split=args.split, progress=not args.no_progress,
                         max_shard_size=args.max_shard_size)
    print(f"wrote {args.episodes or cfg.n_episodes} {cfg.game} episodes to {out} in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
