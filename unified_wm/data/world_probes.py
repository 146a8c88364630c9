"""Probe episodes of the procedural world, for the memory tasks of the eval: ``probe_offscreen`` (an
object moves, the camera looks away for N frames and comes back) and ``probe_revisit`` (the camera
leaves a static scene and returns). Each adds ``state["probe"]`` with what the eval checks."""
from __future__ import annotations

import math

import numpy as np

from unified_wm.data.sources import ProbeError
from unified_wm.data.world import (OPPOSITE, Obj, WorldConfig, build_scene, camera_path, clamp_camera, episode_dict, episode_state,
                                   initial_camera, make_captions, render_frames, simulate_objects, spawn_objects, sprite_for,
                                   sprite_in_view, step_camera)


def probe_episode(cfg: WorldConfig, seed: int, split: str) -> dict:
    """The probe episode ``seed`` of ``split`` ("probe_offscreen" or "probe_revisit")."""
    return _probe_offscreen(cfg, seed) if split == "probe_offscreen" else _probe_revisit(cfg, seed)


def _probe_offscreen(cfg: WorldConfig, seed: int) -> dict:
    T = cfg.probe_frames
    vw, vh = cfg.view_width, cfg.view_height
    base = np.random.default_rng([int(seed), 1])
    N = int(cfg.probe_offscreen_N[int(base.integers(len(cfg.probe_offscreen_N)))])
    for attempt in range(200):
        rng = np.random.default_rng([int(seed), 1, attempt])
        scene = build_scene(cfg, rng)
        n = int(rng.integers(max(1, cfg.min_objects), max(1, cfg.max_objects) + 1))
        objs, p0, v0 = spawn_objects(cfg, rng, scene, n)
        # the probe object moves at a moderate speed so that it is still near when the camera returns
        sp = float(np.linalg.norm(v0[0]))
        if sp > 0:
            v0[0] *= min(1.0, max(cfg.min_speed, 0.25) / sp * 2.0)
        P, V = simulate_objects(cfg, rng, objs, p0, v0, T)
        o = objs[0]
        # camera: the object in view, in the part of the view its motion heads away from
        vx = V[0, 0, 0]
        fx = 0.3 if vx > 0 else 0.7
        cam0 = clamp_camera(cfg, int(round(P[0, 0, 0] - fx * vw)), int(round(P[0, 0, 1] - vh / 2 + rng.uniform(-vh / 8, vh / 8))))
        pre = int(rng.integers(3, 6))
        dirs = list(rng.permutation(["left", "right", "up", "down"]))
        for d in dirs:
            for extra in range(0, 4):
                for hold in range(0, N + 1):
                    plan = _offscreen_plan(cfg, o, P[:, 0], V[:, 0], cam0, T, pre, str(d), extra, hold)
                    if plan is None:
                        continue
                    actions, cams, away_start, return_t = plan
                    if return_t - away_start != N:
                        continue
                    frames, records = render_frames(cfg, scene, objs, P, V, cams)
                    rec = [r[0] for r in records]
                    if not all(r["in_view"] for r in rec[:away_start]):
                        continue
                    if any(r["in_view"] for r in rec[away_start:return_t]):
                        continue
                    if not rec[return_t]["visible"] or not rec[away_start - 1]["visible"]:
                        continue
                    probe = {"kind": "offscreen", "object_id": 0, "away_start": away_start, "return_t": return_t, "N": N, "direction": str(d)}
                    caps = make_captions(cfg, scene, objs, cams, records)
                    return episode_dict(cfg, seed, "probe_offscreen", frames, actions, caps, episode_state(cfg, scene, cams, records, probe))
    raise ProbeError(
        f"could not build a probe_offscreen episode with N={N} in {T} frames (seed {seed}); "
        f"raise probe_frames, pan_step or the world size (world_width={cfg.world_width}, view_width={cfg.view_width})"
    )


def _offscreen_plan(cfg, o: Obj, Pi, Vi, cam0, T, pre, d, extra, hold):
    """Stay `pre`, pan `d` until the object is out of view (+`extra` steps), hold, pan back to cam0."""
    vw, vh = cfg.view_width, cfg.view_height
    actions = ["stay"] * pre
    cam = tuple(cam0)
    t = pre
    for _ in range(pre):
        if not sprite_in_view(sprite_for(o, Vi[0]), Pi[0], cam, vw, vh):
            return None
    # pan away
    steps = 0
    away_start = None
    while t < T - 1:
        nxt = step_camera(cfg, cam, d)
        if nxt == cam:
            return None  # blocked by the border before the object left the view
        actions.append(d)
        cam = nxt
        t += 1
        steps += 1
        if away_start is None and not sprite_in_view(sprite_for(o, Vi[t]), Pi[t], cam, vw, vh):
            away_start = t
            break
    if away_start is None:
        return None
    for _ in range(extra):
        nxt = step_camera(cfg, cam, d)
        if nxt == cam:
            return None
        actions.append(d)
        cam = nxt
        steps += 1
    actions += ["stay"] * hold
    actions += [OPPOSITE[d]] * steps
    if len(actions) > T - 1:
        return None
    actions += ["stay"] * (T - 1 - len(actions))
    cams = camera_path(cfg, cam0, actions)
    return_t = None
    for tt in range(away_start + 1, T):
        if sprite_in_view(sprite_for(o, Vi[tt]), Pi[tt], cams[tt], vw, vh):
            return_t = tt
            break
    if return_t is None:
        return None
    return actions, cams, away_start, return_t


def _probe_revisit(cfg: WorldConfig, seed: int) -> dict:
    T = cfg.probe_frames
    vw, vh = cfg.view_width, cfg.view_height
    base = np.random.default_rng([int(seed), 2])
    hold = int(cfg.probe_revisit_hold[int(base.integers(len(cfg.probe_revisit_hold)))])
    kx = math.ceil(vw / cfg.pan_step)
    ky = math.ceil(vh / cfg.pan_step)
    can_x = cfg.world_width - vw >= kx * cfg.pan_step
    can_y = cfg.world_height - vh >= ky * cfg.pan_step
    if not (can_x or can_y):
        raise ProbeError(
            f"probe_revisit needs room to look fully away: world_width - view_width ({cfg.world_width} - {vw}) "
            f"or world_height - view_height ({cfg.world_height} - {vh}) must be at least the view size rounded up to pan_step={cfg.pan_step}"
        )
    for attempt in range(100):
        rng = np.random.default_rng([int(seed), 2, attempt])
        scene = build_scene(cfg, rng)
        n = int(rng.integers(max(1, cfg.min_objects), max(1, cfg.max_objects) + 1))
        objs, p0, v0 = spawn_objects(cfg, rng, scene, n, static=True)
        P, V = simulate_objects(cfg, rng, objs, p0, v0, T, static=True)
        horizontal = can_x and (not can_y or rng.uniform() < 0.8)
        k = kx if horizontal else ky
        pre = int(rng.integers(2, 5))
        if pre + 2 * k + hold + 1 > T:
            raise ProbeError(
                f"probe_revisit with hold={hold} needs {pre + 2 * k + hold + 1} frames; probe_frames={T} is too short "
                f"(view {vw}x{vh}, pan_step={cfg.pan_step})"
            )
        cam0 = initial_camera(cfg, rng, P[0])
        if horizontal:
            room_r = cfg.world_width - vw - cam0[0]
            d = "right" if room_r >= k * cfg.pan_step else "left"
            if d == "left" and cam0[0] < k * cfg.pan_step:
                continue
        else:
            room_d = cfg.world_height - vh - cam0[1]
            d = "down" if room_d >= k * cfg.pan_step else "up"
            if d == "up" and cam0[1] < k * cfg.pan_step:
                continue
        actions = ["stay"] * pre + [d] * k + ["stay"] * hold + [OPPOSITE[d]] * k
        actions += ["stay"] * (T - 1 - len(actions))
        cams = camera_path(cfg, cam0, actions)
        frames, records = render_frames(cfg, scene, objs, P, V, cams)
        if not any(r["visible"] for r in records[0]):
            continue
        leave_t = next(t for t in range(T) if cams[t] != cams[0])
        return_t = next(t for t in range(leave_t, T) if cams[t] == cams[0])
        probe = {"kind": "revisit", "leave_t": leave_t, "return_t": return_t, "first_visit_t": leave_t - 1, "N": return_t - leave_t, "direction": d}
        caps = make_captions(cfg, scene, objs, cams, records)
        return episode_dict(cfg, seed, "probe_revisit", frames, actions, caps, episode_state(cfg, scene, cams, records, probe))
    raise ProbeError(f"could not build a probe_revisit episode (seed {seed}); enlarge the world relative to the view")
