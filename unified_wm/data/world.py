"""The procedural world: small 2D scenes whose objects live on after the camera looks away.

A world is larger than the camera's view (default 192x128 world pixels seen through a
64x64 view, one world pixel per view pixel). Objects with an identity (a colour and a
kind: car, ball, box) drive, roll and slide around it with momentum and bounded random
acceleration; static occluders (trees, buildings) are drawn over them; a textured
background (grass, a road with a dashed centre line, a dirt path, flowers, rocks, ponds)
makes camera motion visible. The camera pans with the discrete action set ``pan5``.

The point of the data: an object seen in view, then out of view while the camera looks
elsewhere, must be where its motion took it when the camera looks back. Every episode
carries the ground-truth state of every frame (``state`` JSON, see :func:`generate_episode`)
so that eval suites can check exactly that, and two probe splits test it directly:

* ``probe_offscreen``: an object is seen moving; the camera pans away so that the object
  is out of view for exactly N frames (N from ``probe_offscreen_N``), then pans back.
  ``state["probe"] = {"kind": "offscreen", "object_id", "away_start", "return_t", "N",
  "direction"}``: the object is in view at every frame before ``away_start``, out of view
  at frames ``away_start .. return_t-1`` (N = return_t - away_start of them) and in view,
  not occluded, at ``return_t``.
* ``probe_revisit``: every object is static; the camera leaves (``leave_t`` is the first
  frame whose camera differs from the first visit), pans until the new view shares no
  pixel with the old one, waits, and comes back (``return_t`` is the first frame whose
  camera equals the first visit's again). ``state["probe"] = {"kind": "revisit",
  "leave_t", "return_t", "first_visit_t", "N"}``; the true frame at ``return_t`` equals
  the frame at ``first_visit_t`` pixel for pixel.

Seeds. Episode ``i`` of a dataset generated with base seed ``s`` for split ``split`` has
seed ``SPLIT_SEED_OFFSETS[split] + s + i`` (stored in the ``seed`` column):
train 0, val 500_000, probe_offscreen 1_000_000, probe_revisit 2_000_000. The generator
refuses a base seed + count that would run into the next split's range, so training
seeds never collide with val or probe seeds; :func:`seeds_of` lets eval check it.

World borders: ``border: bounce`` reflects an object's velocity (times ``bounce``, the
restitution) when its centre reaches a border; ``border: wrap`` teleports it to the
opposite border (the camera never sees across a border, it is clamped inside the world).

Captions hold from their frame on and are derived from the state alone:

* t=0: ``"a red car and a blue ball; the camera looks at the road; the red car is in view"``
* later frames, joined with ``"; "`` when several happen at once, camera first, then
  objects in id order: ``"the camera pans right"``, ``"the camera stops"``,
  ``"the red car enters from the left"`` (was not in view at t-1, is at t; the side is
  where it was at t-1), ``"the blue ball leaves to the right"`` (in view at t-1, not at
  t; the side is where it is at t), ``"the red car is hidden behind a tree"`` (occluded
  at t, in view and not occluded at t-1), ``"the red car comes out from behind the tree"``
  (occluded at t-1, in view and not occluded at t).

Visibility: ``in_view`` means at least one of the object's sprite pixels lies inside the
view; ``occluded`` means it is in view and at least ``occluded_fraction`` of its in-view
pixels are covered by occluders; ``visible = in_view and not occluded``.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from unified_wm.data.episodes import SPLIT_SEED_OFFSETS, SPLIT_SEED_SPAN
from unified_wm.data.sources import EpisodeSource, generate_dataset, generator_main
from unified_wm.data.world_scene import KINDS, REGIONS, Scene, Sprite, build_scene, make_sprite
from unified_wm.utils import from_dict, load_config

ACTION_SPACES: dict[str, list[str]] = {"pan5": ["stay", "left", "right", "up", "down"]}
ACTION_DELTAS: dict[str, tuple[int, int]] = {"stay": (0, 0), "left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up", "stay": "stay"}

PROBE_KINDS = ("probe_offscreen", "probe_revisit")

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "blue": (50, 90, 255),
    "yellow": (250, 220, 40),
    "white": (245, 245, 245),
    "purple": (170, 60, 220),
    "orange": (255, 140, 20),
    "cyan": (40, 220, 230),
    "pink": (255, 120, 190),
    "green": (60, 235, 60),
    "black": (25, 25, 25),
}
SOURCE = "world"


@dataclass
class WorldConfig:
    """Settings of the procedural world (YAML, strict keys; see recipes/data/world*.yaml)."""

    # geometry (pixels)
    view_width: int = 64
    view_height: int = 64
    world_width: int = 192
    world_height: int = 128
    pan_step: int = 8  # camera motion per pan action, world pixels
    # objects
    min_objects: int = 1
    max_objects: int = 3
    kinds: list[str] = field(default_factory=lambda: list(KINDS))
    colors: list[str] = field(default_factory=lambda: ["red", "blue", "yellow", "white", "purple", "orange", "cyan"])
    min_speed: float = 0.5  # initial speed range, pixels per frame
    max_speed: float = 2.0  # also the cap on speed at every frame
    max_accel: float = 0.15  # bounded random acceleration per axis per frame
    friction: float = 0.0  # velocity *= (1 - friction) each frame
    border: Literal["bounce", "wrap"] = "bounce"
    bounce: float = 1.0  # restitution at a border when border == bounce
    # occluders and background
    occluder_density: float = 0.0  # expected occluders per view-sized area of world
    occluded_fraction: float = 0.9  # share of in-view pixels covered to count as occluded
    background: Literal["road", "plain"] = "road"
    n_landmarks: int = 8  # static background features (flowers, rocks, ponds)
    # scale of the per-pixel noise that textures grass, path and road (1.0: the default
    # world; 0.0: smooth surfaces). The noise is drawn either way, so a scene differs only
    # in its texture. Independent per-pixel noise cannot pass through a 64-token frame code:
    # at 1.0 it caps a tokenizer's PSNR near 31.6 dB (BENCHMARKS.md, video tokenizer).
    texture: float = 1.0
    # camera policy: sticky random bursts, plus looking back for objects long out of view
    stay_prob: float = 0.35
    min_burst: int = 2
    max_burst: int = 6
    max_offscreen: int = 8  # frames an object may stay out of view before the policy may look for it
    lookback_prob: float = 0.5  # chance a new burst pans toward such an object
    # episodes
    episode_length: int = 16  # T, frames per episode
    n_episodes: int = 300
    seed: int = 0
    # probes
    probe_episodes: int = 32
    probe_frames: int = 32  # T of probe episodes
    probe_offscreen_N: list[int] = field(default_factory=lambda: [4, 8, 12])
    probe_revisit_hold: list[int] = field(default_factory=lambda: [0, 4, 8])

    def validate(self) -> None:
        if self.view_width < 8 or self.view_height < 8:
            raise ValueError(f"view_width x view_height = {self.view_width}x{self.view_height}; both must be at least 8")
        if self.world_width < self.view_width:
            raise ValueError(
                f"world_width={self.world_width} is smaller than view_width={self.view_width}; the world must be at least as large as the view"
            )
        if self.world_height < self.view_height:
            raise ValueError(
                f"world_height={self.world_height} is smaller than view_height={self.view_height}; the world must be at least as large as the view"
            )
        if not 0 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 0 <= min_objects ({self.min_objects}) <= max_objects ({self.max_objects})")
        if self.max_objects > len(self.colors):
            raise ValueError(f"max_objects={self.max_objects} needs at least that many colors, got {len(self.colors)} ({self.colors})")
        bad = [c for c in self.colors if c not in PALETTE]
        if bad:
            raise ValueError(f"colors: unknown colour {bad[0]!r}; known: {', '.join(PALETTE)}")
        if len(set(self.colors)) != len(self.colors):
            raise ValueError(f"colors must not repeat, got {self.colors}")
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise ValueError(f"kinds: expected a non-empty subset of {list(KINDS)}, got {self.kinds}")
        if not 0 <= self.min_speed <= self.max_speed:
            raise ValueError(f"need 0 <= min_speed ({self.min_speed}) <= max_speed ({self.max_speed})")
        if self.max_accel < 0 or not 0 <= self.friction < 1 or not 0 <= self.bounce <= 1:
            raise ValueError("need max_accel >= 0, 0 <= friction < 1 and 0 <= bounce <= 1")
        if self.pan_step < 1:
            raise ValueError(f"pan_step must be >= 1, got {self.pan_step}")
        if self.occluder_density < 0 or not 0 < self.occluded_fraction <= 1:
            raise ValueError("need occluder_density >= 0 and 0 < occluded_fraction <= 1")
        if not 1 <= self.min_burst <= self.max_burst:
            raise ValueError(f"need 1 <= min_burst ({self.min_burst}) <= max_burst ({self.max_burst})")
        if not 0 <= self.texture <= 4:
            raise ValueError(f"texture must be in [0, 4] (scale of the per-pixel surface noise; 1.0 is the default world), got {self.texture}")
        for name in ("stay_prob", "lookback_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.episode_length < 2 or self.probe_frames < 2:
            raise ValueError(f"episode_length ({self.episode_length}) and probe_frames ({self.probe_frames}) must be >= 2")
        if self.n_episodes < 1 or self.probe_episodes < 1:
            raise ValueError("n_episodes and probe_episodes must be >= 1")
        for name in ("n_landmarks", "max_offscreen"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.seed < SPLIT_SEED_SPAN:
            raise ValueError(f"seed must be in [0, {SPLIT_SEED_SPAN}), got {self.seed}")
        if not self.probe_offscreen_N or min(self.probe_offscreen_N) < 1:
            raise ValueError(f"probe_offscreen_N must be a non-empty list of ints >= 1, got {self.probe_offscreen_N}")
        if not self.probe_revisit_hold or min(self.probe_revisit_hold) < 0:
            raise ValueError(f"probe_revisit_hold must be a non-empty list of ints >= 0, got {self.probe_revisit_hold}")


def as_config(config: "WorldConfig | str | os.PathLike | dict | None") -> WorldConfig:
    if config is None:
        return WorldConfig()
    if isinstance(config, WorldConfig):
        return config
    if isinstance(config, dict):
        return from_dict(WorldConfig, config)
    return load_config(WorldConfig, config)


# ----------------------------------------------------------------------------- objects


@dataclass
class Obj:
    id: int
    color: str
    kind: str
    sprites: tuple[Sprite, Sprite]  # facing right, facing left (same mask for symmetric kinds)

    @property
    def name(self) -> str:
        return f"{self.color} {self.kind}"


def spawn_objects(cfg: WorldConfig, rng: np.random.Generator, scene: Scene, n: int, static: bool = False):
    W, H = cfg.world_width, cfg.world_height
    colors = list(rng.permutation(cfg.colors))[:n]
    objs, pos, vel = [], np.zeros((n, 2)), np.zeros((n, 2))
    for i in range(n):
        kind = str(cfg.kinds[int(rng.integers(len(cfg.kinds)))])
        color = str(colors[i])
        objs.append(Obj(i, color, kind, (make_sprite(kind, PALETTE[color]), make_sprite(kind, PALETTE[color], facing_left=True))))
        speed = float(rng.uniform(cfg.min_speed, cfg.max_speed))
        ang = float(rng.uniform(0, 2 * math.pi))
        if kind == "car":
            lane = -5.0 if rng.uniform() < 0.5 else 5.0
            y = scene.road_y + lane if scene.road_y is not None else float(rng.uniform(8, H - 8))
            pos[i] = (rng.uniform(8, W - 8), y)
            vel[i] = (speed * (1 if rng.uniform() < 0.5 else -1), 0.0)
        else:
            pos[i] = (rng.uniform(6, W - 6), rng.uniform(6, H - 6))
            vel[i] = (speed * math.cos(ang), speed * math.sin(ang))
            if kind == "box":
                vel[i] *= 0.6
    if static:
        vel[:] = 0.0
    return objs, pos, vel


def simulate_objects(cfg: WorldConfig, rng: np.random.Generator, objs: list[Obj], pos, vel, T: int, static: bool = False):
    """Positions and velocities [T, n, 2]; objects do not depend on the camera."""
    n = len(objs)
    P = np.zeros((T, n, 2))
    V = np.zeros((T, n, 2))
    W, H = cfg.world_width, cfg.world_height
    pos, vel = pos.copy(), vel.copy()
    is_car = np.array([o.kind == "car" for o in objs], bool)
    half = np.array([[o.sprites[0].size[0] / 2, o.sprites[0].size[1] / 2] for o in objs]).reshape(n, 2)
    lo, hi = half, np.array([W, H])[None, :] - half
    for t in range(T):
        P[t], V[t] = pos, vel
        if static:
            continue
        acc = rng.uniform(-cfg.max_accel, cfg.max_accel, size=(n, 2))
        acc[is_car, 1] = 0.0
        vel = (vel + acc) * (1.0 - cfg.friction)
        sp = np.linalg.norm(vel, axis=1, keepdims=True)
        vel = np.where(sp > cfg.max_speed, vel * (cfg.max_speed / np.maximum(sp, 1e-9)), vel)
        pos = pos + vel
        if cfg.border == "bounce":
            for ax in range(2):
                below = pos[:, ax] < lo[:, ax]
                above = pos[:, ax] > hi[:, ax]
                pos[below, ax] = 2 * lo[below, ax] - pos[below, ax]
                pos[above, ax] = 2 * hi[above, ax] - pos[above, ax]
                vel[below, ax] = abs(vel[below, ax]) * cfg.bounce
                vel[above, ax] = -abs(vel[above, ax]) * cfg.bounce
        else:
            pos[:, 0] %= W
            pos[:, 1] %= H
    return P, V


def sprite_for(o: Obj, v) -> Sprite:
    return o.sprites[1] if (o.kind == "car" and v[0] < 0) else o.sprites[0]


def _topleft(sprite: Sprite, p) -> tuple[int, int]:
    w, h = sprite.size
    return int(math.floor(p[0] - w / 2 + 0.5)), int(math.floor(p[1] - h / 2 + 0.5))


def _view_pixels(sprite: Sprite, x0: int, y0: int, cam, vw: int, vh: int):
    """(sprite slice, view slice) of the sprite's overlap with the view, or None."""
    w, h = sprite.size
    vx0, vy0 = x0 - cam[0], y0 - cam[1]
    ax0, ay0 = max(0, vx0), max(0, vy0)
    ax1, ay1 = min(vw, vx0 + w), min(vh, vy0 + h)
    if ax0 >= ax1 or ay0 >= ay1:
        return None
    ss = (slice(ay0 - vy0, ay1 - vy0), slice(ax0 - vx0, ax1 - vx0))
    vs = (slice(ay0, ay1), slice(ax0, ax1))
    return ss, vs


def sprite_in_view(sprite: Sprite, p, cam, vw: int, vh: int) -> bool:
    x0, y0 = _topleft(sprite, p)
    sl = _view_pixels(sprite, x0, y0, cam, vw, vh)
    return sl is not None and bool(sprite.mask[sl[0]].any())


# ----------------------------------------------------------------------------- camera


def clamp_camera(cfg: WorldConfig, x: int, y: int) -> tuple[int, int]:
    return (min(max(x, 0), cfg.world_width - cfg.view_width), min(max(y, 0), cfg.world_height - cfg.view_height))


def step_camera(cfg: WorldConfig, cam, action: str):
    dx, dy = ACTION_DELTAS[action]
    return clamp_camera(cfg, cam[0] + dx * cfg.pan_step, cam[1] + dy * cfg.pan_step)


def camera_path(cfg: WorldConfig, cam0, actions: list[str]):
    cams = [tuple(cam0)]
    for a in actions:
        cams.append(step_camera(cfg, cams[-1], a))
    return cams


def _policy_rollout(cfg: WorldConfig, rng: np.random.Generator, objs, P, V, cam0, T: int):
    """Sticky random bursts of one action; a new burst may look for an object long out of view."""
    actions: list[str] = []
    cam = tuple(cam0)
    cams = [cam]
    off = np.zeros(len(objs), int)
    cur, left = "stay", 0
    pans = ["left", "right", "up", "down"]
    for t in range(T - 1):
        for i, o in enumerate(objs):
            off[i] = 0 if sprite_in_view(sprite_for(o, V[t, i]), P[t, i], cam, cfg.view_width, cfg.view_height) else off[i] + 1
        if left <= 0:
            lost = [i for i in range(len(objs)) if off[i] >= cfg.max_offscreen]
            if lost and rng.uniform() < cfg.lookback_prob:
                i = lost[int(rng.integers(len(lost)))]
                cx = cam[0] + cfg.view_width / 2
                cy = cam[1] + cfg.view_height / 2
                dx, dy = P[t, i, 0] - cx, P[t, i, 1] - cy
                cur = ("right" if dx > 0 else "left") if abs(dx) >= abs(dy) else ("down" if dy > 0 else "up")
            elif rng.uniform() < cfg.stay_prob:
                cur = "stay"
            else:
                # prefer directions the border does not block
                free = [a for a in pans if step_camera(cfg, cam, a) != cam]
                choices = free or pans
                cur = choices[int(rng.integers(len(choices)))]
            left = int(rng.integers(cfg.min_burst, cfg.max_burst + 1))
        actions.append(cur)
        left -= 1
        cam = step_camera(cfg, cam, cur)
        cams.append(cam)
    return actions, cams


# ----------------------------------------------------------------------------- render + state


def render_frames(cfg: WorldConfig, scene: Scene, objs, P, V, cams):
    """Frames [T, vh, vw, 3] and per-frame object records (in_view, occluded, bbox, ...)."""
    T = len(cams)
    vw, vh = cfg.view_width, cfg.view_height
    frames = np.empty((T, vh, vw, 3), np.uint8)
    records = []
    for t in range(T):
        cx, cy = cams[t]
        view = scene.background[cy : cy + vh, cx : cx + vw].copy()
        occ_m = scene.occ_mask[cy : cy + vh, cx : cx + vw]
        occ_i = scene.occ_id[cy : cy + vh, cx : cx + vw]
        recs = []
        for i, o in enumerate(objs):
            sp = sprite_for(o, V[t, i])
            x0, y0 = _topleft(sp, P[t, i])
            sl = _view_pixels(sp, x0, y0, (cx, cy), vw, vh)
            n_in = n_occ = 0
            occluder = None
            if sl is not None:
                ss, vs = sl
                m = sp.mask[ss]
                n_in = int(m.sum())
                if n_in:
                    view[vs][m] = sp.rgb[ss][m]
                    covered = occ_m[vs] & m
                    n_occ = int(covered.sum())
                    if n_occ:
                        ids = occ_i[vs][covered]
                        occluder = int(np.bincount(ids[ids >= 0]).argmax()) if (ids >= 0).any() else None
            in_view = n_in > 0
            occluded = in_view and n_occ >= cfg.occluded_fraction * n_in
            w, h = sp.size
            recs.append(
                {
                    "id": o.id,
                    "color": o.color,
                    "kind": o.kind,
                    "pos": [round(float(P[t, i, 0]), 3), round(float(P[t, i, 1]), 3)],
                    "vel": [round(float(V[t, i, 0]), 3), round(float(V[t, i, 1]), 3)],
                    "bbox": [x0, y0, x0 + w, y0 + h],  # world pixels, [x0, y0, x1, y1) exclusive
                    "in_view": bool(in_view),
                    "occluded": bool(occluded),
                    "visible": bool(in_view and not occluded),
                    "occluder": scene.occluders[occluder]["kind"] if (occluded and occluder is not None) else None,
                }
            )
        if scene.occ_mask.any():
            view[occ_m] = scene.occ_rgb[cy : cy + vh, cx : cx + vw][occ_m]
        frames[t] = view
        records.append(recs)
    return frames, records


def _side_outside(bbox, cam, vw, vh) -> str:
    """Where a bbox lies relative to the view: left/right first, then top/bottom."""
    x0, y0, x1, y1 = bbox
    if x1 <= cam[0]:
        return "left"
    if x0 >= cam[0] + vw:
        return "right"
    if y1 <= cam[1]:
        return "top"
    if y0 >= cam[1] + vh:
        return "bottom"
    # mask-based: bbox overlaps the view edge but no sprite pixel is inside; use the centre
    cxm, cym = (x0 + x1) / 2 - (cam[0] + vw / 2), (y0 + y1) / 2 - (cam[1] + vh / 2)
    if abs(cxm) * vh >= abs(cym) * vw:
        return "left" if cxm < 0 else "right"
    return "top" if cym < 0 else "bottom"


def _join_names(names: list[str]) -> str:
    names = [f"{'an' if n[0] in 'aeiou' else 'a'} {n}" for n in names]
    if not names:
        return "an empty scene"
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + " and " + names[-1]


def make_captions(cfg: WorldConfig, scene: Scene, objs, cams, records) -> list[dict]:
    vw, vh = cfg.view_width, cfg.view_height
    cx, cy = cams[0][0] + vw // 2, cams[0][1] + vh // 2
    where = REGIONS[int(scene.region[cy, cx])]
    seen = [f"the {objs[i].name}" for i, r in enumerate(records[0]) if r["in_view"]]
    first = f"{_join_names([o.name for o in objs])}; the camera looks at the {where}; "
    if not seen:
        first += "nothing is in view"
    else:
        first += (seen[0] if len(seen) == 1 else ", ".join(seen[:-1]) + " and " + seen[-1]) + (" is in view" if len(seen) == 1 else " are in view")
    caps = [{"t": 0, "text": first}]
    prev_move = None
    for t in range(1, len(cams)):
        ev = []
        d = (int(np.sign(cams[t][0] - cams[t - 1][0])), int(np.sign(cams[t][1] - cams[t - 1][1])))
        move = {(-1, 0): "left", (1, 0): "right", (0, -1): "up", (0, 1): "down"}.get(d)
        if move != prev_move:
            if move is not None:
                ev.append(f"the camera pans {move}")
            elif prev_move is not None:
                ev.append("the camera stops")
        prev_move = move
        for i, o in enumerate(objs):
            a, b = records[t - 1][i], records[t][i]
            if b["in_view"] and not a["in_view"]:
                ev.append(f"the {o.name} enters from the {_side_outside(a['bbox'], cams[t - 1], vw, vh)}")
            elif a["in_view"] and not b["in_view"]:
                ev.append(f"the {o.name} leaves to the {_side_outside(b['bbox'], cams[t], vw, vh)}")
            elif b["occluded"] and not a["occluded"]:
                ev.append(f"the {o.name} is hidden behind a {b['occluder'] or 'tree'}")
            elif a["occluded"] and not b["occluded"]:
                ev.append(f"the {o.name} comes out from behind the {a['occluder'] or 'tree'}")
        if ev:
            caps.append({"t": t, "text": "; ".join(ev)})
    return caps


def episode_state(cfg: WorldConfig, scene: Scene, cams, records, probe: dict | None = None) -> dict:
    st = {
        "frames": [{"camera": [int(c[0]), int(c[1])], "objects": recs} for c, recs in zip(cams, records)],
        "world_size": [cfg.world_width, cfg.world_height],
        "view": [cfg.view_width, cfg.view_height],
        "pan_step": cfg.pan_step,
        "border": cfg.border,
        "occluders": scene.occluders,
    }
    if probe is not None:
        st["probe"] = probe
    return st


def episode_dict(cfg, seed, split, frames, actions, caps, state) -> dict:
    return {
        "episode_id": f"world-{split}-{seed:08d}",
        "source": SOURCE,
        "seed": int(seed),
        "split": split,
        "action_space": "pan5",
        "frames": frames,
        "actions": list(actions),
        "rewards": [0.0] * len(actions),
        "captions": caps,
        "state": json.dumps(state, separators=(",", ":")),
    }


def initial_camera(cfg: WorldConfig, rng: np.random.Generator, P0) -> tuple[int, int]:
    """Start looking at a random object most of the time (else anywhere)."""
    if len(P0) and rng.uniform() < 0.8:
        i = int(rng.integers(len(P0)))
        x = P0[i, 0] - cfg.view_width / 2 + rng.uniform(-cfg.view_width / 4, cfg.view_width / 4)
        y = P0[i, 1] - cfg.view_height / 2 + rng.uniform(-cfg.view_height / 4, cfg.view_height / 4)
    else:
        x = rng.uniform(0, cfg.world_width - cfg.view_width)
        y = rng.uniform(0, cfg.world_height - cfg.view_height)
    return clamp_camera(cfg, int(round(x)), int(round(y)))


# ----------------------------------------------------------------------------- episodes


def generate_episode(cfg: WorldConfig | str | os.PathLike | None, seed: int, split: str = "train") -> dict:
    """One episode as a dict with the episode dataset's columns (frames uint8 [T, vh, vw, 3]).

    ``state`` (JSON) holds ``{"frames": [{"camera": [x, y], "objects": [{"id", "color",
    "kind", "pos", "vel", "bbox", "visible", "occluded", "in_view", "occluder"}]}],
    "world_size": [W, H], "view": [w, h], "pan_step", "border", "occluders"}``; camera is the
    view's top-left corner in world pixels, pos the object's centre. Splits ``probe_offscreen``
    and ``probe_revisit`` build probe episodes (and add ``state["probe"]``). Deterministic in
    (cfg, seed, split).
    """
    cfg = as_config(cfg)
    if split in PROBE_KINDS:
        from unified_wm.data.world_probes import probe_episode  # the probes build on this module

        return probe_episode(cfg, seed, split)
    rng = np.random.default_rng([int(seed), 0])
    T = cfg.episode_length
    scene = build_scene(cfg, rng)
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    objs, p0, v0 = spawn_objects(cfg, rng, scene, n)
    P, V = simulate_objects(cfg, rng, objs, p0, v0, T)
    cam0 = initial_camera(cfg, rng, P[0])
    actions, cams = _policy_rollout(cfg, rng, objs, P, V, cam0, T)
    frames, records = render_frames(cfg, scene, objs, P, V, cams)
    caps = make_captions(cfg, scene, objs, cams, records)
    return episode_dict(cfg, seed, split, frames, actions, caps, episode_state(cfg, scene, cams, records))


# ----------------------------------------------------------------------------- the source
WORLD = EpisodeSource(
    name="world", description="Generate procedural world episodes (or probe episodes).", config_cls=WorldConfig,
    as_config=as_config, generate_episode=generate_episode, splits=tuple(SPLIT_SEED_OFFSETS),
    frame_hw=lambda c: (c.view_height, c.view_width), label=lambda c: "world", example_config="recipes/data/world_tiny.yaml",
    probe_splits=PROBE_KINDS,
)


def generate_world(config, out_dir: str | os.PathLike, **kw) -> Path:
    """A world episode dataset at ``out_dir`` (:func:`unified_wm.data.sources.generate_dataset`)."""
    return generate_dataset(WORLD, config, out_dir, **kw)


def main(argv: list[str] | None = None) -> int:
    """`uwm data gen-world --config C --out DIR [--episodes N] [--seed S] [--split ...]`."""
    return generator_main(WORLD, argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
