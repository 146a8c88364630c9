"""Tokenizers that hold up: parallel/resumable `uwm data tokenize`, bad input, continuous actions,
and property tests (ids inside their ranges, binner error bounds and monotonicity)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unified_wm.tokenization.actions import ContinuousActionBinner
from unified_wm.tokenization.processor import ACT_CLOSE, ACT_OPEN, UnifiedProcessor


def _rows(ds):
    return [dict(r) for r in ds]


def _tiny_episodes(n, size, split="train", T=6):
    rng = np.random.default_rng(0)
    return [{"episode_id": f"{split}-{i}", "source": "synthetic", "seed": i, "split": split, "action_space": "pan5",
             "frames": rng.integers(0, 256, (T, size, size, 3), dtype=np.uint8), "actions": ["left"] * (T - 1),
             "rewards": [0.0] * (T - 1), "captions": [{"t": 0, "text": "a red car"}], "state": "{}"} for i in range(n)]


# ----------------------------------------------------------------------------- uwm data tokenize


def test_tokenize_with_workers_equals_single_pass(world_data, processor_dir, tokens_dir, tmp_path):
    from unified_wm.data.tokenize import load_token_documents, tokenize_dataset, work_dir_for

    out = tokenize_dataset(world_data, processor_dir, tmp_path / "par", clip_frames=8, progress=False,
                           workers=2, shard_episodes=3)
    assert _rows(load_token_documents(out)) == _rows(load_token_documents(tokens_dir))
    info = json.loads((out / "tokenize_info.json").read_text())
    assert info["workers"] == 2 and info["shards"] == 4 and info["resumed_shards"] == 0
    assert not work_dir_for(out).exists()  # the work folder is removed once the dataset is in place


def test_interrupted_tokenize_resumes_and_equals_single_pass(world_data, processor_dir, tokens_dir, tmp_path, monkeypatch):
    import unified_wm.data.tokenize as tk

    real = tk.episode_documents
    seen = []

    def flaky(processor, ep, *a, **kw):
        seen.append(ep["episode_id"])
        if len(seen) == 8:  # the 8th episode: shards 0 and 1 (episodes 0-5) are finished by now
            raise KeyboardInterrupt
        return real(processor, ep, *a, **kw)

    out = tmp_path / "tok"
    monkeypatch.setattr(tk, "episode_documents", flaky)
    with pytest.raises(KeyboardInterrupt):
        tk.tokenize_dataset(world_data, processor_dir, out, clip_frames=8, progress=False, shard_episodes=3)
    work = tk.work_dir_for(out)
    assert not out.exists()  # nothing half-written at the output
    assert sorted(p.name for p in work.iterdir()) == ["manifest.json", "shard-00000.arrow", "shard-00001.arrow"]
    kept = {p.name: p.stat().st_mtime_ns for p in work.glob("shard-*.arrow")}

    # a resume with other inputs is refused, naming what changed
    monkeypatch.setattr(tk, "episode_documents", real)
    with pytest.raises(ValueError, match="clip_frames"):
        tk.tokenize_dataset(world_data, processor_dir, out, clip_frames=4, progress=False, shard_episodes=3, resume=True)
    assert {p.name: p.stat().st_mtime_ns for p in work.glob("shard-*.arrow")} == kept

    # the resume tokenizes only the missing shards (6 episodes of 12), with two workers
    seen.clear()
    monkeypatch.setattr(tk, "episode_documents", flaky)  # counts in-process calls; workers are separate processes
    tk.tokenize_dataset(world_data, processor_dir, out, clip_frames=8, progress=False, shard_episodes=3,
                        resume=True, workers=2)
    assert seen == []
    info = json.loads((out / "tokenize_info.json").read_text())
    assert info["resumed_shards"] == 2
    assert _rows(tk.load_token_documents(out)) == _rows(tk.load_token_documents(tokens_dir))
    assert not work.exists()


def test_tokenize_without_resume_starts_over(world_data, processor_dir, tokens_dir, tmp_path):
    from unified_wm.data.tokenize import load_token_documents, tokenize_dataset, work_dir_for

    out = tmp_path / "tok"
    work = work_dir_for(out)
    work.mkdir()
    (work / "shard-00000.arrow").write_bytes(b"junk from an older run")
    tokenize_dataset(world_data, processor_dir, out, clip_frames=8, progress=False, shard_episodes=5)
    assert _rows(load_token_documents(out)) == _rows(load_token_documents(tokens_dir))


def test_tokenize_bad_episode_is_named_and_nothing_is_written(processor_dir, tmp_path):
    from unified_wm.data.episodes import save_episodes
    from unified_wm.data.tokenize import tokenize_dataset, work_dir_for

    data = save_episodes(_tiny_episodes(3, 32), tmp_path / "small", 32, 32)
    out = tmp_path / "tok"
    with pytest.raises(RuntimeError, match=r"episode 'train-([02])' \(row \1 of .*small'\).*\[T,64,64,3\].*\(6, 32, 32, 3\)"):
        tokenize_dataset(data, processor_dir, out, progress=False, workers=2, shard_episodes=2)
    assert not out.exists()
    assert not list(work_dir_for(out).glob("*.tmp-*"))
    with pytest.raises(ValueError, match="unknown task template 'dreams'"):
        tokenize_dataset(data, processor_dir, out, progress=False, templates=["dreams"])


def test_tokenize_cli(world_data, processor_dir, tmp_path, capsys):
    from unified_wm.data.tokenize import load_token_documents, main

    assert main(["--data", str(world_data), "--processor", str(processor_dir), "--out", str(tmp_path / "t"),
                 "--clip-frames", "8", "--templates", "inverse", "--shard-episodes", "4", "--no-progress"]) == 0
    ds = load_token_documents(tmp_path / "t")
    assert set(ds["template"]) == {"inverse"}
    assert f"wrote {len(ds)} documents" in capsys.readouterr().out


# ----------------------------------------------------------------------------- bad input


def test_frames_of_wrong_size_or_dtype_are_refused(processor):
    with pytest.raises(ValueError, match=r"uint8 \[T,64,64,3\].*shape \(2, 32, 32, 3\)"):
        processor.encode_frames(np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="got dtype float32"):
        processor.encode_frames(np.zeros((2, 64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="got dtype int64"):
        processor.encode_frames(torch.zeros((2, 64, 64, 3), dtype=torch.int64))
    tok = processor.video
    with pytest.raises(ValueError, match=r"must lie in \[-1, 1\].*\[0, 255\]"):
        tok.encode(torch.full((1, 3, 64, 64), 255.0).index_fill_(1, torch.tensor([0]), 0.0))
    with pytest.raises(ValueError, match="NaN"):
        tok.encode(torch.full((1, 3, 64, 64), float("nan")))
    with pytest.raises(ValueError, match="got dtype torch.int32"):
        tok.encode(torch.zeros((1, 64, 64, 3), dtype=torch.int32))


def test_vocab_mismatch_message_names_the_sizes_that_differ(processor):
    from tests.conftest import tiny_model_config

    cfg = tiny_model_config(processor)
    a0, a1 = cfg.action_range
    cfg.action_range = [a0, a1 + 4]
    cfg.video_range = [cfg.video_range[0] + 4, cfg.video_range[1] + 4]
    cfg.vocab_size += 4
    with pytest.raises(ValueError) as e:
        processor.check_model(cfg)
    msg = str(e.value)
    assert f"disagree on 'vocab_size': model has {processor.vocab_size + 4}" in msg
    assert f"action {a1 - a0 + 4}" in msg and f"action {a1 - a0}" in msg
    assert "sizes that differ: total, action" in msg
    processor.check_model(tiny_model_config(processor))  # the matching pair is accepted


# ----------------------------------------------------------------------------- continuous actions


@pytest.fixture(scope="module")
def cont_processor(processor_dir):
    return UnifiedProcessor(processor_dir / "text.model", ["stay", "left"], processor_dir / "video_tokenizer",
                            tokens_per_action=2, continuous_actions={"low": [-1.0, 0.0], "high": [1.0, 10.0], "bins": 16})


def test_continuous_actions_in_the_processor(cont_processor, tmp_path):
    p = cont_processor
    assert p.video_offset - p.action_offset == 2 + 2 * 16
    lay = p.model_layout()
    assert lay["action_range"] == [p.action_offset, p.video_offset] and lay["tokens_per_action"] == 2
    x = np.array([[-1.0, 0.0], [0.2, 7.5], [1.0, 10.0]])
    ids = p.encode_continuous_actions(x)
    assert ids.shape == (3, 2) and ((ids >= p.continuous_offset) & (ids < p.video_offset)).all()
    assert (ids[:, 1] >= p.continuous_offset + 16).all()  # dimension 1 has its own bins
    back = p.decode_continuous_actions(ids)
    assert np.all(np.abs(back - x) <= (np.array([2.0, 10.0]) / 15) / 2 + 1e-9)
    assert p.decode_actions(ids.ravel()) == []  # bins are not action names
    assert p.decode_actions(p.encode_actions("left,stay")) == ["left", "stay"]
    with pytest.raises(ValueError, match=r"dimension 1 at index \(0,\) = 12\.0 is outside its declared range \[0\.0, 10\.0\]"):
        p.encode_continuous_actions([[0.0, 12.0]])
    assert np.array_equal(p.encode_continuous_actions([[0.0, 12.0]], clip=True), p.encode_continuous_actions([[0.0, 10.0]]))
    with pytest.raises(ValueError, match="dimension d's bin"):
        p.decode_continuous_actions([[p.continuous_offset + 16, p.continuous_offset]])  # swapped dimensions
    # the stream: <act> c0 c1 </act> decodes back to the vector
    stream = [ACT_OPEN, *ids[1], ACT_CLOSE, ACT_OPEN, *p.encode_actions(["left"]) * 2, ACT_CLOSE]
    dec = p.decode_stream(stream)
    assert np.allclose(dec["continuous_actions"], back[1:2]) and dec["actions"] == ["left", "left"]
    # episode datasets hold named actions: a 2-token action segment cannot be filled from them
    from unified_wm.data.tokenize import episode_documents

    with pytest.raises(ValueError, match="hold 2 tokens"):
        next(episode_documents(p, _tiny_episodes(1, 64)[0]))
    # save / load keeps the space
    p.save_pretrained(tmp_path / "p")
    q = UnifiedProcessor.from_pretrained(tmp_path / "p")
    assert q.model_layout() == p.model_layout()
    assert np.array_equal(q.encode_continuous_actions(x), ids)


def test_continuous_actions_config_is_checked(tmp_path, processor_dir):
    from unified_wm.tokenization.processor import ProcessorConfig
    from unified_wm.utils import ConfigError, load_config

    f = tmp_path / "proc.yaml"
    f.write_text("action_sets: [pan5]\ncontinuous_actions:\n  low: [-1, -1]\n  high: [1, 1]\n  bins: 32\n  mode: mu_law\n")
    with pytest.raises(ConfigError, match="tokens_per_action: 2"):
        load_config(ProcessorConfig, f)
    f.write_text(f.read_text() + "tokens_per_action: 2\n")
    cfg = load_config(ProcessorConfig, f)
    assert cfg.continuous_actions.bins == 32 and cfg.continuous_actions.mode == "mu_law"
    f.write_text("continuous_actions:\n  low: [1]\n  high: [0]\n")
    with pytest.raises(ConfigError, match="low < high"):
        load_config(ProcessorConfig, f)
    with pytest.raises(ValueError, match="declares no continuous action space"):
        UnifiedProcessor(processor_dir / "text.model", ["stay"], processor_dir / "video_tokenizer").encode_continuous_actions([0.0])


# ----------------------------------------------------------------------------- property tests


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), t=st.integers(1, 3), kind=st.sampled_from(["noise", "flat", "extremes", "stripes"]))
def test_video_ids_stay_in_the_video_range(processor, seed, t, kind):
    rng = np.random.default_rng(seed)
    if kind == "noise":
        frames = rng.integers(0, 256, (t, 64, 64, 3), dtype=np.uint8)
    elif kind == "flat":
        frames = np.broadcast_to(rng.integers(0, 256, (t, 1, 1, 3), dtype=np.uint8), (t, 64, 64, 3)).copy()
    elif kind == "extremes":
        frames = (rng.integers(0, 2, (t, 64, 64, 3)) * 255).astype(np.uint8)
    else:
        frames = np.zeros((t, 64, 64, 3), np.uint8)
        frames[:, :, :: 1 + seed % 7] = 255
    ids = processor.encode_frames(frames)
    assert ids.shape == (t, processor.tokens_per_frame)
    assert ids.min() >= processor.video_offset and ids.max() < processor.vocab_size
    out = processor.decode_frames(ids)
    assert out.shape == frames.shape and out.dtype == np.uint8


@pytest.fixture(scope="module")
def vq_tokenizer():
    from unified_wm.tokenization.video import VideoTokenizer, VideoTokenizerConfig
    from unified_wm.utils import from_dict

    torch.manual_seed(0)
    return VideoTokenizer(from_dict(VideoTokenizerConfig, {
        "image_size": 32, "downsample": 4, "channels": [8, 16, 16],
        "quantizer": {"kind": "vq", "vq": {"codebook_size": 48, "dim": 4}}})).eval()


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), flat=st.booleans())
def test_vq_codes_stay_in_the_codebook(vq_tokenizer, seed, flat):
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (2, 1 if flat else 32, 1 if flat else 32, 3), dtype=np.uint8)
    frames = np.ascontiguousarray(np.broadcast_to(frames, (2, 32, 32, 3)))
    codes = vq_tokenizer.encode(frames)
    assert codes.shape == (2, 8, 8) and int(codes.min()) >= 0 and int(codes.max()) < 48


_bounds = st.tuples(st.floats(-1e3, 1e3, allow_nan=False), st.floats(1e-2, 1e3, allow_nan=False))


@settings(max_examples=60, deadline=None)
@given(bounds=st.lists(_bounds, min_size=1, max_size=4), bins=st.integers(2, 512), data=st.data())
def test_uniform_binner_error_is_at_most_half_a_bin(bounds, bins, data):
    low = [lo for lo, _ in bounds]
    high = [lo + w for lo, w in bounds]
    b = ContinuousActionBinner(low, high, bins=bins)
    fr = data.draw(st.lists(st.lists(st.floats(0, 1), min_size=len(low), max_size=len(low)), min_size=1, max_size=8))
    x = np.asarray(low) + np.asarray(fr) * (np.asarray(high) - np.asarray(low))
    x = np.clip(x, low, high)
    idx = b.encode(x)
    assert idx.dtype == np.int64 and idx.min() >= 0 and idx.max() < bins
    err = np.abs(b.decode(idx) - x)
    assert np.all(err <= b.bin_width / 2 * (1 + 1e-9) + 1e-9)
    # the bin centres are fixed points
    centres = b.decode(idx)
    assert np.array_equal(b.encode(np.clip(centres, low, high)), idx)


@settings(max_examples=60, deadline=None)
@given(lo=st.floats(-100, 100), width=st.floats(0.1, 200), bins=st.integers(2, 1024), mu=st.sampled_from([1.0, 15.0, 255.0]),
       fr=st.lists(st.floats(0, 1), min_size=2, max_size=40))
def test_mu_law_binner_is_monotone(lo, width, bins, mu, fr):
    b = ContinuousActionBinner([lo], [lo + width], bins=bins, mode="mu_law", mu=mu)
    x = np.clip(lo + np.sort(np.asarray(fr)) * width, lo, lo + width)[:, None]
    idx = b.encode(x)[:, 0]
    assert np.all(np.diff(idx) >= 0) and idx.min() >= 0 and idx.max() < bins
    dec = b.decode(idx[:, None])[:, 0]
    assert np.all(np.diff(dec) >= 0)
    centres = b.decode(np.arange(bins)[:, None])[:, 0]
    assert np.all(np.diff(centres) > 0)  # strictly increasing bin centres
    assert abs(centres[0] - lo) < 1e-6 * max(1, abs(lo)) + 1e-9 and abs(centres[-1] - (lo + width)) < 1e-6 * max(1, abs(lo + width)) + 1e-9
    # the bin a value lands in is the nearest centre in the companded domain, so it lies between its neighbours
    assert np.all(np.abs(dec - x[:, 0]) <= np.max(np.diff(centres)) + 1e-9)


@settings(max_examples=40, deadline=None)
@given(dim=st.integers(0, 2), over=st.floats(1e-6, 1e6), below=st.booleans())
def test_binner_out_of_range_names_dimension_value_and_range(dim, over, below):
    b = ContinuousActionBinner([-1.0, 0.0, 5.0], [1.0, 1.0, 6.0], bins=8)
    x = np.array([0.0, 0.5, 5.5])
    x[dim] = (b.low[dim] - over) if below else (b.high[dim] + over)
    with pytest.raises(ValueError) as e:
        b.encode(x)
    msg = str(e.value)
    assert f"dimension {dim} = {float(x[dim])!r}" in msg and f"[{float(b.low[dim])!r}, {float(b.high[dim])!r}]" in msg
    assert "clip=True" in msg
    clipped = b.encode(x, clip=True)
    assert clipped[dim] == (0 if below else 7)
    with pytest.raises(ValueError, match="not a finite number"):
        b.encode(np.where(np.arange(3) == dim, np.nan, x))
