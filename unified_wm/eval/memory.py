"""The memory tasks of an eval suite: ``offscreen`` (the object the camera looked away from has
moved plausibly when it looks back) and ``revisit`` (a static scene comes back as it was), with
where Mixture-of-Contexts routing went while the return frame was generated."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from unified_wm.data.episodes import episode_caption
from unified_wm.eval.metrics import frame_psnr, frame_ssim
from unified_wm.eval.suite import RolloutSettings, Suite, check_held_out


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


def eval_offscreen(wm, suite: Suite, model_dir: Path, suite_path: str) -> dict:
    """Off-screen persistence: where does the object reappear after the camera looked away?"""
    from unified_wm.data.world import PALETTE

    eps = _probe_episodes(suite.offscreen_data, "offscreen", suite.n_probes, wm, model_dir, suite_path)
    rs = suite.rollout
    per_n: dict[int, dict[str, list]] = {}
    routes: dict[int, list[dict]] = {}
    skipped = 0
    judged = []  # (episode, t0, t1) of the probes that show the object after the return
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
        judged.append((ep, t0, t1))
    rolled = rollouts_with_return_routing(wm, [(episode_caption(ep), list(ep["actions"][: t1]), t1 - t0 + 1, ep["frames"][:t0])
                                               for ep, t0, t1 in judged], rs)
    for (ep, t0, t1), (gen, routing) in zip(judged, rolled):
        probe, frames_state = ep["state"]["probe"], ep["state"]["frames"]
        oid = probe["object_id"]
        view_w, view_h = ep["state"].get("view", [ep["frames"].shape[2], ep["frames"].shape[1]])
        obj = next(o for o in frames_state[t1]["objects"] if o["id"] == oid)
        cam = frames_state[t1]["camera"]
        truth = _on_screen(obj["bbox"], cam)
        rgb = PALETTE[obj["color"]]
        last = next(o for o in frames_state[t0 - 1]["objects"] if o["id"] == oid)
        stayed = _on_screen(last["bbox"], cam)  # last seen world position, today's camera
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


def objects_placed(ep: dict, start: int, frames: dict[str, np.ndarray], threshold_px: float):
    """Object survival in a rollout: for frames ``start .. start + H - 1`` of a procedural-world
    episode, the objects wholly in view (and not hidden) in the real frame, and for each named
    frame sequence in ``frames`` ([H, h, w, 3] each) how many of them the colour detector places
    within ``threshold_px`` of the true centre. Returns (in view [H], {name: placed [H]}), or
    None for an episode without object states (Atari, recorded video)."""
    from unified_wm.data.world import PALETTE

    st = ep.get("state")
    if isinstance(st, str):
        st = json.loads(st) if st.strip() else {}
    fstates = (st or {}).get("frames") or []
    H = len(next(iter(frames.values())))
    if len(fstates) < start + H or not all("objects" in f and "camera" in f for f in fstates[start:start + H]):
        return None
    view_w, view_h = st.get("view", [ep["frames"].shape[2], ep["frames"].shape[1]])
    seen, placed = np.zeros(H), {k: np.zeros(H) for k in frames}
    for h in range(H):
        fs = fstates[start + h]
        cam = fs["camera"]
        for o in fs["objects"]:
            if o.get("color") not in PALETTE or not _in_view(fs, o["id"], view_w, view_h):
                continue
            truth = _on_screen(o["bbox"], cam)
            seen[h] += 1
            for k, seq in frames.items():
                p = locate_color(seq[h], PALETTE[o["color"]])
                placed[k][h] += p is not None and np.hypot(p[0] - truth[0], p[1] - truth[1]) <= threshold_px
    return seen, placed


def _on_screen(bbox, camera) -> tuple[float, float]:
    """The centre of a world-space box in the view of a camera at ``camera`` (its top-left corner)."""
    return (bbox[0] + bbox[2]) / 2 - camera[0], (bbox[1] + bbox[3]) / 2 - camera[1]


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
    return rollouts_with_return_routing(wm, [(text, actions, frames, context)], rs)[0]


def rollouts_with_return_routing(wm, items: list[tuple], rs: RolloutSettings) -> list[tuple]:
    """:func:`rollout_with_return_routing` of each ``(text, actions, frames, context)`` item, the
    items rolled out ``rs.rows`` at a time in one batch of rows (``WorldModel.rollout_rows``'s
    session; rows of similar lengths together). Each row's routing is read around its own last
    frame."""
    out: list = [None] * len(items)
    order = sorted(range(len(items)), key=lambda i: (len(items[i][3]), items[i][2]))
    size = max(1, rs.rows)
    for j in range(0, len(order), size):
        part = order[j:j + size]
        sess, step = wm.session_rows([{"text": items[i][0], "actions": items[i][1], "context": items[i][3]} for i in part],
                                     **rs.kwargs())
        for r, i in enumerate(part):  # each probe as wm.rollout would check it alone
            wm.check_fits(sess, items[i][2], row=r)
        cache = sess.branches[0].cache
        sparse = any(s is not None for s in cache.uwm_state.attn_states or [])
        last = [items[i][2] - 1 for i in part]
        gen: list[list] = [[] for _ in part]
        before: dict[int, dict] = {}
        for f in range(max(last) + 1):
            if sparse:
                before.update({r: cache.routing_counts(r) for r in range(len(part)) if last[r] == f})
            fr = sess.step(**step(f))
            for r, i in enumerate(part):
                if f <= last[r]:
                    gen[r].append(fr[r])
                if f == last[r]:
                    out[i] = (np.stack(gen[r]), _routing_by_frame(wm, cache, r, before[r]) if sparse else None)
    return out


def _routing_by_frame(wm, cache, row: int, before: dict) -> dict:
    """Routed selections of row ``row`` since ``before`` (its counts then), per frame of the row."""
    from unified_wm.model.modeling_uwm import stream_layout
    from unified_wm.tokenization.processor import FRAME

    after = cache.routing_counts(row)
    cache_ids = cache.uwm_state.ids[row:row + 1]
    meta, _ = stream_layout(cache_ids, wm.model.config)
    frame_cids = meta.chunk_ids[0, cache_ids[0] == FRAME].tolist()
    return {i: after.get(cid, 0.0) - before.get(cid, 0.0) for i, cid in enumerate(frame_cids)}


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
    spans = [(int(ep["state"]["probe"]["leave_t"]), int(ep["state"]["probe"]["return_t"])) for ep in eps]
    rolled = rollouts_with_return_routing(wm, [(episode_caption(ep), list(ep["actions"][: t1]), t1 - t0 + 1, ep["frames"][:t0])
                                               for ep, (t0, t1) in zip(eps, spans)], rs)
    for ep, (t0, t1), (gen, _) in zip(eps, spans, rolled):
        first = int(ep["state"]["probe"].get("first_visit_t", t0))
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
