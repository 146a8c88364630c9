"""Bad input through the command line is exit status 2 and one message naming the file, never a
traceback: damaged weights, a config that does not match its processor, a text tokenizer that is
not SentencePiece, a --context that is not an image, an --out that cannot be written (found
before any frame is made); and `uwm tokenizer eval-video` says when it resized the frames."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from unified_wm.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _copy(src: Path, tmp_path: Path) -> Path:
    d = tmp_path / "model"
    shutil.copytree(src, d)
    return d


def _run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
@pytest.mark.parametrize("command", ["rollout", "play"])
def test_damaged_weights_are_named(tiny_hf, tmp_path, capsys, damage, command):
    d = _copy(tiny_hf, tmp_path)
    w = d / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 3] if damage == "truncated" else os.urandom(5000))
    args = ["--frames", "1", "--out", tmp_path / "o.mp4"] if command == "rollout" else ["--port", "0"]
    code, err = _run(capsys, command, "--model", d, *args)
    assert code == 2 and f"'{w}'" in err and "damaged or not a safetensors file" in err, err
    assert not (tmp_path / "o.mp4").exists()


def test_config_that_does_not_match_the_processor_is_named(tiny_hf, tmp_path, capsys):
    d = _copy(tiny_hf, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["vocab_size"] += 7
    (d / "config.json").write_text(json.dumps(cfg))
    code, err = _run(capsys, "rollout", "--model", d, "--frames", "1", "--out", tmp_path / "o.mp4")
    assert code == 2 and f"'{d}'" in err and "config.json" in err and "'vocab_size'" in err, err
    # the weights of another shape than config.json says: named too, not transformers' report
    cfg["vocab_size"] -= 7
    cfg["hidden_size"] = cfg["hidden_size"] * 2
    cfg["head_dim"] = cfg["head_dim"] * 2
    (d / "config.json").write_text(json.dumps(cfg))
    code, err = _run(capsys, "rollout", "--model", d, "--frames", "1", "--out", tmp_path / "o.mp4")
    assert code == 2 and f"'{d}'" in err and "weights do not load" in err, err


@pytest.mark.parametrize("content", [b"just some text\n", b"", b"\x00" * 64])
def test_build_processor_names_a_text_model_that_is_not_sentencepiece(processor_dir, tmp_path, capsys, content):
    bad = tmp_path / "text.model"
    bad.write_bytes(content)
    code, err = _run(capsys, "tokenizer", "build-processor", "--config", ROOT / "tokenizers/processor.yaml",
                     "--text", bad, "--video", processor_dir / "video_tokenizer", "--out", tmp_path / "proc")
    assert code == 2 and f"'{bad}' is not a SentencePiece model" in err, err
    assert not (tmp_path / "proc").exists()


@pytest.mark.parametrize("name", ["context.png", "context.mp4", "context.jpg"])
def test_context_that_is_not_an_image_is_named(tiny_hf, tmp_path, capsys, name):
    bad = tmp_path / name
    bad.write_text("this is not an image\n")
    code, err = _run(capsys, "rollout", "--model", tiny_hf, "--frames", "1", "--context", bad, "--out", tmp_path / "o.mp4")
    assert code == 2 and f"'{bad}'" in err and ("not an image" in err or "not a video" in err), err


def test_unwritable_out_is_refused_before_any_frame(tiny_hf, tmp_path, capsys):
    if os.geteuid() == 0:  # permission bits do not stop root; /proc takes no new files
        out = Path("/proc/uwm-rollout.mp4")
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        out = ro / "o.mp4"
    code, err = _run(capsys, "rollout", "--model", tiny_hf, "--frames", "4", "--out", out)
    assert code == 2 and f"--out '{out}'" in err and "cannot write" in err, err
    assert "rollout:" not in err  # refused before the model made a frame (no progress bar)
    # a folder given as --out is refused too
    code, err = _run(capsys, "rollout", "--model", tiny_hf, "--frames", "1", "--out", tmp_path)
    assert code == 2 and "is a folder" in err


def test_prompt_past_the_context_is_a_message(tiny_hf, tmp_path, capsys):
    code, err = _run(capsys, "rollout", "--model", tiny_hf, "--frames", "1", "--prompt", "a red car drives right " * 400,
                     "--out", tmp_path / "o.mp4")
    assert code == 2 and "prompt" in err and "2048 tokens" in err, err


def test_eval_video_says_it_resized_the_frames(processor_dir, tmp_path, capsys):
    import av

    from unified_wm.tokenization.video import VideoTokenizer

    tok = processor_dir / "video_tokenizer"
    size = VideoTokenizer.from_pretrained(tok).image_size
    rng = np.random.default_rng(0)
    reports = {}
    for name, (w, h) in {"other": (96, 80), "same": (size, size)}.items():
        path = tmp_path / f"{name}.mp4"
        with av.open(str(path), mode="w") as c:
            s = c.add_stream("libx264", rate=8)
            s.width, s.height, s.pix_fmt = w, h, "yuv420p"
            for _ in range(4):
                frame = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
                for pkt in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    c.mux(pkt)
            for pkt in s.encode():
                c.mux(pkt)
        assert main(["tokenizer", "eval-video", "--model", str(tok), "--video", str(path)]) == 0
        cap = capsys.readouterr()
        reports[name] = (json.loads(cap.out)[f"video:{path}"], cap.err)
    rep, err = reports["other"]
    assert rep["source_frame_size"] == [96, 80]
    assert "centre-cropped from 96x80 to 80x80" in rep["preprocessing"] and f"{size}x{size}" in rep["preprocessing"]
    assert "other.mp4" in err and "centre-cropped" in err
    rep, err = reports["same"]
    assert rep["source_frame_size"] == [size, size] and rep["preprocessing"] is None and "centre-cropped" not in err
