"""Training and evaluating the video tokenizer (``uwm tokenizer train-video`` / ``eval-video``):
frames of an episode dataset, the training loop with its checkpoints, the reconstruction report."""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch

from unified_wm.checkpoint import begin_checkpoint, commit_checkpoint, complete_checkpoints, resolve_resume
from unified_wm.eval.metrics import code_usage, psnr, ssim
from unified_wm.tokenization.video import (TrainConfig, VideoTokenizer, VideoTokenizerConfig)
from unified_wm.utils import ConfigError, MetricsWriter, load_config, to_dict, warmup_cosine_lr, write_json


# ----------------------------------------------------------------------------- data


def resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """Center-crop uint8 [T,H,W,3] frames to a square, then resize to ``size`` (PIL bicubic)."""
    from PIL import Image

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames: expected [T,H,W,3], got shape {frames.shape}")
    t, h, w, _ = frames.shape
    if h == size and w == size:
        return frames.astype(np.uint8, copy=False)
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    out = np.empty((t, size, size, 3), np.uint8)
    for i in range(t):
        im = Image.fromarray(np.ascontiguousarray(frames[i, top : top + s, left : left + s]).astype(np.uint8))
        out[i] = np.asarray(im.resize((size, size), Image.BICUBIC))
    return out


def _is_heldout_split(split: str) -> bool:
    return split in ("val", "valid", "validation", "test") or split.startswith("probe")


def load_frames(data_dir: str | os.PathLike, image_size: int, which: Literal["train", "eval"], max_frames: int) -> tuple[np.ndarray, str]:
    """All frames of an episode dataset as uint8 [N,S,S,3], plus a note on which splits were used.

    ``train``: every episode whose split is not val/test/probe*. ``eval``: the val/test episodes
    if the dataset has any, otherwise every non-probe episode (a dataset kept apart for eval).
    """
    frames, _, note = load_episode_frames(data_dir, image_size, which, max_frames)
    return frames, note


def load_episode_frames(data_dir: str | os.PathLike, image_size: int, which: Literal["train", "eval"],
                        max_frames: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Like :func:`load_frames`, plus the start index of each episode in the frame array."""
    from unified_wm.data.episodes import get_episode, load_episodes

    ds = load_episodes(data_dir)
    rows, note = _frame_rows(ds, which, data_dir)
    chunks, starts, n = [], [], 0
    for i in rows:
        f = get_episode(ds, i)["frames"]
        f = resize_frames(f, image_size)
        if which == "eval":
            f = f[: max_frames - n]
        starts.append(n)
        chunks.append(f)
        n += len(f)
        if n >= max_frames:
            break
    frames = np.concatenate(chunks)[:max_frames]
    starts_arr = np.array([s for s in starts if s < len(frames)], dtype=np.int64)
    return frames, starts_arr, note


def _frame_rows(ds, which: str, data_dir) -> tuple[list[int], str]:
    """The episodes :func:`load_episode_frames` reads, in order, and a note on their splits."""
    splits = list(ds["split"]) if "split" in ds.column_names else ["train"] * len(ds)
    if which == "train":
        rows = [i for i, s in enumerate(splits) if not _is_heldout_split(s)]
        note = "non-held-out splits: " + ",".join(sorted({splits[i] for i in rows}))
    else:
        rows = [i for i, s in enumerate(splits) if s in ("val", "valid", "validation", "test")]
        note = "held-out splits: " + ",".join(sorted({splits[i] for i in rows}))
        if not rows:
            rows = [i for i, s in enumerate(splits) if not s.startswith("probe")]
            note = "all non-probe episodes (dataset has no val/test split)"
    if not rows:
        raise ValueError(f"episode dataset '{data_dir}' has no {which} episodes (splits present: {sorted(set(splits))})")
    return rows, note


def load_object_masks(data_dir: str | os.PathLike, image_size: int, max_frames: int) -> np.ndarray:
    """bool [N,S,S]: the pixels inside an object's box in each training frame, aligned with
    :func:`load_episode_frames` (``train``). The boxes come from each episode's state (world
    coordinates, the camera's corner, the view's size), cropped and scaled as the frames are.
    Only the state column is read: the frames are not decoded a second time."""
    from unified_wm.data.episodes import load_episodes

    ds = load_episodes(data_dir)
    rows, _ = _frame_rows(ds, "train", data_dir)
    meta = ds.select_columns(["episode_id", "state"])
    out, n = [], 0
    for i in rows:
        ep = meta[int(i)]
        st = json.loads(ep["state"]) if isinstance(ep["state"], str) else (ep["state"] or {})
        fs = st.get("frames") if isinstance(st, dict) else None
        view = st.get("view") if isinstance(st, dict) else None
        if not fs or not view or any("camera" not in f or "objects" not in f for f in fs):
            raise ValueError(f"train.object_weight needs the objects' boxes in each episode's state (`uwm data gen-world` "
                             f"writes them); episode {ep['episode_id']!r} of '{data_dir}' has none")
        (w, h), t = view, len(fs)
        side = min(h, w)
        top, left, scale = (h - side) // 2, (w - side) // 2, image_size / side  # as resize_frames crops and scales
        m = np.zeros((t, image_size, image_size), bool)
        for k, f in enumerate(fs):
            cx, cy = f["camera"]
            for o in f["objects"]:
                x0, y0, x1, y1 = o["bbox"]
                xa, xb = (np.array([x0, x1]) - cx - left) * scale
                ya, yb = (np.array([y0, y1]) - cy - top) * scale
                xa, ya = max(0, int(np.floor(xa))), max(0, int(np.floor(ya)))
                xb, yb = min(image_size, int(np.ceil(xb))), min(image_size, int(np.ceil(yb)))
                if xb > xa and yb > ya:
                    m[k, ya:yb, xa:xb] = True
        out.append(m)
        n += t
        if n >= max_frames:
            break
    return np.concatenate(out)[:max_frames]


def _group_sampler(n_frames: int, starts: np.ndarray, temporal: int):
    """Index tables for causal training groups: first frames (alone) and windows of ``temporal`` frames."""
    ends = np.append(starts[1:], n_frames)
    windows = np.concatenate([np.arange(s + 1, e - temporal + 1) for s, e in zip(starts, ends)] + [np.zeros(0, np.int64)])
    mean_len = float(np.mean(ends - starts)) if len(starts) else 1.0
    # the share of first-frame groups in a tiled episode: 1 of 1 + (T-1)/t
    p_first = 1.0 / (1.0 + max(0.0, mean_len - 1) / temporal) if len(windows) else 1.0
    return torch.from_numpy(starts.astype(np.int64)), torch.from_numpy(windows.astype(np.int64)), p_first


def _sample_batch(frames: torch.Tensor, bs: int, gen: torch.Generator, temporal: int, sampler,
                  masks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A training batch in [-1,1]: [B,3,H,W] frames, or [B,3*t,H,W] causal groups when temporal > 1;
    with ``masks`` ([N,H,W]) also their masks, as 0/1 floats of the batch's shape."""
    idx = _batch_index(len(frames), bs, gen, temporal, sampler).flatten()
    x = frames[idx].permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    x = x.reshape(bs, temporal * 3, *x.shape[2:])
    if masks is None:
        return x, None
    m = masks[idx].float().reshape(bs, temporal, 1, *x.shape[2:]).expand(bs, temporal, 3, *x.shape[2:])
    return x, m.reshape(x.shape)


def _batch_index(n: int, bs: int, gen: torch.Generator, temporal: int, sampler) -> torch.Tensor:
    """[B, t] frame indices of a batch: single frames, or causal groups when temporal > 1."""
    if temporal == 1:
        return torch.randint(0, n, (bs,), generator=gen)[:, None]
    firsts, windows, p_first = sampler
    first = torch.rand(bs, generator=gen) < p_first
    w = windows[torch.randint(0, max(1, len(windows)), (bs,), generator=gen)] if len(windows) else firsts[:1].expand(bs)
    f = firsts[torch.randint(0, len(firsts), (bs,), generator=gen)]
    start = torch.where(first, f, w)
    step = torch.where(first, 0, 1)
    return start[:, None] + step[:, None] * torch.arange(temporal)[None]  # [B, t]


# ----------------------------------------------------------------------------- training


def _lr_at(step: int, tc: TrainConfig) -> float:
    return warmup_cosine_lr(step, tc.lr, tc.warmup_steps, tc.steps, tc.min_lr_ratio)


FOREGROUND_THRESHOLD = 24  # a pixel is foreground where a channel differs from the background by more (0..255)


def background_of(frames: np.ndarray | torch.Tensor, max_frames: int = 1024) -> np.ndarray:
    """The static background of uint8 frames [N,H,W,3]: the per-pixel median of up to
    ``max_frames`` evenly spaced frames."""
    f = np.asarray(frames)
    idx = np.linspace(0, len(f) - 1, num=min(max_frames, len(f))).astype(int)
    return np.median(f[idx], axis=0).astype(np.uint8)


def foreground_mask(frames: np.ndarray, background: np.ndarray) -> np.ndarray:
    """bool [N,H,W]: the pixels of ``frames`` that differ from ``background``."""
    return (np.abs(frames.astype(np.int16) - background.astype(np.int16)).max(-1) > FOREGROUND_THRESHOLD)


def _foreground_weights(x: torch.Tensor, bg: torch.Tensor, weight: float) -> torch.Tensor:
    """Per-element loss weights for a batch [B,3*t,H,W] in [-1,1] against bg [3,H,W] in [-1,1]."""
    b, c, h, w = x.shape
    d = (x - bg.repeat(c // 3, 1, 1)).abs().reshape(b, c // 3, 3, h, w).amax(2, keepdim=True)
    fg = (d > FOREGROUND_THRESHOLD / 127.5).float()
    return (1.0 + weight * fg).expand(b, c // 3, 3, h, w).reshape(b, c, h, w)


def _recon_loss(rec: torch.Tensor, x: torch.Tensor, tc: TrainConfig, bg: torch.Tensor | None = None,
                objects: torch.Tensor | None = None) -> torch.Tensor:
    e = rec - x
    wt = None
    if bg is not None and tc.foreground_weight > 0:
        wt = _foreground_weights(x, bg, tc.foreground_weight)
    if objects is not None and tc.object_weight > 0:
        wt = (wt if wt is not None else 1.0) + tc.object_weight * objects
    if wt is not None:  # weighted means: the loss keeps its scale
        wt = wt / wt.mean()
        l1, l2 = (wt * e.abs()).mean(), (wt * e.pow(2)).mean()
    else:
        l1, l2 = e.abs().mean(), e.pow(2).mean()
    loss = l1 if tc.loss == "l1" else l2 if tc.loss == "mse" else l1 + l2
    if tc.grad_loss_weight > 0:
        dxr, dxx = rec[..., :, 1:] - rec[..., :, :-1], x[..., :, 1:] - x[..., :, :-1]
        dyr, dyx = rec[..., 1:, :] - rec[..., :-1, :], x[..., 1:, :] - x[..., :-1, :]
        loss = loss + tc.grad_loss_weight * ((dxr - dxx).abs().mean() + (dyr - dyx).abs().mean())
    return loss


_OLD_CKPT_RE = re.compile(r"^step_(\d+)$")  # checkpoints of earlier versions (not resumable)


def _ema_update(ema: VideoTokenizer, model: VideoTokenizer, decay: float, step: int) -> None:
    """One EMA step; the decay ramps up as (1 + step) / (10 + step) so early weights fade fast."""
    d = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - d)
        for be, b in zip(ema.buffers(), model.buffers()):
            be.copy_(b)


def _save_checkpoint(ckpt_root: Path, step: int, model: VideoTokenizer, opt: torch.optim.Optimizer, gen: torch.Generator, keep: int,
                     ema: VideoTokenizer | None = None) -> Path:
    """``step<N>/`` (by the rules of :mod:`unified_wm.checkpoint`: written aside, verified, then
    named in ``latest``): the model ``from_pretrained`` reads (the EMA weights when on) and
    ``train_state.pt`` (optimizer, data generator, raw weights under EMA)."""
    tmp = begin_checkpoint(ckpt_root, step)
    (ema if ema is not None else model).save_pretrained(tmp)
    state = {"step": step, "optimizer": opt.state_dict(), "generator": gen.get_state()}
    if ema is not None:
        state["raw_model"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(state, tmp / "train_state.pt")
    return commit_checkpoint(tmp, {"step": step}, keep)


def train_video_tokenizer(
    config_path: str | os.PathLike,
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    max_steps: int | None = None,
    resume: bool = False,
    progress: bool = True,
    config: VideoTokenizerConfig | None = None,
    overwrite: bool = False,
) -> dict:
    """Train a video tokenizer on the frames of an episode dataset; returns a summary dict.

    ``out_dir`` receives ``metrics.jsonl``, ``checkpoints/stepN/`` (weights + optimizer; see ``_save_checkpoint``) and,
    at the end, the final ``config.json`` + ``model.safetensors`` (``from_pretrained(out_dir)``).
    ``max_steps`` stops early at that global step (the LR schedule still follows
    ``train.steps``); ``resume`` continues from the newest checkpoint in ``out_dir``.
    ``config`` may be passed instead of reading ``config_path`` (tests, sweeps).
    ``overwrite`` replaces an earlier output in ``out_dir``: the new run trains in a temporary
    folder next to it, which replaces it only when training is complete.
    """
    from tqdm.auto import tqdm

    from unified_wm.utils import atomic_dir, mark_output

    cfg = config if config is not None else load_config(VideoTokenizerConfig, config_path)
    cfg.validate()
    tc = cfg.train
    if tc.threads > 0:
        torch.set_num_threads(tc.threads)
    out = Path(out_dir)
    if overwrite and not resume and out.is_dir() and any(out.iterdir()):
        with atomic_dir(out) as tmp:  # the earlier output stays in place until the new one is complete
            summary = train_video_tokenizer(config_path, data_dir, tmp, max_steps=max_steps, progress=progress, config=cfg)
            summary["out_dir"] = str(out)
            write_json(tmp / "train_summary.json", summary)
        return summary
    ckpt_root = out / "checkpoints"
    if not resume and complete_checkpoints(ckpt_root):
        raise FileExistsError(f"output folder '{out}' already holds checkpoints; pass resume=True (--resume) or choose a new folder")
    # the data first: a dataset that cannot serve this config leaves no output folder behind
    frames_np, starts, note = load_episode_frames(data_dir, cfg.image_size, "train", tc.max_frames)
    masks = torch.from_numpy(load_object_masks(data_dir, cfg.image_size, tc.max_frames)) if tc.object_weight > 0 else None
    if masks is not None and len(masks) != len(frames_np):
        raise ValueError(f"train.object_weight: the episodes' states in '{data_dir}' describe {len(masks)} frames, "
                         f"the episodes hold {len(frames_np)}; expected one state per frame")
    out.mkdir(parents=True, exist_ok=True)
    mark_output(out, "tokenizer train-video")

    frames = torch.from_numpy(frames_np)  # uint8 [N,S,S,3]
    n = len(frames)
    sampler = _group_sampler(n, starts, cfg.temporal) if cfg.temporal > 1 else None
    bg = (torch.from_numpy(background_of(frames_np)).permute(2, 0, 1).float().div(127.5).sub(1.0)
          if tc.foreground_weight > 0 else None)

    torch.manual_seed(tc.seed)
    model = VideoTokenizer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(tc.seed)
    ema: VideoTokenizer | None = None
    if tc.ema_decay > 0:
        import copy

        ema = copy.deepcopy(model).eval().requires_grad_(False)
    step = 0
    if resume:
        if not complete_checkpoints(ckpt_root) and any(_OLD_CKPT_RE.match(p.name) for p in ckpt_root.glob("step_*")):
            raise FileNotFoundError(f"'{ckpt_root}' holds only step_N checkpoints of an older version of this command; "
                                    f"they cannot be resumed (train again, or export its final model)")
        path = resolve_resume("latest", ckpt_root)  # the newest checkpoint that verifies
        step = int(path.name[len("step"):])
        saved = VideoTokenizer.from_pretrained(path)
        if to_dict(saved.config) | {"train": None} != to_dict(cfg) | {"train": None}:
            raise ConfigError(f"checkpoint '{path}' was trained with a different model config than '{config_path}'")
        st = torch.load(path / "train_state.pt", map_location="cpu", weights_only=True)
        if ema is not None:
            ema.load_state_dict(saved.state_dict())
            # a checkpoint written without EMA holds the raw weights as its model
            model.load_state_dict(st.get("raw_model", saved.state_dict()))
        else:
            if "raw_model" in st:
                raise ConfigError(f"checkpoint '{path}' was trained with train.ema_decay > 0; resuming it needs ema_decay > 0 in '{config_path}'")
            model.load_state_dict(saved.state_dict())
        opt.load_state_dict(st["optimizer"])
        gen.set_state(st["generator"])
        step = int(st["step"])
    total = tc.steps if max_steps is None else min(tc.steps, max_steps)
    metrics = MetricsWriter(out / "metrics.jsonl")
    if step == 0:
        # the torch thread count and version: the weights are bitwise the same only under the same ones
        metrics.write(event="start", frames=n, data=str(data_dir), splits=note, params=sum(p.numel() for p in model.parameters()),
                      codebook_size=model.codebook_size, tokens_per_frame=model.tokens_per_frame, config=to_dict(cfg),
                      torch_threads=torch.get_num_threads(), torch_version=str(torch.__version__))
    else:
        metrics.write(event="resume", step=step, frames=n, data=str(data_dir))

    model.train()
    t0 = time.time()
    start_step = step
    win_loss, win_mse, win_n = 0.0, 0.0, 0
    win_idx: list[torch.Tensor] = []
    last_psnr = float("nan")
    bar = tqdm(total=total, initial=step, disable=not progress, desc="video tokenizer", unit="step", dynamic_ncols=True)
    while step < total:
        x, obj = _sample_batch(frames, tc.batch_size, gen, cfg.temporal, sampler, masks)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, tc)
        rec, idx, aux = model(x)
        loss = _recon_loss(rec, x, tc, bg, obj) + aux
        if not torch.isfinite(loss):
            raise FloatingPointError(f"video tokenizer loss became {float(loss)} at step {step}; lower train.lr in '{config_path}'")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        if ema is not None:
            _ema_update(ema, model, tc.ema_decay, step)
        step += 1
        with torch.no_grad():
            win_mse += float((rec.detach().clamp(-1, 1) - x).pow(2).mean())
        win_loss += float(loss.detach())
        win_n += 1
        win_idx.append(idx.detach().flatten())
        bar.update(1)
        if step % tc.log_every == 0 or step == total:
            last_psnr = 10 * math.log10(4.0 / max(win_mse / win_n, 1e-12))
            use = code_usage(torch.cat(win_idx), model.codebook_size)
            rec_ = dict(step=step, loss=win_loss / win_n, psnr=last_psnr, lr=_lr_at(step - 1, tc), code_usage=use["usage"],
                        perplexity=use["perplexity"], seconds=time.time() - t0)
            metrics.write(**rec_)
            bar.set_postfix(loss=f"{rec_['loss']:.4f}", psnr=f"{last_psnr:.2f}", usage=f"{use['usage']:.2f}")
            win_loss, win_mse, win_n, win_idx = 0.0, 0.0, 0, []
        if step % tc.checkpoint_every == 0 or step == total:
            _save_checkpoint(ckpt_root, step, model, opt, gen, tc.keep_checkpoints, ema)
    bar.close()
    seconds = time.time() - t0
    (ema if ema is not None else model).save_pretrained(out)
    summary = {
        "steps": step,
        "steps_this_run": step - start_step,
        "seconds": seconds,
        "final_train_psnr": last_psnr,
        "frames": n,
        "splits": note,
        "codebook_size": model.codebook_size,
        "tokens_per_frame": model.tokens_per_frame,
        "out_dir": str(out),
    }
    metrics.write(event="end", **summary)
    write_json(out / "train_summary.json", summary)
    return summary


# ----------------------------------------------------------------------------- evaluation


def _reconstruction_report(tok: VideoTokenizer, frames: np.ndarray, starts: np.ndarray | None = None) -> tuple[dict, np.ndarray]:
    """Reconstruct ``frames``; with temporal compression each episode (from ``starts``) is one clip."""
    if starts is None or tok.temporal == 1:
        starts = np.zeros(1, np.int64)
    bounds = list(zip(starts.tolist(), np.append(starts[1:], len(frames)).tolist()))
    code_list, recs = [], []
    for lo, hi in bounds:
        c = tok.encode(frames[lo:hi])
        code_list.append(c)
        recs.append(tok.decode(c, num_frames=hi - lo))
    codes = torch.cat(code_list)
    rec = np.concatenate(recs)
    p = psnr(frames, rec)
    p = p.clamp(max=100.0)
    s = ssim(frames, rec)
    # the pixels off the static background (moving objects): PSNR pooled over them alone
    fg = foreground_mask(frames, background_of(frames))
    fg_mse = float(((frames.astype(np.float64) - rec.astype(np.float64)) ** 2)[fg].mean()) if fg.any() else float("nan")
    use = code_usage(codes, tok.codebook_size)
    rep = {
        "frames": int(len(frames)),
        "psnr": float(p.mean()),
        "psnr_min": float(p.min()),
        "ssim": float(s.mean()),
        "foreground_share": float(fg.mean()),
        "foreground_psnr": 10 * math.log10(255.0 ** 2 / max(fg_mse, 1e-10)) if fg.any() else float("nan"),
        "code_usage": use["usage"],
        "codes_used": use["codes_used"],
        "perplexity": use["perplexity"],
        "codebook_size": tok.codebook_size,
        "tokens_per_frame": tok.tokens_per_frame,
        "temporal": tok.temporal,
        "codes_per_video_frame": float(codes.numel()) / max(1, len(frames)),
        "grid": list(tok.grid),
        "image_size": tok.image_size,
        "bits_per_frame": tok.tokens_per_frame * math.log2(tok.codebook_size),
    }
    return rep, rec


def save_side_by_side(originals: np.ndarray, recons: np.ndarray, path: str | os.PathLike, n: int = 8, scale: int = 2) -> Path:
    """PNG: a row of originals over a row of their reconstructions (atomically written)."""
    from PIL import Image

    k = min(n, len(originals))
    top = np.concatenate(list(originals[:k]), axis=1)
    bot = np.concatenate(list(recons[:k]), axis=1)
    grid = np.concatenate([top, bot], axis=0)
    im = Image.fromarray(grid)
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from unified_wm.utils import atomic_path

    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")
    return path


def evaluate_video_tokenizer(tok_dir: str | os.PathLike, data_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                             max_frames: int = 512) -> dict:
    """PSNR / SSIM / code usage of a trained tokenizer on held-out frames of an episode dataset."""
    tok = VideoTokenizer.from_pretrained(tok_dir)
    frames, starts, note = load_episode_frames(data_dir, tok.image_size, "eval", max_frames)
    t0 = time.time()
    rep, rec = _reconstruction_report(tok, frames, starts)
    rep.update(seconds=time.time() - t0, tokenizer=str(tok_dir), data=str(data_dir), splits=note)
    if out_dir is not None:
        o = Path(out_dir)
        idx = np.linspace(0, len(frames) - 1, num=min(8, len(frames))).astype(int)
        rep["side_by_side"] = str(save_side_by_side(frames[idx], rec[idx], o / "video_tokenizer_recon.png"))
        write_json(o / "video_tokenizer_eval.json", rep)
    return rep


def read_video_frames(video_path: str | os.PathLike, image_size: int, max_frames: int = 256) -> np.ndarray:
    """Up to ``max_frames`` frames of a video file, center-cropped and resized to ``image_size``."""
    from unified_wm.video_io import read_video

    return resize_frames(read_video(video_path, max_frames, what="video file"), image_size)


def _video_frame_size(video_path) -> tuple[int, int]:
    """(width, height) of the first video stream of a file (or of an image)."""
    from unified_wm.video_io import read_video

    f = read_video(video_path, 1, what="video file")
    return int(f.shape[2]), int(f.shape[1])


def evaluate_on_video_file(tok_dir: str | os.PathLike, video_path: str | os.PathLike, max_frames: int = 256,
                           out_dir: str | os.PathLike | None = None) -> dict:
    """PSNR / SSIM of a trained tokenizer on the frames of a real video file."""
    tok = VideoTokenizer.from_pretrained(tok_dir)
    frames = read_video_frames(video_path, tok.image_size, max_frames)
    src = _video_frame_size(video_path)
    rep, rec = _reconstruction_report(tok, frames)
    rep.update(tokenizer=str(tok_dir), video=str(video_path))
    # frames of another size are centre-cropped to a square and resized: the report says so
    size = int(tok.image_size)
    rep["source_frame_size"] = list(src)
    rep["preprocessing"] = (None if tuple(src) == (size, size) else
                            f"centre-cropped from {src[0]}x{src[1]} to {min(src)}x{min(src)}, then resized to "
                            f"{size}x{size} (bicubic): the figures are for the resized frames")
    if rep["preprocessing"]:
        print(f"uwm tokenizer eval-video: note: '{video_path}' has {src[0]}x{src[1]} frames; they were "
              f"{rep['preprocessing']}", file=sys.stderr)
    if out_dir is not None:
        o = Path(out_dir)
        idx = np.linspace(0, len(frames) - 1, num=min(8, len(frames))).astype(int)
        rep["side_by_side"] = str(save_side_by_side(frames[idx], rec[idx], o / f"{Path(video_path).stem}_recon.png"))
        write_json(o / f"{Path(video_path).stem}_eval.json", rep)
    return rep


# ----------------------------------------------------------------------------- CLI entry points


def main_train(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="uwm tokenizer train-video", description="Train the discrete video tokenizer (FSQ/VQ autoencoder).")
    ap.add_argument("--config", required=True, help="tokenizer YAML, e.g. tokenizers/video_fsq_tiny.yaml")
    ap.add_argument("--data", required=True, help="episode dataset folder")
    ap.add_argument("--out", required=True, help="output folder (checkpoints, metrics.jsonl, final model)")
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    ap.add_argument("--max-steps", type=int, default=None, help="stop at this global step")
    ap.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads, in place of the config's train.threads (e.g. all cores when nothing else runs)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an earlier output of this command at --out (a folder it did not write is never replaced)")
    a = ap.parse_args(argv)
    from unified_wm.utils import check_out, guarded_out

    if a.threads is not None and a.threads < 1:
        raise ValueError(f"--threads {a.threads}: expected a positive number of threads")

    if a.resume and a.overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    check_out(a.out, "tokenizer train-video", a.overwrite, allow_own=a.resume)
    with guarded_out(a.out, "tokenizer train-video", a.overwrite or a.resume):
        cfg = None
        if a.threads is not None:
            cfg = load_config(VideoTokenizerConfig, a.config)
            cfg.train.threads = a.threads
        summary = train_video_tokenizer(a.config, a.data, a.out, max_steps=a.max_steps, resume=a.resume,
                                        progress=not a.no_progress, overwrite=a.overwrite, config=cfg)
    print(json.dumps(summary, indent=2))
    return 0


def main_eval(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="uwm tokenizer eval-video", description="Measure reconstruction PSNR/SSIM and code usage.")
    ap.add_argument("--model", required=True, help="trained tokenizer folder")
    ap.add_argument("--data", default=None, help="episode dataset folder (val/test episodes are used if present)")
    ap.add_argument("--video", action="append", default=[], help="a video file to measure on (repeatable)")
    ap.add_argument("--out", default=None, help="folder for the JSON report and side-by-side PNG")
    ap.add_argument("--max-frames", type=int, default=512)
    a = ap.parse_args(argv)
    if a.data is None and not a.video:
        ap.error("give --data and/or --video")
    report: dict = {}
    if a.data is not None:
        report["dataset"] = evaluate_video_tokenizer(a.model, a.data, a.out, max_frames=a.max_frames)
    for v in a.video:
        report[f"video:{v}"] = evaluate_on_video_file(a.model, v, a.max_frames, out_dir=a.out)
    print(json.dumps(report, indent=2))
    return 0


__all__ = [
    "resize_frames", "load_frames", "load_episode_frames", "read_video_frames",
    "train_video_tokenizer", "evaluate_video_tokenizer", "evaluate_on_video_file", "save_side_by_side",
    "main_train", "main_eval",
]
