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

Held-out only: the suite refuses data whose episode seeds overlap the model's training seeds.
Output: ``results.json`` (every figure), ``results.md`` (the table), printed to stdout.
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

TASKS = ("nll", "rollout", "action_sensitivity")


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


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of two uint8 RGB frames (gaussian window 11, sigma 1.5, per channel)."""
    import torch.nn.functional as F

    x = torch.from_numpy(a).permute(2, 0, 1)[None].double() / 255
    y = torch.from_numpy(b).permute(2, 0, 1)[None].double() / 255
    g = torch.exp(-((torch.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    g = (g / g.sum()).double()
    win = (g[:, None] * g[None, :]).expand(3, 1, 11, 11)
    mu_x, mu_y = F.conv2d(x, win, groups=3), F.conv2d(y, win, groups=3)
    sxx = F.conv2d(x * x, win, groups=3) - mu_x**2
    syy = F.conv2d(y * y, win, groups=3) - mu_y**2
    sxy = F.conv2d(x * y, win, groups=3) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return float(s.mean())


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


def run_suite(model_dir: str, suite_path: str, out_dir: str | None = None, progress: bool = True,
              data: str | None = None) -> dict:
    from tqdm import tqdm

    from unified_wm.data.episodes import get_episode, load_episodes
    from unified_wm.rollout import WorldModel

    suite = load_config(Suite, suite_path, {"data": data} if data else None)
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
    for task in tqdm(suite.tasks, desc="tasks", disable=not progress):
        results[task] = runners[task](wm, episodes, suite)
    results["seconds"] = time.time() - t0
    table = markdown_table(results)
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
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
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="uwm eval", description="Run an evaluation suite on an exported model.")
    ap.add_argument("--model", required=True)
    ap.add_argument("--suite", required=True, help="suite YAML (eval/)")
    ap.add_argument("--out", default=None, help="folder for results.json and results.md")
    ap.add_argument("--data", default=None, help="override the suite's held-out episode dataset")
    a = ap.parse_args(argv)
    try:
        run_suite(a.model, a.suite, a.out, data=a.data)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
