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

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from unified_wm.data.sources import EpisodeSource, generate_dataset, generator_main
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


def require_ale():
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
    gym = require_ale()
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
    gym = require_ale()
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


ATARI = EpisodeSource(
    name="atari", description="Record Atari episodes (gymnasium + ale-py) as an episode dataset.", config_cls=AtariConfig,
    as_config=as_config, generate_episode=generate_episode, splits=("train", "val"), frame_hw=lambda c: (c.height, c.width),
    label=lambda c: f"atari {c.game}", example_config="recipes/data/atari_pong.yaml", open=make_env,
    check=lambda c: check_game(c.game), listing=("--list-games", "print the valid game names and exit", atari_games),
)


def generate_atari(config, out_dir: str | os.PathLike, **kw) -> Path:
    """An Atari episode dataset at ``out_dir`` (:func:`unified_wm.data.sources.generate_dataset`)."""
    return generate_dataset(ATARI, config, out_dir, **kw)


def main(argv: list[str] | None = None) -> int:
    """`uwm data gen-atari --config C --out DIR [--episodes N] [--seed S] [--split train|val]` (or `--list-games`)."""
    return generator_main(ATARI, argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
