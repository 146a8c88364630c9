"""Tests for the discrete video tokenizer (unified_wm/tokenization/video.py). Fast on 2 CPU cores."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from unified_wm.data.episodes import save_episodes
from unified_wm.eval.metrics import code_usage, psnr, ssim
from unified_wm.tokenization.video import FSQ, AttnBlock, EMAVectorQuantizer, ResBlock, VideoTokenizer, VideoTokenizerConfig, VQConfig
from unified_wm.tokenization.video_train import evaluate_video_tokenizer, resize_frames, train_video_tokenizer
from unified_wm.utils import ConfigError, from_dict, load_config, to_dict

REPO = Path(__file__).resolve().parents[1]


def _synthetic_frames(rng: np.random.Generator, t: int, size: int) -> np.ndarray:
    """Flat-coloured rectangles and circles moving over a two-colour gradient background."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c0, c1 = rng.uniform(30, 220, 3), rng.uniform(30, 220, 3)
    g = (xx + yy)[..., None] / 2
    bg = c0 * (1 - g) + c1 * g
    shapes = [(rng.integers(0, 2), rng.uniform(2, size / 4), rng.uniform(0, size, 2), rng.uniform(-1, 1, 2), rng.uniform(0, 255, 3))
              for _ in range(3)]
    Y, X = np.mgrid[0:size, 0:size]
    out = np.empty((t, size, size, 3), np.uint8)
    for i in range(t):
        im = bg.copy()
        for kind, r, p, v, col in shapes:
            cx, cy = (p + v * i) % size
            m = (np.abs(X - cx) <= r) & (np.abs(Y - cy) <= r) if kind == 0 else (X - cx) ** 2 + (Y - cy) ** 2 <= r * r
            im[m] = col
        out[i] = np.clip(im, 0, 255).astype(np.uint8)
    return out


def _episodes(n: int, t: int, size: int, split: str, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {"episode_id": f"{split}-{i}", "source": "synthetic", "seed": seed * 1000 + i, "split": split,
         "action_space": "none", "frames": _synthetic_frames(rng, t, size), "actions": ["noop"] * (t - 1),
         "rewards": [0.0] * (t - 1), "captions": [{"t": 0, "text": "shapes"}], "state": "{}"}
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("vt") / "episodes"
    eps = _episodes(6, 8, 32, "train", 1) + _episodes(2, 8, 32, "val", 2) + _episodes(1, 8, 32, "probe_offscreen", 3)
    save_episodes(eps, d, 32, 32)
    return d


def _tiny_config(**train) -> VideoTokenizerConfig:
    t = {"steps": 40, "batch_size": 8, "lr": 3e-3, "warmup_steps": 5, "checkpoint_every": 10, "log_every": 5, "seed": 0, "threads": 1}
    t.update(train)
    return from_dict(VideoTokenizerConfig, {
        "image_size": 32, "downsample": 4, "patch_size": 1, "channels": [8, 16, 16], "res_blocks": 1,
        "quantizer": {"kind": "fsq", "fsq": {"levels": [5, 5, 3]}}, "train": t,
    })


# ----------------------------------------------------------------------------- quantizers


def test_fsq_index_round_trip_and_all_codes_reachable():
    fsq = FSQ([8, 5, 5, 5])
    assert fsq.codebook_size == 1000
    idx = torch.arange(1000)
    codes = fsq.indices_to_codes(idx)
    assert codes.shape == (1000, 4)
    assert codes.min() >= -1 and codes.max() <= 1
    assert torch.equal(fsq.codes_to_indices(codes), idx)
    # codes are distinct, so the mapping is a bijection
    assert len(torch.unique(codes, dim=0)) == 1000
    # quantizing random latents: indices in range, and every code is produced by some input
    z = torch.randn(200_000, 4, generator=torch.Generator().manual_seed(0)) * 2
    zq, ind, aux = fsq(z)
    assert ind.dtype == torch.long and int(ind.min()) >= 0 and int(ind.max()) < 1000
    assert torch.equal(fsq.codes_to_indices(zq), ind)
    assert torch.equal(fsq.indices_to_codes(ind), zq)
    assert int((torch.bincount(ind, minlength=1000) > 0).sum()) == 1000
    assert float(aux) == 0.0


def test_fsq_straight_through_gradient():
    fsq = FSQ([7, 5])
    z = torch.randn(64, 2, requires_grad=True)
    zq, _, _ = fsq(z)
    zq.sum().backward()
    assert z.grad is not None and bool((z.grad.abs() > 0).all())


def test_vq_ema_indices_in_range_and_dead_codes_restart():
    vq = EMAVectorQuantizer(VQConfig(codebook_size=32, dim=4, decay=0.5, dead_code_threshold=0.5))
    vq.train()
    z = torch.randn(256, 4)
    q, idx, commit = vq(z)
    assert q.shape == z.shape and idx.shape == (256,)
    assert int(idx.min()) >= 0 and int(idx.max()) < 32
    assert float(commit) >= 0
    # feed points near a single code: the other codes' cluster sizes decay below threshold and get re-seeded
    far = torch.full((256, 4), 50.0) + 0.01 * torch.randn(256, 4)
    for _ in range(4):
        vq(far)
    # restarted codes are copies of encoder outputs, so they now sit near the new data
    assert int((vq.embed - 50.0).abs().max(dim=1).values.lt(1.0).sum()) > 1
    vq.eval()
    assert torch.equal(vq.indices_to_codes(vq(far)[1]), vq.embed[vq(far)[1]])


# ----------------------------------------------------------------------------- model


def test_encode_decode_shapes_dtypes_and_range_checks():
    tok = VideoTokenizer(_tiny_config())
    assert tok.codebook_size == 75 and tok.grid == (8, 8) and tok.tokens_per_frame == 64 and tok.image_size == 32
    frames = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    codes = tok.encode(frames, batch_size=2)
    assert codes.dtype == torch.long and codes.shape == (5, 8, 8)
    assert int(codes.min()) >= 0 and int(codes.max()) < tok.codebook_size
    # float [T,3,H,W] in [-1,1] gives the same codes as the uint8 input
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.equal(tok.encode(x), codes)
    out = tok.decode(codes)
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.shape == (5, 32, 32, 3)
    with pytest.raises(ValueError, match=r"\[0, 75\)"):
        tok.decode(torch.full((1, 8, 8), 75))
    with pytest.raises(ValueError, match="expects 32x32"):
        tok.encode(np.zeros((2, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        tok.encode(np.zeros((2, 32, 32, 3), np.float32))


def test_config_channel_count_is_checked():
    with pytest.raises(ConfigError, match="channels"):
        from_dict(VideoTokenizerConfig, {"downsample": 8, "channels": [8, 16]}, source="x.yaml")


def test_mid_attention_and_decoder_depth(tmp_path):
    base = to_dict(_tiny_config())
    tok = VideoTokenizer(from_dict(VideoTokenizerConfig, base | {"decoder_res_blocks": 3, "mid_attention": 1, "attention_heads": 2}))
    n_res = lambda m: sum(isinstance(b, ResBlock) for b in m.modules())  # noqa: E731
    # encoder: 1 per resolution (3) + the mid block's; decoder: 3 per resolution (9) + the mid block's
    assert (n_res(tok.encoder), n_res(tok.decoder)) == (4, 10)
    assert sum(isinstance(b, AttnBlock) for b in tok.modules()) == 2
    # every weight, the attention's included, gets a gradient
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    rec, _, _ = tok(x)
    rec.pow(2).mean().backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in tok.parameters())
    # the attention sees the whole grid: its output at one position depends on a far corner
    attn = next(b for b in tok.modules() if isinstance(b, AttnBlock))
    h = torch.randn(1, 16, 8, 8)
    h2 = h.clone()
    h2[..., 7, 7] += 3.0
    assert not torch.allclose(attn(h)[..., 0, 0], attn(h2)[..., 0, 0])
    tok.save_pretrained(tmp_path / "tok")
    tok2 = VideoTokenizer.from_pretrained(tmp_path / "tok")
    frames = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    assert torch.equal(tok.encode(frames), tok2.encode(frames))
    for bad, match in [({"mid_attention": -1}, "mid_attention"), ({"mid_attention": 1, "attention_heads": 3}, "attention_heads"),
                       ({"decoder_res_blocks": -2}, "decoder_res_blocks"), ({"train": base["train"] | {"ema_decay": 1.0}}, "ema_decay")]:
        with pytest.raises(ConfigError, match=match):
            from_dict(VideoTokenizerConfig, base | bad, source="x.yaml")


def test_save_load_round_trip_identical_codes(tmp_path):
    torch.manual_seed(0)
    tok = VideoTokenizer(_tiny_config())
    frames = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    tok.save_pretrained(tmp_path / "tok")
    assert (tmp_path / "tok" / "config.json").is_file() and (tmp_path / "tok" / "model.safetensors").is_file()
    assert not [p for p in (tmp_path / "tok").iterdir() if p.name.startswith(".")]  # no temp files left
    meta = json.loads((tmp_path / "tok" / "config.json").read_text())
    assert meta["codebook_size"] == 75 and meta["tokens_per_frame"] == 64
    tok2 = VideoTokenizer.from_pretrained(tmp_path / "tok")
    assert torch.equal(tok.encode(frames), tok2.encode(frames))
    assert np.array_equal(tok.decode(tok.encode(frames)), tok2.decode(tok2.encode(frames)))


def test_from_pretrained_missing_folder_names_it(tmp_path):
    missing = tmp_path / "no_such_tokenizer"
    with pytest.raises(FileNotFoundError, match="no_such_tokenizer"):
        VideoTokenizer.from_pretrained(missing)
    (tmp_path / "half").mkdir()
    with pytest.raises(FileNotFoundError, match="model.safetensors|config.json"):
        VideoTokenizer.from_pretrained(tmp_path / "half")


def test_unknown_yaml_key_is_a_config_error(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("image_size: 64\ndownsample: 8\nchanels: [1, 2]\n")
    with pytest.raises(ConfigError) as e:
        load_config(VideoTokenizerConfig, p)
    assert "chanels" in str(e.value) and "bad.yaml" in str(e.value)
    p.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"train\.stepz"):
        load_config(VideoTokenizerConfig, p)


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "tokenizers").glob("video_*.yaml")))
def test_repo_configs_load(name):
    cfg = load_config(VideoTokenizerConfig, REPO / "tokenizers" / name)
    tok = VideoTokenizer(cfg)
    assert tok.image_size == 64 and tok.tokens_per_frame == 64
    assert 256 <= tok.codebook_size <= 16384


def test_tokenizers_folder_is_data_only():
    assert not (REPO / "tokenizers" / "__init__.py").exists()


# ----------------------------------------------------------------------------- metrics


def test_psnr_known_case_and_ssim_identity():
    a = np.zeros((2, 16, 16, 3), np.uint8)
    b = np.full((2, 16, 16, 3), 10, np.uint8)
    p = psnr(a, b)
    assert p.shape == (2,)
    assert abs(float(p[0]) - 10 * math.log10(255**2 / 100)) < 1e-9  # 28.1308 dB
    assert math.isinf(float(psnr(a, a)[0]))
    img = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    s = ssim(img, img)
    assert torch.allclose(s, torch.ones(3, dtype=s.dtype), atol=1e-9)
    noisy = np.clip(img.astype(int) + np.random.default_rng(1).integers(-60, 60, img.shape), 0, 255).astype(np.uint8)
    s2 = ssim(img, noisy)
    assert bool((s2 < 0.95).all()) and bool((s2 > 0).all())
    # closed form for flat images: only the luminance term remains, (2ab + C1) / (a^2 + b^2 + C1)
    c1 = (0.01 * 255) ** 2
    flat = ssim(np.full((1, 16, 16, 3), 100, np.uint8), np.full((1, 16, 16, 3), 150, np.uint8))
    assert abs(float(flat[0]) - (2 * 100 * 150 + c1) / (100**2 + 150**2 + c1)) < 1e-9
    # SSIM ignores a tiny constant shift much more than heavy noise
    assert float(ssim(img, np.clip(img.astype(int) + 2, 0, 255).astype(np.uint8)).mean()) > float(s2.mean())


def test_code_usage():
    u = code_usage(torch.tensor([0, 1, 2, 3]), 8)
    assert u["codes_used"] == 4 and u["usage"] == 0.5 and abs(u["perplexity"] - 4.0) < 1e-9


def test_resize_frames_center_crop():
    f = np.zeros((2, 40, 80, 3), np.uint8)
    f[:, :, 20:60] = 200  # the central square
    out = resize_frames(f, 16)
    assert out.shape == (2, 16, 16, 3) and out.dtype == np.uint8
    assert int(out.min()) == 200


# ----------------------------------------------------------------------------- training


def test_training_lowers_loss_resumes_and_evaluates(data_dir, tmp_path):
    cfg = _tiny_config()
    out = tmp_path / "run"
    s1 = train_video_tokenizer("<test>", data_dir, out, max_steps=20, progress=False, config=cfg)
    assert s1["steps"] == 20 and s1["steps_this_run"] == 20
    assert (out / "checkpoints" / "step20" / "train_state.pt").is_file()
    assert (out / "checkpoints" / "latest").read_text() == "step20"
    # the training set excludes the val and probe episodes: 6 episodes x 8 frames
    assert s1["frames"] == 48 and "val" not in s1["splits"] and "probe" not in s1["splits"]
    with pytest.raises(FileExistsError, match="resume"):
        train_video_tokenizer("<test>", data_dir, out, max_steps=30, progress=False, config=cfg)

    s2 = train_video_tokenizer("<test>", data_dir, out, resume=True, progress=False, config=cfg)
    assert s2["steps"] == 40 and s2["steps_this_run"] == 20
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "step" in r and "loss" in r]
    assert steps == list(range(5, 41, 5))  # resumed run continues the count, no repeats
    losses = [r["loss"] for r in rows if "loss" in r and "step" in r]
    assert losses[-1] < 0.7 * losses[0]
    assert all(0 <= r["code_usage"] <= 1 for r in rows if "code_usage" in r)
    # only the newest checkpoints are kept
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["latest", "step30", "step40"]

    tok = VideoTokenizer.from_pretrained(out)
    rep = evaluate_video_tokenizer(out, data_dir, tmp_path / "eval", max_frames=12)
    assert rep["frames"] == 12 and "val" in rep["splits"]
    assert 5 < rep["psnr"] < 100 and 0 < rep["ssim"] <= 1 and 0 < rep["code_usage"] <= 1
    assert rep["tokens_per_frame"] == tok.tokens_per_frame == 64
    assert (tmp_path / "eval" / "video_tokenizer_recon.png").is_file()
    assert json.loads((tmp_path / "eval" / "video_tokenizer_eval.json").read_text())["psnr"] == rep["psnr"]


def test_ema_model_is_saved_and_resume_matches_one_run(data_dir, tmp_path):
    from safetensors.torch import load_file

    cfg = _tiny_config(steps=12, checkpoint_every=6, ema_decay=0.9)
    whole = train_video_tokenizer("<test>", data_dir, tmp_path / "whole", progress=False, config=cfg)
    assert whole["steps"] == 12
    train_video_tokenizer("<test>", data_dir, tmp_path / "cut", max_steps=6, progress=False, config=cfg)
    train_video_tokenizer("<test>", data_dir, tmp_path / "cut", resume=True, progress=False, config=cfg)
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # the saved model is the average, not the raw weights (those ride in train_state.pt)
    ck = tmp_path / "whole" / "checkpoints" / "step12"
    raw = torch.load(ck / "train_state.pt", weights_only=True)["raw_model"]
    saved = load_file(ck / "model.safetensors")
    assert torch.equal(saved["decoder.conv_out.weight"], a["decoder.conv_out.weight"])
    assert not torch.allclose(raw["decoder.conv_out.weight"], a["decoder.conv_out.weight"])
    # the raw weights cannot be resumed by a config without EMA
    with pytest.raises(ConfigError, match="ema_decay"):
        train_video_tokenizer("<test>", data_dir, tmp_path / "whole", resume=True, progress=False, config=_tiny_config(steps=14))


def test_resume_without_checkpoint_is_an_error(data_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        train_video_tokenizer("<test>", data_dir, tmp_path / "empty", resume=True, progress=False, config=_tiny_config())


def test_vq_tokenizer_trains_a_few_steps(data_dir, tmp_path):
    cfg = from_dict(VideoTokenizerConfig, {
        "image_size": 32, "downsample": 4, "channels": [8, 16, 16],
        "quantizer": {"kind": "vq", "vq": {"codebook_size": 64, "dim": 4}},
        "train": {"steps": 6, "batch_size": 4, "checkpoint_every": 6, "log_every": 3, "threads": 1},
    })
    s = train_video_tokenizer("<test>", data_dir, tmp_path / "vq", progress=False, config=cfg)
    assert s["steps"] == 6 and s["codebook_size"] == 64
    tok = VideoTokenizer.from_pretrained(tmp_path / "vq")
    codes = tok.encode(np.zeros((2, 32, 32, 3), np.uint8))
    assert codes.shape == (2, 8, 8) and int(codes.max()) < 64


# ----------------------------------------------------------------------------- temporal compression


def test_group_frames_is_causal_first_frame_alone_then_groups():
    from unified_wm.tokenization.video import group_frames, num_groups, ungroup_frames

    assert [num_groups(t, 4) for t in (0, 1, 2, 5, 6, 9)] == [0, 1, 2, 2, 3, 3]
    x = torch.arange(7.0).view(7, 1, 1, 1).expand(7, 3, 2, 2).contiguous()
    g = group_frames(x, 3)
    assert g.shape == (3, 9, 2, 2)
    assert g[:, ::3, 0, 0].tolist() == [[0, 0, 0], [1, 2, 3], [4, 5, 6]]
    assert torch.equal(ungroup_frames(g, 3, 7), x)
    g2 = group_frames(x[:6], 3)  # the last group is padded with the last frame
    assert g2[:, ::3, 0, 0].tolist() == [[0, 0, 0], [1, 2, 3], [4, 5, 5]]
    assert torch.equal(ungroup_frames(g2, 3, 6), x[:6])
    assert torch.equal(group_frames(x, 1), x)


def test_temporal_tokenizer_codes_grids_and_causality():
    cfg = _tiny_config()
    cfg.temporal = 3
    cfg.validate()
    torch.manual_seed(0)
    tok = VideoTokenizer(cfg)
    frames = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    codes = tok.encode(frames)
    assert codes.shape == (4, 8, 8)  # frame 0, then frames 1-3, 4-6, 7(+pad)
    assert tok.decode(codes, num_frames=8).shape == (8, 32, 32, 3)
    assert tok.decode(codes).shape == (10, 32, 32, 3)
    changed = frames.copy()
    changed[5] = 0  # lies in the third grid: earlier grids must not change
    c2 = tok.encode(changed)
    assert torch.equal(c2[:2], codes[:2]) and torch.equal(c2[3], codes[3])
    with pytest.raises(ConfigError, match="temporal"):
        from_dict(VideoTokenizerConfig, {"image_size": 32, "downsample": 4, "channels": [8, 16, 16], "temporal": 0})


def test_temporal_tokenizer_trains_evaluates_and_the_processor_refuses_it(data_dir, tmp_path):
    cfg = _tiny_config(steps=6, checkpoint_every=6, log_every=3)
    cfg.temporal = 2
    s = train_video_tokenizer("<test>", data_dir, tmp_path / "t2", progress=False, config=cfg)
    assert s["steps"] == 6
    rep = evaluate_video_tokenizer(tmp_path / "t2", data_dir, max_frames=16)
    # two val episodes of 8 frames, each a clip: 1 + ceil(7/2) = 5 grids per 8 frames
    assert rep["temporal"] == 2 and rep["frames"] == 16 and abs(rep["codes_per_video_frame"] - 64 * 5 / 8) < 1e-9
    assert 0 < rep["psnr"] < 100
    from unified_wm.tokenization.processor import UnifiedProcessor

    with pytest.raises(ValueError, match="compresses time"):
        UnifiedProcessor(REPO / "nowhere.model", [], tmp_path / "t2")


def test_resume_skips_a_corrupted_tokenizer_checkpoint(data_dir, tmp_path):
    """The video tokenizer's checkpoints follow the training's rules: sizes and hashes recorded at
    save, verified on resume, and a corrupted newest one is skipped for the one before it."""
    cfg = _tiny_config(steps=12, checkpoint_every=6)
    out = tmp_path / "run"
    train_video_tokenizer("<test>", data_dir, out, max_steps=12, progress=False, config=cfg)
    state = out / "checkpoints" / "step12" / "train_state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    s = train_video_tokenizer("<test>", data_dir, out, resume=True, progress=False, config=cfg)
    assert s["steps"] == 12 and s["steps_this_run"] == 6  # resumed from step6, the newest that verifies


def test_foreground_mask_weights_and_report_find_a_moving_dot():
    """A 2x2 dot moving over a flat background: the background is the flat colour, the mask and
    the loss weights pick the dot's pixels alone (per frame, also in a 2-frame group), and the
    reconstruction report's foreground PSNR scores those pixels only."""
    from unified_wm.tokenization.video_train import _foreground_weights, _reconstruction_report, background_of, foreground_mask

    frames = np.full((8, 16, 16, 3), (140, 70, 20), np.uint8)
    for i in range(8):
        frames[i, 5:7, 2 * i:2 * i + 2] = (230, 230, 230)
    bg = background_of(frames)
    assert (bg == (140, 70, 20)).all()
    mask = foreground_mask(frames, bg)
    assert mask.sum() == 8 * 4 and mask[3, 5:7, 6:8].all()
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    bgt = torch.from_numpy(bg).permute(2, 0, 1).float().div(127.5).sub(1.0)
    w = _foreground_weights(x, bgt, 9.0)
    assert torch.equal(w == 10.0, torch.from_numpy(mask)[:, None].expand(8, 3, 16, 16)) and set(w.unique().tolist()) == {1.0, 10.0}
    w2 = _foreground_weights(x.reshape(4, 6, 16, 16), bgt, 9.0)  # frames grouped in twos
    assert torch.equal(w2.reshape(8, 3, 16, 16), w)

    class Erase:  # a "tokenizer" that returns the background: perfect off the dot, wrong on it
        temporal, codebook_size, tokens_per_frame, grid, image_size = 1, 4, 1, (1, 1), 16

        def encode(self, f):
            return torch.zeros(len(f), 1, dtype=torch.long)

        def decode(self, c, num_frames=None):
            return np.broadcast_to(bg, (len(c), 16, 16, 3)).copy()

    rep, _ = _reconstruction_report(Erase(), frames)
    assert rep["foreground_share"] == 32 / (8 * 256) and rep["foreground_psnr"] < 5 and rep["psnr"] > rep["foreground_psnr"] + 15


def _last_loss_by_weight(key: str, data, folder: Path, steps: int) -> dict[float, float]:
    """The last logged training loss of a few steps with train.<key> at 0 and at 20."""
    losses = {}
    for w in (0.0, 20.0):
        train_video_tokenizer("<test>", data, folder / f"{key}{w}", max_steps=steps, progress=False, config=_tiny_config(**{key: w}))
        rows = [json.loads(x) for x in (folder / f"{key}{w}" / "metrics.jsonl").read_text().splitlines()]
        losses[w] = [r["loss"] for r in rows if "loss" in r][-1]
    return losses


def test_foreground_weight_changes_the_training_loss_and_is_checked(data_dir, tmp_path):
    runs = _last_loss_by_weight("foreground_weight", data_dir, tmp_path, 5)
    assert all(math.isfinite(v) for v in runs.values()) and runs[0.0] != runs[20.0]
    with pytest.raises(ValueError, match="train.foreground_weight"):
        _tiny_config(foreground_weight=-1.0).train.validate()


def test_object_weight_masks_the_world_objects_and_needs_their_boxes(data_dir, tmp_path):
    """`train.object_weight`: the masks follow the world's object boxes through the crop and
    resize of the frames (the palette's colours are far likelier inside them), the weight
    changes the training loss, and a dataset without boxes or a negative weight is refused."""
    from unified_wm.data.world import PALETTE, generate_world
    from unified_wm.tokenization.video_train import load_episode_frames, load_object_masks

    world = tmp_path / "world"
    generate_world(Path(__file__).resolve().parents[1] / "recipes/data/world_tiny.yaml", world, n_episodes=2, seed=0,
                   split="train", progress=False)
    frames, _, _ = load_episode_frames(world, 32, "train", 10_000)
    masks = load_object_masks(world, 32, 10_000)
    assert masks.shape == frames.shape[:3] and 0 < masks.mean() < 0.3
    pal = np.array(list(PALETTE.values()), float)
    near = np.linalg.norm(frames[..., None, :].astype(float) - pal, axis=-1).min(-1) < 40
    assert near[masks].mean() > 3 * near[~masks].mean(), (near[masks].mean(), near[~masks].mean())
    losses = _last_loss_by_weight("object_weight", world, tmp_path, 3)
    assert all(math.isfinite(v) for v in losses.values()) and losses[0.0] != losses[20.0]
    with pytest.raises(ValueError, match=r"train.object_weight needs the objects' boxes .* episode 'train-0'"):
        train_video_tokenizer("<test>", data_dir, tmp_path / "nobox", max_steps=2, progress=False, config=_tiny_config(object_weight=5.0))
    assert not (tmp_path / "nobox").exists()
    with pytest.raises(ValueError, match="train.object_weight"):
        _tiny_config(object_weight=-1.0).train.validate()
