"""A first-person 3D source with ground-truth pose: ViZDoom (Doom levels, rendered offscreen).

Optional: ``pip install unified_wm[3d]`` (``vizdoom``; the Freedoom WADs and the scenarios
ship inside the wheel; no window, no display, no download). Each episode starts a new game
of ``scenario`` (a scenario of the wheel such as ``my_way_home``, or a path to a ``.cfg``)
with the episode's seed, then records ``frames`` screens (rendered at ``resolution``,
resized to ``width`` x ``height`` with PIL's area filter) and the ``frames - 1`` actions
between them; every action is held for ``tics_per_action`` game tics (35 tics = 1 s).

Actions use names of the ``pan5`` action set (``unified_wm.tokenization.actions``), so a
processor built with ``pan5`` already knows them; their meaning here is first-person:

  stay   no button
  up     move forward          down   move backward
  left   turn left by ``turn_degrees``      right  turn right by ``turn_degrees``

Turns use ViZDoom's delta button, so a turn is exact: ``turn_degrees / tics_per_action``
must be a whole number of Doom's angle units (360/65536 degrees), and then turning N
steps one way and N steps back returns to the same pose bit for bit (checked by
:meth:`DoomConfig.validate`). The policy is sticky-random: keep the previous action with
probability ``sticky_prob``, else draw one with probabilities ``action_probs``.

Columns: source and action_space ``"doom:<scenario>"``, rewards are the game's (summed over
the action's tics). ``state`` JSON: ``{"scenario", "map", "tics_per_action", "turn_degrees",
"action_set": "pan5", "action_meanings", "resolution", "frames": [{"pos": [x, y, z],
"angle": deg, "vel": [vx, vy], "health", "objects": [{"name", "id", "pos": [x, y, z],
"bbox": [x0, y0, x1, y1]}]}]}``; positions in Doom map units, angle in degrees
counter-clockwise from east (a left turn raises it), ``bbox`` in pixels of the rendered
screen, ``objects`` the things in view (ViZDoom's labels buffer; the player excluded).

Captions, derived from the state: t=0 ``"doom, my way home: the player faces north"`` plus
``"; a green armor is in view"`` for things in view; later frames, joined with ``"; "``:
the player's motion when it changes (``"the player turns left"``, ``"the player turns
right"``, ``"the player walks forward"``, ``"the player walks backward"``, ``"the player
walks into a wall"``, ``"the player stops"``), things that come into or go out of view
(``"a green armor comes into view"``, ``"the green armor goes out of view"``), health
(``"the player is hurt"``, ``"the player's health rises"``).

If the game ends during an action (``my_way_home`` ends when the player reaches the
armor), the episode ends at the last recorded frame (T may be shorter); the action that
ended it and its reward are in ``state["final_step"]`` (``state["game_over"]`` is true).

Revisit probes (split ``probe_revisit``): a random walk of ``probe_walk_steps`` actions,
then ``stay`` until the player is at rest (its position does not change over one action);
that frame is ``first_visit_t``. The player turns ``direction`` (left/right) for N steps, holds
for H steps and turns back N steps, (N, H) drawn from the pairs of ``probe_turn_steps`` x
``probe_hold`` that still fit in ``probe_frames`` once the player is at rest;
``return_t`` is the frame after the last turn back, where the pose equals the first
visit's exactly; the remaining frames are ``stay``. ``state["probe"] = {"kind": "revisit",
"leave_t", "return_t", "first_visit_t", "N", "hold", "direction", "degrees"}`` (``leave_t``
= first_visit_t + 1, the first frame whose pose differs; ``N`` = return_t - leave_t, as
in the world's revisit probes; ``degrees`` = the turn away). The real frame at
``return_t`` is the ground truth a world model must reproduce; for a scene without moving
things (``my_way_home``) it equals the first-visit frame pixel for pixel.

Seeds follow :func:`unified_wm.data.world.episode_seeds` (train 0 + seed + i, val 500_000
+ seed + i, probe_revisit 2_000_000 + seed + i).
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from unified_wm.data.sources import EpisodeSource, ProbeError, generate_dataset, generator_main
from unified_wm.utils import from_dict, load_config

ACTIONS = ["stay", "left", "right", "up", "down"]  # the names of ACTION_SETS["pan5"]
ACTION_MEANINGS = {"stay": "no-op", "left": "turn left", "right": "turn right", "up": "move forward", "down": "move backward"}
ANGLE_UNIT = 360.0 / 65536  # Doom turns in whole units of 2^16 of its 32-bit angle
SPLITS = ("train", "val", "probe_revisit")
RESOLUTIONS = ("RES_160X120", "RES_320X240", "RES_640X480")
MOVE_EPS = 0.5  # map units: less than this per action counts as not moving


class DoomUnavailable(ImportError):
    """vizdoom is not installed (or its binary does not load)."""


@dataclass
class DoomConfig:
    """Settings of the ViZDoom source (YAML, strict keys; see recipes/data/doom.yaml)."""

    scenario: str = "my_way_home"  # a scenario of the vizdoom wheel, or a path to a .cfg
    n_episodes: int = 64
    frames: int = 32  # T, recorded frames per episode
    tics_per_action: int = 4
    turn_degrees: float = 22.5  # per turn action
    sticky_prob: float = 0.6
    action_probs: dict[str, float] = field(default_factory=lambda: {"stay": 0.1, "up": 0.45, "down": 0.05, "left": 0.2, "right": 0.2})
    resolution: Literal["RES_160X120", "RES_320X240", "RES_640X480"] = "RES_160X120"
    render_weapon: bool = False
    width: int = 64
    height: int = 64
    seed: int = 0
    split: Literal["train", "val"] = "train"
    # revisit probes
    probe_episodes: int = 32
    probe_frames: int = 32
    probe_walk_steps: int = 4
    probe_turn_steps: list[int] = field(default_factory=lambda: [4, 6, 8])
    probe_hold: list[int] = field(default_factory=lambda: [0, 2, 4])

    def validate(self) -> None:
        if not self.scenario:
            raise ValueError("scenario must name a ViZDoom scenario (e.g. 'my_way_home') or a .cfg file")
        if self.frames < 2 or self.probe_frames < 2:
            raise ValueError(f"frames ({self.frames}) and probe_frames ({self.probe_frames}) must be >= 2")
        if self.n_episodes < 1 or self.probe_episodes < 1 or self.tics_per_action < 1:
            raise ValueError("need n_episodes >= 1, probe_episodes >= 1 and tics_per_action >= 1")
        per_tic = self.turn_degrees / self.tics_per_action
        units = per_tic / ANGLE_UNIT
        if self.turn_degrees <= 0 or abs(units - round(units)) > 1e-6:
            near = max(1, round(units)) * ANGLE_UNIT * self.tics_per_action
            raise ValueError(
                f"turn_degrees={self.turn_degrees:g} over tics_per_action={self.tics_per_action} is {per_tic:g} degrees a tic, "
                f"not a whole number of Doom angle units (360/65536 degrees): turning away and back would not return "
                f"to the same pose; use e.g. turn_degrees={near:g} (22.5 with 4 tics is exact)"
            )
        bad = [a for a in self.action_probs if a not in ACTIONS]
        if bad:
            raise ValueError(f"action_probs: unknown action '{bad[0]}'; actions: {', '.join(ACTIONS)}")
        if any(p < 0 for p in self.action_probs.values()) or sum(self.action_probs.values()) <= 0:
            raise ValueError(f"action_probs must be >= 0 with a positive sum, got {self.action_probs}")
        if not 0 <= self.sticky_prob <= 1:
            raise ValueError(f"sticky_prob must be in [0, 1], got {self.sticky_prob}")
        if self.width < 8 or self.height < 8:
            raise ValueError(f"width x height = {self.width}x{self.height}; both must be at least 8")
        if not self.probe_turn_steps or min(self.probe_turn_steps) < 1:
            raise ValueError(f"probe_turn_steps must be a non-empty list of ints >= 1, got {self.probe_turn_steps}")
        if not self.probe_hold or min(self.probe_hold) < 0:
            raise ValueError(f"probe_hold must be a non-empty list of ints >= 0, got {self.probe_hold}")
        if self.probe_walk_steps < 0:
            raise ValueError(f"probe_walk_steps must be >= 0, got {self.probe_walk_steps}")
        need = self.probe_walk_steps + 2 * max(self.probe_turn_steps) + max(self.probe_hold) + 2
        if self.probe_frames < need:
            raise ValueError(
                f"probe_frames={self.probe_frames} is too short: a walk of probe_walk_steps={self.probe_walk_steps}, "
                f"2 x {max(self.probe_turn_steps)} turns and a hold of {max(self.probe_hold)} need at least {need} "
                f"(plus a few frames to come to rest)"
            )


def as_config(config) -> DoomConfig:
    if config is None:
        return DoomConfig()
    if isinstance(config, DoomConfig):
        return config
    if isinstance(config, dict):
        return from_dict(DoomConfig, config)
    return load_config(DoomConfig, config)


def require_vizdoom():
    try:
        import vizdoom
    except Exception as e:  # ImportError, or a broken binary wheel
        raise DoomUnavailable(
            f"the Doom source needs vizdoom, which could not be imported ({type(e).__name__}: {e}); "
            "install it with: pip install unified_wm[3d]"
        ) from None
    return vizdoom


def doom_scenarios() -> list[str]:
    """Names of the scenarios that ship in the vizdoom wheel (``my_way_home``, ``basic``, ...)."""
    vzd = require_vizdoom()
    return sorted(f[:-4] for f in os.listdir(vzd.scenarios_path) if f.endswith(".cfg"))


# Scenarios of the wheel that cannot record here: they would crash or hang the engine in-process.
UNSUPPORTED = {
    "cig": "a multiplayer scenario (needs a host and other players; the engine crashes)",
    "multi_duel": "a multiplayer scenario (needs a host and other players; the engine crashes)",
    "freedoom1": "hangs at start-up in a windowless process here",
}


def scenario_path(scenario: str) -> Path:
    """The .cfg file of ``scenario``; a ValueError naming it and the valid names if there is none."""
    vzd = require_vizdoom()
    if scenario.endswith(".cfg"):
        p = Path(scenario)
        if not p.is_file():
            raise ValueError(f"ViZDoom scenario file '{p}' (config key 'scenario') does not exist")
        return p
    if scenario in UNSUPPORTED:
        raise ValueError(f"ViZDoom scenario {scenario!r} (config key 'scenario') is not supported: {UNSUPPORTED[scenario]}; "
                         f"supported: {', '.join(n for n in doom_scenarios() if n not in UNSUPPORTED)}")
    p = Path(vzd.scenarios_path) / f"{scenario}.cfg"
    if not p.is_file():
        raise ValueError(
            f"unknown ViZDoom scenario {scenario!r} (config key 'scenario'); valid: {', '.join(doom_scenarios())} "
            "(or a path to a .cfg file)"
        )
    return p


def scenario_name(cfg: DoomConfig) -> str:
    return Path(cfg.scenario).stem if cfg.scenario.endswith(".cfg") else cfg.scenario


def make_game(cfg: DoomConfig):
    """An initialised, windowless DoomGame for ``cfg`` (buttons, variables, screen set here)."""
    vzd = require_vizdoom()
    path = scenario_path(cfg.scenario)
    g = vzd.DoomGame()
    g.load_config(str(path))  # a .cfg names its WAD relative to itself
    # the engine writes its own .ini (into the working directory by default); keep one per user in the temp dir
    ini_dir = Path(tempfile.gettempdir()) / f"uwm-vizdoom-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    ini_dir.mkdir(parents=True, exist_ok=True)
    g.set_doom_config_path(str(ini_dir / "_vizdoom.ini"))
    g.set_window_visible(False)
    g.set_sound_enabled(False)
    g.set_mode(vzd.Mode.PLAYER)
    g.set_screen_resolution(getattr(vzd.ScreenResolution, cfg.resolution))
    g.set_screen_format(vzd.ScreenFormat.RGB24)
    g.set_render_hud(False)
    g.set_render_crosshair(False)
    g.set_render_weapon(cfg.render_weapon)
    g.set_render_messages(False)
    g.set_render_screen_flashes(False)
    g.set_labels_buffer_enabled(True)
    for off in ("set_audio_buffer_enabled", "set_automap_buffer_enabled", "set_depth_buffer_enabled"):
        getattr(g, off)(False)  # some scenario files turn these on; an audio buffer hangs without a sound device
    g.set_available_buttons([vzd.Button.MOVE_FORWARD, vzd.Button.MOVE_BACKWARD, vzd.Button.TURN_LEFT_RIGHT_DELTA])
    GV = vzd.GameVariable
    g.set_available_game_variables([GV.POSITION_X, GV.POSITION_Y, GV.POSITION_Z, GV.ANGLE, GV.VELOCITY_X, GV.VELOCITY_Y, GV.HEALTH])
    g.set_episode_timeout(10**9)  # the recorder decides the length
    try:
        g.init()
    except Exception as e:
        raise ValueError(f"cannot start ViZDoom scenario '{path}' (config key 'scenario'): {type(e).__name__}: {e}") from None
    return g


def _buttons(cfg: DoomConfig, action: str) -> list[float]:
    per_tic = cfg.turn_degrees / cfg.tics_per_action
    # ViZDoom's delta turns right for positive values; a left turn raises ANGLE
    return {
        "stay": [0, 0, 0],
        "up": [1, 0, 0],
        "down": [0, 1, 0],
        "left": [0, 0, -per_tic],
        "right": [0, 0, per_tic],
    }[action]


def _words(name: str) -> str:
    """'GreenArmor' -> 'green armor'."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name).lower()


def _compass(angle: float) -> str:
    dirs = ["east", "north-east", "north", "north-west", "west", "south-west", "south", "south-east"]
    return dirs[int(((angle % 360) + 22.5) // 45) % 8]


def _resize(screen: np.ndarray, w: int, h: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(screen).resize((w, h), Image.BOX), dtype=np.uint8)


def _observe(game, cfg: DoomConfig) -> tuple[np.ndarray, dict]:
    st = game.get_state()
    v = [float(x) for x in st.game_variables]
    objects = []
    for lab in st.labels:
        if lab.object_name == "DoomPlayer":
            continue
        objects.append({
            "name": lab.object_name, "id": int(lab.object_id),
            "pos": [round(float(lab.object_position_x), 3), round(float(lab.object_position_y), 3), round(float(lab.object_position_z), 3)],
            "bbox": [int(lab.x), int(lab.y), int(lab.x + lab.width), int(lab.y + lab.height)],
        })
    rec = {"pos": v[0:3], "angle": v[3], "vel": v[4:6], "health": v[6], "objects": objects}
    return _resize(st.screen_buffer, cfg.width, cfg.height), rec


def _angle_delta(a: float, b: float) -> float:
    return (b - a + 180.0) % 360.0 - 180.0


def _motion(prev: dict, cur: dict, action: str) -> str:
    """The player's motion over one action, from the pose (not from the button)."""
    d_angle = _angle_delta(prev["angle"], cur["angle"])
    if abs(d_angle) > 1e-3:
        return "turns left" if d_angle > 0 else "turns right"
    dx, dy = cur["pos"][0] - prev["pos"][0], cur["pos"][1] - prev["pos"][1]
    dist = math.hypot(dx, dy)
    if action in ("up", "down") and dist < MOVE_EPS:
        return "walks into a wall"
    if dist >= MOVE_EPS:
        a = math.radians(cur["angle"])
        return "walks forward" if dx * math.cos(a) + dy * math.sin(a) >= 0 else "walks backward"
    return "stops"


def _captions(cfg: DoomConfig, records: list[dict], actions: list[str]) -> list[dict]:
    title = scenario_name(cfg).replace("_", " ")
    r0 = records[0]
    first = [f"doom, {title}: the player faces {_compass(r0['angle'])}"]
    for name in sorted({o["name"] for o in r0["objects"]}):
        first.append(f"a {_words(name)} is in view")
    caps = [{"t": 0, "text": "; ".join(first)}]
    motion = "stops"
    for t in range(1, len(records)):
        prev, cur = records[t - 1], records[t]
        events = []
        m = _motion(prev, cur, actions[t - 1])
        if m != motion:
            events.append(f"the player {m}")
            motion = m
        seen_before = {o["name"] for o in prev["objects"]}
        seen_now = {o["name"] for o in cur["objects"]}
        events += [f"a {_words(n)} comes into view" for n in sorted(seen_now - seen_before)]
        events += [f"the {_words(n)} goes out of view" for n in sorted(seen_before - seen_now)]
        if cur["health"] < prev["health"]:
            events.append("the player is hurt")
        elif cur["health"] > prev["health"]:
            events.append("the player's health rises")
        if events:
            caps.append({"t": t, "text": "; ".join(events)})
    return caps


class _Recorder:
    def __init__(self, game, cfg: DoomConfig):
        self.g, self.cfg = game, cfg
        self.frames, self.records, self.actions, self.rewards = [], [], [], []
        self.ended = False
        self.final: dict | None = None
        f, rec = _observe(game, cfg)
        self.frames.append(f)
        self.records.append(rec)

    def step(self, action: str) -> bool:
        """Play ``action``; False (and nothing recorded) if the game has ended."""
        if self.ended:
            return False
        r = float(self.g.make_action(_buttons(self.cfg, action), self.cfg.tics_per_action))
        if self.g.is_episode_finished():
            # the game ended during this action: there is no screen after it, so the episode ends
            # at the last recorded frame; the ending action and its reward go to the state
            self.ended = True
            self.final = {"action": action, "reward": r}
            return False
        f, rec = _observe(self.g, self.cfg)
        self.frames.append(f)
        self.records.append(rec)
        self.actions.append(action)
        self.rewards.append(r)
        return True


def _policy(cfg: DoomConfig, rng: np.random.Generator):
    names = list(cfg.action_probs)
    p = np.array([cfg.action_probs[n] for n in names], dtype=float)
    p /= p.sum()
    last = [None]

    def act() -> str:
        if last[0] is None or rng.uniform() >= cfg.sticky_prob:
            last[0] = names[int(rng.choice(len(names), p=p))]
        return last[0]

    return act


def _episode_dict(cfg: DoomConfig, game, seed: int, split: str, rec: _Recorder, probe: dict | None = None) -> dict:
    name = f"doom:{scenario_name(cfg)}"
    state = {
        "scenario": scenario_name(cfg),
        "map": game.get_doom_map(),
        "tics_per_action": cfg.tics_per_action,
        "turn_degrees": cfg.turn_degrees,
        "action_set": "pan5",
        "action_meanings": ACTION_MEANINGS,
        "resolution": cfg.resolution,
        "game_over": rec.ended,
        "final_step": rec.final,  # {"action", "reward"} of the action that ended the game, else null
        "frames": rec.records,
    }
    if probe is not None:
        state["probe"] = probe
    return {
        "episode_id": f"doom-{scenario_name(cfg)}-{split}-{seed:08d}",
        "source": name,
        "seed": int(seed),
        "split": split,
        "action_space": name,
        "frames": np.stack(rec.frames).astype(np.uint8),
        "actions": list(rec.actions),
        "rewards": list(rec.rewards),
        "captions": _captions(cfg, rec.records, rec.actions),
        "state": json.dumps(state, separators=(",", ":")),
    }


def generate_episode(cfg, seed: int, split: str = "train", game=None) -> dict:
    """One Doom episode with the episode dataset's columns (deterministic in cfg and seed).

    ``split="probe_revisit"`` builds a revisit probe (see the module docstring).
    """
    cfg = as_config(cfg)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    own = game is None
    game = game or make_game(cfg)
    try:
        game.set_seed(int(seed))
        game.new_episode()
        rng = np.random.default_rng([int(seed), 11])
        rec = _Recorder(game, cfg)
        if split == "probe_revisit":
            return _probe_revisit(cfg, game, seed, rng, rec)
        act = _policy(cfg, rng)
        for _ in range(cfg.frames - 1):
            if not rec.step(act()):
                break
        return _episode_dict(cfg, game, seed, split, rec)
    finally:
        if own:
            game.close()


def _probe_revisit(cfg: DoomConfig, game, seed: int, rng: np.random.Generator, rec: _Recorder) -> dict:
    T = cfg.probe_frames
    direction = "left" if rng.uniform() < 0.5 else "right"
    back = "right" if direction == "left" else "left"
    act = _policy(cfg, rng)
    for _ in range(cfg.probe_walk_steps):
        rec.step(act())
    # come to rest: the position (and angle) do not change over one `stay`; then N turns away,
    # `hold` stays and N turns back must still fit: return_t = first + 2N + hold <= T - 1
    pairs = [(int(n), int(h)) for n in cfg.probe_turn_steps for h in cfg.probe_hold]
    shortest = min(2 * n + h for n, h in pairs)
    while True:
        if len(rec.frames) + shortest > T or rec.ended:
            raise ProbeError(
                f"doom revisit probe (seed {seed}): the player did not come to rest in time for the shortest probe "
                f"(2 x {min(cfg.probe_turn_steps)} turns, hold {min(cfg.probe_hold)}) in probe_frames={T}; "
                f"raise probe_frames or lower probe_walk_steps (={cfg.probe_walk_steps})"
            )
        a, b = rec.records[-2:] if len(rec.records) >= 2 else (None, rec.records[-1])
        if a is not None and rec.actions[-1] == "stay" and a["pos"] == b["pos"] and a["angle"] == b["angle"]:
            break
        rec.step("stay")
    fitting = [(n, h) for n, h in pairs if len(rec.frames) + 2 * n + h <= T]
    N, hold = fitting[int(rng.integers(len(fitting)))]
    first = len(rec.frames) - 1
    for a in [direction] * N + ["stay"] * hold + [back] * N:
        if not rec.step(a):
            raise ProbeError(f"doom revisit probe (seed {seed}): the game ended during the probe")
    return_t = len(rec.frames) - 1
    while len(rec.frames) < T and rec.step("stay"):
        pass
    probe = {"kind": "revisit", "leave_t": first + 1, "return_t": return_t, "first_visit_t": first, "N": return_t - first - 1,
             "hold": hold, "direction": direction, "degrees": N * cfg.turn_degrees}
    return _episode_dict(cfg, game, seed, "probe_revisit", rec, probe)


# ----------------------------------------------------------------------------- datasets


DOOM = EpisodeSource(
    name="doom", description="Record first-person ViZDoom episodes (with pose) as an episode dataset.", config_cls=DoomConfig,
    as_config=as_config, generate_episode=generate_episode, splits=SPLITS, frame_hw=lambda c: (c.height, c.width),
    label=lambda c: f"doom {scenario_name(c)}", example_config="recipes/data/doom.yaml", open=make_game,
    check=lambda c: scenario_path(c.scenario), probe_splits=("probe_revisit",),
    listing=("--list-scenarios", "print the scenarios that ship in the vizdoom wheel and exit", doom_scenarios),
)


def generate_doom(config, out_dir: str | os.PathLike, **kw) -> Path:
    """A Doom episode dataset at ``out_dir`` (:func:`unified_wm.data.sources.generate_dataset`)."""
    return generate_dataset(DOOM, config, out_dir, **kw)


def main(argv: list[str] | None = None) -> int:
    """`uwm data gen-doom --config C --out DIR [--episodes N] [--seed S] [--split train|val|probe_revisit]`."""
    return generator_main(DOOM, argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
