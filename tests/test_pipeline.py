"""The walking skeleton end to end, with real parts: the deepspeed launcher on 2 CPU ranks
(ZeRO-2), export to a Hugging Face folder, rollout to a video file, the eval suite; and
the clear errors that bad input gets."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from unified_wm.distributed import free_port

from tests.conftest import uwm_in_process

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
DEEPSPEED = str(Path(PY).parent / "deepspeed")


def uwm(*args, check=True, timeout=600):
    r = subprocess.run([PY, "-m", "unified_wm.cli", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"uwm {' '.join(map(str, args))} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokens_dir, processor_dir):
    """A tiny model trained by the real deepspeed launcher on 2 CPU ranks with ZeRO-2, then exported."""
    from tests.conftest import write_tiny_recipe

    d = tmp_path_factory.mktemp("ds")
    rp = write_tiny_recipe(d, tokens_dir, processor_dir, keep_checkpoints=1)
    r = subprocess.run([DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "unified_wm.train",
                        "--recipe", str(rp), "--deepspeed", str(ROOT / "ds_configs/zero2.json")],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    run = d / "run"
    uwm("export", "--checkpoint", run / "checkpoints", "--out", d / "hf")
    return {"run": run, "hf": d / "hf", "log": r.stdout + r.stderr}


def test_deepspeed_two_ranks_zero2_logs_per_modality_losses(trained):
    run = trained["run"]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 4, 6]
    for key in ("loss", "loss_video", "loss_text", "loss_action", "lr", "grad_norm", "tokens_per_s"):
        assert key in lines[-1], key
    assert all(np.isfinite(x["loss"]) for x in lines)
    info = json.loads((run / "recipe.json").read_text())
    assert info["deepspeed"]["zero_optimization"]["stage"] == 2
    assert info["deepspeed"]["train_batch_size"] == 2  # 1 per rank x 2 ranks, filled from "auto"
    assert "world size 2" in trained["log"]
    # rotation kept only the newest checkpoint, and 'latest' points at it
    tags = sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())
    assert tags == ["step6"] and (run / "checkpoints" / "latest").read_text().strip() == "step6"


def test_exported_folder_loads_with_auto_classes(trained):
    import torch
    from transformers import AutoModelForCausalLM

    import unified_wm  # noqa: F401
    from unified_wm.tokenization.processor import UnifiedProcessor

    hf = trained["hf"]
    for name in ("config.json", "model.safetensors", "processor_config.json", "text.model", "README.md", "training_seeds.json"):
        assert (hf / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(hf).eval()
    proc = UnifiedProcessor.from_pretrained(hf)
    proc.check_model(model.config)
    ids = torch.tensor([[1, 7] + list(range(proc.video_offset, proc.video_offset + 64))])
    a = model.generate(ids, max_new_tokens=70, do_sample=False, use_cache=True)
    b = model.generate(ids, max_new_tokens=70, do_sample=False, use_cache=False)
    assert torch.equal(a, b)


def test_rollout_writes_readable_video_gif_and_contact_sheet(trained, tmp_path):
    import av
    from PIL import Image

    out = tmp_path / "roll" / "out.mp4"
    r = uwm("rollout", "--model", trained["hf"], "--prompt", "a red car drives right", "--actions", "right,right,stay",
            "--frames", "5", "--out", out)
    assert "wrote 5 frames" in r.stdout
    with av.open(str(out)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape == (64, 64, 3)
    gif = Image.open(out.with_suffix(".gif"))
    assert gif.n_frames == 5
    assert Image.open(out.with_suffix(".png")).size[0] > 64
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_python_rollout_is_deterministic_per_seed(trained):
    from unified_wm.rollout import WorldModel

    wm = WorldModel.from_pretrained(trained["hf"])
    a = wm.rollout(text="a blue ball", actions=["left", "stay"], frames=2, seed=3)
    b = wm.rollout(text="a blue ball", actions=["left", "stay"], frames=2, seed=3)
    assert a.dtype == np.uint8 and a.shape == (2, 64, 64, 3) and np.array_equal(a, b)


def test_eval_suite_writes_json_table_and_plots(trained, val_data, tmp_path):
    from unified_wm.data.world import generate_world

    probes = tmp_path / "probes"
    generate_world(ROOT / "recipes/data/world_tiny.yaml", probes, n_episodes=2, split="probe_offscreen", progress=False)
    suite = yaml.safe_load((ROOT / "eval/quick.yaml").read_text())
    suite.update(n_episodes=2, n_probes=2, rollout={"context_frames": 1, "horizon": 2, "temperature": 0.0, "seed": 0})
    sp = tmp_path / "suite.yaml"
    sp.write_text(yaml.safe_dump(suite))
    r = uwm("eval", "--model", trained["hf"], "--suite", sp, "--data", val_data, "--offscreen-data", probes,
            "--out", tmp_path / "ev")
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert res["nll"]["interleaved"]["nll_video"] > 0
    assert len(res["rollout"]["psnr_by_step"]) == 2
    assert all(0.0 <= x <= 1.0 for x in res["rollout"]["token_acc_by_step"]) and len(res["rollout"]["token_acc_by_step"]) == 2
    assert "| rollout | psnr_mean |" in r.stdout
    off = res["offscreen"]
    if "error" not in off:  # the detector finds the object in the real frames: the test is measurable
        assert off["overall"]["real"]["found_rate"] > 0
        assert 0.0 <= off["overall"]["model"]["success_rate"] <= 1.0
    assert (tmp_path / "ev" / "rollout_psnr.png").stat().st_size > 1000
    assert (tmp_path / "ev" / "rollout_token_acc.png").stat().st_size > 1000
    if "object_placed_mean" in res["rollout"]:  # objects were in view in the held-out frames
        assert (tmp_path / "ev" / "rollout_objects.png").stat().st_size > 1000 and "| rollout | object_placed_by_step |" in r.stdout
    # compare two runs side by side
    c = uwm_in_process("eval", "compare", tmp_path / "ev", tmp_path / "ev")
    assert c.returncode == 0 and "rollout/psnr_mean" in c.stdout and "+0.0000" in c.stdout


def test_unknown_eval_task_lists_valid_names(trained, tmp_path):
    suite = yaml.safe_load((ROOT / "eval/quick.yaml").read_text())
    suite["tasks"] = ["nll", "fvd_magic"]
    sp = tmp_path / "suite.yaml"
    sp.write_text(yaml.safe_dump(suite))
    r = uwm_in_process("eval", "--model", trained["hf"], "--suite", sp)
    assert r.returncode == 2 and "unknown task 'fvd_magic'" in r.stderr and "offscreen" in r.stderr
    r = uwm_in_process("eval", "--model", trained["hf"], "--suite", ROOT / "eval/quick.yaml", "--tasks", "nll,warp")
    assert r.returncode == 2 and "--tasks" in r.stderr and "unknown task 'warp'" in r.stderr and "revisit" in r.stderr
    r = uwm_in_process("eval", "--model", trained["hf"], "--suite", ROOT / "eval/quick.yaml", "--tasks", " , ")
    assert r.returncode == 2 and "expected comma-separated task names" in r.stderr


def test_eval_refuses_training_episodes(trained, world_data, tmp_path):
    r = uwm_in_process("eval", "--model", trained["hf"], "--suite", ROOT / "eval/quick.yaml", "--data", world_data)
    assert r.returncode == 2 and "shares" in r.stderr and "held-out" in r.stderr


# ----------------------------------------------------------------------------- bad input
def test_unknown_recipe_key_names_key_and_file(tiny_recipe):
    data = yaml.safe_load(tiny_recipe.read_text())
    data["train"]["learning_rate"] = 1.0
    tiny_recipe.write_text(yaml.safe_dump(data))
    r = uwm_in_process("train", "--recipe", tiny_recipe)  # refused before any rank starts: no new interpreter needed
    assert r.returncode == 2
    assert "unknown key 'train.learning_rate'" in r.stderr and str(tiny_recipe) in r.stderr


def test_ds_config_contradicting_recipe_is_refused(tiny_recipe, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}}))
    r = uwm_in_process("train", "--recipe", tiny_recipe, "--deepspeed", ds)
    assert r.returncode == 2 and "train_micro_batch_size_per_gpu" in r.stderr and str(ds) in r.stderr


def test_recipe_pointing_at_missing_data_is_refused(tiny_recipe, tmp_path):
    r = uwm_in_process("train", "--recipe", tiny_recipe, "--set", f"data.tokens={tmp_path / 'nope'}")
    assert r.returncode == 2 and "data.tokens" in r.stderr and "nope" in r.stderr


def test_single_process_uwm_train_and_resume(tiny_recipe):
    """`uwm train` (one process), then --resume latest continues from the saved step."""
    r = uwm("train", "--recipe", tiny_recipe, "--max-steps", "3")
    assert '"step": 3' in r.stdout
    run = Path(yaml.safe_load(tiny_recipe.read_text())["output_dir"])
    r2 = uwm("train", "--recipe", tiny_recipe, "--max-steps", "5", "--resume", "latest")
    assert "resumed from step 3" in r2.stdout and '"step": 5' in r2.stdout
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 5


def test_missing_model_folder(tmp_path):
    r = uwm_in_process("rollout", "--model", tmp_path / "no_model", "--out", tmp_path / "x.mp4")
    assert r.returncode == 2 and "no_model" in r.stderr and "does not exist" in r.stderr
    assert not (tmp_path / "x.mp4").exists()


def test_unknown_action_name(trained, tmp_path):
    r = uwm_in_process("rollout", "--model", trained["hf"], "--actions", "left,teleport", "--out", tmp_path / "x.mp4")
    assert r.returncode == 2 and "unknown action name 'teleport'" in r.stderr
    assert not (tmp_path / "x.mp4").exists()


def test_prompt_longer_than_context(trained, tmp_path):
    long_prompt = " ".join(["a red car enters from the left"] * 400)
    r = uwm_in_process("rollout", "--model", trained["hf"], "--prompt", long_prompt, "--frames", "2", "--out", tmp_path / "x.mp4")
    assert r.returncode == 2 and "more than the model's context of 2048 tokens" in r.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_uwm_pipeline_runs_every_stage_once_and_resumes(tmp_path):
    """`uwm pipeline`: data -> tokenizers -> processor -> tokens -> deepspeed training -> export
    -> eval on a tiny config; run again, every stage is skipped; training resumes from its
    checkpoint when asked to redo it; an unknown stage is named."""
    w = tmp_path / "work"
    vt = yaml.safe_load((ROOT / "tokenizers/video_fsq_tiny.yaml").read_text())
    vt["channels"] = [8, 16, 16]
    vt["train"].update(steps=4, batch_size=4, warmup_steps=1, checkpoint_every=2, log_every=2)
    (tmp_path / "video.yaml").write_text(yaml.safe_dump(vt))
    recipe = yaml.safe_load((ROOT / "recipes/tiny_cpu.yaml").read_text())
    recipe["model"].update(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                           num_hidden_layers=2, rope_mode="3d")
    recipe["train"].update(max_steps=2, seq_len=1152, micro_batch_size=1, log_every=1, save_every=2, warmup_steps=1)
    recipe["tasks"] = {"interleaved": recipe["tasks"]["interleaved"], "dynamics": {"weight": 0.5}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    suite = {"name": "p", "data": "unused", "tasks": ["nll"], "n_episodes": 2, "templates": ["dynamics"],
             "baselines": ["copy_last", "copy_shift"], "clip_frames": 16}
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    cfg = {"workdir": str(w), "world": str(ROOT / "recipes/data/world_tiny.yaml"), "recipe": str(tmp_path / "recipe.yaml"),
           "episodes": {"train": 3, "val": 2, "probe_offscreen": 0, "probe_revisit": 0},
           "video_tokenizer": str(tmp_path / "video.yaml"), "clip_frames": 16,
           "templates": ["interleaved", "dynamics"], "ranks": 1, "eval": [str(tmp_path / "suite.yaml")],
           "text_tokenizer": str(ROOT / "tokenizers/text_captions.yaml"), "processor": str(ROOT / "tokenizers/processor.yaml"),
           "deepspeed": str(ROOT / "ds_configs/zero2.json")}
    cp = tmp_path / "pipeline.yaml"
    cp.write_text(yaml.safe_dump(cfg))
    uwm("pipeline", "--config", cp, timeout=900)
    state = json.loads((w / "pipeline_state.json").read_text())
    assert list(state["done"]) == ["data", "text_tokenizer", "video_tokenizer", "processor", "tokens", "train", "export", "eval"]
    res = json.loads((w / "eval_suite" / "results.json").read_text())
    assert 0.0 <= res["nll"]["dynamics"]["next_frame_token_acc"] <= 1.0 and "copy_shift" in res["nll"]["baselines"]
    # the calls below start no stage: in-process (each subprocess would import torch again)
    again = uwm_in_process("pipeline", "--config", cp)
    assert again.returncode == 0 and again.stdout.count("skipped") == 8 and "$ " not in again.stdout
    redo = uwm_in_process("pipeline", "--config", cp, "--redo", "train", "--dry-run")
    assert "--resume latest" in redo.stdout and "[pipeline] data: done" in redo.stdout
    bad = uwm_in_process("pipeline", "--config", cp, "--redo", "training")
    assert bad.returncode == 2 and "unknown stage 'training'" in bad.stderr
    # a finished stage made from other settings stops the pipeline, naming the stage, the change and the --redo
    suite_text = (tmp_path / "suite.yaml").read_text()
    (tmp_path / "suite.yaml").write_text(suite_text.replace("n_episodes: 2", "n_episodes: 3"))
    stale = uwm_in_process("pipeline", "--config", cp)
    assert stale.returncode == 2 and "stage 'eval'" in stale.stderr and f"'{tmp_path / 'suite.yaml'}'" in stale.stderr
    assert "has changed" in stale.stderr and "--redo eval" in stale.stderr and "$ " not in stale.stdout
    assert uwm_in_process("pipeline", "--config", cp, "--redo", "eval", "--dry-run").returncode == 0
    (tmp_path / "suite.yaml").write_text(suite_text)
    cp.write_text(yaml.safe_dump({**cfg, "clip_frames": 12}))
    stale = uwm_in_process("pipeline", "--config", cp)
    assert stale.returncode == 2 and "stage 'tokens'" in stale.stderr and "'16' is now '12'" in stale.stderr
    cp.write_text(yaml.safe_dump(cfg))
    # a state written before input files were recorded is read too (commands compared only)
    for rec in state["done"].values():
        rec.pop("inputs")
    (w / "pipeline_state.json").write_text(json.dumps(state))
    assert uwm_in_process("pipeline", "--config", cp).stdout.count("skipped") == 8
    cfg["templates"] = ["interleaved"]
    cp.write_text(yaml.safe_dump(cfg))
    bad = uwm_in_process("pipeline", "--config", cp)
    assert bad.returncode == 2 and "trains on 'dynamics', which this pipeline does not tokenize" in bad.stderr


def test_atari_pipeline_generates_with_gen_atari_and_refuses_probe_splits(tmp_path):
    """The shipped Pong pipeline's data stage runs `uwm data gen-atari` for both splits, and its
    eval gets no probe folders; probe splits or two data sources are refused by name."""
    cfg = yaml.safe_load((ROOT / "recipes/pipelines/atari_cpu.yaml").read_text())
    cfg["workdir"] = str(tmp_path / "w")
    cp = tmp_path / "p.yaml"
    cp.write_text(yaml.safe_dump(cfg))
    r = uwm_in_process("pipeline", "--config", cp, "--dry-run")
    gens = [ln for ln in r.stdout.splitlines() if ln.startswith("$ ") and " data gen-" in ln]
    assert len(gens) == 2 and all(" data gen-atari --config recipes/data/atari_pong.yaml " in g for g in gens)
    assert "--split val" in gens[1] and "--offscreen-data" not in r.stdout and not (tmp_path / "w").exists()
    # the token documents are made by one process per core unless the config says how many
    toks = [ln for ln in r.stdout.splitlines() if ln.startswith("$ ") and " data tokenize " in ln]
    assert len(toks) == 2 and all(f" --workers {len(os.sched_getaffinity(0))} " in t for t in toks)
    cp.write_text(yaml.safe_dump({**cfg, "tokenize_workers": 3}))
    r = uwm_in_process("pipeline", "--config", cp, "--dry-run")
    assert r.stdout.count(" --workers 3 ") == 2
    for change, message in (({"episodes": {"probe_offscreen": 8}}, "the probe splits are made by the procedural world"),
                            ({"world": "recipes/data/world.yaml"}, "give exactly one data source"),
                            ({"tokenize_workers": -1}, "tokenize_workers must be >= 0")):
        cp.write_text(yaml.safe_dump({**cfg, **change}))
        bad = uwm_in_process("pipeline", "--config", cp)
        assert bad.returncode == 2 and message in bad.stderr
