"""An eval suite (``eval/*.yaml``): its tasks and settings, validated when the suite loads, and the
check that its data is held out from the model's training data."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from unified_wm.eval.baselines import BASELINES
from unified_wm.sequence import TEMPLATES
from unified_wm.utils import ConfigError

TASKS = ("nll", "rollout", "action_sensitivity", "offscreen", "revisit", "controllability", "caption", "fvd")
METRICS = ("psnr", "ssim", "lpips")  # frame metrics; lpips needs the metrics extra
CONTROL_ACTIONS = ("logged", "uniform")


@dataclass
class RolloutSettings:
    context_frames: int = 1
    horizon: int = 8
    temperature: float = 0.0  # 0 = greedy
    seed: int = 0
    mode: str = "token"  # token | diagonal (uwm rollout --mode)
    diagonals_per_pass: int = 1
    cfg_text: float = 1.0  # classifier-free guidance scales (1 = off)
    cfg_action: float = 1.0
    rows: int = 16  # episodes rolled out together, one prompt per batch row (1: one at a time)

    def kwargs(self) -> dict:
        """Sampling keywords for ``WorldModel.rollout``."""
        return dict(temperature=self.temperature, seed=self.seed, mode=self.mode,
                    diagonals_per_pass=self.diagonals_per_pass, cfg_text=self.cfg_text, cfg_action=self.cfg_action)


@dataclass
class ControllabilitySettings:
    actions: str = "logged"  # logged: the episode's own actions; uniform: drawn uniformly from the probe's classes
    probe_transitions: int = 4000  # real transitions the probe learns from (at most)
    epochs: int = 6  # raised on small data so that the probe gets at least 400 optimizer steps
    # None: the probe trains all its epochs, so its figures do not depend on the machine's speed
    # or load; a number of seconds stops it sooner, and the results say that it did
    time_limit_s: float | None = None
    downsample: int = 2  # average-pool frames by this before the probe's CNN (1 = full resolution)
    seed: int = 0


@dataclass
class CaptionSettings:
    max_events_per_episode: int = 4  # event captions asked per episode (besides its scene caption)
    max_new_tokens: int = 96


@dataclass
class FVDSettings:
    frames: int = 16  # window length (16 is the standard FVD window)
    n_videos: int = 0  # 0 = every evaluated episode long enough; 256+ for a stable figure


@dataclass
class Suite:
    name: str
    data: str
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    n_episodes: int = 8
    templates: list[str] = field(default_factory=lambda: list(TEMPLATES))
    clip_frames: int = 16
    rollout: RolloutSettings = field(default_factory=RolloutSettings)
    sensitivity_actions: list[str] = field(default_factory=lambda: ["left", "right"])
    offscreen_data: str = ""  # probe_offscreen episodes (uwm data gen-world --split probe_offscreen)
    revisit_data: str = ""  # probe_revisit episodes
    n_probes: int = 8
    offscreen_threshold_px: float = 8.0
    metrics: list[str] = field(default_factory=lambda: ["psnr", "ssim"])
    # trivial next-frame predictors shown beside the model (unified_wm/eval/baselines.py);
    # copy_shift needs episodes that record the camera (the procedural world)
    baselines: list[str] = field(default_factory=lambda: ["copy_last"])
    # episodes the controllability probe and the caption baseline learn from (normally the
    # model's training episodes); empty = the held-out episodes after the first n_episodes
    train_data: str = ""
    train_episodes: int = 300  # read at most this many of them
    controllability: ControllabilitySettings = field(default_factory=ControllabilitySettings)
    caption: CaptionSettings = field(default_factory=CaptionSettings)
    fvd: FVDSettings = field(default_factory=FVDSettings)
    description: str = ""

    def validate(self) -> None:
        for t in self.tasks:
            if t not in TASKS:
                raise ValueError(f"tasks: unknown task '{t}'; valid tasks: {', '.join(TASKS)}")
        for b in self.baselines:
            if b not in BASELINES:
                raise ValueError(f"baselines: unknown baseline '{b}'; valid baselines: {', '.join(BASELINES)}")
        for m in self.metrics:
            if m not in METRICS:
                raise ValueError(f"metrics: unknown metric '{m}'; valid metrics: {', '.join(METRICS)}")
        if self.controllability.actions not in CONTROL_ACTIONS:
            raise ValueError(f"controllability.actions: unknown value '{self.controllability.actions}'; "
                             f"valid values: {', '.join(CONTROL_ACTIONS)}")
        if "fvd" in self.tasks and self.fvd.frames < 9:
            raise ValueError(f"fvd.frames: {self.fvd.frames} frames is too short for I3D; use 16 (the standard window), at least 9")
        if "fvd" in self.tasks and self.fvd.frames <= self.rollout.context_frames:
            raise ValueError(f"fvd.frames ({self.fvd.frames}) must exceed rollout.context_frames ({self.rollout.context_frames})")
        for t in self.templates:
            if t not in TEMPLATES:
                raise ValueError(f"templates: unknown template '{t}'; valid templates: {', '.join(TEMPLATES)}")
        if self.rollout.mode not in ("token", "diagonal"):
            raise ValueError(f"rollout.mode: unknown mode '{self.rollout.mode}'; valid modes: token, diagonal")
        if self.rollout.context_frames < 1 or self.rollout.horizon < 1:
            raise ValueError("rollout: context_frames and horizon must be >= 1")
        for task, key in (("offscreen", "offscreen_data"), ("revisit", "revisit_data")):
            if task in self.tasks and not getattr(self, key):
                raise ValueError(f"task '{task}' needs '{key}' (a probe episode dataset)")
        if self.n_episodes < 1:
            raise ValueError(f"n_episodes = {self.n_episodes}; the suite needs at least 1 episode to evaluate")
        probes = [t for t in ("offscreen", "revisit") if t in self.tasks]
        if probes and self.n_probes < 1:
            raise ValueError(f"n_probes = {self.n_probes}; task '{probes[0]}' needs at least 1 probe episode")
        tl = self.controllability.time_limit_s
        if tl is not None and (isinstance(tl, bool) or not isinstance(tl, (int, float)) or tl <= 0):
            raise ValueError(f"controllability.time_limit_s = {tl!r}; expected a positive number of seconds, or null for no limit")
        if self.train_episodes < 1:
            raise ValueError(f"train_episodes = {self.train_episodes}; expected >= 1")


def check_held_out(model_dir: Path, ds, suite_path: str) -> str:
    """"checked" when the data's episode seeds were compared with the model's training seeds (an
    overlap is an error), "not checked" when the model has no ``training_seeds.json``."""
    seeds_file = Path(model_dir) / "training_seeds.json"
    if not seeds_file.is_file():
        print(f"warning: '{seeds_file}' is missing; cannot check that the suite's data is held out", file=sys.stderr)
        return "not checked"
    train_seeds = set(json.loads(seeds_file.read_text())["seeds"])
    overlap = sorted(train_seeds & {int(s) for s in ds["seed"]})
    if overlap:
        raise ConfigError(
            f"{suite_path}: the suite's data shares {len(overlap)} episode seeds with the model's training data "
            f"(e.g. {overlap[:5]}); evaluate on held-out episodes only"
        )
    return "checked"
