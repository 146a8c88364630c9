"""Checkpoints carry the size and sha256 of every file (complete.json); ``--resume latest`` skips one
that does not verify and says why; a corrupted RNG file is named; another ZeRO stage is refused up
front; and a one-process (ZeRO-0) run exports to a Hugging Face folder."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import uwm_in_process, write_tiny_recipe
from unified_wm.checkpoint import DONE_MARKER, check_checkpoint, file_records, read_rng_file, resolve_resume, rng_state
from unified_wm.utils import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def uwm(*args, timeout=600):
    return subprocess.run([PY, "-m", "unified_wm.cli", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


def _ckpt(d: Path, name: str) -> Path:
    """A checkpoint folder recorded the way save_checkpoint records one."""
    p = d / name
    p.mkdir(parents=True)
    (p / "mp_rank_00_model_states.pt").write_bytes(os.urandom(4096))
    (p / "rng_rank0.json").write_text(json.dumps(rng_state()))
    (p / DONE_MARKER).write_text(json.dumps({"step": int(name[4:]), "zero_stage": 0, "files": file_records(p)}))
    return p


@pytest.fixture
def two_ckpts(tmp_path):
    d = tmp_path / "checkpoints"
    _ckpt(d, "step3"), _ckpt(d, "step6")
    (d / "latest").write_text("step6")
    return d


def test_complete_json_records_size_and_sha256(two_ckpts):
    info = json.loads((two_ckpts / "step6" / DONE_MARKER).read_text())
    assert set(info["files"]) == {"mp_rank_00_model_states.pt", "rng_rank0.json"}
    assert info["files"]["mp_rank_00_model_states.pt"]["size"] == 4096
    assert len(info["files"]["rng_rank0.json"]["sha256"]) == 64
    assert check_checkpoint(two_ckpts / "step6") == []


def test_flipped_bytes_make_resume_latest_fall_back_to_the_older_one(two_ckpts, capsys):
    f = two_ckpts / "step6" / "mp_rank_00_model_states.pt"
    data = bytearray(f.read_bytes())
    data[100] ^= 0xFF
    f.write_bytes(bytes(data))
    assert resolve_resume("latest", two_ckpts).name == "step3"
    err = capsys.readouterr().err
    assert "skipping checkpoint" in err and "step6" in err and "does not match its sha256" in err
    with pytest.raises(ConfigError, match="mp_rank_00_model_states.pt' does not match its sha256"):
        resolve_resume(str(two_ckpts / "step6"), two_ckpts)


def test_truncated_file_makes_resume_latest_fall_back(two_ckpts, capsys):
    f = two_ckpts / "step6" / "mp_rank_00_model_states.pt"
    f.write_bytes(f.read_bytes()[:1000])
    assert resolve_resume("latest", two_ckpts).name == "step3"
    assert "has 1000 bytes, 4096 were saved" in capsys.readouterr().err
    # nothing verifies: an error that lists why
    g = two_ckpts / "step3" / "rng_rank0.json"
    g.write_text(g.read_text()[:-5])
    with pytest.raises(ConfigError, match="no checkpoint in .* verifies"):
        resolve_resume("latest", two_ckpts)


def test_corrupted_rng_file_is_named(tmp_path):
    f = tmp_path / "rng_rank1.json"
    f.write_text('{"python": [3, [1, 2')
    with pytest.raises(ConfigError, match=r"RNG state file '.*rng_rank1.json' is corrupted"):
        read_rng_file(f)
    f.write_text('{"python": 1}')
    with pytest.raises(ConfigError, match="rng_rank1.json' is corrupted"):
        read_rng_file(f)
    f.write_text(json.dumps(rng_state()))
    assert read_rng_file(f)["torch"]


@pytest.fixture(scope="module")
def zero0_run(tmp_path_factory, tokens_dir, processor_dir):
    """`uwm train` in one process without --deepspeed (ZeRO-0): checkpoints at steps 2 and 4."""
    d = tmp_path_factory.mktemp("zero0")
    rp = write_tiny_recipe(d, tokens_dir, processor_dir, max_steps=4, save_every=2, keep_checkpoints=0)
    r = uwm("train", "--recipe", rp, "--no-progress")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return {"recipe": rp, "run": d / "run"}


@pytest.mark.slow
def test_zero0_checkpoint_records_hashes_and_resume_skips_a_corrupted_one(zero0_run, tmp_path):
    ck = zero0_run["run"] / "checkpoints"
    assert check_checkpoint(ck / "step4") == [] and check_checkpoint(ck / "step2") == []
    assert json.loads((ck / "step4" / DONE_MARKER).read_text())["zero_stage"] == 0
    # a copy of the run whose newest checkpoint is damaged: resume uses step2
    run2 = tmp_path / "run"
    shutil.copytree(zero0_run["run"], run2)
    f = next((run2 / "checkpoints" / "step4").glob("*model_states.pt"))
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    r = uwm("train", "--recipe", zero0_run["recipe"], "--output-dir", run2, "--resume", "latest", "--max-steps", "3", "--no-progress")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "skipping checkpoint" in r.stderr and "step4" in r.stderr
    assert "resumed from step 2" in r.stdout


@pytest.mark.slow
def test_resume_under_another_zero_stage_is_refused_up_front(zero0_run):
    r = uwm_in_process("train", "--recipe", zero0_run["recipe"], "--deepspeed", ROOT / "ds_configs/zero2.json", "--resume",
                       "latest", "--max-steps", "5", "--no-progress")  # refused before any rank starts
    assert r.returncode == 2
    assert "saved under ZeRO stage 0" in r.stderr and "uses ZeRO stage 2" in r.stderr and "zero2.json" in r.stderr


@pytest.mark.slow
def test_zero0_run_exports_to_a_hf_folder(zero0_run, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    import unified_wm  # noqa: F401

    r = uwm_in_process("export", "--checkpoint", zero0_run["run"] / "checkpoints", "--out", tmp_path / "hf")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    ckpt = zero0_run["run"] / "checkpoints" / "step4" / "mp_rank_00_model_states.pt"
    states = torch.load(ckpt, map_location="cpu", weights_only=True)["module"]
    for k, v in model.state_dict().items():
        assert torch.equal(v.float(), states[k].float()), k
    assert "ZeRO stage 0" in (tmp_path / "hf" / "README.md").read_text()
    # its own earlier output is replaced only with --overwrite
    r = uwm_in_process("export", "--checkpoint", zero0_run["run"] / "checkpoints", "--out", tmp_path / "hf")
    assert r.returncode == 2 and "--overwrite" in r.stderr
    r = uwm_in_process("export", "--checkpoint", zero0_run["run"] / "checkpoints" / "step2", "--out", tmp_path / "hf", "--overwrite")
    assert r.returncode == 0, r.stderr[-3000:]
