"""What the procedural world looks like: object sprites (car, ball, box) and the static scene (terrain
regions, texture, occluders) an episode is rendered on. The dynamics, camera and probes: ``world.py``."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from unified_wm.data.world import WorldConfig

KINDS = ("car", "ball", "box")


# ----------------------------------------------------------------------------- sprites


@dataclass
class Sprite:
    rgb: np.ndarray  # [h, w, 3] uint8
    mask: np.ndarray  # [h, w] bool

    @property
    def size(self) -> tuple[int, int]:
        return self.mask.shape[1], self.mask.shape[0]


def _shade(c, f):
    return tuple(int(max(0, min(255, v * f))) for v in c)


def make_sprite(kind: str, color: tuple[int, int, int], facing_left: bool = False) -> Sprite:
    dark = np.array(_shade(color, 0.45), np.uint8)
    col = np.array(color, np.uint8)
    if kind == "car":
        w, h = 14, 9
        rgb = np.zeros((h, w, 3), np.uint8)
        mask = np.zeros((h, w), bool)
        mask[1:8, :] = True
        rgb[1:8, :] = dark
        rgb[2:7, 1:13] = col
        win = np.array((170, 220, 255), np.uint8)
        rgb[3:6, 9:12] = win  # windscreen at the front (right)
        rgb[3:6, 3:5] = np.array(_shade(color, 0.75), np.uint8)  # rear window
        for x0 in (2, 9):  # wheels on both sides
            for y in (0, 8):
                mask[y, x0 : x0 + 3] = True
                rgb[y, x0 : x0 + 3] = (20, 20, 20)
        if facing_left:
            rgb, mask = rgb[:, ::-1].copy(), mask[:, ::-1].copy()
        return Sprite(rgb, mask)
    if kind == "ball":
        d = 9
        yy, xx = np.mgrid[0:d, 0:d]
        r2 = (xx - 4) ** 2 + (yy - 4) ** 2
        mask = r2 <= 4.6**2
        rgb = np.zeros((d, d, 3), np.uint8)
        rgb[mask] = dark
        rgb[r2 <= 3.5**2] = col
        rgb[2:4, 2:4] = np.array(_shade(color, 1.4), np.uint8) | np.array((60, 60, 60), np.uint8)
        return Sprite(rgb, mask)
    if kind == "box":
        d = 9
        mask = np.ones((d, d), bool)
        rgb = np.zeros((d, d, 3), np.uint8)
        rgb[:] = dark
        rgb[1:-1, 1:-1] = col
        idx = np.arange(1, d - 1)
        rgb[idx, idx] = dark
        rgb[idx, d - 1 - idx] = dark
        return Sprite(rgb, mask)
    raise ValueError(f"unknown object kind {kind!r}; known: {list(KINDS)}")


# ----------------------------------------------------------------------------- scene


@dataclass
class Scene:
    background: np.ndarray  # [H, W, 3] uint8, world
    occ_rgb: np.ndarray  # [H, W, 3] uint8, occluder colours
    occ_mask: np.ndarray  # [H, W] bool
    occ_id: np.ndarray  # [H, W] int16, index of the occluder covering a pixel, -1 if none
    occluders: list[dict]
    region: np.ndarray  # [H, W] uint8 codes into REGIONS
    road_y: float | None


REGIONS = ("grass", "road", "path", "pond", "field")


def smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    gh, gw = h // cell + 2, w // cell + 2
    g = rng.standard_normal((gh, gw)).astype(np.float32)
    ys = np.arange(h) / cell
    xs = np.arange(w) / cell
    y0 = ys.astype(int)
    x0 = xs.astype(int)
    fy = (ys - y0)[:, None]
    fx = (xs - x0)[None, :]
    a = g[y0][:, x0]
    b = g[y0][:, x0 + 1]
    c = g[y0 + 1][:, x0]
    d = g[y0 + 1][:, x0 + 1]
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


def build_scene(cfg: WorldConfig, rng: np.random.Generator) -> Scene:
    from PIL import Image, ImageDraw

    W, H = cfg.world_width, cfg.world_height
    low = smooth_noise(rng, H, W, 16)
    fine = rng.standard_normal((H, W)).astype(np.float32)
    region = np.zeros((H, W), np.uint8)
    grass = np.array((70, 135, 55), np.float32)
    fine = fine * np.float32(cfg.texture)
    img = grass[None, None, :] * (1 + 0.10 * low[..., None]) + 9 * fine[..., None] * np.array((0.6, 1.0, 0.5), np.float32)
    road_y = None
    if cfg.background == "road":
        # a dirt path crossing vertically
        px = int(rng.integers(W // 6, W - W // 6))
        pw = 9
        xs = np.arange(W)
        wobble = (3 * np.sin(np.arange(H) / 9.0 + rng.uniform(0, 6))).astype(int)
        for y in range(H):
            x0 = px + wobble[y]
            img[y, max(0, x0) : x0 + pw] = np.array((150, 115, 75), np.float32) + 10 * fine[y, max(0, x0) : x0 + pw, None]
            region[y, max(0, x0) : x0 + pw] = REGIONS.index("path")
        # the road: a horizontal band with kerbs and a dashed centre line
        rw = 22
        road_y = float(rng.integers(int(H * 0.35), int(H * 0.65)))
        r0, r1 = int(road_y - rw / 2), int(road_y + rw / 2)
        img[r0:r1] = np.array((88, 88, 94), np.float32) + 7 * fine[r0:r1, :, None]
        img[r0 : r0 + 1] = (200, 200, 190)
        img[r1 - 1 : r1] = (200, 200, 190)
        dash = (xs // 8) % 2 == 0
        cy = int(road_y)
        img[cy, dash] = (240, 230, 120)
        region[r0:r1] = REGIONS.index("road")
        del xs
    else:
        region[:] = REGIONS.index("field")
    bg = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    dr = ImageDraw.Draw(bg)
    reg_img = Image.fromarray(region)
    rdr = ImageDraw.Draw(reg_img)
    road_band = (road_y - 14, road_y + 14) if road_y is not None else None

    def off_road(y0, y1):
        return road_band is None or y1 < road_band[0] or y0 > road_band[1]

    for _ in range(cfg.n_landmarks):
        kind = rng.choice(["flowers", "rock", "pond", "flowers", "rock"])
        for _try in range(10):
            x, y = float(rng.uniform(4, W - 4)), float(rng.uniform(4, H - 4))
            if off_road(y - 8, y + 8):
                break
        if kind == "flowers":
            c = [(250, 250, 250), (250, 230, 60), (240, 90, 160)][int(rng.integers(3))]
            for _k in range(7):
                fx, fy = x + rng.normal(0, 3), y + rng.normal(0, 3)
                dr.rectangle([fx, fy, fx + 1, fy + 1], fill=c)
        elif kind == "rock":
            r = float(rng.uniform(2.5, 4.5))
            dr.ellipse([x - r, y - r * 0.8, x + r, y + r * 0.8], fill=(125, 120, 115), outline=(80, 78, 75))
        else:
            rx, ry = float(rng.uniform(7, 12)), float(rng.uniform(4, 7))
            dr.ellipse([x - rx, y - ry, x + rx, y + ry], fill=(60, 110, 200), outline=(40, 80, 150))
            dr.ellipse([x - rx * 0.5, y - ry * 0.5, x - rx * 0.1, y - ry * 0.2], fill=(120, 170, 235))
            rdr.ellipse([x - rx, y - ry, x + rx, y + ry], fill=REGIONS.index("pond"))
    background = np.asarray(bg, dtype=np.uint8).copy()

    # occluders: trees and buildings, drawn over objects
    n_occ = cfg.occluder_density * (W * H) / (cfg.view_width * cfg.view_height)
    n_occ = int(math.floor(n_occ + rng.uniform()))  # unbiased rounding
    occ = Image.new("RGBA", (W, H), (0, 0, 0, 0))
    od = ImageDraw.Draw(occ)
    occ_id_img = Image.new("I", (W, H), -1)
    idd = ImageDraw.Draw(occ_id_img)
    occluders = []
    for i in range(n_occ):
        kind = "tree" if rng.uniform() < 0.65 else "building"
        x, y = float(rng.uniform(8, W - 8)), float(rng.uniform(8, H - 8))
        if kind == "tree":
            r = float(rng.uniform(8, 12))
            od.rectangle([x - 1.5, y, x + 1.5, y + r + 2], fill=(95, 60, 30, 255))
            idd.rectangle([x - 1.5, y, x + 1.5, y + r + 2], fill=i)
            od.ellipse([x - r, y - r, x + r, y + r], fill=(25, 95, 35, 255), outline=(15, 60, 20, 255))
            od.ellipse([x - r * 0.6, y - r * 0.7, x, y - r * 0.1], fill=(50, 130, 55, 255))
            idd.ellipse([x - r, y - r, x + r, y + r], fill=i)
            bbox = [x - r, y - r, x + r, y + r + 2]
        else:
            bw, bh = float(rng.uniform(16, 26)), float(rng.uniform(14, 20))
            roof = [(170, 70, 60), (120, 110, 100), (150, 120, 80)][int(rng.integers(3))]
            od.rectangle([x - bw / 2, y - bh / 2, x + bw / 2, y + bh / 2], fill=roof + (255,), outline=(50, 45, 40, 255))
            od.line([x - bw / 2, y, x + bw / 2, y], fill=_shade(roof, 0.6) + (255,))
            idd.rectangle([x - bw / 2, y - bh / 2, x + bw / 2, y + bh / 2], fill=i)
            bbox = [x - bw / 2, y - bh / 2, x + bw / 2, y + bh / 2]
        occluders.append({"id": i, "kind": kind, "bbox": [round(v, 1) for v in bbox]})
    occ_arr = np.asarray(occ, dtype=np.uint8)
    occ_id = np.asarray(occ_id_img, dtype=np.int32).astype(np.int16)
    return Scene(
        background=background,
        occ_rgb=occ_arr[..., :3].copy(),
        occ_mask=occ_arr[..., 3] > 0,
        occ_id=occ_id,
        occluders=occluders,
        region=np.asarray(reg_img, dtype=np.uint8).copy(),
        road_y=road_y,
    )
