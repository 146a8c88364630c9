"""Rollouts: cache rollback and eviction, parallel (diagonal) decoding, batches, classifier-free
guidance, unbounded streaming, the command line and its bad input, condition dropout in training.

Models here are tiny and randomly initialised (the mechanics do not need training); the
processor is the session's real one (SentencePiece + video tokenizer, 64 codes per frame).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import unified_wm  # noqa: F401
from tests.conftest import tiny_model_config
from unified_wm.model.cache import UWMCache
from unified_wm.model.modeling_uwm import UnifiedWMForCausalLM

ROOT = Path(__file__).resolve().parents[1]


def tiny_wm(processor, backend="moc", **kw):
    from unified_wm.rollout import WorldModel

    torch.manual_seed(0)
    cfg = tiny_model_config(processor, attention={"backend": backend, "top_k": 2}, **kw)
    return WorldModel(UnifiedWMForCausalLM(cfg).eval(), processor)


def stream(processor, n_frames: int, seed: int = 0) -> list[int]:
    from unified_wm.sequence import StreamBuilder

    rng = np.random.default_rng(seed)
    codes = rng.integers(processor.video_offset, processor.video_offset + processor.video.codebook_size,
                         (n_frames, processor.tokens_per_frame))
    acts = [processor.encode_actions([a]) for a in rng.choice(["left", "right", "stay"], n_frames)]
    return StreamBuilder(processor).prompt("a red car drives right", codes, acts)


@pytest.mark.parametrize("backend", ["moc", "dense"])
def test_cache_restore_forgets_what_came_after_the_snapshot(processor, backend):
    m = tiny_wm(processor, backend).model
    ids = torch.tensor([stream(processor, 3)])
    cache = UWMCache(m.config)
    m(ids[:, :80], cache=cache, use_cache=True)
    snap = cache.snapshot()
    a = m(ids[:, 80:150], cache=cache, use_cache=True).logits
    m(ids[:, 150:170], cache=cache, use_cache=True)
    cache.restore(snap)
    b = m(ids[:, 80:150], cache=cache, use_cache=True).logits
    assert cache.get_seq_length() == 150
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("backend,rope_mode", [("moc", "1d"), ("dense", "1d"), ("moc", "3d")])
def test_evicting_frames_equals_a_fresh_pass_over_the_kept_tokens(processor, backend, rope_mode):
    """Eviction re-rotates the kept keys to their new positions instead of recomputing them:
    with one layer (where a key depends only on its token and position; deeper keys also
    remember the evicted context, by design) the next logits must equal those of a model
    that only ever saw the kept tokens."""
    from unified_wm.tokenization.processor import FRAME

    m = tiny_wm(processor, backend, num_hidden_layers=1, rope_mode=rope_mode).model
    ids = stream(processor, 5)
    frames = [i for i, t in enumerate(ids) if t == FRAME]
    keep = list(range(frames[0])) + list(range(frames[3], len(ids)))  # drop frames 0..2 (+ their actions)
    cache = UWMCache(m.config)
    m(torch.tensor([ids]), cache=cache, use_cache=True)
    cache.keep_tokens(torch.tensor(keep), m.config)
    nxt = torch.tensor([[FRAME, processor.video_offset + 3]])
    got = m(nxt, cache=cache, use_cache=True).logits
    kept = [ids[i] for i in keep]
    want = m(torch.tensor([kept + nxt[0].tolist()])).logits[:, -2:]
    assert cache.get_seq_length() == len(kept) + 2
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def test_a_whole_frame_fed_at_once_through_the_sparse_decode_matches_the_full_pass(processor):
    """More than DECODE_MAX_QUERIES new tokens with a cache take the routed-mask decode path."""
    from unified_wm.model import attention

    m = tiny_wm(processor, "moc").model
    ids = torch.tensor([stream(processor, 4)])
    full = m(ids).logits
    cache = UWMCache(m.config)
    cut = ids.shape[1] - processor.tokens_per_frame - 1
    head = m(ids[:, :cut], cache=cache, use_cache=True).logits
    assert ids.shape[1] - cut > attention.DECODE_MAX_QUERIES
    tail = m(ids[:, cut:], cache=cache, use_cache=True).logits
    assert torch.allclose(torch.cat([head, tail], 1), full, atol=1e-4)


def test_batch_rows_equal_single_rollouts_with_their_seeds(processor):
    wm = tiny_wm(processor)
    batch = wm.rollout("a blue ball", ["left", "right"], 2, seed=4, batch=3, temperature=1.0)
    assert batch.shape == (3, 2, 64, 64, 3) and batch.dtype == np.uint8
    for i in range(3):
        one = wm.rollout("a blue ball", ["left", "right"], 2, seed=4 + i, temperature=1.0)
        # the same codes; the video decoder's batched convolutions may round a pixel differently
        assert np.abs(one.astype(int) - batch[i]).max() <= 1, i
    assert np.abs(batch[0].astype(int) - batch[1]).mean() > 5
    frames, ids = wm.rollout("a blue ball", ["left", "right"], 2, seed=4, batch=3, temperature=1.0, return_codes=True)
    assert ids.shape == (3, 2, processor.tokens_per_frame) and np.abs(frames.astype(int) - batch).max() <= 1
    assert np.abs(processor.decode_frames(ids[1]).astype(int) - batch[1]).max() <= 1
    single, batched = wm.session("a blue ball", seed=5), wm.session("a blue ball", seed=4, batch=3)
    for a in (None, "left", "right"):
        single.step(a), batched.step(a)
        assert torch.equal(single.prev_codes[0], batched.prev_codes[1])


@pytest.mark.parametrize("mode", ["token", "diagonal"])
def test_rows_of_different_prompts_equal_their_own_rollouts(processor, mode):
    """rollout_rows: prompts of different lengths (left-padded), contexts (of other lengths) and
    actions in one batch; each row is the rollout of its prompt alone (greedy and sampled), classifier-free
    guidance included."""
    wm = tiny_wm(processor)
    rng = np.random.default_rng(3)
    ctx = [rng.integers(0, 255, (2, 64, 64, 3), dtype=np.uint8) for _ in range(3)]
    rows = [{"text": "a red car", "actions": ["left", "right", "stay"], "context": ctx[0]},
            {"text": "a small blue ball drives to the right of the road", "actions": ["right"], "context": ctx[1]},
            {"text": "", "actions": ["up", "down"], "context": ctx[2][:1]}]  # fewer context frames
    for kw in (dict(temperature=0.0), dict(temperature=1.0, seed=7, cfg_action=2.0)):
        frames, codes = wm.rollout_rows(rows, 3, mode=mode, **kw)
        assert frames.shape == (3, 3, 64, 64, 3) and codes.shape == (3, 3, processor.tokens_per_frame)
        for i, r in enumerate(rows):
            one, one_codes = wm.rollout(r["text"], r["actions"], 3, context=r["context"], mode=mode, return_codes=True, **kw)
            assert np.array_equal(one_codes, codes[i]), (i, kw)
            assert np.abs(one.astype(int) - frames[i]).max() <= 1, (i, kw)  # the decoder's batched convolutions
    assert not np.array_equal(codes[0], codes[1])


def test_bad_rows_are_named(processor):
    wm = tiny_wm(processor)
    ctx = np.zeros((2, 64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match=r"every row needs context frames, or none does; got \[0, 2\]"):
        wm.rollout_rows([{"text": "a", "context": ctx}, {"text": "b"}], 2)
    with pytest.raises(ValueError, match="unknown key 'prompt'"):
        wm.rollout_rows([{"prompt": "a"}], 2)
    with pytest.raises(ValueError, match="at least one row"):
        wm.rollout_rows([], 2)
    with pytest.raises(ValueError, match="teleport"):
        wm.rollout_rows([{"actions": ["teleport"]}], 2)
    sess = wm.session(rows=[{"text": "a"}, {"text": "bb"}])
    with pytest.raises(ValueError, match=r"one action per row \(2\), got 1"):
        sess.step(row_actions=["left"])
    with pytest.raises(ValueError, match="streaming with a window"):
        wm.session(rows=[{"text": "a"}], window=4000)


def test_guidance_scale_zero_is_the_unconditional_stream(processor):
    """l = l_c + (s - 1)(l_c - l_u): at s = 0 only the unconditional stream is left."""
    wm = tiny_wm(processor)
    no_text = wm.rollout("", ["left"], 2, temperature=0)
    assert np.array_equal(wm.rollout("a red car", ["left"], 2, temperature=0, cfg_text=0.0), no_text)
    assert not np.array_equal(wm.rollout("a red car", ["left"], 2, temperature=0), no_text)
    # without actions (cfg_action = 0) the actions cannot change the video any more
    left = wm.rollout("a red car", ["left"] * 3, 3, temperature=0, cfg_action=0.0)
    right = wm.rollout("a red car", ["right"] * 3, 3, temperature=0, cfg_action=0.0)
    assert np.array_equal(left, right)
    assert not np.array_equal(wm.rollout("a red car", ["left"] * 3, 3, temperature=0),
                              wm.rollout("a red car", ["right"] * 3, 3, temperature=0))
    both = wm.rollout("a red car", ["right"] * 2, 2, temperature=1.0, cfg_text=2.0, cfg_action=3.0, seed=1)
    assert both.shape == (2, 64, 64, 3)


@pytest.mark.parametrize("per_pass", [1, 3])
def test_diagonal_mode_leaves_the_cache_as_if_the_frame_was_fed_token_by_token(processor, per_pass):
    wm = tiny_wm(processor)
    s = wm.session("a red car", mode="diagonal", diagonals_per_pass=per_pass, temperature=1.0, seed=0)
    for a in ("left", "right", "right"):
        f = s.step(a)
        assert f.shape == (1, 64, 64, 3)
    s.flush()
    cache = s.branches[0].cache
    ids = cache.uwm_state.ids
    v0 = processor.video_offset
    frames = (ids == 7).nonzero()[:, 1].tolist()
    assert len(frames) == 3
    for st in frames:  # every frame is a whole grid of video codes
        codes = ids[0, st + 1:st + 1 + processor.tokens_per_frame]
        assert bool(((codes >= v0) & (codes < v0 + processor.video.codebook_size)).all())
    nxt = torch.tensor([[5]])  # <act>
    got = wm.model(nxt, cache=cache, use_cache=True).logits[:, -1]
    want = wm.model(torch.cat([ids, nxt], 1)).logits[:, -1]
    assert torch.allclose(got, want, atol=1e-4)
    # the diagonal order differs from the raster order, so frames differ from token mode
    tok = wm.rollout("a red car", ["left", "right"], 2, mode="token", temperature=1.0, seed=0)
    diag = wm.rollout("a red car", ["left", "right"], 2, mode="diagonal", temperature=1.0, seed=0)
    assert tok.shape == diag.shape


@pytest.mark.parametrize("backend", ["moc", "dense"])
def test_streaming_outgrows_the_context_and_keeps_the_prompt(processor, backend):
    wm = tiny_wm(processor, backend, max_position_embeddings=600)
    prompt_len = len(wm.builder.prompt("a red car"))
    with pytest.raises(ValueError, match="context of 600 tokens"):
        wm.rollout("a red car", ["right"], 12, temperature=0)
    seen = []
    s = wm.session("a red car", window=600, recent=2, temperature=1.0, mode="token")
    first_prompt = s.branches[0].cache.uwm_state.ids[0, :prompt_len].tolist()
    for t in range(20):  # 20 x 68 tokens: more than twice the window
        s.step("right")
        seen.append(s.length)
    assert s.evictions >= 2
    assert max(seen) <= 600
    assert s.branches[0].cache.uwm_state.ids[0, :prompt_len].tolist() == first_prompt
    frames = wm.rollout("a red car", ["right"], 14, temperature=0, window=600)
    assert frames.shape == (14, 64, 64, 3)
    rows = wm.rollout("a red car", ["right"], 14, temperature=1.0, window=600, batch=2, mode="diagonal")
    assert rows.shape == (2, 14, 64, 64, 3)


def test_bad_rollout_input_names_it(processor):
    wm = tiny_wm(processor)
    with pytest.raises(ValueError, match="teleport"):
        wm.rollout("x", ["left", "teleport"], 2)
    with pytest.raises(ValueError, match=r"uint8 \[T,64,64,3\].*\(3, 32, 32, 3\)"):
        wm.rollout("x", ["left"], 2, context=np.zeros((3, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="window of 100 tokens is too small"):
        wm.rollout("x", ["left"], 2, window=100)
    with pytest.raises(ValueError, match="diagonals_per_pass"):
        wm.rollout("x", ["left"], 2, mode="diagonal", diagonals_per_pass=0)
    with pytest.raises(ValueError, match="mode must be"):
        wm.rollout("x", ["left"], 2, mode="jacobi")
    with pytest.raises(ValueError, match="cfg_text needs a text prompt"):
        wm.rollout("", ["left"], 2, cfg_text=2.0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, processor):
    d = tmp_path_factory.mktemp("wm") / "hf"
    wm = tiny_wm(processor)
    wm.model.save_pretrained(d)
    processor.save_pretrained(d)
    return d


def run_uwm(*args):
    return subprocess.run([sys.executable, "-m", "unified_wm.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_cli_streams_a_batch_from_an_episode(model_dir, val_data, tmp_path):
    r = run_uwm("rollout", "--model", model_dir, "--episode", f"{val_data}:1", "--context-frames", "2", "--frames", "3",
                "--batch", "2", "--mode", "diagonal", "--window", "1000", "--out", tmp_path / "r.mp4")
    assert r.returncode == 0, r.stderr[-2000:]
    from unified_wm.video_io import read_video

    for i in range(2):
        v = read_video(tmp_path / f"r-{i}.mp4")
        assert v.shape == (3, 64, 64, 3)
        assert (tmp_path / f"r-{i}.gif").stat().st_size > 100 and (tmp_path / f"r-{i}.png").stat().st_size > 100
    assert "wrote 6 frames" in r.stdout
    assert not list(tmp_path.glob(".*tmp*"))


def test_cli_bad_context_and_episode_are_named(model_dir, tmp_path):
    from tests.conftest import uwm_in_process

    from PIL import Image

    img = tmp_path / "big.png"
    Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(img)
    r = uwm_in_process("rollout", "--model", model_dir, "--context", img, "--out", tmp_path / "x.mp4")
    assert r.returncode == 2 and str(img) in r.stderr and "64x64" in r.stderr, r.stderr
    r = uwm_in_process("rollout", "--model", model_dir, "--episode", "nowhere", "--out", tmp_path / "x.mp4")
    assert r.returncode == 2 and "DATASET:INDEX" in r.stderr, r.stderr
    assert not list(tmp_path.glob("x*")) and not list(tmp_path.glob(".x*"))


def test_condition_dropout_removes_text_and_action_segments(tokens_dir, processor_dir, tmp_path):
    from tests.conftest import write_tiny_recipe
    from unified_wm.data.tokenize import load_token_documents
    from unified_wm.tokenization.processor import ACT_OPEN, TEXT_OPEN
    from unified_wm.data.packing import PackedBatches, drop_segments
    from unified_wm.recipe import load_recipe

    assert drop_segments([1, 3, 20, 4, 7, 50, 5, 41, 6, 2], list(range(10)), 5, 6) == \
        ([1, 3, 20, 4, 7, 50, 2], [0, 1, 2, 3, 4, 5, 9])
    docs = load_token_documents(tokens_dir)

    def counts(**drop):
        rp = write_tiny_recipe(tmp_path, tokens_dir, processor_dir, **drop)
        recipe = load_recipe(rp)
        rows = PackedBatches(docs, recipe, 0, 1).epoch_rows(0)
        ids = [t for r in rows for t in r[0]]
        return ids.count(TEXT_OPEN), ids.count(ACT_OPEN), len(rows)

    t0, a0, _ = counts()
    t1, a1, _ = counts(text_dropout=0.5, action_dropout=0.5)
    assert t1 < 0.9 * t0 and a1 < 0.9 * a0
    assert counts(text_dropout=0.5, action_dropout=0.5) == (t1, a1, counts(text_dropout=0.5, action_dropout=0.5)[2])
