"""``uwm bench rollout``: decoding cost as the video grows, Mixture of Contexts vs dense.

Part 1 (always): a model of the demo's shape with random weights decodes frame ``--early``
(default 16) and frame ``--late`` (default 256) of an interleaved stream (64 codes per frame,
one action between frames) with the KV cache, token by token, greedy under the stream
grammar. It reports the seconds per frame at both points and their ratio, for ``moc`` and
``dense``. Target: MoC's frame 256 costs at most 1.3x its frame 16.

Part 2 (with ``--model DIR``): frames per second of a real exported model's rollout
(``WorldModel.rollout``, the same path as ``uwm rollout``).

Prints a table and writes JSON (``--out``).
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def _stream_model(backend: str, top_k: int, max_len: int):
    from unified_wm.model.modeling_uwm import UnifiedWMConfig, UnifiedWMForCausalLM

    # the demo's layout: 16 specials, 256 text pieces, 19 actions, 1000 video codes
    t0, a0, v0, V = 16, 272, 291, 1291
    cfg = UnifiedWMConfig(
        vocab_size=V, hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=max_len, attn_backend=backend, moc_top_k=top_k,
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
    from unified_wm.model.modeling_uwm import StreamGrammar, UWMCache

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
def model_fps(model_dir: str, frames: int) -> dict:
    from unified_wm.rollout import WorldModel

    wm = WorldModel.from_pretrained(model_dir)
    t = time.perf_counter()
    wm.rollout(text="a red car drives right", actions=["right", "right", "stay"], frames=frames, temperature=0.8, top_k=50)
    dt = time.perf_counter() - t
    return {"model": model_dir, "attention": wm.model.config.attn_backend, "frames": frames, "seconds": dt, "fps": frames / dt}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="uwm bench rollout", description=__doc__.split("\n")[0])
    ap.add_argument("--early", type=int, default=16)
    ap.add_argument("--late", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2, help="frames timed at each point (min is reported)")
    ap.add_argument("--backends", default="moc,dense")
    ap.add_argument("--model", default=None, help="also time a real exported model's rollout")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = [time_frames(b, a.early, a.late, a.top_k, a.repeats) for b in a.backends.split(",")]
    print(f"decoding one 64x64 frame (64 codes + action) with the KV cache, demo-sized model, {a.threads} thread(s)")
    print(f"{'backend':>8} {'frame':>6} {'s/frame':>8} {'frame':>6} {'ctx tok':>8} {'s/frame':>8} {'ratio':>6}")
    for r in rows:
        print(f"{r['backend']:>8} {r['early_frame']:>6} {r['s_per_frame_early']:8.3f} {r['late_frame']:>6} "
              f"{r['context_tokens_late']:>8} {r['s_per_frame_late']:8.3f} {r['ratio']:6.2f}")
    result = {"decode": rows, "threads": a.threads}
    if a.model:
        fps = model_fps(a.model, a.frames)
        result["rollout"] = fps
        print(f"rollout of {fps['model']} ({fps['attention']}): {fps['frames']} frames in {fps['seconds']:.1f}s = {fps['fps']:.2f} frames/s")
    if a.out:
        from unified_wm.utils import write_json

        write_json(a.out, result)
    return 0
