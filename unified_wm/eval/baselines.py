"""Trivial predictors of the next frame's codes, so every table shows where a model sits.

``copy_last``   the next frame's codes are the last frame's codes.
``copy_shift``  the last frame's codes moved by the camera's motion between the two frames,
                in whole code cells (the procedural world pans by ``pan_step`` pixels, one
                8-pixel cell with the default tokenizers); cells the motion reveals repeat the
                edge. The motion is read from the episode's ground-truth state (the logged
                action's effect, clamping at the world's border included), so the rule is what
                "copy, or shift by the action" can do at best. It needs episodes that record a
                camera (the procedural world); asking it of others is an error.

A model that does not beat both on held-out episodes has not learned the world's dynamics,
whatever its loss says.
"""
from __future__ import annotations

import json

import numpy as np

BASELINES = ("copy_last", "copy_shift")


class BaselineUnavailable(ValueError):
    """A baseline asked of data that cannot support it (named in the message)."""


def camera_cells(ep: dict, grid: tuple[int, int], frame_hw: tuple[int, int]) -> np.ndarray | None:
    """The camera's position per frame in code cells ``[T, 2]`` (x, y), or None if the
    episode's state records no camera."""
    st = ep.get("state")
    if isinstance(st, str):
        try:
            st = json.loads(st)
        except ValueError:
            return None
    frames = (st or {}).get("frames") if isinstance(st, dict) else None
    if not frames or "camera" not in frames[0]:
        return None
    cam = np.array([f["camera"] for f in frames], dtype=np.float64)
    cell_w, cell_h = frame_hw[1] / grid[1], frame_hw[0] / grid[0]
    return np.stack([cam[:, 0] / cell_w, cam[:, 1] / cell_h], 1)


def require_camera(ep: dict, grid, frame_hw, where: str) -> np.ndarray:
    cells = camera_cells(ep, grid, frame_hw)
    if cells is None:
        raise BaselineUnavailable(
            f"baseline 'copy_shift' needs episodes that record the camera (the procedural world's state); "
            f"'{where}' has none (episode '{ep.get('episode_id')}'); leave copy_shift out of the suite's baselines"
        )
    return cells


def shift_codes(codes: np.ndarray, dx: int, dy: int, grid: tuple[int, int]) -> np.ndarray:
    """``codes`` [h*w] as seen after the camera moved by (dx, dy) cells; revealed cells repeat the edge."""
    h, w = grid
    g = np.asarray(codes).reshape(h, w)
    rows = np.clip(np.arange(h) + int(dy), 0, h - 1)
    cols = np.clip(np.arange(w) + int(dx), 0, w - 1)
    return g[rows][:, cols].reshape(-1)


def predict(kind: str, last: np.ndarray, cam_from, cam_to, grid) -> np.ndarray:
    """The baseline's codes for a frame, from the ``last`` frame's codes and the camera (in cells)
    at both frames (ignored by copy_last)."""
    if kind == "copy_last":
        return np.asarray(last)
    if kind == "copy_shift":
        d = np.rint(np.asarray(cam_to) - np.asarray(cam_from)).astype(int)
        return shift_codes(last, d[0], d[1], grid)
    raise ValueError(f"unknown baseline '{kind}'; valid baselines: {', '.join(BASELINES)}")


def rollout_codes(kind: str, context_codes: np.ndarray, cams: np.ndarray | None, c: int, horizon: int, grid) -> np.ndarray:
    """``[horizon, h*w]``: the baseline rolled out from the last context frame (index ``c - 1``);
    copy_shift moves it by the camera's total motion since then, so revealed edges stay edges."""
    last = np.asarray(context_codes[c - 1])
    if kind == "copy_last":
        return np.repeat(last[None], horizon, 0)
    return np.stack([predict(kind, last, cams[c - 1], cams[c + h], grid) for h in range(horizon)])


def next_frame_accuracy(kind: str, frame_ids: np.ndarray, cams: np.ndarray | None, grid, clip_frames: int) -> tuple[int, int]:
    """(correct, total) codes of every frame after the first of its clip (the frames the model
    predicts from a previous one in teacher forcing), predicted from the previous frame."""
    correct = total = 0
    for t in range(1, len(frame_ids)):
        if clip_frames and t % clip_frames == 0:
            continue  # the first frame of a clip has no previous frame in its document
        pred = predict(kind, frame_ids[t - 1], None if cams is None else cams[t - 1], None if cams is None else cams[t], grid)
        correct += int((pred == np.asarray(frame_ids[t])).sum())
        total += int(np.asarray(frame_ids[t]).size)
    return correct, total
