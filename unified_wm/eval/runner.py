"""Evaluation suites: ``uwm eval --model HF_DIR --suite eval/quick.yaml --out DIR``.

A suite (YAML in ``eval/``) names held-out episode data and the tasks to run:

  nll                 teacher-forced negative log-likelihood and perplexity per modality,
                      for each task template, and top-1 accuracy on video codes.
  rollout             n-step rollout under the logged actions from the episode's caption and
                      first ``context_frames`` frames: PSNR and SSIM per horizon step against the
                      real frames, next to two baselines: the tokenizer's own reconstruction
                      (the ceiling) and repeating the last context frame (the floor to beat).
                      On the procedural world also object survival: the share of objects in
                      view that the colour detector places within ``offscreen_threshold_px``
                      in each generated frame, next to copy-last, the tokenizer and the real frame.
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
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from unified_wm.data.episodes import episode_caption
from unified_wm.eval import baselines as bl
from unified_wm.eval.memory import eval_offscreen, eval_revisit, objects_placed
from unified_wm.eval.metrics import frame_psnr, frame_ssim
from unified_wm.eval.report import compare, markdown_table, write_plots
from unified_wm.eval.suite import RolloutSettings, Suite, check_held_out
from unified_wm.sequence import MODALITY_KEYS
from unified_wm.utils import ConfigError, load_config, write_json

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
                _, modality, _, (_, k_coords, _) = stream_layout_continue(ids, model.config, None)
                mod = modality[0, 1:]
                ce = torch.nn.functional.cross_entropy(logits, tgt, reduction="none")
                for name, (s_, n_) in zip(MODALITY_KEYS, model.ce_sums(ce, mod, m, len(MODALITY_KEYS))):
                    sums[name][0] += s_
                    sums[name][1] += n_
                vsel = m & (mod == MODALITY_KEYS.index("video"))
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
        out, codes = self.many([(ep, n_ctx, actions, frames)])[0]
        return (out, codes) if with_codes else out

    def many(self, requests: list[tuple]) -> list[tuple]:
        """``(frames, codes)`` for each ``(episode, n_ctx, actions, frames)`` request, the ones not
        remembered yet rolled out ``rollout.rows`` at a time in one batch (``WorldModel.rollout_rows``)."""
        todo, got = {}, {}
        for i, (ep, n_ctx, actions, frames) in enumerate(requests):
            actions = [str(a) for a in actions]
            key = (ep.get("episode_id"), int(ep.get("seed", -1)), n_ctx)
            need = n_ctx + frames - 1  # action positions the rollout reads
            hit = self._memo.get(key)
            if hit is not None and len(hit[1]) >= frames and self._effective(hit[0], need) == self._effective(actions, need):
                got[i] = (hit[1][:frames], hit[2][:frames])
            else:
                todo.setdefault((n_ctx, frames), []).append((i, key, ep, actions))
        size = max(1, self.rs.rows)
        for (n_ctx, frames), group in todo.items():
            for j in range(0, len(group), size):
                part = group[j:j + size]
                rows = [{"text": episode_caption(ep), "actions": actions, "context": ep["frames"][:n_ctx]}
                        for _, _, ep, actions in part]
                out, codes = self.wm.rollout_rows(rows, frames, **self.rs.kwargs())
                self.calls += len(part)
                for r, (i, key, _, actions) in enumerate(part):
                    got[i] = (out[r], codes[r])
                    hit = self._memo.get(key)
                    if hit is None or frames >= len(hit[1]):
                        self._memo[key] = (actions, out[r], codes[r])
        return [got[i] for i in range(len(requests))]


def eval_rollout(wm, episodes, suite: Suite, roll: Rollouts | None = None) -> dict:
    rs = suite.rollout
    p = wm.processor
    H = rs.horizon
    roll = roll or Rollouts(wm, rs)
    use_lpips = "lpips" in suite.metrics
    model_psnr, model_ssim = [[] for _ in range(H)], [[] for _ in range(H)]
    copy_psnr, recon_psnr = [[] for _ in range(H)], [[] for _ in range(H)]
    copy_codes_psnr = [[] for _ in range(H)]  # the last context frame's codes, decoded: copy-last in token space
    tok_acc, copy_acc = [[] for _ in range(H)], [[] for _ in range(H)]
    shift_acc, shift_psnr = [[] for _ in range(H)], [[] for _ in range(H)]
    with_shift = "copy_shift" in suite.baselines
    cams = episode_cameras(wm, episodes, suite)
    lp = {k: [[] for _ in range(H)] for k in ("model", "copy", "recon")}
    obj_seen, obj_placed = np.zeros(H), {k: np.zeros(H) for k in ("model", "copy_last", "tokenizer_recon", "real")}
    roll.many([(ep, rs.context_frames, list(ep["actions"][: rs.context_frames + H - 1]), H)
               for ep, _ in episodes if len(ep["frames"]) >= rs.context_frames + H])
    for (ep, fids), cam in zip(episodes, cams):
        frames = ep["frames"]
        c = rs.context_frames
        if len(frames) < c + H:
            continue
        actions = list(ep["actions"][: c + H - 1])
        gen, gen_ids = roll(ep, c, actions, H, with_codes=True)
        recon = p.decode_frames(fids[c:c + H])
        copy_codes = p.decode_frames(np.repeat(np.asarray(fids[c - 1:c]), H, axis=0))
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
            copy_codes_psnr[h].append(frame_psnr(copy_codes[h], real[h]))
            recon_psnr[h].append(frame_psnr(recon[h], real[h]))
        copy = np.repeat(frames[c - 1:c], H, axis=0)  # copy-last's frames
        placed = objects_placed(ep, c, {"model": gen, "copy_last": copy, "tokenizer_recon": recon, "real": real},
                                suite.offscreen_threshold_px)
        if placed is not None:
            obj_seen += placed[0]
            for k, v in placed[1].items():
                obj_placed[k] += v
        if use_lpips:
            from unified_wm.eval.learned import lpips

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
        "copy_last_codes_psnr_by_step": mean(copy_codes_psnr), "copy_last_codes_psnr_mean": float(np.mean(copy_codes_psnr)),
        "token_acc_by_step": mean(tok_acc), "token_acc_mean": float(np.mean(tok_acc)),
        "copy_last_token_acc_by_step": mean(copy_acc), "copy_last_token_acc_mean": float(np.mean(copy_acc)),
    }
    if with_shift:
        out.update({"copy_shift_psnr_by_step": mean(shift_psnr), "copy_shift_psnr_mean": float(np.mean(shift_psnr)),
                    "copy_shift_token_acc_by_step": mean(shift_acc), "copy_shift_token_acc_mean": float(np.mean(shift_acc))})
    if obj_seen.sum() > 0:  # the procedural world: objects in view placed within offscreen_threshold_px, per step
        out["objects_in_view_by_step"] = obj_seen.astype(int).tolist()
        for k, v in obj_placed.items():
            name = "object_placed" if k == "model" else f"{k}_object_placed"
            out[f"{name}_by_step"] = (v / np.maximum(obj_seen, 1)).round(4).tolist()
            out[f"{name}_mean"] = float(v.sum() / obj_seen.sum())
    if use_lpips:
        for k, name in (("model", "lpips"), ("copy", "copy_last_lpips"), ("recon", "tokenizer_recon_lpips")):
            out[f"{name}_by_step"] = mean(lp[k])
            out[f"{name}_mean"] = float(np.mean(lp[k]))
    return out


def eval_action_sensitivity(wm, episodes, suite: Suite) -> dict:
    rs = suite.rollout
    a, b = suite.sensitivity_actions
    eps = [ep for ep, _ in episodes[: max(1, len(episodes) // 2)]]
    gens = Rollouts(wm, rs).many([(ep, rs.context_frames, [x] * (rs.context_frames + rs.horizon), rs.horizon)
                                  for x in (a, b) for ep in eps])  # a fresh memory: one episode, two actions
    diffs = [float(np.abs(ga.astype(np.float64) - gb.astype(np.float64)).mean())
             for (ga, _), (gb, _) in zip(gens[:len(eps)], gens[len(eps):])]
    return {"actions": [a, b], "mean_abs_pixel_diff": float(np.mean(diffs)), "n_episodes": len(diffs)}


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
    asked = []
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
        asked.append((ep, acts))
    gens = roll.many([(ep, c, acts, H) for ep, acts in asked])
    for (ep, acts), (gen, _) in zip(asked, gens):
        f = ep["frames"]
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
    prompt = wm.builder.prompt(episode_caption(ep), fids[:c], [wm.processor.encode_actions([str(a)]) for a in list(ep["actions"])[:c]])
    need = wm.tokens_needed(len(prompt), longest)
    if need > wm.context_limit:
        raise ConfigError(
            f"{suite_path}: {rs.context_frames} context frames and a {longest}-frame rollout need about {need} tokens with "
            f"this model, more than its context of {wm.context_limit} tokens; lower rollout.horizon (or fvd.frames), or "
            f"evaluate a model trained with a longer context (max_position_embeddings)"
        )
    if len(lengths) > 1:
        roll.many([(ep, rs.context_frames, list(ep["actions"][: rs.context_frames + longest - 1]), longest)
                   for ep, _ in episodes if len(ep["frames"]) >= rs.context_frames + longest])


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
              train_data: str | None = None, tasks: list[str] | None = None) -> dict:
    """Run the suite at ``suite_path`` on the exported model; the keyword arguments replace the
    suite's data paths and its task list (``uwm eval --data ... --tasks nll,rollout``)."""
    from tqdm import tqdm

    from unified_wm.data.episodes import get_episode, load_episodes
    from unified_wm.rollout import WorldModel

    overrides = {k: v for k, v in (("data", data), ("offscreen_data", offscreen_data), ("revisit_data", revisit_data),
                                   ("train_data", train_data)) if v}
    if tasks:
        overrides["tasks"] = list(tasks)
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
    from unified_wm.eval.preflight import TaskFailures, preflight

    early_reference = preflight(suite, ds, suite_path, model_dir)  # every check that needs no model
    wm = WorldModel.from_pretrained(model_dir)
    n = min(suite.n_episodes, len(ds))
    episodes = []
    for i in tqdm(range(n), desc="encode", disable=not progress):
        ep = get_episode(ds, i)
        episodes.append((ep, wm.processor.encode_frames(ep["frames"])))
    t0 = time.time()
    results: dict = {"suite": suite.name, "model": str(model_dir), "data": suite.data, "n_episodes": n, "held_out": held_out}
    roll = Rollouts(wm, suite.rollout)
    ref: list = [early_reference] if early_reference is not None else []

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
    failed: dict[str, str] = {}
    task_seconds: dict[str, float] = {}  # wall time of each task (the prewarmed rollouts count once, before the first)
    for i, task in enumerate(tqdm(suite.tasks, desc="tasks", disable=not progress)):
        t_task = time.time()
        try:
            results[task] = runners[task]()
        except Exception as e:  # a late failure: the finished tasks' results are kept, this one is named
            failed[task] = f"{type(e).__name__}: {e}"
            if not isinstance(e, ValueError):
                import traceback

                traceback.print_exc()
            print(f"error: task '{task}' failed: {failed[task]}", file=sys.stderr, flush=True)
        task_seconds[task] = round(time.time() - t_task, 1)
        results["task_seconds"] = task_seconds
        if failed:
            results["failed_tasks"] = failed
        if out_dir and i + 1 < len(suite.tasks):  # what has finished so far, in case the run stops here
            _write_results(results, Path(out_dir), final=False, pending=suite.tasks[i + 1:])
    results["rollouts_generated"] = roll.calls
    results["seconds"] = time.time() - t0
    table = _write_results(results, Path(out_dir), final=True) if out_dir else markdown_table(results)
    print(table)
    if failed:
        raise TaskFailures(failed, out_dir)
    return results


def _write_results(results: dict, out: Path, final: bool, pending=()) -> str:
    """results.json and results.md (plots too when ``final``); unfinished runs name the tasks still to run."""
    out.mkdir(parents=True, exist_ok=True)
    res = dict(results)
    if pending:
        res["pending_tasks"] = list(pending)
    if final:
        results["plots"] = res["plots"] = write_plots(results, out)
    table = markdown_table(res)
    write_json(out / "results.json", res)
    (out / "results.md").write_text(table + "\n")
    return table


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
    ap.add_argument("--tasks", default=None,
                    help="run these tasks instead of the suite's list, comma-separated (e.g. nll,rollout,controllability; "
                         "for splitting a long suite across processes); checked like the suite's own list")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    a = ap.parse_args(argv)
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()] if a.tasks is not None else None
    if tasks is not None and not tasks:
        print(f"error: --tasks '{a.tasks}': expected comma-separated task names, e.g. nll,rollout", file=sys.stderr)
        return 2
    try:
        run_suite(a.model, a.suite, a.out, progress=not a.no_progress, data=a.data, offscreen_data=a.offscreen_data,
                  revisit_data=a.revisit_data, train_data=a.train_data, tasks=tasks)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from unified_wm.eval.preflight import TaskFailures

        if not isinstance(e, TaskFailures):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
