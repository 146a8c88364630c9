"""``--out`` never deletes a folder the user made: a non-empty folder without the command's marker is
refused, the command's own earlier output is replaced only with ``--overwrite``, and the new output
is swapped in only when complete."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from unified_wm.utils import OUTPUT_MARKER, OutputError, atomic_dir, check_out, guarded_out

ROOT = Path(__file__).resolve().parents[1]
WORLD = str(ROOT / "recipes/data/world_tiny.yaml")


def user_folder(p: Path) -> Path:
    p.mkdir(parents=True)
    (p / "notes.txt").write_text("keep")
    return p


# ----------------------------------------------------------------------------- the shared helper


def test_check_out_refuses_a_file_a_file_parent_and_a_users_folder(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(OutputError, match="file.txt' exists and is not a folder"):
        check_out(f, "data gen-world")
    with pytest.raises(OutputError, match="file.txt' is not a folder"):
        check_out(f / "sub", "data gen-world")
    u = user_folder(tmp_path / "mine")
    with pytest.raises(OutputError, match=r"mine' is an existing folder that `uwm data gen-world` did not write"):
        check_out(u, "data gen-world", overwrite=True)
    assert check_out(tmp_path / "new" / "deeper", "data gen-world") == tmp_path / "new" / "deeper"
    (tmp_path / "empty").mkdir()
    check_out(tmp_path / "empty", "data gen-world")


def test_an_interrupted_build_leaves_the_old_output_intact(tmp_path):
    out = tmp_path / "out"
    with guarded_out(out, "data gen-world"), atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("first")
    assert json.loads((out / OUTPUT_MARKER).read_text())["command"] == "data gen-world"
    with pytest.raises(RuntimeError):
        with guarded_out(out, "data gen-world", overwrite=True), atomic_dir(out) as tmp:
            (tmp / "a.txt").write_text("second")
            raise RuntimeError("cut off")
    assert (out / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left behind


def test_files_put_into_the_folder_during_the_build_are_not_replaced(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="did not write"):
        with guarded_out(out, "export"), atomic_dir(out) as tmp:
            (tmp / "model.safetensors").write_text("new")
            user_folder(out)  # someone made the folder meanwhile
    assert (out / "notes.txt").read_text() == "keep"


# ----------------------------------------------------------------------------- the five commands


def test_gen_world_keeps_a_users_folder_and_replaces_its_own_only_with_overwrite(tmp_path, capsys):
    from unified_wm.cli import main

    u = user_folder(tmp_path / "x")
    assert main(["data", "gen-world", "--config", WORLD, "--out", str(u), "--episodes", "2", "--no-progress"]) == 2
    assert "'" + str(u) + "' is an existing folder" in capsys.readouterr().err
    assert (u / "notes.txt").read_text() == "keep"

    out = tmp_path / "d"
    args = ["data", "gen-world", "--config", WORLD, "--out", str(out), "--episodes", "2", "--no-progress"]
    assert main(args) == 0
    first = sorted(p.name for p in out.iterdir())
    assert OUTPUT_MARKER in first
    assert main(args) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    (out / "extra.txt").write_text("from before")
    assert main(args + ["--overwrite", "--episodes", "3"]) == 0
    assert not (out / "extra.txt").exists() and sorted(p.name for p in out.iterdir()) == first
    from unified_wm.data.episodes import load_episodes

    assert len(load_episodes(out)) == 3
    # another command's output is not this command's to replace
    (out / OUTPUT_MARKER).write_text(json.dumps({"command": "export"}))
    assert main(args + ["--overwrite"]) == 2
    assert "holds the output of `uwm export`" in capsys.readouterr().err


def test_gen_world_refuses_a_file_out_before_any_work(tmp_path, capsys):
    from unified_wm.cli import main

    f = tmp_path / "f.bin"
    f.write_text("x")
    # the config does not exist either: the --out check comes first
    assert main(["data", "gen-world", "--config", str(tmp_path / "none.yaml"), "--out", str(f)]) == 2
    assert f"--out '{f}' exists and is not a folder" in capsys.readouterr().err
    assert f.read_text() == "x"


def test_build_processor_keeps_a_users_folder(tmp_path, processor_dir, capsys):
    from unified_wm.cli import main

    parts = processor_dir.parent
    base = ["tokenizer", "build-processor", "--config", str(ROOT / "tokenizers/processor.yaml"),
            "--text", str(parts / "text.model"), "--video", str(parts / "video")]
    u = user_folder(tmp_path / "p")
    assert main(base + ["--out", str(u)]) == 2
    assert "is an existing folder" in capsys.readouterr().err and (u / "notes.txt").is_file()
    out = tmp_path / "proc"
    assert main(base + ["--out", str(out)]) == 0
    assert main(base + ["--out", str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(base + ["--out", str(out), "--overwrite"]) == 0
    from unified_wm.tokenization.processor import UnifiedProcessor

    UnifiedProcessor.from_pretrained(out)


def test_tokenize_keeps_a_users_folder(tmp_path, processor_dir, capsys):
    from unified_wm.cli import main
    from unified_wm.data.world import generate_world

    data = generate_world(WORLD, tmp_path / "data", n_episodes=1, seed=0, split="train", progress=False)
    base = ["data", "tokenize", "--data", str(data), "--processor", str(processor_dir), "--clip-frames", "4",
            "--templates", "caption", "--no-progress"]
    u = user_folder(tmp_path / "t")
    assert main(base + ["--out", str(u)]) == 2
    assert "is an existing folder" in capsys.readouterr().err and (u / "notes.txt").is_file()
    out = tmp_path / "tokens"
    assert main(base + ["--out", str(out)]) == 0
    assert main(base + ["--out", str(out)]) == 2
    assert main(base + ["--out", str(out), "--overwrite"]) == 0
    assert (out / "tokenize_info.json").is_file() and (out / OUTPUT_MARKER).is_file()


def test_export_keeps_a_users_folder(tmp_path, capsys):
    from unified_wm.cli import main

    u = user_folder(tmp_path / "hf")
    # refused before the (missing) checkpoint is even looked at
    assert main(["export", "--checkpoint", str(tmp_path / "no_ckpt"), "--out", str(u)]) == 2
    assert f"'{u}' is an existing folder" in capsys.readouterr().err
    assert (u / "notes.txt").read_text() == "keep"


def test_train_video_keeps_a_users_folder_and_replaces_its_own_only_with_overwrite(tmp_path, capsys):
    from unified_wm.cli import main
    from unified_wm.data.world import generate_world

    data = generate_world(WORLD, tmp_path / "data", n_episodes=1, seed=0, split="train", progress=False)
    cfg = yaml.safe_load((ROOT / "tokenizers/video_fsq_tiny.yaml").read_text())
    cfg.update(channels=[4, 8, 8], quantizer={"kind": "fsq", "fsq": {"levels": [4, 4]}})
    cfg["train"].update(steps=2, batch_size=2, warmup_steps=1, checkpoint_every=2, log_every=1, threads=3)
    cp = tmp_path / "vt.yaml"
    cp.write_text(yaml.safe_dump(cfg))
    base = ["tokenizer", "train-video", "--config", str(cp), "--data", str(data), "--no-progress"]
    u = user_folder(tmp_path / "v")
    assert main(base + ["--out", str(u)]) == 2
    assert "is an existing folder" in capsys.readouterr().err and sorted(p.name for p in u.iterdir()) == ["notes.txt"]
    out = tmp_path / "video"
    assert main(base + ["--out", str(out)]) == 0
    assert (out / OUTPUT_MARKER).is_file() and (out / "model.safetensors").is_file()
    assert main(base + ["--out", str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    (out / "extra.txt").write_text("from before")
    assert main(base + ["--out", str(out), "--overwrite", "--threads", "0"]) == 2
    assert "--threads 0: expected a positive number" in capsys.readouterr().err and (out / "extra.txt").exists()
    assert main(base + ["--out", str(out), "--overwrite", "--threads", "1"]) == 0  # in place of the config's 3
    assert not (out / "extra.txt").exists() and (out / "model.safetensors").is_file()
    start = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start" and start["torch_threads"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "v", "video", "vt.yaml"]


# ----------------------------------------------------------------------------- permissions


def test_files_and_folders_are_written_with_the_users_umask(tmp_path):
    import os
    import stat

    from unified_wm.tokenization.video import FSQConfig, QuantizerConfig, VideoTokenizer, VideoTokenizerConfig
    from unified_wm.utils import atomic_file, write_json

    tok = VideoTokenizer(VideoTokenizerConfig(image_size=16, downsample=4, patch_size=1, channels=[4, 4, 4],
                                              quantizer=QuantizerConfig(kind="fsq", fsq=FSQConfig(levels=[3, 3]))))
    old = os.umask(0o027)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        with atomic_file(tmp_path / "b.gif", "wb") as f:
            f.write(b"GIF89a")
        with guarded_out(tmp_path / "video", "tokenizer train-video"), atomic_dir(tmp_path / "video") as tmp:
            tok.save_pretrained(tmp)
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    for p in (tmp_path / "a.json", tmp_path / "b.gif", tmp_path / "video" / "model.safetensors",
              tmp_path / "video" / "config.json", tmp_path / "video" / OUTPUT_MARKER):
        assert mode(p) == 0o640, (p, oct(mode(p)))
    assert mode(tmp_path / "video") == 0o750
    assert VideoTokenizer.from_pretrained(tmp_path / "video").codebook_size == 9
