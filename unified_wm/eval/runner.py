"""Evaluation suites: ``uwm eval --model HF_DIR --suite eval/quick.yaml --out DIR``.

A suite (YAML in ``eval/``) names held-out episode data and the tasks to run:

  nll                 teacher-forced negative log-likelihood and perplexity per modality,
                      for each task template, and top-1 accuracy on video codes.
  rollout             n-step rollout under the logged actions from the episode's caption and
                      first ``context_frames`` frames: PSNR and SSIM per horizon step against the
                      real frames, next to two baselines: the tokenizer's own reconstruction
                      (the ceiling) and repeating the last context frame (the floor to beat).
  action_sensitivity  from the same context, roll out each of two different actions and
                      report the mean absolute pixel difference of the outcomes (0 = the
                      model ignores its actions).
  offscreen           the seed's test, on ``probe_offscreen`` episodes: the model sees an
                      object moving, the camera looks away for N frames (the model imagines
                      them under the logged actions) and comes back. Where the object
                      appears in the generated return frame (centroid of its colour) is
                      compared with where the ground-truth state puts it: error in pixels,
                      success rate within ``offscreen_threshold_px``, per N. Baselines: the
                      same detector on the real return frame through the tokenizer (the
                      ceiling), and "it stayed where it was last seen" (the floor).
  revisit             on ``probe_revisit`` episodes (a static scene the camera leaves and
                      comes back to): PSNR/SSIM of the generated return frame against the real
                      one, next to repeating the last context frame.
  controllability     (MineWorld-style) a small CNN inverse-dynamics probe, trained on real
                      transitions of ``train_data``, reads the action back from two frames:
                      accuracy and macro-F1 on held-out real transitions, on the same through
                      the tokenizer (ceiling), on the model's transitions rolled out from real
                      context under given actions, and on a frozen-frame baseline. See
                      ``unified_wm/eval/controllability.py``.
  caption             the model captions real frames (``caption`` template: the scene; the
                      ``interleaved`` template: the events), grammar-constrained and greedy;
                      exact match and object / event hit rates against the ground truth, next
                      to the most frequent training caption. See ``unified_wm/eval/captioning.py``.
  fvd                 (``metrics`` extra) FVD of 16-frame windows (real context + rollout under
                      the logged actions) against the real windows, with the sample count, next
                      to copy-last and tokenizer-reconstruction baselines. Stable from ~256 videos.

Frame metrics (``metrics:``) for the rollout curves and revisit: ``psnr`` and ``ssim`` (always
computed) and ``lpips`` (``metrics`` extra: ``pip install -e .[metrics]``, JAX imported lazily).

Held-out only: the suite refuses data whose episode seeds overlap the model's training seeds.
Output: ``results.json`` (every figure), ``results.md`` (the table), ``*.png`` plots (metric vs
horizon, error vs N), printed to stdout. ``uwm eval compare A B`` prints two runs side by side.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from unified_wm.eval.metrics import frame_psnr, frame_ssim
from unified_wm.eval import baselines as bl
from unified_wm.eval.baselines import BASELINES
from unified_wm.sequence import MODALITY_KEYS, TEMPLATES
from unified_wm.utils import ConfigError, load_config, write_json

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

    def kwargs(self) -> dict:
        """Sampling keywords for ``WorldModel.rollout``."""
        return dict(temperature=self.temperature, seed=self.seed, mode=self.mode,
                    diagonals_per_pass=self.diagonals_per_pass, cfg_text=self.cfg_text, cfg_action=self.cfg_action)


@dataclass
class ControllabilitySettings:
    actions: str = "logged"  # logged: the episode's own actions; uniform: drawn uniformly from the probe's classes
    probe_transitions: int = 4000  # real transitions the probe learns from (at most)
    epochs: int = 6  # raised on small data so that the probe gets at least 400 optimizer steps
    time_limit_s: float = 60.0  # the probe stops training after this, whatever the epochs
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


def episode_cameras(wm, episodes, suite: Suite) -> list:
    """Camera positions in code cells per episode for copy_shift (None when not asked)."""
    if "copy_shift" not in suite.baselines:
        return [None] * len(episodes)
    grid = tuple(wm.processor.grid)
    return [bl.require_camera(ep, grid, ep["frames"].shape[1:3], suite.data) for ep, _ in episodes]


@torch.no_grad()
def eval_nll(wm, episodes, suite: Suite) -> dict:
    """Teacher-forced NLL per modality for each template; top-1 accuracy on every video code
    (``video_token_acc``) and on the codes of frames after the first of a document
    (``next_frame_token_acc``: predicted with the previous frame in view), next to the
    baselines' accuracy on those same codes (under ``baselines``)."""
    from unified_wm.data.tokenize import episode_documents
    from unified_wm.model.modeling_uwm import stream_layout_continue

    model, p = wm.model, wm.processor
    res = {}
    for tpl in suite.templates:
        sums = {m: [0.0, 0] for m in MODALITY_KEYS}
        correct, total, nxt_correct, nxt_total = 0, 0, 0, 0
        for ep, fids in episodes:
            for doc in episode_documents(p, ep, [tpl], suite.clip_frames, frame_ids=fids):
                ids = torch.tensor([doc["input_ids"]])
                mask = torch.tensor([doc["loss_mask"]]).bool()
                logits = model(ids).logits[0, :-1]
                tgt, m = ids[0, 1:], mask[0, 1:]
                _, modality, _, (_, k_coords) = stream_layout_continue(ids, model.config, None)
                mod = modality[0, 1:]
                ce = torch.nn.functional.cross_entropy(logits, tgt, reduction="none")
                for i, name in enumerate(MODALITY_KEYS):
                    sel = m & (mod == i)
                    sums[name][0] += float(ce[sel].sum())
                    sums[name][1] += int(sel.sum())
                vsel = m & (mod == 3)
                hit = logits.argmax(-1) == tgt
                correct += int(hit[vsel].sum())
                total += int(vsel.sum())
                later = vsel & (k_coords[0, 1:, 1] >= 2)  # frame index (1-based in the coordinates) >= 1
                nxt_correct += int(hit[later].sum())
                nxt_total += int(later.sum())
        r = {}
        for name, (s, n) in sums.items():
            if n:
                r[f"nll_{name}"] = s / n
                r[f"ppl_{name}"] = math.exp(min(s / n, 50))
        if total:
            r["video_token_acc"] = correct / total
        if nxt_total:
            r["next_frame_token_acc"] = nxt_correct / nxt_total
        res[tpl] = r
    if any("next_frame_token_acc" in r for r in res.values()):
        grid = tuple(p.grid)
        cams = episode_cameras(wm, episodes, suite)
        res["baselines"] = {}
        for kind in suite.baselines:
            c = n = 0
            for (ep, fids), cam in zip(episodes, cams):
                a, b = bl.next_frame_accuracy(kind, np.asarray(fids), cam, grid, suite.clip_frames)
                c, n = c + a, n + b
            res["baselines"][kind] = {"next_frame_token_acc": c / max(n, 1), "codes": n}
    return res


class Rollouts:
    """``wm.rollout`` with a memory, so that tasks rolling out the same episode from the same
    context under the same actions (rollout, controllability, fvd) share one rollout. A longer
    rollout answers a shorter request: decoding is causal and the sampler draws in order, so
    its first frames are exactly what the shorter rollout would have produced."""

    def __init__(self, wm, rs: RolloutSettings):
        self.wm, self.rs = wm, rs
        self._memo: dict = {}
        self.calls = 0

    @staticmethod
    def _effective(actions, n: int) -> tuple:
        return tuple(actions[min(i, len(actions) - 1)] for i in range(n)) if len(actions) else ()

    def __call__(self, ep: dict, n_ctx: int, actions, frames: int, with_codes: bool = False):
        """Frames uint8 [frames, H, W, 3] (and the sampled code ids [frames, h*w] with ``with_codes``)."""
        actions = [str(a) for a in actions]
        key = (ep.get("episode_id"), int(ep.get("seed", -1)), n_ctx)
        need = n_ctx + frames - 1  # action positions the rollout reads
        hit = self._memo.get(key)
        if hit is not None and len(hit[1]) >= frames and self._effective(hit[0], need) == self._effective(actions, need):
            return (hit[1][:frames], hit[2][:frames]) if with_codes else hit[1][:frames]
        self.calls += 1
        out, codes = self.wm.rollout(_caption0(ep), actions, frames, context=ep["frames"][:n_ctx],
                                     return_codes=True, **self.rs.kwargs())
        if hit is None or len(out) >= len(hit[1]):
            self._memo[key] = (actions, out, codes)
        return (out, codes) if with_codes else out


def eval_rollout(wm, episodes, suite: Suite, roll: Rollouts | None = None) -> dict:
    rs = suite.rollout
    p = wm.processor
    H = rs.horizon
    roll = roll or Rollouts(wm, rs)
    use_lpips = "lpips" in suite.metrics
    model_psnr, model_ssim = [[] for _ in range(H)], [[] for _ in range(H)]
    copy_psnr, recon_psnr = [[] for _ in range(H)], [[] for _ in range(H)]
    tok_acc, copy_acc = [[] for _ in range(H)], [[] for _ in range(H)]
    shift_acc, shift_psnr = [[] for _ in range(H)], [[] for _ in range(H)]
    with_shift = "copy_shift" in suite.baselines
    cams = episode_cameras(wm, episodes, suite)
    lp = {k: [[] for _ in range(H)] for k in ("model", "copy", "recon")}
    for (ep, fids), cam in zip(episodes, cams):
        frames = ep["frames"]
        c = rs.context_frames
        if len(frames) < c + H:
            continue
        actions = list(ep["actions"][: c + H - 1])
        gen, gen_ids = roll(ep, c, actions, H, with_codes=True)
        recon = p.decode_frames(fids[c:c + H])
        real = frames[c:c + H]
        for h in range(H):  # token accuracy: the sampled codes against the real frame's codes
            tok_acc[h].append(float((np.asarray(gen_ids[h]) == np.asarray(fids[c + h])).mean()))
            copy_acc[h].append(float((np.asarray(fids[c - 1]) == np.asarray(fids[c + h])).mean()))
        if with_shift:  # copy-or-shift rolled out from the last context frame, decoded by the tokenizer
            sc = bl.rollout_codes("copy_shift", np.asarray(fids), cam, c, H, tuple(p.grid))
            sf = p.decode_frames(sc)
            for h in range(H):
                shift_acc[h].append(float((sc[h] == np.asarray(fids[c + h])).mean()))
                shift_psnr[h].append(frame_psnr(sf[h], real[h]))
        for h in range(H):
            model_psnr[h].append(frame_psnr(gen[h], real[h]))
            model_ssim[h].append(frame_ssim(gen[h], real[h]))
            copy_psnr[h].append(frame_psnr(frames[c - 1], real[h]))
            recon_psnr[h].append(frame_psnr(recon[h], real[h]))
        if use_lpips:
            from unified_wm.eval.learned import lpips

            copy = np.repeat(frames[c - 1:c], H, axis=0)
            for k, x in (("model", gen), ("copy", copy), ("recon", recon)):
                for h, v in enumerate(lpips(x, real)):
                    lp[k][h].append(float(v))
    if not model_psnr[0]:
        return {"error": f"no episode has {rs.context_frames + H} frames"}
    mean = lambda xs: [float(np.mean(x)) for x in xs]  # noqa: E731
    out = {
        "n_episodes": len(model_psnr[0]),
        "psnr_by_step": mean(model_psnr), "ssim_by_step": mean(model_ssim),
        "copy_last_psnr_by_step": mean(copy_psnr), "tokenizer_recon_psnr_by_step": mean(recon_psnr),
        "psnr_mean": float(np.mean(model_psnr)), "ssim_mean": float(np.mean(model_ssim)),
        "copy_last_psnr_mean": float(np.mean(copy_psnr)), "tokenizer_recon_psnr_mean": float(np.mean(recon_psnr)),
        "token_acc_by_step": mean(tok_acc), "token_acc_mean": float(np.mean(tok_acc)),
        "copy_last_token_acc_by_step": mean(copy_acc), "copy_last_token_acc_mean": float(np.mean(copy_acc)),
    }
    if with_shift:
        out.update({"copy_shift_psnr_by_step": mean(shift_psnr), "copy_shift_psnr_mean": float(np.mean(shift_psnr)),
                    "copy_shift_token_acc_by_step": mean(shift_acc), "copy_shift_token_acc_mean": float(np.mean(shift_acc))})
    if use_lpips:
        for k, name in (("model", "lpips"), ("copy", "copy_last_lpips"), ("recon", "tokenizer_recon_lpips")):
            out[f"{name}_by_step"] = mean(lp[k])
            out[f"{name}_mean"] = float(np.mean(lp[k]))
    return out


def eval_action_sensitivity(wm, episodes, suite: Suite) -> dict:
    rs = suite.rollout
    a, b = suite.sensitivity_actions
    diffs = []
    for ep, _ in episodes[: max(1, len(episodes) // 2)]:
        caption = next((x["text"] for x in ep["captions"] if int(x["t"]) == 0), "")
        ctx = ep["frames"][: rs.context_frames]
        ga = wm.rollout(caption, [a] * (rs.context_frames + rs.horizon), rs.horizon, context=ctx, **rs.kwargs())
        gb = wm.rollout(caption, [b] * (rs.context_frames + rs.horizon), rs.horizon, context=ctx, **rs.kwargs())
        diffs.append(float(np.abs(ga.astype(np.float64) - gb.astype(np.float64)).mean()))
    return {"actions": [a, b], "mean_abs_pixel_diff": float(np.mean(diffs)), "n_episodes": len(diffs)}


def _probe_episodes(path: str, kind: str, n: int, wm, model_dir: Path, suite_path: str) -> list[dict]:
    from unified_wm.data.episodes import get_episode, load_episodes

    ds = load_episodes(path)
    check_held_out(model_dir, ds, suite_path)
    eps = []
    for i in range(len(ds)):
        ep = get_episode(ds, i)
        st = json.loads(ep["state"]) if isinstance(ep["state"], str) else ep["state"]
        if st.get("probe", {}).get("kind") == kind:
            ep["state"] = st
            eps.append(ep)
        if len(eps) >= n:
            break
    if not eps:
        raise ValueError(f"'{path}' holds no '{kind}' probe episodes (make them with `uwm data gen-world --split probe_{kind}`)")
    return eps


def locate_color(frame: np.ndarray, rgb, tol: float = 70.0, min_pixels: int = 3):
    """Centroid (x, y) of the pixels within ``tol`` of colour ``rgb``; None if fewer than ``min_pixels``."""
    d = np.linalg.norm(frame.astype(np.float64) - np.asarray(rgb, dtype=np.float64), axis=-1)
    ys, xs = np.nonzero(d < tol)
    if len(xs) < min_pixels:
        return None
    return float(xs.mean()), float(ys.mean())


def _caption0(ep) -> str:
    return next((x["text"] for x in ep["captions"] if int(x["t"]) == 0), "")


def eval_offscreen(wm, suite: Suite, model_dir: Path, suite_path: str) -> dict:
    """Off-screen persistence: where does the object reappear after the camera looked away?"""
    from unified_wm.data.world import PALETTE

    eps = _probe_episodes(suite.offscreen_data, "offscreen", suite.n_probes, wm, model_dir, suite_path)
    rs = suite.rollout
    per_n: dict[int, dict[str, list]] = {}
    routes: dict[int, list[dict]] = {}
    skipped = 0
    for ep in eps:
        probe, frames_state = ep["state"]["probe"], ep["state"]["frames"]
        t0, oid = int(probe["away_start"]), probe["object_id"]
        view_w, view_h = ep["state"].get("view", [ep["frames"].shape[2], ep["frames"].shape[1]])
        # judge at the first frame from the return on where the object is wholly in view and
        # not hidden (on the return frame itself it is often only a sliver at the border)
        t1 = None
        for t in range(int(probe["return_t"]), min(len(ep["frames"]), int(probe["return_t"]) + 7)):
            if _in_view(frames_state[t], oid, view_w, view_h):
                t1 = t
                break
        if t1 is None:
            skipped += 1
            continue
        ctx = ep["frames"][:t0]
        gen, routing = rollout_with_return_routing(wm, _caption0(ep), list(ep["actions"][: t1]), t1 - t0 + 1, ctx, rs)
        obj = next(o for o in frames_state[t1]["objects"] if o["id"] == oid)
        cam = frames_state[t1]["camera"]
        bx = obj["bbox"]
        truth = ((bx[0] + bx[2]) / 2 - cam[0], (bx[1] + bx[3]) / 2 - cam[1])
        rgb = PALETTE[obj["color"]]
        last = next(o for o in frames_state[t0 - 1]["objects"] if o["id"] == oid)
        lb = last["bbox"]
        stayed = ((lb[0] + lb[2]) / 2 - cam[0], (lb[1] + lb[3]) / 2 - cam[1])  # last seen world position, today's camera
        recon = wm.processor.decode_frames(wm.processor.encode_frames(ep["frames"][t1:t1 + 1]))[0]
        found = {"model": locate_color(gen[-1], rgb), "tokenizer_real": locate_color(recon, rgb),
                 "real": locate_color(ep["frames"][t1], rgb)}
        d = per_n.setdefault(int(probe["N"]), {"model": [], "tokenizer_real": [], "real": [], "stayed": []})
        for k, p in found.items():
            d[k].append(float("inf") if p is None else float(np.hypot(p[0] - truth[0], p[1] - truth[1])))
        d["stayed"].append(float(np.hypot(stayed[0] - truth[0], stayed[1] - truth[1])))
        if routing is not None:
            vis = [t for t in range(t0) if _in_view(frames_state[t], oid, view_w, view_h)]
            routes.setdefault(int(probe["N"]), []).append(routing_shares(routing, t0, vis))
    thr = suite.offscreen_threshold_px

    def summary(errs):
        e = np.array(errs)
        ok = np.isfinite(e)
        return {"success_rate": float((e <= thr).mean()), "found_rate": float(ok.mean()),
                "median_error_px": float(np.median(e[ok])) if ok.any() else None, "n": int(len(e))}

    if not per_n:
        return {"error": f"none of the {len(eps)} probes shows the object wholly in view after the return"}
    out = {"threshold_px": thr, "skipped_probes": skipped, "by_N": {}, "overall": {}}
    for n in sorted(per_n):
        out["by_N"][str(n)] = {k: summary(v) for k, v in per_n[n].items()}
    for k in ("model", "stayed", "tokenizer_real", "real"):
        out["overall"][k] = summary([e for d in per_n.values() for e in d[k]])
    if routes:
        for n in sorted(routes):
            out["by_N"][str(n)]["routing"] = mean_shares(routes[n])
        out["overall"]["routing"] = mean_shares([r for rs_ in routes.values() for r in rs_])
    return out


def _in_view(frame_state: dict, oid, view_w: int, view_h: int) -> bool:
    """The object is wholly inside the camera's view and not hidden behind an occluder."""
    o = next(o for o in frame_state["objects"] if o["id"] == oid)
    cx, cy = frame_state["camera"]
    b = o["bbox"]
    return b[0] >= cx and b[1] >= cy and b[2] < cx + view_w and b[3] < cy + view_h and not o["occluded"]


def rollout_with_return_routing(wm, text: str, actions: list, frames: int, context: np.ndarray, rs: RolloutSettings):
    """``wm.rollout`` (same session, same sampling), and where Mixture-of-Contexts routing went
    while the model generated the LAST frame: ``{frame index: selections}`` summed over layers,
    heads and the frame's queries (its ``<frame>`` and codes, plus the action just before it),
    counting only frame chunks (routed selections of text, sink and action chunks are left out).
    None for a model without a sparse decode state (dense attention)."""
    from unified_wm.model.modeling_uwm import stream_layout
    from unified_wm.tokenization.processor import FRAME

    ids = wm.action_ids(actions) or [wm.default_action()]
    n_ctx = len(context)
    act = lambda t: ids[min(t, len(ids) - 1)]  # noqa: E731  (as in WorldModel.rollout)
    sess = wm.session(text, context, [act(t) for t in range(max(n_ctx - 1, 0))], **rs.kwargs())
    cache = sess.branches[0].cache
    sparse = any(s is not None for s in cache.uwm_state.attn_states or [])

    out, before = [], {}
    for f in range(frames):
        if f == frames - 1:
            before = cache.routing_counts()
        t = n_ctx + f - 1
        out.append(sess.step(act(t) if t >= 0 else None)[0])
    if not sparse:
        return np.stack(out), None
    after = cache.routing_counts()
    cache_ids = cache.uwm_state.ids[:1]
    meta, _ = stream_layout(cache_ids, wm.model.config)
    frame_pos = torch.nonzero(cache_ids[0] == FRAME).flatten().tolist()
    by_frame = {}
    for i, pos in enumerate(frame_pos):
        cid = int(meta.chunk_ids[0, pos])
        by_frame[i] = after.get(cid, 0.0) - before.get(cid, 0.0)
    return np.stack(out), by_frame


def routing_shares(by_frame: dict, t0: int, visible: list[int]) -> dict:
    """Shares of the return frame's routed frame selections: on the frame where the object was
    last seen, on every frame where it was in view, on the frames generated while the camera
    looked away (and the return frame itself), next to what uniform routing over the earlier
    frames would give the last-seen frame."""
    total = sum(v for k, v in by_frame.items())
    if total <= 0:
        return {}
    last = max(visible) if visible else None
    earlier = max(len(by_frame) - 1, 1)
    return {
        "last_seen": (by_frame.get(last, 0.0) / total) if last is not None else 0.0,
        "visible": sum(by_frame.get(t, 0.0) for t in visible) / total,
        "away": sum(v for k, v in by_frame.items() if k >= t0) / total,
        "uniform_last_seen": 1.0 / earlier,
        "uniform_visible": len(visible) / earlier,
    }


def mean_shares(rows: list[dict]) -> dict:
    rows = [r for r in rows if r]
    if not rows:
        return {}
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} | {"n": len(rows)}


def eval_revisit(wm, suite: Suite, model_dir: Path, suite_path: str) -> dict:
    eps = _probe_episodes(suite.revisit_data, "revisit", suite.n_probes, wm, model_dir, suite_path)
    rs = suite.rollout
    m_psnr, m_ssim, c_psnr, first_psnr = [], [], [], []  # c_psnr: the real return frame through the tokenizer
    m_lp, c_lp = [], []
    use_lpips = "lpips" in suite.metrics
    for ep in eps:
        probe = ep["state"]["probe"]
        t0, t1 = int(probe["leave_t"]), int(probe["return_t"])
        first = int(probe.get("first_visit_t", t0))
        gen = wm.rollout(_caption0(ep), list(ep["actions"][: t1]), t1 - t0 + 1, context=ep["frames"][:t0],
                         **rs.kwargs())
        real = ep["frames"][t1]
        recon = wm.processor.decode_frames(wm.processor.encode_frames(real[None]))[0]
        m_psnr.append(frame_psnr(gen[-1], real))
        m_ssim.append(frame_ssim(gen[-1], real))
        c_psnr.append(frame_psnr(recon, real))
        first_psnr.append(frame_psnr(gen[-1], ep["frames"][first]))
        if use_lpips:
            from unified_wm.eval.learned import lpips

            m_lp.append(float(lpips(gen[-1:], real[None])[0]))
            c_lp.append(float(lpips(recon[None], real[None])[0]))
    out = {"n": len(eps), "return_psnr": float(np.mean(m_psnr)), "return_ssim": float(np.mean(m_ssim)),
           "return_vs_first_visit_psnr": float(np.mean(first_psnr)), "tokenizer_ceiling_psnr": float(np.mean(c_psnr))}
    if use_lpips:
        out.update(return_lpips=float(np.mean(m_lp)), tokenizer_ceiling_lpips=float(np.mean(c_lp)))
    return out


def reference_episodes(suite: Suite, ds, suite_path: str) -> tuple[list[dict], str]:
    """Episodes the controllability probe and the caption baseline learn from, and where they come from.

    ``train_data`` when the suite names it (it must share no seed with the evaluated episodes),
    else the held-out episodes after the first ``n_episodes`` (never the evaluated ones).
    """
    from itertools import islice

    from unified_wm.data.episodes import iter_episodes, load_episodes

    n_eval = min(suite.n_episodes, len(ds))
    if suite.train_data:
        tds = load_episodes(suite.train_data)
        eval_seeds = {int(x) for x in ds.select(range(n_eval))["seed"]}
        overlap = sorted(eval_seeds & {int(x) for x in tds["seed"]})
        if overlap:
            raise ConfigError(
                f"{suite_path}: train_data '{suite.train_data}' shares {len(overlap)} episode seeds with the evaluated "
                f"episodes (e.g. {overlap[:5]}); the probe and the caption baseline must not learn from the episodes they are scored on"
            )
        eps = list(islice(iter_episodes(tds), suite.train_episodes))
        return eps, f"train_data {suite.train_data} ({len(eps)} episodes)"
    if len(ds) <= n_eval:
        raise ConfigError(
            f"{suite_path}: tasks 'controllability' and 'caption' need episodes to learn from: set train_data (e.g. the "
            f"model's training episodes), or give data more than n_episodes={n_eval} episodes (it has {len(ds)})"
        )
    eps = list(islice(iter_episodes(ds.select(range(n_eval, len(ds)))), suite.train_episodes))
    return eps, f"held-out episodes {n_eval}..{n_eval + len(eps) - 1} of {suite.data} (not evaluated)"


def eval_controllability(wm, episodes, suite: Suite, roll: Rollouts, reference) -> dict:
    """Inverse-dynamics probe accuracy on real, tokenizer, generated and frozen transitions (see controllability.py)."""
    from unified_wm.eval.controllability import scores, train_probe, transitions

    cs, rs = suite.controllability, suite.rollout
    ref_eps, source = reference()
    pairs, labels = transitions(ref_eps, cs.probe_transitions)
    try:
        probe = train_probe(pairs, labels, epochs=cs.epochs, seed=cs.seed, time_limit_s=cs.time_limit_s,
                            downsample=cs.downsample)
    except ValueError as e:  # too few transitions, or a single action, in the reference episodes
        return {"error": f"{e} (from {source})"}
    real_pairs, real_labels = transitions([ep for ep, _ in episodes])
    recon = [{"frames": wm.processor.decode_frames(f), "actions": ep["actions"]} for ep, f in episodes]
    tok_pairs, tok_labels = transitions(recon)
    c, H = rs.context_frames, rs.horizon
    rng = np.random.default_rng(cs.seed)
    choices = [a for a in probe.classes if a in wm.processor.action_names]
    gen_pairs, frozen_pairs, labels_g, steps = [], [], [], []
    for ep, _ in episodes:
        f = ep["frames"]
        if cs.actions == "logged":
            if len(ep["actions"]) < c + H - 1:
                continue
            acts = [str(a) for a in ep["actions"][: c + H - 1]]
        else:
            if len(f) < c:
                continue
            acts = [str(a) for a in ep["actions"][: c - 1]] + [str(a) for a in rng.choice(choices, H)]
        gen = roll(ep, c, acts, H)
        prev = f[c - 1]
        for h in range(H):
            gen_pairs.append(np.stack([prev, gen[h]]))
            frozen_pairs.append(np.stack([f[c - 1], f[c - 1]]))
            labels_g.append(acts[c - 1 + h])
            steps.append(h)
            prev = gen[h]
    if not gen_pairs:
        return {"error": f"no episode has {c + H - 1} actions for a {H}-step rollout after {c} context frames"}
    pred_g = probe.predict(np.stack(gen_pairs))
    model = scores(labels_g, pred_g)
    st = np.array(steps)
    model["accuracy_by_step"] = [float(np.mean([pred_g[i] == labels_g[i] for i in np.nonzero(st == h)[0]])) for h in range(H)]
    return {
        "actions": cs.actions, "probe": {**probe.info, "trained_on": source},
        "real": scores(real_labels, probe.predict(real_pairs)),
        "tokenizer_real": scores(tok_labels, probe.predict(tok_pairs)),
        "model": model,
        "frozen": scores(labels_g, probe.predict(np.stack(frozen_pairs))),
        "n_rollouts": len(gen_pairs) // H,
    }


def eval_caption(wm, episodes, suite: Suite, reference) -> dict:
    """The model's scene and event captions of real frames, scored against the ground truth (see captioning.py)."""
    from unified_wm.eval.captioning import caption_prompts, generate_text, most_frequent_captions, score_caption, summarize

    cs = suite.caption
    ref_eps, source = reference()
    base = most_frequent_captions(ref_eps)
    rows = {"scene": ([], []), "events": ([], [])}
    examples = []
    for ep, fids in episodes:
        for kind, prompt, truth in caption_prompts(wm.processor, ep, fids, suite.clip_frames, cs.max_events_per_episode):
            if len(prompt) + cs.max_new_tokens > wm.context_limit:
                continue
            pred = wm.processor.decode_text(generate_text(wm.model, prompt, cs.max_new_tokens))
            rows[kind][0].append(score_caption(pred, truth))
            rows[kind][1].append(score_caption(base[kind], truth))
            if sum(e["kind"] == kind for e in examples) < 3:
                examples.append({"kind": kind, "episode_id": ep.get("episode_id"), "truth": truth, "model": pred})
    if not rows["scene"][0] and not rows["events"][0]:
        return {"error": "no evaluated episode has a caption at t=0 (the captioning task needs ground-truth captions)"}
    out = {"baseline": {"source": source, "scene": base["scene"], "events": base["events"]}, "examples": examples}
    for kind, key in (("scene", "clause_hit"), ("events", "event_hit")):
        out[kind] = {"model": summarize(rows[kind][0], key), "most_frequent_caption": summarize(rows[kind][1], key)}
    return out


def eval_fvd(wm, episodes, suite: Suite, roll: Rollouts) -> dict:
    """FVD (I3D, Kinetics-400) of real-context + rollout windows against the real windows (metrics extra)."""
    from unified_wm.eval.learned import frechet_distance, i3d_features

    F, c = suite.fvd.frames, suite.rollout.context_frames
    vids: dict[str, list] = {"real": [], "model": [], "copy_last": [], "tokenizer_recon": []}
    for ep, fids in episodes:
        f = ep["frames"]
        if len(f) < F:
            continue
        if suite.fvd.n_videos and len(vids["real"]) >= suite.fvd.n_videos:
            break
        gen = roll(ep, c, list(ep["actions"][: F - 1]), F - c)
        vids["real"].append(f[:F])
        vids["model"].append(np.concatenate([f[:c], gen]))
        vids["copy_last"].append(np.concatenate([f[:c], np.repeat(f[c - 1:c], F - c, axis=0)]))
        vids["tokenizer_recon"].append(wm.processor.decode_frames(fids[:F]))
    n = len(vids["real"])
    if n < 2:
        return {"error": f"FVD needs at least 2 episodes of {F} frames, found {n}"}
    feats = {k: i3d_features(np.stack(v)) for k, v in vids.items()}
    out = {"n_videos": n, "frames": F, "context_frames": c, "stable": n >= 256,
           "note": "FVD is biased upwards and unstable below ~256 videos per side; compare runs at equal n_videos"}
    for k in ("model", "copy_last", "tokenizer_recon"):
        out["fvd" if k == "model" else f"{k}_fvd"] = frechet_distance(feats["real"], feats[k])
    return out


def write_plots(results: dict, out: Path) -> list[str]:
    """PNG plots: rollout PSNR per horizon step (model vs baselines); off-screen error vs N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    ro = results.get("rollout") or {}
    curves = (  # file, y label, title, (key, label) per line: metric vs horizon, model vs baselines
        ("rollout_psnr.png", "PSNR (dB)", "rollout quality vs horizon",
         (("psnr_by_step", "model"), ("copy_last_psnr_by_step", "copy last frame"),
          ("tokenizer_recon_psnr_by_step", "tokenizer ceiling"))),
        ("rollout_token_acc.png", "video token accuracy", "sampled codes vs the real frame's codes",
         (("token_acc_by_step", "model"), ("copy_last_token_acc_by_step", "copy last frame"))),
        ("rollout_lpips.png", "LPIPS (AlexNet, lower is better)", "rollout LPIPS vs horizon",
         (("lpips_by_step", "model"), ("copy_last_lpips_by_step", "copy last frame"),
          ("tokenizer_recon_lpips_by_step", "tokenizer ceiling"))),
    )
    for fname, ylabel, title, lines in curves:
        if lines[0][0] not in ro:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for key, label in lines:
            ax.plot(range(1, len(ro[key]) + 1), ro[key], marker="o", label=label)
        ax.set_xlabel("rollout step"), ax.set_ylabel(ylabel), ax.legend(), ax.grid(alpha=0.3)
        ax.set_title(f"{results['suite']}: {title}")
        fig.tight_layout()
        fig.savefig(out / fname, dpi=100)
        plt.close(fig)
        written.append(str(out / fname))
    co = results.get("controllability")
    if co and "model" in co:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        steps = range(1, len(co["model"]["accuracy_by_step"]) + 1)
        ax.plot(steps, co["model"]["accuracy_by_step"], marker="o", label="model's rollout")
        for key, label, style in (("real", "real frames", "--"), ("tokenizer_real", "real via tokenizer", ":"),
                                  ("frozen", "frozen frame", "-.")):
            ax.axhline(co[key]["accuracy"], linestyle=style, color="gray" if key != "real" else "black", label=label)
        ax.set_xlabel("rollout step"), ax.set_ylabel("inverse-dynamics accuracy"), ax.set_ylim(-0.05, 1.05)
        ax.legend(fontsize=8), ax.grid(alpha=0.3)
        ax.set_title(f"{results['suite']}: action controllability ({co['actions']} actions)")
        fig.tight_layout()
        fig.savefig(out / "controllability.png", dpi=100)
        plt.close(fig)
        written.append(str(out / "controllability.png"))
    off = results.get("offscreen")
    if off and off.get("by_N"):
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ns = [int(n) for n in off["by_N"]]
        for key, label in (("model", "model"), ("stayed", "stayed where last seen"),
                           ("tokenizer_real", "real frame via tokenizer (ceiling)"), ("real", "real frame (detector check)")):
            ax.plot(ns, [off["by_N"][str(n)][key]["success_rate"] for n in ns], marker="o", label=label)
        ax.set_xlabel("frames looked away (N)"), ax.set_ylabel(f"success (error <= {off['threshold_px']:g} px)")
        ax.set_ylim(-0.05, 1.05), ax.legend(), ax.grid(alpha=0.3)
        ax.set_title(f"{results['suite']}: off-screen persistence")
        fig.tight_layout()
        fig.savefig(out / "offscreen.png", dpi=100)
        plt.close(fig)
        written.append(str(out / "offscreen.png"))
    return written


def _prewarm(wm, suite: Suite, episodes, roll: Rollouts, suite_path: str) -> None:
    """Check that the longest rollout fits the model's context, then roll it out once per
    episode when several tasks will read it (the shorter ones reuse its first frames)."""
    rs = suite.rollout
    lengths = []
    if "rollout" in suite.tasks or ("controllability" in suite.tasks and suite.controllability.actions == "logged"):
        lengths.append(rs.horizon)
    if "fvd" in suite.tasks:
        lengths.append(suite.fvd.frames - rs.context_frames)
    if not lengths or not episodes:
        return
    longest = max(lengths)
    ep, fids = episodes[0]
    c = min(rs.context_frames, len(fids))
    prompt = wm.builder.prompt(_caption0(ep), fids[:c], [wm.processor.encode_actions([str(a)]) for a in list(ep["actions"])[:c]])
    need = wm.tokens_needed(len(prompt), longest)
    if need > wm.context_limit:
        raise ConfigError(
            f"{suite_path}: {rs.context_frames} context frames and a {longest}-frame rollout need about {need} tokens with "
            f"this model, more than its context of {wm.context_limit} tokens; lower rollout.horizon (or fvd.frames), or "
            f"evaluate a model trained with a longer context (max_position_embeddings)"
        )
    if len(lengths) > 1:
        for ep, _ in episodes:
            if len(ep["frames"]) >= rs.context_frames + longest:
                roll(ep, rs.context_frames, list(ep["actions"][: rs.context_frames + longest - 1]), longest)


def _check_extras(suite: Suite, suite_path: str) -> None:
    from unified_wm.eval.learned import MetricsUnavailable, _import

    for what, wanted in (("lpips", "lpips" in suite.metrics), ("fvd", "fvd" in suite.tasks)):
        if wanted:
            try:
                _import(what)
            except MetricsUnavailable as e:
                raise ConfigError(f"{suite_path}: {e}") from None


def run_suite(model_dir: str, suite_path: str, out_dir: str | None = None, progress: bool = True,
              data: str | None = None, offscreen_data: str | None = None, revisit_data: str | None = None,
              train_data: str | None = None) -> dict:
    from tqdm import tqdm

    from unified_wm.data.episodes import get_episode, load_episodes
    from unified_wm.rollout import WorldModel

    overrides = {k: v for k, v in (("data", data), ("offscreen_data", offscreen_data), ("revisit_data", revisit_data),
                                   ("train_data", train_data)) if v}
    suite = load_config(Suite, suite_path, overrides, override_flag=lambda key: "--" + key.replace("_", "-"))
    _check_extras(suite, suite_path)
    model_dir = Path(model_dir)
    ds = load_episodes(suite.data)
    if "copy_shift" in suite.baselines and len(ds):  # before the model is loaded
        try:
            bl.require_camera(get_episode(ds, 0), (1, 1), (1, 1), suite.data)
        except bl.BaselineUnavailable as e:
            raise ConfigError(f"{suite_path}: {e}") from None
    held_out = check_held_out(model_dir, ds, suite_path)
    wm = WorldModel.from_pretrained(model_dir)
    n = min(suite.n_episodes, len(ds))
    episodes = []
    for i in tqdm(range(n), desc="encode", disable=not progress):
        ep = get_episode(ds, i)
        episodes.append((ep, wm.processor.encode_frames(ep["frames"])))
    t0 = time.time()
    results: dict = {"suite": suite.name, "model": str(model_dir), "data": suite.data, "n_episodes": n, "held_out": held_out}
    roll = Rollouts(wm, suite.rollout)
    ref: list = []

    def reference():  # loaded once, on first use (controllability, caption)
        if not ref:
            ref.append(reference_episodes(suite, ds, suite_path))
        return ref[0]

    _prewarm(wm, suite, episodes, roll, suite_path)
    runners = {
        "nll": lambda: eval_nll(wm, episodes, suite),
        "rollout": lambda: eval_rollout(wm, episodes, suite, roll),
        "action_sensitivity": lambda: eval_action_sensitivity(wm, episodes, suite),
        "offscreen": lambda: eval_offscreen(wm, suite, model_dir, suite_path),
        "revisit": lambda: eval_revisit(wm, suite, model_dir, suite_path),
        "controllability": lambda: eval_controllability(wm, episodes, suite, roll, reference),
        "caption": lambda: eval_caption(wm, episodes, suite, reference),
        "fvd": lambda: eval_fvd(wm, episodes, suite, roll),
    }
    for task in tqdm(suite.tasks, desc="tasks", disable=not progress):
        results[task] = runners[task]()
    results["rollouts_generated"] = roll.calls
    results["seconds"] = time.time() - t0
    table = markdown_table(results)
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        results["plots"] = write_plots(results, out)
        write_json(out / "results.json", results)
        (out / "results.md").write_text(table + "\n")
    print(table)
    return results


def markdown_table(r: dict) -> str:
    which = ("held-out episodes" if r.get("held_out", "checked") == "checked"
             else "episodes (held-out: not checked, the model has no training_seeds.json)")
    lines = [f"### eval suite `{r['suite']}` on {r['n_episodes']} {which}", "", "| task | metric | value |", "|---|---|---|"]
    nll = r.get("nll", {})
    for tpl, m in nll.items():
        if tpl == "baselines":
            continue
        for k, v in m.items():
            lines.append(f"| nll/{tpl} | {k} | {v:.4f} |")
        if "next_frame_token_acc" in m and nll.get("baselines"):
            names = list(nll["baselines"])
            lines.append(f"| nll/{tpl} | next-frame code accuracy: model / {' / '.join(n.replace('_', ' ') for n in names)} | "
                         f"{m['next_frame_token_acc']:.3f} / "
                         + " / ".join(f"{nll['baselines'][n]['next_frame_token_acc']:.3f}" for n in names) + " |")
    ro = r.get("rollout")
    if ro and "error" not in ro:
        for k in ("psnr_mean", "ssim_mean", "copy_last_psnr_mean", "copy_shift_psnr_mean", "tokenizer_recon_psnr_mean"):
            if k in ro:
                lines.append(f"| rollout | {k} | {ro[k]:.3f} |")
        lines.append("| rollout | psnr_by_step | " + " ".join(f"{x:.1f}" for x in ro["psnr_by_step"]) + " |")
        if "token_acc_mean" in ro:
            shift = f" / {ro['copy_shift_token_acc_mean']:.3f}" if "copy_shift_token_acc_mean" in ro else ""
            lines.append(f"| rollout | token_acc_mean (model / copy last{' / copy or shift' if shift else ''}) | "
                         f"{ro['token_acc_mean']:.3f} / {ro['copy_last_token_acc_mean']:.3f}{shift} |")
            lines.append("| rollout | token_acc_by_step | " + " ".join(f"{x:.3f}" for x in ro["token_acc_by_step"]) + " |")
        if "lpips_mean" in ro:
            lines.append(f"| rollout | lpips_mean (model / copy last / tokenizer ceiling) | {ro['lpips_mean']:.3f} / "
                         f"{ro['copy_last_lpips_mean']:.3f} / {ro['tokenizer_recon_lpips_mean']:.3f} |")
            lines.append("| rollout | lpips_by_step | " + " ".join(f"{x:.3f}" for x in ro["lpips_by_step"]) + " |")
    elif ro:
        lines.append(f"| rollout | error | {ro['error']} |")
    s = r.get("action_sensitivity")
    if s:
        lines.append(f"| action_sensitivity | mean_abs_pixel_diff ({s['actions'][0]} vs {s['actions'][1]}) | {s['mean_abs_pixel_diff']:.3f} |")
    off = r.get("offscreen")
    if off and "error" in off:
        lines.append(f"| offscreen | error | {off['error']} |")
    elif off:
        for k in ("model", "stayed", "tokenizer_real", "real") if "overall" in off else ():
            o = off["overall"][k]
            med = "n/a" if o["median_error_px"] is None else f"{o['median_error_px']:.1f}"
            lines.append(f"| offscreen ({k}) | success <= {off['threshold_px']:g}px / found / median err px | "
                         f"{o['success_rate']:.2f} / {o['found_rate']:.2f} / {med} |")
        for n, d in off.get("by_N", {}).items():
            lines.append(f"| offscreen N={n} | success: model / stayed / tokenizer on real (n) | "
                         f"{d['model']['success_rate']:.2f} / {d['stayed']['success_rate']:.2f} / "
                         f"{d['tokenizer_real']['success_rate']:.2f} ({d['model']['n']}) |")
        ro_ = off.get("overall", {}).get("routing")
        if ro_:
            lines.append("| offscreen routing (return frame) | share on last-seen frame (uniform) / frames in view (uniform) / "
                         f"away frames | {ro_['last_seen']:.3f} ({ro_['uniform_last_seen']:.3f}) / {ro_['visible']:.3f} "
                         f"({ro_['uniform_visible']:.3f}) / {ro_['away']:.3f} |")
    rv = r.get("revisit")
    if rv:
        lines.append(f"| revisit | return-frame PSNR (model / tokenizer ceiling) | {rv['return_psnr']:.2f} / {rv['tokenizer_ceiling_psnr']:.2f} |")
        if "return_lpips" in rv:
            lines.append(f"| revisit | return-frame LPIPS (model / tokenizer ceiling) | "
                         f"{rv['return_lpips']:.3f} / {rv['tokenizer_ceiling_lpips']:.3f} |")
    co = r.get("controllability")
    if co and "error" in co:
        lines.append(f"| controllability | error | {co['error']} |")
    elif co:
        order = ("real", "tokenizer_real", "model", "frozen")
        for m in ("accuracy", "macro_f1"):
            lines.append(f"| controllability ({co['actions']} actions) | probe {m}: real / real via tokenizer / model / frozen frame | "
                         + " / ".join(_fmt(co[k][m]) for k in order) + " |")
        lines.append(f"| controllability | transitions scored: real / model | {co['real']['n']} / {co['model']['n']} |")
    cap = r.get("caption")
    if cap and "error" in cap:
        lines.append(f"| caption | error | {cap['error']} |")
    elif cap:
        for kind, hit in (("scene", "clause_hit"), ("events", "event_hit")):
            for who, label in (("model", "model"), ("most_frequent_caption", "most frequent training caption")):
                m = cap[kind][who]
                if m["n"]:
                    lines.append(f"| caption {kind} ({label}) | exact / object hit / {hit.replace('_', ' ')} (n={m['n']}) | "
                                 f"{_fmt(m['exact_match'])} / {_fmt(m['object_hit'])} / {_fmt(m[hit])} |")
    fv = r.get("fvd")
    if fv and "error" in fv:
        lines.append(f"| fvd | error | {fv['error']} |")
    elif fv:
        flag = "" if fv["stable"] else "; unstable below 256"
        lines.append(f"| fvd ({fv['n_videos']} videos x {fv['frames']} frames{flag}) | model / copy last / tokenizer recon | "
                     f"{fv['fvd']:.1f} / {fv['copy_last_fvd']:.1f} / {fv['tokenizer_recon_fvd']:.1f} |")
    return "\n".join(lines)


def _fmt(x, nd: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    return out


def compare(a: str, b: str, out: str | None = None) -> str:
    """Two results.json (or folders holding one) side by side with the differences; with ``out``,
    also a plot of both runs' rollout curves over the horizon (e.g. MoC vs dense, eval/long.yaml)."""
    def load(p):
        p = Path(p)
        f = p / "results.json" if p.is_dir() else p
        if not f.is_file():
            raise FileNotFoundError(f"eval results '{f}' do not exist (expected results.json written by `uwm eval --out`)")
        return json.loads(f.read_text())

    full_a, full_b = load(a), load(b)
    ra, rb = flatten(full_a), flatten(full_b)
    keys = [k for k in ra if k in rb and k not in ("n_episodes", "held_out", "seconds", "rollouts_generated") and not k.endswith("_seconds")]
    w = max(len(k) for k in keys) if keys else 10
    lines = [f"{'metric':<{w}} {'A':>10} {'B':>10} {'B-A':>10}", f"A = {a}", f"B = {b}"]
    for k in keys:
        lines.append(f"{k:<{w}} {ra[k]:10.4f} {rb[k]:10.4f} {rb[k] - ra[k]:+10.4f}")
    only = sorted(set(ra) ^ set(rb))
    if only:
        lines.append(f"(in one run only: {', '.join(only[:10])}{' ...' if len(only) > 10 else ''})")
    if out:
        path = plot_compare(full_a, full_b, Path(out), str(a), str(b))
        lines.append(f"plot: {path}" if path else "plot: neither run has rollout curves to plot")
    return "\n".join(lines)


def plot_compare(ra: dict, rb: dict, out: Path, label_a: str, label_b: str) -> str | None:
    """Rollout PSNR (and LPIPS where both runs have it) vs horizon for two runs, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ro_a, ro_b = ra.get("rollout") or {}, rb.get("rollout") or {}
    keys = [k for k in ("psnr_by_step", "token_acc_by_step", "lpips_by_step") if k in ro_a and k in ro_b]
    if not keys:
        return None
    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for ro, name in ((ro_a, f"A: {Path(label_a).name}"), (ro_b, f"B: {Path(label_b).name}")):
            ax.plot(range(1, len(ro[key]) + 1), ro[key], marker="o", label=name)
        base = "copy_last_" + key
        if base in ro_a:
            ax.plot(range(1, len(ro_a[base]) + 1), ro_a[base], linestyle="--", color="gray", label="copy last frame")
        ax.set_xlabel("rollout step"), ax.set_ylabel(key.replace("_by_step", "").upper()), ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("rollout quality vs horizon: A vs B")
    fig.tight_layout()
    path = out / "compare_rollout.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare"]:
        cp = argparse.ArgumentParser(prog="uwm eval compare", description="Two eval runs side by side.")
        cp.add_argument("a"), cp.add_argument("b")
        cp.add_argument("--out", default=None, help="folder for compare_rollout.png (both runs' curves vs horizon)")
        c = cp.parse_args(argv[1:])
        try:
            print(compare(c.a, c.b, c.out))
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    ap = argparse.ArgumentParser(prog="uwm eval", description="Run an evaluation suite on an exported model.")
    ap.add_argument("--model", required=True)
    ap.add_argument("--suite", required=True, help="suite YAML (eval/)")
    ap.add_argument("--out", default=None, help="folder for results.json and results.md")
    ap.add_argument("--data", default=None, help="override the suite's held-out episode dataset")
    ap.add_argument("--offscreen-data", default=None, help="override the suite's probe_offscreen dataset")
    ap.add_argument("--revisit-data", default=None, help="override the suite's probe_revisit dataset")
    ap.add_argument("--train-data", default=None,
                    help="override the suite's train_data (episodes the controllability probe and the caption baseline learn from)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    a = ap.parse_args(argv)
    try:
        run_suite(a.model, a.suite, a.out, progress=not a.no_progress, data=a.data, offscreen_data=a.offscreen_data,
                  revisit_data=a.revisit_data, train_data=a.train_data)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
