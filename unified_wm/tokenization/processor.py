"""One id space for text, actions and video, and the processor that owns it.

Ids, in order: 16 special tokens, then SentencePiece text pieces, then action names, then
video codes. The processor turns an episode into the interleaved stream (via the task
templates in :mod:`unified_wm.sequence`) and turns generated ids back into text, actions
and frames. It saves and loads with ``save_pretrained`` / ``from_pretrained`` next to the
model (``processor_config.json``, ``text.model``, ``video_tokenizer/``).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from unified_wm.tokenization.actions import parse_actions
from unified_wm.utils import atomic_dir

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<text>", "</text>", "<act>", "</act>", "<frame>"] + [
    f"<reserved_{i}>" for i in range(8, 16)
]
PAD, BOS, EOS, TEXT_OPEN, TEXT_CLOSE, ACT_OPEN, ACT_CLOSE, FRAME = range(8)
N_SPECIAL = len(SPECIAL_TOKENS)
CONFIG_NAME = "processor_config.json"


class UnifiedProcessor:
    def __init__(self, text_model: str | os.PathLike, action_names: list[str], video_tokenizer_dir: str | os.PathLike,
                 max_chunk_len: int = 64, tokens_per_action: int = 1):
        import sentencepiece as spm

        from unified_wm.tokenization.video import VideoTokenizer

        self.text_model_path = Path(text_model)
        self.sp = spm.SentencePieceProcessor(model_file=str(self.text_model_path))
        self.action_names = list(action_names)
        self.video_tokenizer_dir = Path(video_tokenizer_dir)
        self.video = VideoTokenizer.from_pretrained(self.video_tokenizer_dir)
        self.max_chunk_len = max_chunk_len
        self.tokens_per_action = tokens_per_action
        self.text_offset = N_SPECIAL
        self.action_offset = self.text_offset + self.sp.get_piece_size()
        self.video_offset = self.action_offset + len(self.action_names)
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

    def check_model(self, model_config) -> None:
        """Refuse a model whose vocabulary or layout disagrees with this processor."""
        layout = self.model_layout()
        for key, want in layout.items():
            got = getattr(model_config, key, None)
            if isinstance(got, tuple):
                got = list(got)
            if got != want:
                raise ValueError(
                    f"model and processor disagree on '{key}': model has {got}, processor has {want} "
                    f"(vocab: text {self.action_offset - self.text_offset}, actions {len(self.action_names)}, "
                    f"video {self.video.codebook_size}); they were not trained together"
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
        return [self.action_names[int(i) - self.action_offset] for i in ids if self.action_offset <= int(i) < self.video_offset]

    # ------------------------------------------------------------------ video
    def encode_frames(self, frames: np.ndarray) -> np.ndarray:
        """uint8 [T,H,W,3] -> stream ids [T, h*w]."""
        frames = np.asarray(frames)
        size = self.video.image_size
        if frames.ndim != 4 or frames.shape[1:] != (size, size, 3):
            raise ValueError(f"frames must be uint8 [T,{size},{size},3] for this video tokenizer, got shape {frames.shape}")
        codes = self.video.encode(frames)
        return codes.reshape(codes.shape[0], -1).cpu().numpy().astype(np.int64) + self.video_offset

    def decode_frames(self, ids) -> np.ndarray:
        """stream ids [T, h*w] (or flat) -> uint8 [T,H,W,3]."""
        import torch

        arr = np.asarray(ids, dtype=np.int64).reshape(-1, self.tokens_per_frame) - self.video_offset
        if arr.min() < 0 or arr.max() >= self.video.codebook_size:
            raise ValueError(f"video ids must lie in [{self.video_offset}, {self.vocab_size}), got {arr.min() + self.video_offset}..{arr.max() + self.video_offset}")
        return self.video.decode(torch.from_numpy(arr).view(-1, *self.grid))

    # ------------------------------------------------------------------ streams
    def decode_stream(self, ids) -> dict:
        """Split a stream into its segments: {"texts": [...], "actions": [...], "frames": uint8 [T,H,W,3]}."""
        ids = [int(i) for i in ids]
        texts, actions, frame_ids = [], [], []
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
                actions += self.decode_actions(ids[i + 1:i + 1 + self.tokens_per_action])
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
        return {"texts": texts, "actions": actions, "frames": frames}

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
            "text_model": "text.model", "video_tokenizer": "video_tokenizer", **self.model_layout(),
        }
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
        return cls(p / cfg["text_model"], cfg["action_names"], p / cfg["video_tokenizer"],
                   max_chunk_len=cfg["max_chunk_len"], tokens_per_action=cfg["tokens_per_action"])


from dataclasses import dataclass, field


@dataclass
class ProcessorConfig:
    action_sets: list[str] = field(default_factory=lambda: ["pan5", "atari18"])
    max_chunk_len: int = 64
    tokens_per_action: int = 1

    def validate(self) -> None:
        if self.max_chunk_len <= 0:
            raise ValueError(f"max_chunk_len must be positive, got {self.max_chunk_len}")
        if self.tokens_per_action != 1:
            raise ValueError("tokens_per_action must be 1 for discrete action sets")


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
    a = ap.parse_args(argv)
    cfg = load_config(ProcessorConfig, a.config)
    proc = UnifiedProcessor(a.text, action_vocabulary(cfg.action_sets), a.video, cfg.max_chunk_len, cfg.tokens_per_action)
    with atomic_dir(a.out) as tmp:
        proc.save_pretrained(tmp)
    print(f"processor -> {a.out}: vocab {proc.vocab_size} (special {N_SPECIAL}, text {proc.action_offset - proc.text_offset}, "
          f"actions {len(proc.action_names)}, video {proc.video.codebook_size}), {proc.tokens_per_frame} tokens per frame")
    return 0
