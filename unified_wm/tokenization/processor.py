"""One id space for text, actions and video, and the processor that owns it.

Ids, in order: 16 special tokens, then SentencePiece text pieces, then action tokens (the
action names, then, if the processor declares a continuous action space, ``dims * bins`` bin
tokens: dimension ``d``, bin ``b`` is ``action_offset + len(action_names) + d * bins + b``),
then video codes. The processor turns an episode into the interleaved stream (via the task
templates in :mod:`unified_wm.sequence`) and turns generated ids back into text, actions
and frames. It saves and loads with ``save_pretrained`` / ``from_pretrained`` next to the
model (``processor_config.json``, ``text.model``, ``video_tokenizer/``).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np

from unified_wm.tokenization.actions import ContinuousActionBinner, parse_actions
from unified_wm.utils import OVERWRITE_HELP, atomic_dir

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<text>", "</text>", "<act>", "</act>", "<frame>"] + [
    f"<reserved_{i}>" for i in range(8, 16)
]
PAD, BOS, EOS, TEXT_OPEN, TEXT_CLOSE, ACT_OPEN, ACT_CLOSE, FRAME = range(8)
N_SPECIAL = len(SPECIAL_TOKENS)
CONFIG_NAME = "processor_config.json"


class UnifiedProcessor:
    def __init__(self, text_model: str | os.PathLike, action_names: list[str], video_tokenizer_dir: str | os.PathLike,
                 max_chunk_len: int = 64, tokens_per_action: int = 1, continuous_actions: dict | None = None):
        import sentencepiece as spm

        from unified_wm.tokenization.video import VideoTokenizer

        self.video_tokenizer_dir = Path(video_tokenizer_dir)
        self.video = VideoTokenizer.from_pretrained(self.video_tokenizer_dir)
        if self.video.temporal != 1:
            raise ValueError(
                f"video tokenizer '{self.video_tokenizer_dir}' compresses time (temporal: {self.video.temporal}: one code "
                f"grid per {self.video.temporal} frames), but the stream holds one <frame> segment per frame with an action "
                f"between frames; build the processor from a tokenizer with temporal: 1"
            )
        self.text_model_path = Path(text_model)
        if not self.text_model_path.is_file():
            raise FileNotFoundError(f"SentencePiece model '{self.text_model_path}' does not exist")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.text_model_path))
        except (RuntimeError, OSError) as e:  # not a SentencePiece model (a text file, an empty or cut file)
            raise ValueError(f"'{self.text_model_path}' is not a SentencePiece model ({str(e).strip()[:200]}); "
                             f"expected the .model file written by `uwm tokenizer train-text`") from None
        self.action_names = list(action_names)
        if len(set(self.action_names)) != len(self.action_names):
            dup = sorted({a for a in self.action_names if self.action_names.count(a) > 1})
            raise ValueError(f"action names must be unique, got duplicates {dup}")
        self.continuous = None
        if continuous_actions is not None:
            known = {"low", "high", "bins", "mode", "mu"}
            unknown = sorted(set(continuous_actions) - known)
            if unknown:
                raise ValueError(f"continuous_actions: unknown key '{unknown[0]}' (valid keys: {', '.join(sorted(known))})")
            self.continuous = ContinuousActionBinner(**continuous_actions)
            if tokens_per_action != self.continuous.dims:
                raise ValueError(
                    f"a continuous action space of {self.continuous.dims} dimension(s) puts {self.continuous.dims} "
                    f"token(s) in every <act> segment; tokens_per_action is {tokens_per_action}"
                )
        elif tokens_per_action != 1:
            raise ValueError(f"tokens_per_action must be 1 for named (discrete) actions, got {tokens_per_action}")
        self.max_chunk_len = max_chunk_len
        self.tokens_per_action = tokens_per_action
        self.text_offset = N_SPECIAL
        self.action_offset = self.text_offset + self.sp.get_piece_size()
        self.continuous_offset = self.action_offset + len(self.action_names)
        n_cont = self.continuous.dims * self.continuous.bins if self.continuous is not None else 0
        self.video_offset = self.continuous_offset + n_cont
        self.vocab_size = self.video_offset + self.video.codebook_size
        self.grid = tuple(self.video.grid)
        self.tokens_per_frame = int(self.grid[0] * self.grid[1])
        self._action_index = {a: i for i, a in enumerate(self.action_names)}

    # ------------------------------------------------------------------ layout for the model
    def model_layout(self) -> dict:
        """Config fields the model needs to read the stream (see UnifiedWMConfig)."""
        return dict(
            vocab_size=self.vocab_size, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
            text_open_id=TEXT_OPEN, text_close_id=TEXT_CLOSE, act_open_id=ACT_OPEN, act_close_id=ACT_CLOSE,
            frame_id=FRAME, text_range=[self.text_offset, self.action_offset],
            action_range=[self.action_offset, self.video_offset], video_range=[self.video_offset, self.vocab_size],
            tokens_per_frame=self.tokens_per_frame, tokens_per_action=self.tokens_per_action,
            max_chunk_len=self.max_chunk_len,
        )

    def vocab_sizes(self) -> dict:
        """Token counts per part of the id space (what ``check_model`` compares)."""
        return _sizes_from_ranges(self.vocab_size, [self.text_offset, self.action_offset],
                                  [self.action_offset, self.video_offset], [self.video_offset, self.vocab_size])

    def check_model(self, model_config) -> None:
        """Refuse a model whose vocabulary or layout disagrees with this processor.

        The message says which key differs and compares the sizes of both id spaces
        (total, special, text, action and video token counts), naming the ones that differ.
        """
        layout = self.model_layout()
        for key, want in layout.items():
            got = getattr(model_config, key, None)
            if isinstance(got, tuple):
                got = list(got)
            if got != want:
                mine = self.vocab_sizes()
                try:
                    theirs = _sizes_from_ranges(model_config.vocab_size, list(model_config.text_range),
                                                list(model_config.action_range), list(model_config.video_range))
                except (AttributeError, TypeError, ValueError):
                    theirs = {}
                differ = [k for k in mine if k in theirs and theirs[k] != mine[k]]
                fmt = lambda d: ", ".join(f"{k} {v}" for k, v in d.items())  # noqa: E731
                sizes = (f"model vocab: {fmt(theirs) or 'unknown'}; processor vocab: {fmt(mine)}; "
                         f"sizes that differ: {', '.join(differ) if differ else 'none (the layout differs)'}")
                raise ValueError(
                    f"model and processor disagree on '{key}': model has {got}, processor has {want} "
                    f"({sizes}); they were not trained together"
                )

    # ------------------------------------------------------------------ text
    def encode_text(self, text: str) -> list[int]:
        return [self.text_offset + i for i in self.sp.encode(text)]

    def decode_text(self, ids) -> str:
        pieces = [int(i) - self.text_offset for i in ids if self.text_offset <= int(i) < self.action_offset]
        return self.sp.decode(pieces)

    # ------------------------------------------------------------------ actions
    def encode_actions(self, actions: str | list[str]) -> list[int]:
        names = parse_actions(actions, self.action_names)
        return [self.action_offset + self._action_index[a] for a in names]

    def decode_actions(self, ids) -> list[str]:
        """Action names of the named-action ids in ``ids`` (other ids, continuous bins included, are skipped)."""
        return [self.action_names[int(i) - self.action_offset] for i in ids if self.action_offset <= int(i) < self.continuous_offset]

    def _need_continuous(self):
        if self.continuous is None:
            raise ValueError("this processor declares no continuous action space (continuous_actions in its config)")
        return self.continuous

    def encode_continuous_actions(self, x, clip: bool = False) -> np.ndarray:
        """float [..., dims] -> stream ids [..., dims] (one bin token per dimension).

        A value outside its declared range is a ValueError naming the dimension, value and
        range, unless ``clip=True``.
        """
        b = self._need_continuous()
        bins = b.encode(x, clip=clip)
        return self.continuous_offset + np.arange(b.dims) * b.bins + bins

    def decode_continuous_actions(self, ids) -> np.ndarray:
        """stream ids [..., dims] (or flat, a multiple of dims) -> float [..., dims] (bin centres)."""
        b = self._need_continuous()
        arr = np.asarray(ids, dtype=np.int64)
        if arr.ndim == 1:
            if arr.size % b.dims:
                raise ValueError(f"got {arr.size} continuous action ids, not a multiple of the {b.dims} dimension(s)")
            arr = arr.reshape(-1, b.dims)
        rel = arr - self.continuous_offset
        dim = np.arange(b.dims) * b.bins
        if arr.size and (np.any(rel < dim) or np.any(rel >= dim + b.bins)):
            raise ValueError(
                f"continuous action ids must hold dimension d's bin in [{self.continuous_offset} + d*{b.bins}, "
                f"{self.continuous_offset} + (d+1)*{b.bins}); got {arr.min()}..{arr.max()}"
            )
        return b.decode(rel - dim)

    # ------------------------------------------------------------------ video
    def encode_frames(self, frames: np.ndarray) -> np.ndarray:
        """uint8 [T,H,W,3] -> stream ids [T, h*w]."""
        size = self.video.image_size
        if not isinstance(frames, np.ndarray) and hasattr(frames, "numpy"):  # a torch tensor
            frames = frames.detach().cpu().numpy()
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[1:] != (size, size, 3):
            raise ValueError(
                f"frames must be uint8 [T,{size},{size},3] for this video tokenizer, got shape {frames.shape} "
                f"(dtype {frames.dtype}); resize with unified_wm.tokenization.video_train.resize_frames"
            )
        if frames.dtype != np.uint8:
            raise ValueError(
                f"frames must be uint8 [T,{size},{size},3] (0..255 RGB), got dtype {frames.dtype}; "
                f"convert with np.clip(x, 0, 255).astype(np.uint8) if they are 0..255 values"
            )
        codes = self.video.encode(frames)
        return codes.reshape(codes.shape[0], -1).cpu().numpy().astype(np.int64) + self.video_offset

    def decode_frames(self, ids) -> np.ndarray:
        """stream ids [T, h*w] (or flat) -> uint8 [T,H,W,3]."""
        import torch

        arr = np.asarray(ids, dtype=np.int64).reshape(-1, self.tokens_per_frame) - self.video_offset
        if arr.min() < 0 or arr.max() >= self.video.codebook_size:
            raise ValueError(f"video ids must lie in [{self.video_offset}, {self.vocab_size}), "
                             f"got {arr.min() + self.video_offset}..{arr.max() + self.video_offset}")
        return self.video.decode(torch.from_numpy(arr).view(-1, *self.grid))

    # ------------------------------------------------------------------ streams
    def decode_stream(self, ids) -> dict:
        """Split a stream into its segments: {"texts": [...], "actions": [...], "frames": uint8 [T,H,W,3]}.

        With a continuous action space, ``"continuous_actions"`` holds the decoded vectors
        (float [N, dims]) of the ``<act>`` segments made of bin tokens.
        """
        ids = [int(i) for i in ids]
        texts, actions, frame_ids, continuous = [], [], [], []
        i = 0
        while i < len(ids):
            t = ids[i]
            if t == TEXT_OPEN:
                j = i + 1
                while j < len(ids) and ids[j] != TEXT_CLOSE:
                    j += 1
                texts.append(self.decode_text(ids[i + 1:j]))
                i = j + 1
            elif t == ACT_OPEN:
                seg = ids[i + 1:i + 1 + self.tokens_per_action]
                if self.continuous is not None and len(seg) == self.tokens_per_action and all(
                        self.continuous_offset <= x < self.video_offset for x in seg):
                    try:
                        continuous.append(self.decode_continuous_actions(seg)[0])
                    except ValueError:  # bins in the wrong dimension's slot: not a valid vector
                        pass
                else:
                    actions += self.decode_actions(seg)
                i += 2 + self.tokens_per_action
            elif t == FRAME:
                codes = ids[i + 1:i + 1 + self.tokens_per_frame]
                if len(codes) == self.tokens_per_frame:
                    frame_ids.append(codes)
                i += 1 + self.tokens_per_frame
            else:
                i += 1
        size = self.video.image_size
        frames = self.decode_frames(np.array(frame_ids)) if frame_ids else np.zeros((0, size, size, 3), np.uint8)
        out = {"texts": texts, "actions": actions, "frames": frames}
        if self.continuous is not None:
            out["continuous_actions"] = np.array(continuous, dtype=np.float64).reshape(-1, self.continuous.dims)
        return out

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, out_dir: str | os.PathLike) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with atomic_dir(out / "video_tokenizer") as tmp:
            for f in self.video_tokenizer_dir.iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
        if self.text_model_path.resolve() != (out / "text.model").resolve():
            shutil.copy2(self.text_model_path, out / "text.model")
        cfg = {
            "processor_class": "UnifiedProcessor", "special_tokens": SPECIAL_TOKENS, "action_names": self.action_names,
            "max_chunk_len": self.max_chunk_len, "tokens_per_action": self.tokens_per_action,
            "text_model": "text.model", "video_tokenizer": "video_tokenizer",
            "continuous_actions": self.continuous.to_dict() if self.continuous is not None else None,
            **self.model_layout(),
        }
        from unified_wm.fingerprint import KEY, token_space

        cfg[KEY] = token_space(self)  # what artifacts made with this processor record (unified_wm.fingerprint)
        from unified_wm.utils import write_json

        write_json(out / CONFIG_NAME, cfg)
        return out

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "UnifiedProcessor":
        p = Path(path)
        if not (p / CONFIG_NAME).is_file():
            raise FileNotFoundError(
                f"'{p}' holds no processor ({CONFIG_NAME} is missing); expected a folder written by "
                "UnifiedProcessor.save_pretrained or `uwm export`"
            )
        cfg = json.loads((p / CONFIG_NAME).read_text())
        proc = cls(p / cfg["text_model"], cfg["action_names"], p / cfg["video_tokenizer"],
                   max_chunk_len=cfg["max_chunk_len"], tokens_per_action=cfg["tokens_per_action"],
                   continuous_actions=cfg.get("continuous_actions"))
        if "vocab_size" in cfg and cfg["vocab_size"] != proc.vocab_size:
            raise ValueError(
                f"'{p / CONFIG_NAME}' records vocab_size {cfg['vocab_size']} but its files give {proc.vocab_size} "
                f"({proc.vocab_sizes()}); the text model or video tokenizer in '{p}' was replaced"
            )
        from unified_wm.fingerprint import KEY, differences, token_space

        recorded = cfg.get(KEY)
        if isinstance(recorded, dict) and recorded.get("fingerprint") != token_space(proc)["fingerprint"]:
            raise ValueError(
                f"'{p / CONFIG_NAME}' records token-space fingerprint {recorded.get('fingerprint')} but its files give "
                f"{token_space(proc)['fingerprint']} ({'; '.join(differences(recorded, token_space(proc)))}); "
                f"the text model or video tokenizer in '{p}' was replaced"
            )
        return proc


def _sizes_from_ranges(vocab_size, text_range, action_range, video_range) -> dict:
    return {
        "total": int(vocab_size), "special": int(text_range[0]), "text": int(text_range[1] - text_range[0]),
        "action": int(action_range[1] - action_range[0]), "video": int(video_range[1] - video_range[0]),
    }



@dataclass
class ContinuousActionsConfig:
    """A continuous action space: ``len(low)`` dimensions, each quantised into ``bins`` bins."""

    low: list[float] = field(default_factory=list)
    high: list[float] = field(default_factory=list)
    bins: int = 256
    mode: Literal["uniform", "mu_law"] = "uniform"
    mu: float = 255.0

    def validate(self) -> None:
        ContinuousActionBinner(self.low, self.high, self.bins, self.mode, self.mu)  # raises naming the problem

    def to_dict(self) -> dict:
        return {"low": list(self.low), "high": list(self.high), "bins": self.bins, "mode": self.mode, "mu": self.mu}


@dataclass
class ProcessorConfig:
    action_sets: list[str] = field(default_factory=lambda: ["pan5", "atari18"])
    max_chunk_len: int = 64
    tokens_per_action: int = 1
    continuous_actions: Optional[ContinuousActionsConfig] = None

    def validate(self) -> None:
        if self.max_chunk_len <= 0:
            raise ValueError(f"max_chunk_len must be positive, got {self.max_chunk_len}")
        if self.continuous_actions is None:
            if self.tokens_per_action != 1:
                raise ValueError(f"tokens_per_action must be 1 for discrete action sets, got {self.tokens_per_action}")
        else:
            dims = len(self.continuous_actions.low)
            if self.tokens_per_action != dims:
                raise ValueError(
                    f"tokens_per_action = {self.tokens_per_action}, but the continuous action space has {dims} "
                    f"dimension(s): every <act> segment holds one bin token per dimension, so set tokens_per_action: {dims}"
                )


def main_build(argv: list[str] | None = None) -> int:
    """``uwm tokenizer build-processor``: join text, action and video tokenizers into one id space."""
    import argparse

    from unified_wm.tokenization.actions import action_vocabulary
    from unified_wm.utils import load_config

    ap = argparse.ArgumentParser(prog="uwm tokenizer build-processor", description="Build the unified processor.")
    ap.add_argument("--config", required=True, help="tokenizers/processor.yaml")
    ap.add_argument("--text", required=True, help="SentencePiece .model")
    ap.add_argument("--video", required=True, help="video tokenizer folder")
    ap.add_argument("--out", required=True)
    ap.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    a = ap.parse_args(argv)
    from unified_wm.utils import check_out, guarded_out

    check_out(a.out, "tokenizer build-processor", a.overwrite)
    cfg = load_config(ProcessorConfig, a.config)
    cont = cfg.continuous_actions.to_dict() if cfg.continuous_actions is not None else None
    proc = UnifiedProcessor(a.text, action_vocabulary(cfg.action_sets), a.video, cfg.max_chunk_len, cfg.tokens_per_action,
                            continuous_actions=cont)
    with guarded_out(a.out, "tokenizer build-processor", a.overwrite), atomic_dir(a.out) as tmp:
        proc.save_pretrained(tmp)
    print(f"processor -> {a.out}: vocab {proc.vocab_size} (special {N_SPECIAL}, text {proc.action_offset - proc.text_offset}, "
          f"actions {proc.video_offset - proc.action_offset}, video {proc.video.codebook_size}), {proc.tokens_per_frame} tokens per frame")
    return 0
