"""Token documents, processor, training run and exported model record the processor's token-space
fingerprint, and train / export / rollout (eval, play) refuse a mismatch naming both artifacts and
what differs; artifacts from before fingerprints get a warning."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import uwm_in_process, write_tiny_recipe
from unified_wm.fingerprint import FingerprintMismatch, differences, token_space

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def uwm(*args, timeout=600):
    return subprocess.run([PY, "-m", "unified_wm.cli", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.fixture(scope="module")
def reordered_dir(tmp_path_factory, processor_dir):
    """The session's processor with the same text model, video tokenizer and action names, the
    actions in another order: every size is the same, the action ids mean other actions."""
    from unified_wm.tokenization.processor import UnifiedProcessor

    p = UnifiedProcessor.from_pretrained(processor_dir)
    names = list(p.action_names)
    names[0], names[1] = names[1], names[0]
    out = tmp_path_factory.mktemp("reordered") / "processor"
    UnifiedProcessor(processor_dir / "text.model", names, processor_dir / "video_tokenizer", max_chunk_len=p.max_chunk_len).save_pretrained(out)
    return out


def test_fingerprint_survives_save_and_load_and_names_a_reordered_action_set(processor, processor_dir, reordered_dir, tmp_path):
    from unified_wm.tokenization.processor import UnifiedProcessor

    a = token_space(processor)
    processor.save_pretrained(tmp_path / "copy")  # what export writes beside the model
    assert token_space(UnifiedProcessor.from_pretrained(tmp_path / "copy"))["fingerprint"] == a["fingerprint"]
    assert json.loads((processor_dir / "processor_config.json").read_text())["token_space"]["fingerprint"] == a["fingerprint"]
    b = token_space(UnifiedProcessor.from_pretrained(reordered_dir))
    assert b["summary"]["vocab_size"] == a["summary"]["vocab_size"] and b["fingerprint"] != a["fingerprint"]
    diff = differences(a, b)
    assert len(diff) == 1 and "action set: the same" in diff[0] and "another order" in diff[0], diff


def test_a_processor_whose_video_tokenizer_was_replaced_is_refused_on_load(processor_dir, tmp_path):
    import torch

    from unified_wm.tokenization.processor import UnifiedProcessor
    from unified_wm.tokenization.video import VideoTokenizer

    d = tmp_path / "processor"
    shutil.copytree(processor_dir, d)
    vt = VideoTokenizer.from_pretrained(d / "video_tokenizer")
    torch.manual_seed(123)
    VideoTokenizer(vt.config).save_pretrained(d / "video_tokenizer")  # same codebook and grid, other weights
    with pytest.raises(ValueError, match=r"video tokenizer: the same codebook .* other weights.*was replaced"):
        UnifiedProcessor.from_pretrained(d)


def test_token_documents_record_the_fingerprint_and_train_refuses_another_processor(
        tokens_dir, processor, reordered_dir, tmp_path, capsys):
    from unified_wm.train import main

    info = json.loads((tokens_dir / "tokenize_info.json").read_text())
    assert info["token_space"]["fingerprint"] == token_space(processor)["fingerprint"]
    rp = write_tiny_recipe(tmp_path, tokens_dir, reordered_dir)
    assert main(["--recipe", str(rp), "--no-progress"]) == 2  # refused before any distributed setup
    err = capsys.readouterr().err
    assert f"token documents (data.tokens) '{tokens_dir}'" in err and f"processor '{reordered_dir}'" in err, err
    assert "action set: the same" in err and "another order" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_token_documents_without_a_fingerprint_get_a_warning(tokens_dir, processor, tmp_path, capsys):
    from unified_wm.fingerprint import check_token_documents

    old = tmp_path / "tokens"
    shutil.copytree(tokens_dir, old)
    info = json.loads((old / "tokenize_info.json").read_text())
    del info["token_space"]
    (old / "tokenize_info.json").write_text(json.dumps(info))
    assert check_token_documents(old, processor, "processor 'p'") is False
    err = capsys.readouterr().err
    assert "warning:" in err and str(old) in err and "records no token-space fingerprint" in err


@pytest.fixture(scope="module")
def fp_run(tmp_path_factory, tokens_dir, processor_dir):
    d = tmp_path_factory.mktemp("fp_run")
    rp = write_tiny_recipe(d, tokens_dir, processor_dir, max_steps=1, save_every=1)
    r = uwm("train", "--recipe", rp, "--no-progress")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return {"d": d, "recipe": rp, "run": d / "run"}


@pytest.mark.slow
def test_export_refuses_a_recipe_processor_the_run_was_not_trained_with(fp_run, tokens_dir, reordered_dir, tmp_path):
    import yaml

    assert "token_space" in json.loads((fp_run["run"] / "recipe.json").read_text())
    assert "token_space" in json.loads((fp_run["run"] / "checkpoints" / "step1" / "complete.json").read_text())
    other = yaml.safe_load(fp_run["recipe"].read_text())
    other["data"]["processor"] = str(reordered_dir)
    rp = tmp_path / "other.yaml"
    rp.write_text(yaml.safe_dump(other))
    r = uwm_in_process("export", "--checkpoint", fp_run["run"] / "checkpoints", "--out", tmp_path / "hf", "--recipe", rp)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"the checkpoint '{fp_run['run'] / 'checkpoints' / 'step1'}' (complete.json)" in r.stderr
    assert f"processor '{reordered_dir}'" in r.stderr
    assert "another order" in r.stderr and not (tmp_path / "hf").exists()


@pytest.mark.slow
def test_rollout_refuses_an_exported_model_whose_processor_was_swapped(fp_run, processor, reordered_dir, tmp_path, capsys):
    from unified_wm.rollout import WorldModel

    hf = tmp_path / "hf"
    r = uwm_in_process("export", "--checkpoint", fp_run["run"] / "checkpoints", "--out", hf)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["token_space"]["fingerprint"] == token_space(processor)["fingerprint"]
    WorldModel.from_pretrained(hf)  # matches: loads
    swapped = tmp_path / "swapped"
    shutil.copytree(hf, swapped)
    for f in ("processor_config.json", "text.model"):
        shutil.copy2(reordered_dir / f, swapped / f)
    with pytest.raises(FingerprintMismatch, match=r"model '.*swapped' \(config.json\) was made with another processor"):
        WorldModel.from_pretrained(swapped)
    r = uwm_in_process("rollout", "--model", swapped, "--prompt", "a red car", "--actions", "right", "--frames", "2",
                       "--out", tmp_path / "x.mp4")
    assert r.returncode == 2 and "action set: the same" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    # a model exported before fingerprints: a warning, and it loads
    del cfg["token_space"]
    (swapped / "config.json").write_text(json.dumps(cfg))
    for f in ("processor_config.json", "text.model"):
        shutil.copy2(hf / f, swapped / f)
    capsys.readouterr()
    WorldModel.from_pretrained(swapped)
    err = capsys.readouterr().err
    assert "warning:" in err and "records no token-space fingerprint" in err


@pytest.mark.slow
def test_resume_with_another_processor_is_refused_naming_the_checkpoint(fp_run, world_data, reordered_dir, tmp_path, capsys):
    """Token documents and processor agree with each other, but not with the checkpoint resumed."""
    from unified_wm.data.tokenize import tokenize_dataset
    from unified_wm.train import main

    tokens = tokenize_dataset(world_data, reordered_dir, tmp_path / "tokens", clip_frames=8, progress=False)
    run = tmp_path / "run"
    shutil.copytree(fp_run["run"], run)
    rp = write_tiny_recipe(tmp_path, tokens, reordered_dir, max_steps=2, save_every=1)
    assert main(["--recipe", str(rp), "--output-dir", str(run), "--resume", "latest", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"the checkpoint '{run / 'checkpoints' / 'step1'}' (complete.json)" in err and "another order" in err, err
