"""SentencePiece text tokenizer trained here on the caption corpus (no hub downloads)."""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from unified_wm.utils import atomic_file


def train_text_tokenizer(
    texts: Iterable[str], out_file: str | os.PathLike, vocab_size: int = 256, model_type: str = "bpe",
    extra_files: list[str] | None = None,
) -> Path:
    """Train SentencePiece on ``texts`` (+ text files) and write ``out_file`` (spm .model).

    The stream's special tokens live in the unified id space, not in SentencePiece; its own
    specials are reduced to <unk> so that every piece id is an ordinary text piece.
    If the corpus is too small for ``vocab_size`` the largest size it supports is used.
    """
    import sentencepiece as spm

    corpus = [t.strip() for t in texts if t and t.strip()]
    for f in extra_files or []:
        p = Path(f)
        if not p.is_file():
            raise FileNotFoundError(f"text file '{p}' does not exist")
        corpus += [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
    if not corpus:
        raise ValueError("no text to train the SentencePiece model on (the caption corpus is empty)")
    size = vocab_size
    while True:
        buf = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(corpus), model_writer=buf, vocab_size=size, model_type=model_type,
                character_coverage=1.0, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
                hard_vocab_limit=True, minloglevel=2, num_threads=2,
            )
            break
        except RuntimeError as e:
            msg = str(e)
            if "Vocabulary size" in msg and size > 32:
                # corpus supports fewer pieces; SentencePiece says how many in its message
                import re

                m = re.search(r"<= (\d+)", msg)
                size = int(m.group(1)) if m else size // 2
                continue
            raise
    with atomic_file(out_file, "wb") as f:
        f.write(buf.getvalue())
    return Path(out_file)



@dataclass
class TextTokenizerConfig:
    vocab_size: int = 256
    model_type: str = "bpe"

    def validate(self) -> None:
        if self.model_type not in ("bpe", "unigram", "char", "word"):
            raise ValueError(f"model_type '{self.model_type}' is unknown; expected bpe, unigram, char or word")
        if self.vocab_size < 8:
            raise ValueError(f"vocab_size must be >= 8, got {self.vocab_size}")


def main_train(argv: list[str] | None = None) -> int:
    """``uwm tokenizer train-text``: SentencePiece on the captions of an episode dataset (+ text files)."""
    import argparse

    from unified_wm.data.episodes import load_episodes
    from unified_wm.utils import load_config

    ap = argparse.ArgumentParser(prog="uwm tokenizer train-text", description="Train the SentencePiece text tokenizer.")
    ap.add_argument("--config", required=True, help="tokenizers/*.yaml")
    ap.add_argument("--data", required=True, help="episode dataset whose captions form the corpus")
    ap.add_argument("--out", required=True, help="output SentencePiece .model file")
    ap.add_argument("--extra-text", nargs="*", default=[], help="more text files, one sentence per line")
    a = ap.parse_args(argv)
    cfg = load_config(TextTokenizerConfig, a.config)
    ds = load_episodes(a.data)
    caps = ds["captions"]
    texts = [t for c in caps for t in (c["text"] if isinstance(c, dict) else [x["text"] for x in c])]
    out = train_text_tokenizer(texts, a.out, cfg.vocab_size, cfg.model_type, a.extra_text)
    import sentencepiece as spm

    n = spm.SentencePieceProcessor(model_file=str(out)).get_piece_size()
    print(f"trained SentencePiece ({n} pieces) on {len(texts)} captions -> {out}")
    return 0
