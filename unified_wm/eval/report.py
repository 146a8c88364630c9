"""What an eval run shows: the markdown table of ``results.json``, the plots, and ``uwm eval compare``."""
from __future__ import annotations

import json
from pathlib import Path


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
          ("copy_last_codes_psnr_by_step", "copy last frame's codes, decoded"),
          ("tokenizer_recon_psnr_by_step", "tokenizer ceiling"))),
        ("rollout_token_acc.png", "video token accuracy", "sampled codes vs the real frame's codes",
         (("token_acc_by_step", "model"), ("copy_last_token_acc_by_step", "copy last frame"))),
        ("rollout_objects.png", "objects placed within the threshold", "objects in view kept in the rollout",
         (("object_placed_by_step", "model"), ("copy_last_object_placed_by_step", "copy last frame"),
          ("tokenizer_recon_object_placed_by_step", "tokenizer ceiling"), ("real_object_placed_by_step", "real frame"))),
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
        for k in ("psnr_mean", "ssim_mean", "copy_last_psnr_mean", "copy_last_codes_psnr_mean", "copy_shift_psnr_mean",
                  "tokenizer_recon_psnr_mean"):
            if k in ro:
                lines.append(f"| rollout | {k} | {ro[k]:.3f} |")
        lines.append("| rollout | psnr_by_step | " + " ".join(f"{x:.1f}" for x in ro["psnr_by_step"]) + " |")
        if "token_acc_mean" in ro:
            shift = f" / {ro['copy_shift_token_acc_mean']:.3f}" if "copy_shift_token_acc_mean" in ro else ""
            lines.append(f"| rollout | token_acc_mean (model / copy last{' / copy or shift' if shift else ''}) | "
                         f"{ro['token_acc_mean']:.3f} / {ro['copy_last_token_acc_mean']:.3f}{shift} |")
            lines.append("| rollout | token_acc_by_step | " + " ".join(f"{x:.3f}" for x in ro["token_acc_by_step"]) + " |")
        if "object_placed_mean" in ro:
            lines.append(f"| rollout | objects in view placed within the threshold (model / copy last / tokenizer ceiling / real) | "
                         f"{ro['object_placed_mean']:.3f} / {ro['copy_last_object_placed_mean']:.3f} / "
                         f"{ro['tokenizer_recon_object_placed_mean']:.3f} / {ro['real_object_placed_mean']:.3f} |")
            lines.append("| rollout | object_placed_by_step | " + " ".join(f"{x:.2f}" for x in ro["object_placed_by_step"]) + " |")
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
    for task, msg in r.get("failed_tasks", {}).items():
        lines.append(f"| {task} | failed (no results) | {msg} |")
    if r.get("pending_tasks"):
        lines.append(f"| (unfinished run) | tasks not run yet | {', '.join(r['pending_tasks'])} |")
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
