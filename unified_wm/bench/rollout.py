"""``uwm bench rollout``: decoding cost as the video grows, Mixture of Contexts vs dense.

Part 1 (always): a model of the demo's shape with random weights decodes frame ``--early``
(default 16) and frame ``--late`` (default 256) of an interleaved stream (64 codes per frame,
one action between frames) with the KV cache, token by token, greedy under the stream
grammar. It reports the seconds per frame at both points and their ratio, for ``moc`` and
``dense``. Target: MoC's frame 256 costs at most 1.3x its frame 16.

Part 2 (with ``--model DIR``): frames per second of a real exported model's rollout
(``WorldModel.rollout``, the same path as ``uwm rollout``); with ``--data`` also the quality per
decoding mode, episodes rolled out together (``rows``: ``WorldModel.rollout_rows``, as the eval
does) and a long streaming rollout.

Prints a table and writes JSON (``--out``).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch


def _stream_model(backend: str, top_k: int, max_len: int):
    from unified_wm.model.modeling_uwm import UnifiedWMConfig, UnifiedWMForCausalLM

    # the demo's layout: 16 specials, 256 text pieces, 19 actions, 1000 video codes
    t0, a0, v0, V = 16, 272, 291, 1291
    cfg = UnifiedWMConfig(  # recipes/tiny_cpu.yaml's model (the demo's)
        vocab_size=V, hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=max_len, attention={"backend": backend, "top_k": top_k},
        rope_mode="3d", attention_bias=True, prev_frame_input="cross", video_grid=(8, 8),
        text_range=(t0, a0), action_range=(a0, v0), video_range=(v0, V), tokens_per_frame=64, max_chunk_len=64,
    )
    torch.manual_seed(0)
    return UnifiedWMForCausalLM(cfg).eval()


def _frames_tokens(n_frames: int, gen: torch.Generator, cfg) -> list[int]:
    ids = []
    for _ in range(n_frames):
        ids += [cfg.frame_id] + torch.randint(cfg.video_range[0], cfg.video_range[1], (64,), generator=gen).tolist()
        ids += [cfg.act_open_id, cfg.action_range[0] + 2, cfg.act_close_id]
    return ids


@torch.no_grad()
def time_frames(backend: str, early: int, late: int, top_k: int, repeats: int = 1) -> dict:
    from unified_wm.model.cache import UWMCache
    from unified_wm.model.grammar import StreamGrammar

    model = _stream_model(backend, top_k, max_len=(late + 2) * 68 + 64)
    cfg = model.config
    allow = StreamGrammar(cfg).allow["video"]
    gen = torch.Generator().manual_seed(0)
    prompt = [cfg.bos_token_id, cfg.text_open_id, 20, 21, 22, cfg.text_close_id]
    cache = UWMCache(cfg)

    def feed(ids: list[int], chunk: int = 2048):
        for i in range(0, len(ids), chunk):
            model(torch.tensor([ids[i:i + chunk]]), cache=cache, use_cache=True)

    def decode_frame() -> float:
        t = time.perf_counter()
        logits = model(torch.tensor([[cfg.frame_id]]), cache=cache, use_cache=True).logits[0, -1]
        for _ in range(cfg.tokens_per_frame):
            tok = int(logits.masked_fill(~allow, float("-inf")).argmax())
            logits = model(torch.tensor([[tok]]), cache=cache, use_cache=True).logits[0, -1]
        model(torch.tensor([[cfg.act_open_id, cfg.action_range[0] + 2, cfg.act_close_id]]), cache=cache, use_cache=True)
        return time.perf_counter() - t

    feed(prompt + _frames_tokens(early - 1, gen, cfg))
    t_early = min(decode_frame() for _ in range(repeats))  # repeats continue the video: frames early..early+r-1
    done = early - 1 + repeats
    feed(_frames_tokens(late - 1 - done, gen, cfg))
    t_late = min(decode_frame() for _ in range(repeats))
    return {"backend": backend, "early_frame": early, "late_frame": late, "context_tokens_late": cache.get_seq_length(),
            "s_per_frame_early": t_early, "s_per_frame_late": t_late, "ratio": t_late / t_early}


@torch.no_grad()
def model_fps(wm, frames: int, modes: list[tuple[str, int]], batches: list[int]) -> list[dict]:
    """Frames per second of the real model's rollout (``WorldModel.rollout``, as ``uwm rollout``)."""
    rows = []
    for mode, per_pass in modes:
        for B in batches:
            wm.rollout("a red car drives right", ["right"], 2, mode=mode, diagonals_per_pass=per_pass, batch=B)  # warm-up
            t = time.perf_counter()
            wm.rollout(text="a red car drives right", actions=["right", "right", "stay"], frames=frames, temperature=0.8,
                       top_k=50, mode=mode, diagonals_per_pass=per_pass, batch=B)
            dt = time.perf_counter() - t
            rows.append({"mode": _mode_name(mode, per_pass), "batch": B, "frames": frames * B, "seconds": dt,
                         "fps": frames * B / dt})
    return rows


def _mode_name(mode: str, per_pass: int) -> str:
    return mode if mode == "token" else f"diagonal x{per_pass}"


@torch.no_grad()
def model_quality(wm, data: str, modes: list[tuple[str, int]], episodes: int, context: int, horizon: int,
                  cfg_actions: list[float]) -> list[dict]:
    """Greedy rollouts from real context under the logged actions: PSNR against the real frames
    (mean over the horizon) for each decoding mode, next to repeating the last context frame."""
    from unified_wm.data.episodes import episode_caption, get_episode, load_episodes
    from unified_wm.eval.metrics import psnr

    ds = load_episodes(data)
    eps = [get_episode(ds, i) for i in range(min(episodes, len(ds)))]
    rows = []
    settings = [(m, pp, 1.0) for m, pp in modes] + [("token", 1, c) for c in cfg_actions if c != 1.0]
    for mode, per_pass, cfg_a in settings:
        vals, copy, secs = [], [], 0.0
        for ep in eps:
            fr = np.asarray(ep["frames"])
            t = time.perf_counter()
            gen = wm.rollout(episode_caption(ep), [str(a) for a in ep["actions"]], horizon, context=fr[:context],
                             temperature=0.0, mode=mode, diagonals_per_pass=per_pass, cfg_action=cfg_a)
            secs += time.perf_counter() - t
            real = fr[context:context + horizon]
            vals.append(float(psnr(torch.from_numpy(gen[:len(real)]), torch.from_numpy(real)).mean()))
            copy.append(float(psnr(torch.from_numpy(np.repeat(fr[context - 1:context], len(real), 0)),
                                   torch.from_numpy(real)).mean()))
        rows.append({"mode": _mode_name(mode, per_pass), "cfg_action": cfg_a, "psnr": float(np.mean(vals)),
                     "copy_last_psnr": float(np.mean(copy)), "episodes": len(eps), "horizon": horizon,
                     "fps": len(eps) * horizon / secs})
    return rows


@torch.no_grad()
def model_rows(wm, data: str, episodes: int, sizes: list[int], context: int = 2, horizon: int = 8) -> list[dict]:
    """Greedy rollouts of ``episodes`` held-out episodes (as the eval's rollout task makes them),
    ``size`` episodes per batch of rows (``WorldModel.rollout_rows``): frames per second, and the
    share of sampled codes equal to those of one-at-a-time rollouts (the first size)."""
    from unified_wm.data.episodes import episode_caption, get_episode, load_episodes

    ds = load_episodes(data)
    rows = [{"text": episode_caption(ep), "actions": [str(a) for a in ep["actions"][:context + horizon - 1]],
             "context": np.asarray(ep["frames"])[:context]}
            for ep in (get_episode(ds, i) for i in range(min(episodes, len(ds))))]
    out, first = [], None
    for size in sizes:
        t = time.perf_counter()
        codes = np.concatenate([wm.rollout_rows(rows[i:i + size], horizon, temperature=0.0)[1]
                                for i in range(0, len(rows), size)])
        dt = time.perf_counter() - t
        first = codes if first is None else first
        out.append({"rows": size, "episodes": len(rows), "horizon": horizon, "seconds": dt,
                    "fps": len(rows) * horizon / dt, "codes_equal_to_first": float((codes == first).mean())})
    return out


def _histogram(frames: np.ndarray, bins: int = 8) -> np.ndarray:
    q = (frames.reshape(-1, 3).astype(np.int64) * bins) // 256
    h = np.bincount(q[:, 0] * bins * bins + q[:, 1] * bins + q[:, 2], minlength=bins ** 3).astype(float)
    return h / h.sum()


@torch.no_grad()
def long_stream(wm, data: str, frames: int, window: int, mode: str, per_pass: int, span: int = 32,
                temperature: float = 1.0) -> dict:
    """One rollout many times longer than the context, streaming with eviction, from the caption
    and first 2 frames of held-out episode 0 under a fixed pan pattern. Per span of frames:
    seconds per frame, the mean absolute change between consecutive frames, and the
    colour-histogram distance (L1, 0..2) to real frames of the data and to the 2 context frames
    (is it still the same scene?). A rollout that stays coherent keeps these near those of its
    first span (inside the context) and of real video; one that falls apart drifts to noise
    (large change, far histogram) or freezes (change 0)."""
    from unified_wm.data.episodes import episode_caption, get_episode, load_episodes

    ds = load_episodes(data)
    real = np.concatenate([np.asarray(get_episode(ds, i)["frames"]) for i in range(min(8, len(ds)))])
    real_hist = _histogram(real)
    ep = get_episode(ds, 0)
    context = np.asarray(ep["frames"])[:2]
    ctx_hist = _histogram(context)
    real_change = float(np.abs(np.diff(real.astype(np.int16), axis=0)).mean())
    stamps = [time.perf_counter()]
    sess_frames = []

    def on_frame(t, fr):
        stamps.append(time.perf_counter())
        sess_frames.append(fr[0])

    actions = (["right"] * 12 + ["stay"] * 4 + ["left"] * 12 + ["stay"] * 4)
    wm.rollout(episode_caption(ep), actions * (frames // len(actions) + 1), frames, context=context,
               temperature=temperature, top_k=50, seed=0, mode=mode, diagonals_per_pass=per_pass, window=window,
               on_frame=on_frame)
    dt = np.diff(stamps)
    gen = np.stack(sess_frames)
    spans = []
    for s0 in range(0, frames, span):
        g = gen[s0:s0 + span]
        spans.append({"frames": f"{s0}-{s0 + len(g) - 1}", "s_per_frame": float(dt[s0:s0 + span].mean()),
                      "change": float(np.abs(np.diff(g.astype(np.int16), axis=0)).mean()) if len(g) > 1 else 0.0,
                      "hist_l1_to_real": float(np.abs(_histogram(g) - real_hist).sum()),
                      "hist_l1_to_context": float(np.abs(_histogram(g) - ctx_hist).sum())})
    return {"mode": _mode_name(mode, per_pass), "frames": frames, "window": window, "temperature": temperature, "spans": spans,
            "s_per_frame_16": float(dt[15]), "s_per_frame_last": float(dt[-8:].mean()),
            "real_change": real_change, "frames_array": gen}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="uwm bench rollout", description=__doc__.split("\n")[0])
    ap.add_argument("--early", type=int, default=16)
    ap.add_argument("--late", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2, help="frames timed at each point (min is reported)")
    ap.add_argument("--backends", default="moc,dense")
    ap.add_argument("--model", default=None, help="also measure a real exported model (fps, quality per mode, long streaming)")
    ap.add_argument("--data", default=None, help="with --model: held-out episodes for quality and long-stream statistics")
    ap.add_argument("--frames", type=int, default=16, help="frames per fps measurement")
    ap.add_argument("--batches", default="1,4", help="rollouts per batch for the fps table")
    ap.add_argument("--episodes", type=int, default=4)
    ap.add_argument("--rows", default="1,16", help="episodes per batch of rows for the rows table (first: the reference)")
    ap.add_argument("--rows-episodes", type=int, default=16, help="episodes of the rows table")
    ap.add_argument("--long", type=int, default=256, help="frames of the long streaming rollout (0: skip)")
    ap.add_argument("--window", type=int, default=1100, help="token window of the long streaming rollout")
    ap.add_argument("--parts", default="decode,fps,quality,rows,long",
                    help="comma list of: decode (random weights, frame 16 vs 256), fps, quality, rows, long (need --model)")
    ap.add_argument("--long-temperature", type=float, default=0.7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    result = {"threads": a.threads}
    parts = {p for p in a.parts.split(",") if p}
    bad = parts - {"decode", "fps", "quality", "rows", "long"}
    if bad:
        raise ValueError(f"--parts: unknown part '{sorted(bad)[0]}'; valid: decode, fps, quality, rows, long")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    if "decode" in parts:
        rows = [time_frames(b, a.early, a.late, a.top_k, a.repeats) for b in a.backends.split(",")]
        print(f"decoding one 64x64 frame (64 codes + action) with the KV cache, demo-sized model, {a.threads} thread(s)")
        print(f"{'backend':>8} {'frame':>6} {'s/frame':>8} {'frame':>6} {'ctx tok':>8} {'s/frame':>8} {'ratio':>6}")
        for r in rows:
            print(f"{r['backend']:>8} {r['early_frame']:>6} {r['s_per_frame_early']:8.3f} {r['late_frame']:>6} "
                  f"{r['context_tokens_late']:>8} {r['s_per_frame_late']:8.3f} {r['ratio']:6.2f}")
        result["decode"] = rows
    if a.model:
        from unified_wm.rollout import WorldModel

        wm = WorldModel.from_pretrained(a.model)
        modes = [("token", 1), ("diagonal", 1), ("diagonal", 2), ("diagonal", 4)]
        if "fps" in parts:
            fps = model_fps(wm, a.frames, modes, [int(b) for b in a.batches.split(",")])
            result["rollout_fps"] = fps
            print(f"\nrollout speed of {a.model} ({wm.model.config.attention['backend']}), {a.frames} frames per row, 64x64:")
            print(f"{'mode':>12} {'batch':>5} {'frames/s':>9}")
            for r in fps:
                print(f"{r['mode']:>12} {r['batch']:>5} {r['fps']:9.2f}")
        if a.data and "quality" in parts:
            q = model_quality(wm, a.data, modes, a.episodes, 2, 8, [2.0])
            result["quality"] = q
            print(f"\nquality: greedy 8-step rollouts from 2 real frames under the logged actions, {a.episodes} episodes")
            print(f"{'mode':>12} {'cfg_act':>7} {'PSNR':>7} {'copy-last':>9} {'frames/s':>9}")
            for r in q:
                print(f"{r['mode']:>12} {r['cfg_action']:7.1f} {r['psnr']:7.2f} {r['copy_last_psnr']:9.2f} {r['fps']:9.2f}")
        if a.data and "rows" in parts:
            rr = model_rows(wm, a.data, a.rows_episodes, [int(b) for b in a.rows.split(",")])
            result["rows"] = rr
            print(f"\nepisodes rolled out together (rollout_rows): {rr[0]['episodes']} held-out episodes, greedy, "
                  f"{rr[0]['horizon']} frames from 2 real ones")
            print(f"{'rows':>5} {'seconds':>8} {'frames/s':>9} {'codes as rows=' + str(rr[0]['rows']):>16}")
            for r in rr:
                print(f"{r['rows']:>5} {r['seconds']:8.1f} {r['fps']:9.2f} {r['codes_equal_to_first']:16.4f}")
        if a.data and "long" in parts and a.long:
            result["long"] = []
            for mode, pp in (("token", 1), ("diagonal", 2)):
                lg = long_stream(wm, a.data, a.long, a.window, mode, pp, temperature=a.long_temperature)
                gen = lg.pop("frames_array")
                result["long"].append(lg)
                print(f"\nstreaming {a.long} frames ({lg['mode']}) in a {a.window}-token window "
                      f"(model context {wm.context_limit}): frame 16 {lg['s_per_frame_16']:.3f} s, "
                      f"last frames {lg['s_per_frame_last']:.3f} s; real video change {lg['real_change']:.1f}")
                print(f"{'frames':>9} {'s/frame':>8} {'change':>7} {'hist L1 real':>12} {'hist L1 context':>15}")
                for sp in lg["spans"]:
                    print(f"{sp['frames']:>9} {sp['s_per_frame']:8.3f} {sp['change']:7.1f} {sp['hist_l1_to_real']:12.3f} "
                          f"{sp['hist_l1_to_context']:15.3f}")
                if a.out:
                    from PIL import Image

                    from unified_wm.video_io import contact_sheet

                    sheet = contact_sheet(gen[::8], cols=8, scale=1)
                    png = Path(a.out).with_name(Path(a.out).stem + f"_long_{mode}.png")
                    Image.fromarray(np.asarray(sheet)).save(png)
                    print(f"every 8th frame: {png}")
    if a.out:
        from unified_wm.utils import write_json

        write_json(a.out, result)
    return 0
