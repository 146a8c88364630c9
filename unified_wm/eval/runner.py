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

from unified_wm.sequence import MODALITY_KEYS, TEMPLATES
from unified_wm.utils import ConfigError, load_config, write_json

TASKS = ("nll", "rollout", "action_sensitivity", "offscreen", "revisit")


@dataclass
class RolloutSettings:
    context_frames: int = 1
    horizon: int = 8
    temperature: float = 0.0  # 0 = greedy
    seed: int = 0


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
    description: str = ""

    def validate(self) -> None:
        for t in self.tasks:
            if t not in TASKS:
                raise ValueError(f"tasks: unknown task '{t}'; valid tasks: {', '.join(TASKS)}")
        for t in self.templates:
            if t not in TEMPLATES:
                raise ValueError(f"templates: unknown template '{t}'; valid templates: {', '.join(TEMPLATES)}")
        if self.rollout.context_frames < 1 or self.rollout.horizon < 1:
            raise ValueError("rollout: context_frames and horizon must be >= 1")
        for task, key in (("offscreen", "offscreen_data"), ("revisit", "revisit_data")):
            if task in self.tasks and not getattr(self, key):
                raise ValueError(f"task '{task}' needs '{key}' (a probe episode dataset)")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of two uint8 frames (the video tokenizer's definition); identical frames are capped at 100 dB."""
    from unified_wm.tokenization.video import psnr as _psnr

    return min(100.0, float(_psnr(a, b)))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of two uint8 RGB frames (the video tokenizer's definition)."""
    from unified_wm.tokenization.video import ssim as _ssim

    return float(_ssim(a, b))


def check_held_out(model_dir: Path, ds, suite_path: str) -> None:
    seeds_file = model_dir / "training_seeds.json"
    if not seeds_file.is_file():
        print(f"warning: '{seeds_file}' is missing; cannot check that the suite's data is held out", file=sys.stderr)
        return
    train_seeds = set(json.loads(seeds_file.read_text())["seeds"])
    overlap = sorted(train_seeds & {int(s) for s in ds["seed"]})
    if overlap:
        raise ConfigError(
            f"{suite_path}: the suite's data shares {len(overlap)} episode seeds with the model's training data "
            f"(e.g. {overlap[:5]}); evaluate on held-out episodes only"
        )


@torch.no_grad()
def eval_nll(wm, episodes, suite: Suite) -> dict:
    from unified_wm.data.tokenize import episode_documents
    from unified_wm.model.modeling_uwm import stream_layout

    model, p = wm.model, wm.processor
    res = {}
    for tpl in suite.templates:
        sums = {m: [0.0, 0] for m in MODALITY_KEYS}
        correct, total = 0, 0
        for ep, fids in episodes:
            for doc in episode_documents(p, ep, [tpl], suite.clip_frames, frame_ids=fids):
                ids = torch.tensor([doc["input_ids"]])
                mask = torch.tensor([doc["loss_mask"]]).bool()
                logits = model(ids).logits[0, :-1]
                tgt, m = ids[0, 1:], mask[0, 1:]
                _, modality = stream_layout(ids, model.config)
                mod = modality[0, 1:]
                ce = torch.nn.functional.cross_entropy(logits, tgt, reduction="none")
                for i, name in enumerate(MODALITY_KEYS):
                    sel = m & (mod == i)
                    sums[name][0] += float(ce[sel].sum())
                    sums[name][1] += int(sel.sum())
                vsel = m & (mod == 3)
                correct += int((logits.argmax(-1)[vsel] == tgt[vsel]).sum())
                total += int(vsel.sum())
        r = {}
        for name, (s, n) in sums.items():
            if n:
                r[f"nll_{name}"] = s / n
                r[f"ppl_{name}"] = math.exp(min(s / n, 50))
        if total:
            r["video_token_acc"] = correct / total
        res[tpl] = r
    return res


def eval_rollout(wm, episodes, suite: Suite) -> dict:
    rs = suite.rollout
    p = wm.processor
    H = rs.horizon
    model_psnr, model_ssim = [[] for _ in range(H)], [[] for _ in range(H)]
    copy_psnr, recon_psnr = [[] for _ in range(H)], [[] for _ in range(H)]
    for ep, fids in episodes:
        frames = ep["frames"]
        c = rs.context_frames
        if len(frames) < c + H:
            continue
        caption = next((x["text"] for x in ep["captions"] if int(x["t"]) == 0), "")
        actions = list(ep["actions"][: c + H - 1])
        gen = wm.rollout(caption, actions, H, context=frames[:c], temperature=rs.temperature, seed=rs.seed)
        recon = p.decode_frames(fids[c:c + H])
        for h in range(H):
            real = frames[c + h]
            model_psnr[h].append(psnr(gen[h], real))
            model_ssim[h].append(ssim(gen[h], real))
            copy_psnr[h].append(psnr(frames[c - 1], real))
            recon_psnr[h].append(psnr(recon[h], real))
    if not model_psnr[0]:
        return {"error": f"no episode has {rs.context_frames + H} frames"}
    mean = lambda xs: [float(np.mean(x)) for x in xs]  # noqa: E731
    return {
        "n_episodes": len(model_psnr[0]),
        "psnr_by_step": mean(model_psnr), "ssim_by_step": mean(model_ssim),
        "copy_last_psnr_by_step": mean(copy_psnr), "tokenizer_recon_psnr_by_step": mean(recon_psnr),
        "psnr_mean": float(np.mean(model_psnr)), "ssim_mean": float(np.mean(model_ssim)),
        "copy_last_psnr_mean": float(np.mean(copy_psnr)), "tokenizer_recon_psnr_mean": float(np.mean(recon_psnr)),
    }


def eval_action_sensitivity(wm, episodes, suite: Suite) -> dict:
    rs = suite.rollout
    a, b = suite.sensitivity_actions
    diffs = []
    for ep, _ in episodes[: max(1, len(episodes) // 2)]:
        caption = next((x["text"] for x in ep["captions"] if int(x["t"]) == 0), "")
        ctx = ep["frames"][: rs.context_frames]
        ga = wm.rollout(caption, [a] * (rs.context_frames + rs.horizon), rs.horizon, context=ctx, temperature=rs.temperature, seed=rs.seed)
        gb = wm.rollout(caption, [b] * (rs.context_frames + rs.horizon), rs.horizon, context=ctx, temperature=rs.temperature, seed=rs.seed)
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
    skipped = 0
    for ep in eps:
        probe, frames_state = ep["state"]["probe"], ep["state"]["frames"]
        t0, oid = int(probe["away_start"]), probe["object_id"]
        view_w, view_h = ep["state"].get("view", [ep["frames"].shape[2], ep["frames"].shape[1]])
        # judge at the first frame from the return on where the object is wholly in view and
        # not hidden (on the return frame itself it is often only a sliver at the border)
        t1 = None
        for t in range(int(probe["return_t"]), min(len(ep["frames"]), int(probe["return_t"]) + 7)):
            o = next(o for o in frames_state[t]["objects"] if o["id"] == oid)
            cx, cy = frames_state[t]["camera"]
            b = o["bbox"]
            if b[0] >= cx and b[1] >= cy and b[2] < cx + view_w and b[3] < cy + view_h and not o["occluded"]:
                t1 = t
                break
        if t1 is None:
            skipped += 1
            continue
        ctx = ep["frames"][:t0]
        gen = wm.rollout(_caption0(ep), list(ep["actions"][: t1]), t1 - t0 + 1, context=ctx,
                         temperature=rs.temperature, seed=rs.seed)
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
    return out


def eval_revisit(wm, suite: Suite, model_dir: Path, suite_path: str) -> dict:
    eps = _probe_episodes(suite.revisit_data, "revisit", suite.n_probes, wm, model_dir, suite_path)
    rs = suite.rollout
    m_psnr, m_ssim, c_psnr, first_psnr = [], [], [], []  # c_psnr: the real return frame through the tokenizer
    for ep in eps:
        probe = ep["state"]["probe"]
        t0, t1 = int(probe["leave_t"]), int(probe["return_t"])
        first = int(probe.get("first_visit_t", t0))
        gen = wm.rollout(_caption0(ep), list(ep["actions"][: t1]), t1 - t0 + 1, context=ep["frames"][:t0],
                         temperature=rs.temperature, seed=rs.seed)
        real = ep["frames"][t1]
        m_psnr.append(psnr(gen[-1], real))
        m_ssim.append(ssim(gen[-1], real))
        c_psnr.append(psnr(wm.processor.decode_frames(wm.processor.encode_frames(real[None]))[0], real))
        first_psnr.append(psnr(gen[-1], ep["frames"][first]))
    return {"n": len(eps), "return_psnr": float(np.mean(m_psnr)), "return_ssim": float(np.mean(m_ssim)),
            "return_vs_first_visit_psnr": float(np.mean(first_psnr)), "tokenizer_ceiling_psnr": float(np.mean(c_psnr))}


def write_plots(results: dict, out: Path) -> list[str]:
    """PNG plots: rollout PSNR per horizon step (model vs baselines); off-screen error vs N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    ro = results.get("rollout")
    if ro and "psnr_by_step" in ro:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        steps = range(1, len(ro["psnr_by_step"]) + 1)
        for key, label in (("psnr_by_step", "model"), ("copy_last_psnr_by_step", "copy last frame"),
                           ("tokenizer_recon_psnr_by_step", "tokenizer ceiling")):
            ax.plot(steps, ro[key], marker="o", label=label)
        ax.set_xlabel("rollout step"), ax.set_ylabel("PSNR (dB)"), ax.legend(), ax.grid(alpha=0.3)
        ax.set_title(f"{results['suite']}: rollout quality vs horizon")
        fig.tight_layout()
        fig.savefig(out / "rollout_psnr.png", dpi=100)
        plt.close(fig)
        written.append(str(out / "rollout_psnr.png"))
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


def run_suite(model_dir: str, suite_path: str, out_dir: str | None = None, progress: bool = True,
              data: str | None = None, offscreen_data: str | None = None, revisit_data: str | None = None) -> dict:
    from tqdm import tqdm

    from unified_wm.data.episodes import get_episode, load_episodes
    from unified_wm.rollout import WorldModel

    overrides = {k: v for k, v in (("data", data), ("offscreen_data", offscreen_data), ("revisit_data", revisit_data)) if v}
    suite = load_config(Suite, suite_path, overrides)
    model_dir = Path(model_dir)
    wm = WorldModel.from_pretrained(model_dir)
    ds = load_episodes(suite.data)
    check_held_out(model_dir, ds, suite_path)
    n = min(suite.n_episodes, len(ds))
    episodes = []
    for i in tqdm(range(n), desc="encode", disable=not progress):
        ep = get_episode(ds, i)
        episodes.append((ep, wm.processor.encode_frames(ep["frames"])))
    t0 = time.time()
    results: dict = {"suite": suite.name, "model": str(model_dir), "data": suite.data, "n_episodes": n}
    runners = {"nll": eval_nll, "rollout": eval_rollout, "action_sensitivity": eval_action_sensitivity}
    probes = {"offscreen": eval_offscreen, "revisit": eval_revisit}
    for task in tqdm(suite.tasks, desc="tasks", disable=not progress):
        if task in probes:
            results[task] = probes[task](wm, suite, model_dir, suite_path)
        else:
            results[task] = runners[task](wm, episodes, suite)
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
    lines = [f"### eval suite `{r['suite']}` on {r['n_episodes']} held-out episodes", "", "| task | metric | value |", "|---|---|---|"]
    for tpl, m in r.get("nll", {}).items():
        for k, v in m.items():
            lines.append(f"| nll/{tpl} | {k} | {v:.4f} |")
    ro = r.get("rollout")
    if ro and "error" not in ro:
        for k in ("psnr_mean", "ssim_mean", "copy_last_psnr_mean", "tokenizer_recon_psnr_mean"):
            lines.append(f"| rollout | {k} | {ro[k]:.3f} |")
        lines.append("| rollout | psnr_by_step | " + " ".join(f"{x:.1f}" for x in ro["psnr_by_step"]) + " |")
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
    rv = r.get("revisit")
    if rv:
        lines.append(f"| revisit | return-frame PSNR (model / tokenizer ceiling) | {rv['return_psnr']:.2f} / {rv['tokenizer_ceiling_psnr']:.2f} |")
    return "\n".join(lines)


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    return out


def compare(a: str, b: str) -> str:
    """Two results.json (or folders holding one) side by side with the differences."""
    def load(p):
        p = Path(p)
        f = p / "results.json" if p.is_dir() else p
        if not f.is_file():
            raise FileNotFoundError(f"eval results '{f}' do not exist (expected results.json written by `uwm eval --out`)")
        return json.loads(f.read_text())

    ra, rb = flatten(load(a)), flatten(load(b))
    keys = [k for k in ra if k in rb and k not in ("n_episodes", "seconds")]
    w = max(len(k) for k in keys) if keys else 10
    lines = [f"{'metric':<{w}} {'A':>10} {'B':>10} {'B-A':>10}", f"A = {a}", f"B = {b}"]
    for k in keys:
        lines.append(f"{k:<{w}} {ra[k]:10.4f} {rb[k]:10.4f} {rb[k] - ra[k]:+10.4f}")
    only = sorted(set(ra) ^ set(rb))
    if only:
        lines.append(f"(in one run only: {', '.join(only[:10])}{' ...' if len(only) > 10 else ''})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare"]:
        cp = argparse.ArgumentParser(prog="uwm eval compare", description="Two eval runs side by side.")
        cp.add_argument("a"), cp.add_argument("b")
        c = cp.parse_args(argv[1:])
        print(compare(c.a, c.b))
        return 0
    ap = argparse.ArgumentParser(prog="uwm eval", description="Run an evaluation suite on an exported model.")
    ap.add_argument("--model", required=True)
    ap.add_argument("--suite", required=True, help="suite YAML (eval/)")
    ap.add_argument("--out", default=None, help="folder for results.json and results.md")
    ap.add_argument("--data", default=None, help="override the suite's held-out episode dataset")
    ap.add_argument("--offscreen-data", default=None, help="override the suite's probe_offscreen dataset")
    ap.add_argument("--revisit-data", default=None, help="override the suite's probe_revisit dataset")
    a = ap.parse_args(argv)
    try:
        run_suite(a.model, a.suite, a.out, data=a.data, offscreen_data=a.offscreen_data, revisit_data=a.revisit_data)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
