"""Roll a world model out from a text + action prompt into video.

Python::

    from unified_wm.rollout import WorldModel
    wm = WorldModel.from_pretrained("runs/demo/hf")
    frames = wm.rollout(text="a red car drives right", actions=["right", "right", "stay"], frames=16)

Command line (same code path)::

    uwm rollout --model runs/demo/hf --prompt "a red car drives right" --actions right,right,stay \\
        --frames 16 --out out.mp4      # also writes out.gif and out.png (contact sheet)

The stream is ``<bos> <text>prompt</text> <frame> codes <act> a </act> <frame> codes ...``.
Frames are sampled code by code with the KV cache; actions are forced from the list (the last
action is held when the list is shorter than the rollout). Sampling is constrained by the
stream grammar, so every frame is a whole grid of video codes.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch


class WorldModel:
    def __init__(self, model, processor):
        from unified_wm.model.modeling_uwm import StreamGrammar
        from unified_wm.sequence import StreamBuilder

        processor.check_model(model.config)
        self.model = model.eval()
        self.processor = processor
        self.builder = StreamBuilder(processor)
        self.video_allowed = StreamGrammar(model.config).allow["video"]

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "WorldModel":
        import unified_wm  # noqa: F401  (registers the model with the Auto classes)
        from transformers import AutoModelForCausalLM

        from unified_wm.tokenization.processor import UnifiedProcessor

        p = Path(path)
        if not p.is_dir():
            raise FileNotFoundError(f"model folder '{p}' does not exist (expected a folder written by `uwm export`)")
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"model folder '{p}' has no config.json (expected a folder written by `uwm export`)")
        processor = UnifiedProcessor.from_pretrained(p)
        model = AutoModelForCausalLM.from_pretrained(str(p))
        return cls(model, processor)

    @property
    def context_limit(self) -> int:
        return int(self.model.config.max_position_embeddings)

    def tokens_needed(self, prompt_len: int, frames: int) -> int:
        per_step = 1 + self.processor.tokens_per_frame + 2 + self.processor.tokens_per_action
        return prompt_len + frames * per_step

    @torch.no_grad()
    def rollout(self, text: str = "", actions: list[str] | str = (), frames: int = 16, *,
                context: np.ndarray | None = None, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                seed: int | None = 0, on_frame=None, progress: bool = False) -> np.ndarray:
        """Generate ``frames`` new frames (uint8 [frames, H, W, 3]) after the prompt and optional context frames."""
        p = self.processor
        if frames <= 0:
            raise ValueError(f"frames must be positive, got {frames}")
        action_names = list(actions) if not isinstance(actions, str) else [a for a in actions.split(",") if a]
        action_ids = [p.encode_actions([a]) for a in action_names] if action_names else [p.encode_actions(["stay"]) if "stay" in p.action_names else [p.action_offset]]
        n_ctx = 0 if context is None else len(context)
        ctx_ids = p.encode_frames(context) if context is not None else None
        ctx_actions = [action_ids[min(i, len(action_ids) - 1)] for i in range(n_ctx)] if n_ctx else None
        prompt = self.builder.prompt(text, ctx_ids, ctx_actions)
        need = self.tokens_needed(len(prompt), frames)
        if len(prompt) > self.context_limit or need > self.context_limit:
            raise ValueError(
                f"prompt ({len(prompt)} tokens) plus {frames} frames needs {need} tokens, more than the model's context "
                f"of {self.context_limit} tokens; shorten the prompt or ask for fewer frames"
            )
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        threads = torch.get_num_threads()
        # token-by-token decoding of a small model is latency bound: one thread avoids
        # the synchronisation cost (and contention) of several on tiny matrices
        torch.set_num_threads(1)
        try:
            return self._rollout(prompt, frames, action_ids, n_ctx, temperature, top_k, top_p, gen, on_frame, progress)
        finally:
            torch.set_num_threads(threads)

    def _rollout(self, prompt, frames, action_ids, n_ctx, temperature, top_k, top_p, gen, on_frame, progress):
        from tqdm import tqdm
        from unified_wm.model.modeling_uwm import UWMCache
        from unified_wm.tokenization.processor import FRAME

        p = self.processor
        cache = UWMCache(self.model.config)
        self.model(torch.tensor([prompt]), cache=cache, use_cache=True)
        out_frames = []
        bar = tqdm(total=frames, desc="rollout", unit="frame", disable=not progress)
        t0 = time.time()
        for f in range(frames):
            logits = self.model(torch.tensor([[FRAME]]), cache=cache, use_cache=True).logits[:, -1]
            codes = []
            for _ in range(p.tokens_per_frame):
                tok = self._sample(logits, temperature, top_k, top_p, gen)
                codes.append(tok)
                logits = self.model(torch.tensor([[tok]]), cache=cache, use_cache=True).logits[:, -1]
            frame = p.decode_frames(np.array([codes]))[0]
            out_frames.append(frame)
            if on_frame is not None:
                on_frame(frame)
            if f < frames - 1:
                a = action_ids[min(n_ctx + f, len(action_ids) - 1)]
                logits = self.model(torch.tensor([self.builder.act_segment(a)]), cache=cache, use_cache=True).logits[:, -1]
            bar.update(1)
            bar.set_postfix(fps=f"{(f + 1) / (time.time() - t0):.2f}")
        bar.close()
        return np.stack(out_frames)

    def _sample(self, logits, temperature, top_k, top_p, gen) -> int:
        logits = logits[0].float().clone()
        logits[~self.video_allowed[: logits.shape[-1]]] = float("-inf")
        if temperature <= 0:
            return int(logits.argmax())
        logits = logits / temperature
        if top_k and top_k > 0:
            kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
            logits[logits < kth] = float("-inf")
        probs = torch.softmax(logits, -1)
        if top_p < 1.0:
            sp, si = probs.sort(descending=True)
            keep = sp.cumsum(0) - sp < top_p
            mask = torch.zeros_like(probs, dtype=torch.bool)
            mask[si[keep]] = True
            probs = torch.where(mask, probs, torch.zeros_like(probs))
            probs = probs / probs.sum()
        return int(torch.multinomial(probs, 1, generator=gen))


# ----------------------------------------------------------------------------- writers
class VideoWriter:
    """Streams frames into an mp4 (H.264 from PyAV's bundled FFmpeg); renamed into place on close."""

    def __init__(self, path: str | os.PathLike, fps: int = 8):
        import av

        self.final = Path(path)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.final.with_name(f".{self.final.stem}.tmp-{os.getpid()}{self.final.suffix}")
        self.container = av.open(str(self.tmp), mode="w")
        self.stream = self.container.add_stream("libx264", rate=fps)
        self.stream.pix_fmt = "yuv420p"
        self.stream.options = {"crf": "18"}
        self.frames: list[np.ndarray] = []
        self._started = False

    def write(self, frame: np.ndarray) -> None:
        import av

        if not self._started:
            self.stream.height, self.stream.width = frame.shape[:2]
            self._started = True
        self.frames.append(frame)
        for packet in self.stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
            self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()
        os.replace(self.tmp, self.final)

    def abort(self) -> None:
        try:
            self.container.close()
        finally:
            if self.tmp.exists():
                self.tmp.unlink()


def contact_sheet(frames: np.ndarray, cols: int = 8, scale: int = 2, pad: int = 2):
    from PIL import Image

    T, H, W, _ = frames.shape
    cols = min(cols, T)
    rows = (T + cols - 1) // cols
    sheet = np.full((rows * (H * scale + pad) + pad, cols * (W * scale + pad) + pad, 3), 255, np.uint8)
    for i, f in enumerate(frames):
        r, c = divmod(i, cols)
        big = np.kron(f, np.ones((scale, scale, 1), np.uint8))
        y, x = pad + r * (H * scale + pad), pad + c * (W * scale + pad)
        sheet[y:y + H * scale, x:x + W * scale] = big
    return Image.fromarray(sheet)


def write_outputs(frames: np.ndarray, out: str | os.PathLike, fps: int = 8) -> dict:
    """Write the mp4, a GIF and a PNG contact sheet next to it (atomically)."""
    from PIL import Image

    from unified_wm.utils import atomic_file

    out = Path(out)
    w = VideoWriter(out, fps)
    try:
        for f in frames:
            w.write(f)
        w.close()
    except BaseException:
        w.abort()
        raise
    gif, png = out.with_suffix(".gif"), out.with_suffix(".png")
    imgs = [Image.fromarray(f).resize((f.shape[1] * 2, f.shape[0] * 2), Image.NEAREST) for f in frames]
    with atomic_file(gif, "wb") as fh:
        imgs[0].save(fh, format="GIF", save_all=True, append_images=imgs[1:], duration=int(1000 / fps), loop=0)
    with atomic_file(png, "wb") as fh:
        contact_sheet(frames).save(fh, format="PNG")
    return {"video": str(out), "gif": str(gif), "contact_sheet": str(png)}


def read_video(path: str | os.PathLike) -> np.ndarray:
    """Decode a video file (or an image) into uint8 [T,H,W,3]."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"context video '{p}' does not exist")
    if p.suffix.lower() in (".png", ".jpg", ".jpeg"):
        from PIL import Image

        return np.asarray(Image.open(p).convert("RGB"))[None]
    import av

    with av.open(str(p)) as c:
        return np.stack([fr.to_ndarray(format="rgb24") for fr in c.decode(video=0)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="uwm rollout", description="Roll out video from a text + action prompt.")
    ap.add_argument("--model", required=True, help="exported model folder (uwm export)")
    ap.add_argument("--prompt", default="", help="text prompt")
    ap.add_argument("--actions", default="", help="comma-separated action names, or a file with one per line")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--context", default=None, help="a video or image whose frames start the rollout")
    ap.add_argument("--out", required=True, help="output .mp4 (a .gif and a .png contact sheet are written beside it)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fps", type=int, default=8)
    a = ap.parse_args(argv)
    try:
        actions = a.actions
        if actions and Path(actions).is_file():
            actions = ",".join(ln.strip() for ln in Path(actions).read_text().splitlines() if ln.strip())
        wm = WorldModel.from_pretrained(a.model)
        from unified_wm.tokenization.actions import parse_actions

        names = parse_actions(actions, wm.processor.action_names) if actions else []
        context = read_video(a.context) if a.context else None
        t0 = time.time()
        frames = wm.rollout(a.prompt, names, a.frames, context=context, temperature=a.temperature, top_k=a.top_k,
                            top_p=a.top_p, seed=a.seed, progress=True)
        paths = write_outputs(frames, a.out, a.fps)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dt = time.time() - t0
    print(f"wrote {len(frames)} frames in {dt:.1f}s ({len(frames) / dt:.2f} frames/s): " + ", ".join(paths.values()))
    return 0
