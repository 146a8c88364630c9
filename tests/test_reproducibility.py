"""Two runs of the same stage, same inputs, same thread count: bitwise the same outputs (episode
data, SentencePiece model, video tokenizer weights and metrics, token documents)."""
from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _files(d: Path) -> dict[str, bytes]:
    return {str(f.relative_to(d)): f.read_bytes() for f in sorted(d.rglob("*.arrow"))}


def test_world_data_and_text_tokenizer_are_bitwise_reproducible(tmp_path):
    from unified_wm.data.episodes import iter_episodes, load_episodes
    from unified_wm.data.world import generate_world
    from unified_wm.tokenization.text import train_text_tokenizer

    for k in ("a", "b"):
        generate_world(ROOT / "recipes/data/world_tiny.yaml", tmp_path / k, n_episodes=3, seed=5, split="train", progress=False)
        texts = [c["text"] for ep in iter_episodes(load_episodes(tmp_path / k)) for c in ep["captions"]]
        train_text_tokenizer(texts, tmp_path / f"{k}.model", vocab_size=96)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a and a == b
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()


def test_video_tokenizer_training_and_tokenization_are_bitwise_reproducible(tmp_path, world_data, processor_dir):
    import torch

    from unified_wm.data.tokenize import tokenize_dataset
    from unified_wm.tokenization.video import FSQConfig, QuantizerConfig, TrainConfig, VideoTokenizer, VideoTokenizerConfig
    from unified_wm.tokenization.video_train import train_video_tokenizer

    threads = torch.get_num_threads()
    try:
        for k in ("a", "b"):
            cfg = VideoTokenizerConfig(image_size=64, downsample=8, patch_size=2, channels=[8, 16, 16],
                                       quantizer=QuantizerConfig(kind="fsq", fsq=FSQConfig(levels=[4, 4, 4])),
                                       train=TrainConfig(steps=6, batch_size=4, warmup_steps=1, log_every=3,
                                                         checkpoint_every=6, threads=1))
            train_video_tokenizer(None, world_data, tmp_path / k, config=cfg, progress=False)
    finally:
        torch.set_num_threads(threads)
    wa, wb = (VideoTokenizer.from_pretrained(tmp_path / k).state_dict() for k in ("a", "b"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[n], wb[n]) for n in wa)
    strip = lambda p: [{k: v for k, v in json.loads(x).items() if k not in ("seconds", "time", "out_dir")} for x in p.read_text().splitlines()]  # noqa: E731
    ma, mb = strip(tmp_path / "a" / "metrics.jsonl"), strip(tmp_path / "b" / "metrics.jsonl")
    assert ma == mb and ma[0]["torch_threads"] == 1 and any("loss" in r for r in ma)
    for k in ("a", "b"):
        tokenize_dataset(world_data, processor_dir, tmp_path / f"tok_{k}", clip_frames=8, progress=False)
    assert _files(tmp_path / "tok_a") == _files(tmp_path / "tok_b")
