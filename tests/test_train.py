"""Training that survives real use: DeepSpeed configs and recipes, checkpoints that are only
ever complete, kill -9 + resume with identical losses, a NaN that stops every rank, ZeRO-3
export, the GPU-scale recipe smoke-tested at tiny size, per-task losses and TensorBoard."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from unified_wm.checkpoint import (
    DONE_MARKER, TMP_PREFIX, complete_checkpoints, resolve_resume, rng_state, rotate_checkpoints, set_rng_state,
)
from unified_wm.distributed import free_port
from unified_wm.recipe import fill_ds_config, load_recipe
from unified_wm.train import TensorBoard, changed_code_weights, per_task_ce, scheduled_sampling
from unified_wm.utils import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
DEEPSPEED = str(Path(PY).parent / "deepspeed")
TINY_MODEL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 2048}


def write_recipe(d: Path, tokens_dir, processor_dir, **train) -> Path:
    recipe = {
        "output_dir": str(d / "run"),
        "data": {"tokens": str(tokens_dir), "processor": str(processor_dir)},
        "model": dict(TINY_MODEL),
        "attention": {"backend": "moc", "top_k": 2, "drop_off": 0.2},  # drop_off draws from the RNG: resume must restore it
        "tasks": {"interleaved": {"weight": 0.8}, "caption": {"weight": 0.1}, "inverse": {"weight": 0.1}},
        "train": {"seq_len": 640, "micro_batch_size": 1, "max_steps": 8, "lr": 3e-3, "warmup_steps": 2,
                  "log_every": 1, "save_every": 2, "keep_checkpoints": 2, "torch_threads": 1, **train},
    }
    d.mkdir(parents=True, exist_ok=True)
    p = d / "recipe.yaml"
    p.write_text(yaml.safe_dump(recipe))
    return p


def launch_cmd(recipe: Path, ds_config: str, *extra) -> list[str]:
    return [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "unified_wm.train",
            "--recipe", str(recipe), "--deepspeed", str(ROOT / ds_config), "--no-progress", *map(str, extra)]


def run_launcher(cmd, env_extra=None, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def losses_by_step(metrics: Path) -> dict[int, float]:
    out = {}
    for line in metrics.read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]  # a resumed run re-logs steps after its checkpoint: the last one wins
    return out


def _steps_logged(metrics: Path) -> set[int]:
    """Steps in a metrics file another process is appending to (a torn last line is skipped)."""
    if not metrics.exists():
        return set()
    steps = set()
    for line in metrics.read_text().splitlines():
        try:
            steps.add(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            pass
    return steps


# ----------------------------------------------------------------------------- configs and recipes
def test_every_ds_config_fills_from_one_recipe(tiny_recipe):
    recipe = load_recipe(tiny_recipe)
    names = sorted(p.name for p in (ROOT / "ds_configs").glob("*.json"))
    assert {"zero0.json", "zero1.json", "zero2.json", "zero3.json", "zero3_offload.json", "zero2_bf16.json"} <= set(names)
    for name in names:
        cfg = fill_ds_config(json.loads((ROOT / "ds_configs" / name).read_text()), recipe, 2, name)
        assert cfg["train_batch_size"] == 2 and cfg["train_micro_batch_size_per_gpu"] == 1
        assert cfg["gradient_clipping"] == recipe.train.grad_clip
        assert "auto" not in json.dumps(cfg), name
    z3 = fill_ds_config(json.loads((ROOT / "ds_configs/zero3.json").read_text()), recipe, 2, "zero3.json")
    assert z3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    off = fill_ds_config(json.loads((ROOT / "ds_configs/zero3_offload.json").read_text()), recipe, 2, "zero3_offload.json")
    assert off["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert off["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert off["zero_force_ds_cpu_optimizer"] is False  # a torch AdamW, no JIT-built DeepSpeed CPU Adam
    assert json.loads((ROOT / "ds_configs/zero2_bf16.json").read_text())["bf16"]["enabled"] is True


@pytest.mark.parametrize("cfg,key", [
    ({"zero_optimization": {"stage": 5}}, "zero_optimization.stage"),
    ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, "offload_param"),
    ({"optimizer": {"type": "Adam"}}, "optimizer"),
    ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps"),
    ({"zero_optimization": {"stage": 3, "sub_group_size": "auto"}}, "zero_optimization.sub_group_size"),
])
def test_bad_ds_config_names_file_and_key(tiny_recipe, cfg, key):
    with pytest.raises(ConfigError) as e:
        fill_ds_config(cfg, load_recipe(tiny_recipe), 2, "my_ds.json")
    assert "my_ds.json" in str(e.value) and key in str(e.value)


def test_recipes_load_and_world_twins_differ_only_in_attention_backend():
    recipes = {n: load_recipe(ROOT / "recipes" / f"{n}.yaml") for n in
               ("tiny_cpu", "small_atari", "world_moc", "world_dense", "base_moc_long")}
    moc, dense = (dataclasses.asdict(recipes[n]) for n in ("world_moc", "world_dense"))
    assert moc["attention"].pop("backend") == "moc" and dense["attention"].pop("backend") == "dense"
    for d in (moc, dense):
        d.pop("output_dir"), d.pop("description")
    assert moc == dense
    cpu, cpu_dense = (dataclasses.asdict(load_recipe(ROOT / "recipes" / f"{n}.yaml")) for n in ("world_cpu", "world_cpu_dense"))
    assert cpu["attention"].pop("backend") == "moc" and cpu_dense["attention"].pop("backend") == "dense"
    for d in (cpu, cpu_dense):
        d.pop("output_dir"), d.pop("description")
    assert cpu == cpu_dense and cpu["model"]["rope_mode"] == "3d"
    long = recipes["base_moc_long"]
    assert long.train.seq_len >= 32768 and long.attention.backend == "moc"
    assert long.model.max_position_embeddings >= long.train.seq_len


def test_recipe_value_errors_name_the_key(tiny_recipe):
    with pytest.raises(ConfigError, match="train.keep_checkpoints"):
        load_recipe(tiny_recipe, {"train": {"keep_checkpoints": -1}})
    with pytest.raises(ConfigError, match="data.val_tokens"):
        load_recipe(tiny_recipe, {"train": {"eval_every": 5}})
    with pytest.raises(ConfigError, match="train.seq_len"):
        load_recipe(tiny_recipe, {"train": {"seq_len": 4096}})


# ----------------------------------------------------------------------------- checkpoint bookkeeping
def _fake_ckpt(d: Path, name: str, complete: bool) -> Path:
    p = d / name
    p.mkdir(parents=True)
    (p / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (p / DONE_MARKER).write_text("{}")
    return p


def test_only_complete_checkpoints_are_resumed_and_rotation_keeps_newest(tmp_path):
    d = tmp_path / "checkpoints"
    _fake_ckpt(d, "step2", True)
    _fake_ckpt(d, "step4", True)
    _fake_ckpt(d, "step6", True)
    _fake_ckpt(d, f"{TMP_PREFIX}step8", False)  # a crash mid-write
    _fake_ckpt(d, "step10", False)  # no marker: never looks complete
    (d / "latest").write_text("step6")
    assert [s for s, _ in complete_checkpoints(d)] == [2, 4, 6]
    assert resolve_resume("latest", d).name == "step6"
    (d / "latest").write_text("step10")  # a 'latest' naming an incomplete save is not trusted
    assert resolve_resume("latest", d).name == "step6"
    with pytest.raises(FileNotFoundError, match="incomplete"):
        resolve_resume(str(d / f"{TMP_PREFIX}step8"), d)
    with pytest.raises(FileNotFoundError, match="incomplete"):
        resolve_resume(str(d / "step10"), d)
    (d / "latest").write_text("step2")  # rotation never deletes the checkpoint 'latest' names
    rotate_checkpoints(d, keep=1)
    assert sorted(p.name for p in d.iterdir() if p.is_dir()) == ["step10", "step2", "step6"]
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_resume("latest", tmp_path / "nothing")


def test_rng_state_roundtrip_is_json():
    import random

    import numpy as np

    torch.manual_seed(3)
    st = json.loads(json.dumps(rng_state()))
    a = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    set_rng_state(st)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_per_task_ce_matches_direct_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    labels = torch.randint(0, 11, (2, 6))
    labels[0, 2] = -100
    task = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    got = per_task_ce(logits, labels, task, 2)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), reduction="none",
                                           ignore_index=-100).view(2, 5)
    valid, tk = labels[:, 1:] != -100, task[:, 1:]
    for i in range(2):
        sel = valid & (tk == i)
        assert got[2 * i + 1] == sel.sum()
        assert abs(float(got[2 * i]) - float(ce[sel].sum())) < 1e-4


def test_scheduled_sampling_replaces_only_generated_codes_with_the_models_guess(tiny_recipe, processor):
    """Only video codes that are loss targets and have a previous frame in their document are
    candidates; at rate 1 each becomes the model's greedy guess from the true inputs, at rate 0
    nothing changes, and the draw is the generator's."""
    from unified_wm.data.packing import PackedBatches, prepare_batch
    from unified_wm.data.tokenize import load_token_documents
    from unified_wm.model.modeling_uwm import stream_layout_continue
    from unified_wm.recipe import build_model

    recipe = load_recipe(tiny_recipe)
    torch.manual_seed(0)
    model = build_model(recipe, processor)
    model.train()
    batches = PackedBatches(load_token_documents(recipe.data.tokens), recipe, 0, 1)
    ids, labels, _, _ = prepare_batch(batches, 0, model.config, recipe, list(recipe.tasks))
    v_lo, v_hi = model.config.video_range
    with torch.no_grad():
        model.eval()
        guess = model(input_ids=ids).logits[:, :-1, v_lo:v_hi].argmax(-1) + v_lo
        model.train()
    _, _, _, (_, k, _) = stream_layout_continue(ids, model.config, None)
    nxt = ids[:, 1:]
    cand = (nxt >= v_lo) & (nxt < v_hi) & (labels[:, 1:] != -100) & (k[:, 1:, 1] >= 2)
    first_frame = (nxt >= v_lo) & (nxt < v_hi) & (k[:, 1:, 1] == 1)
    assert cand.sum() > 100 and first_frame.sum() > 0

    out, (n_cand, n_pick, n_wrong) = scheduled_sampling(model, ids, labels, 1.0, torch.Generator().manual_seed(0))
    assert model.training and n_cand == n_pick == int(cand.sum()) and n_wrong == int((guess != nxt)[cand].sum())
    assert n_wrong > 0.5 * n_pick  # an untrained model guesses wrong
    assert torch.equal(out[:, 1:][cand], guess[cand])
    assert torch.equal(out[:, 1:][~cand], nxt[~cand]) and out[0, 0] == ids[0, 0]
    assert torch.equal(out[:, 1:][first_frame], nxt[first_frame])  # a rollout is given its first frame

    same, counts0 = scheduled_sampling(model, ids, labels, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(same, ids) and counts0[1] == 0
    a, counts_a = scheduled_sampling(model, ids, labels, 0.3, torch.Generator().manual_seed(5))
    b, _ = scheduled_sampling(model, ids, labels, 0.3, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and 0.2 < counts_a[1] / counts_a[0] < 0.4

    # two passes: the second guesses from the first pass's mixed inputs, the same codes replaced
    with torch.no_grad():
        model.eval()
        mixed = ids.clone()
        mixed[:, 1:] = torch.where(cand, guess, nxt)
        guess2 = model(input_ids=mixed).logits[:, :-1, v_lo:v_hi].argmax(-1) + v_lo
        model.train()
    assert not torch.equal(guess2[cand], guess[cand])  # the guesses moved with their inputs
    out2, (c2, p2, w2) = scheduled_sampling(model, ids, labels, 1.0, torch.Generator().manual_seed(0), passes=2)
    assert model.training and (c2, p2) == (n_cand, n_pick) and w2 == int((guess2 != nxt)[cand].sum())
    assert torch.equal(out2[:, 1:][cand], guess2[cand]) and torch.equal(out2[:, 1:][~cand], nxt[~cand])


def test_changed_code_weight_marks_the_codes_that_differ_from_their_cell_one_frame_back(tiny_recipe, processor):
    """Counted here from the token grammar (``<frame>`` then the frame's codes in raster order,
    ``<bos>`` starting a document): a video target weighs 1 + w exactly where its code differs
    from the code at the same index of the document's previous frame; everything else weighs 1."""
    from unified_wm.data.packing import PackedBatches, prepare_batch
    from unified_wm.data.tokenize import load_token_documents
    from unified_wm.recipe import build_model

    recipe = load_recipe(tiny_recipe)
    cfg = build_model(recipe, processor).config
    batches = PackedBatches(load_token_documents(recipe.data.tokens), recipe, 0, 1)
    ids, labels, _, _ = prepare_batch(batches, 0, cfg, recipe, list(recipe.tasks))
    v_lo, v_hi = cfg.video_range
    want = torch.ones(ids.shape)
    n_prev = n_changed = 0
    for b in range(ids.shape[0]):
        row = ids[b].tolist()
        prev_start = cur_start = None
        for j, tok in enumerate(row):
            if tok == cfg.bos_token_id:
                prev_start = cur_start = None
            elif tok == cfg.frame_id:
                prev_start, cur_start = cur_start, j
            elif v_lo <= tok < v_hi and prev_start is not None and labels[b, j] != -100:
                n_prev += 1
                if row[prev_start + (j - cur_start)] != tok:
                    want[b, j] = 3.5
                    n_changed += 1
    got, counts = changed_code_weights(ids, labels, cfg, 2.5)
    assert 0 < n_changed < n_prev and counts == [n_prev, n_changed]
    assert torch.equal(got, want)
    assert torch.equal(changed_code_weights(ids, labels, cfg, 0.0)[0], torch.ones(ids.shape))


def test_tensorboard_tags_group_by_kind():
    assert TensorBoard.tag("loss") == "loss/total"
    assert TensorBoard.tag("loss_video") == "loss_modality/video"
    assert TensorBoard.tag("loss_task_caption") == "loss_task/caption"
    assert TensorBoard.tag("val_loss_task_inverse") == "val/loss_task_inverse"
    assert TensorBoard.tag("moc_sparsity") == "routing/sparsity"
    assert TensorBoard.tag("tokens_per_s") == "train/tokens_per_s"


# ----------------------------------------------------------------------------- the real launcher
@pytest.mark.slow
def test_kill9_then_resume_gives_the_uninterrupted_losses(tmp_path, tokens_dir, processor_dir):
    """2 ranks, ZeRO-1, MoC with drop_off (RNG matters): kill -9 the whole process group after a
    checkpoint, resume with --resume latest, and every later step's loss equals the uninterrupted run's."""
    import psutil

    # scheduled sampling draws from its own per-step generator: the resumed steps must match too
    ss = {"scheduled_sampling": 0.5, "scheduled_sampling_ramp": 4}
    ref_recipe = write_recipe(tmp_path / "ref", tokens_dir, processor_dir, **ss)
    r = run_launcher(launch_cmd(ref_recipe, "ds_configs/zero1.json"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ref_run = tmp_path / "ref" / "run"
    ref = losses_by_step(ref_run / "metrics.jsonl")
    assert sorted(ref) == list(range(1, 9))
    last = json.loads((ref_run / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("loss_task_interleaved", "loss_video", "lr", "grad_norm", "tokens_per_s", "moc_sparsity", "ss_replaced"):
        assert key in last, key
    assert last["ss_rate"] == 0.5 and 0.4 < last["ss_replaced"] < 0.6
    assert list((ref_run / "tensorboard").glob("events.out.tfevents.*")), "no TensorBoard events"

    recipe = write_recipe(tmp_path / "crash", tokens_dir, processor_dir, **ss)
    run = tmp_path / "crash" / "run"
    log = open(tmp_path / "crash.log", "w")
    crash_cmd = launch_cmd(recipe, "ds_configs/zero1.json")
    p = subprocess.Popen(crash_cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                         start_new_session=True, env={**os.environ, "UWM_DEBUG_STEP_SLEEP": "0.4"})
    deadline = time.time() + 240
    try:
        while True:  # wait until step 2 is checkpointed and the run is past it
            latest = run / "checkpoints" / "latest"
            seen = _steps_logged(run / "metrics.jsonl")
            if latest.exists() and max(seen, default=0) >= 3:
                break
            assert p.poll() is None, "the run ended before it could be killed:\n" + (tmp_path / "crash.log").read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint appeared in time"
            time.sleep(0.02)
        procs = psutil.Process(p.pid).children(recursive=True) + [psutil.Process(p.pid)]
    finally:
        os.killpg(p.pid, signal.SIGKILL)  # the launcher and both ranks, no chance to clean up
        p.wait()
        log.close()
    _, alive = psutil.wait_procs(procs, timeout=10)
    for proc in alive:  # a rank outside the launcher's process group: ours, end it by pid
        proc.kill()
    assert not alive, f"kill -9 of the process group left {alive}"
    killed_at = max(losses_by_step(run / "metrics.jsonl"))
    assert killed_at < 8, "the run finished before the kill"
    resume_cmd = launch_cmd(recipe, "ds_configs/zero1.json", "--resume", "latest")
    resumed = run_launcher(resume_cmd)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    # DeepSpeed's CPU all-reduce buffers (~69 MB of /dev/shm per rank) are gone after a clean
    # run and after a kill -9 alike (unified_wm.distributed.release_shm_buffer)
    shm = Path("/dev/shm")
    if shm.is_dir():
        for cmd in (crash_cmd, resume_cmd):
            port = cmd[cmd.index("--master_port") + 1]
            assert not list(shm.glob(f"deepspeed_allreduce_buffer_*_{port}_*")), port
    k = int(resumed.stdout.split("resumed from step ")[1].split()[0])
    assert 2 <= k < 8
    got = losses_by_step(run / "metrics.jsonl")
    assert sorted(got) == list(range(1, 9))
    for s in range(k + 1, 9):
        assert got[s] == pytest.approx(ref[s], rel=1e-6, abs=1e-7), (s, got[s], ref[s])
    for s in range(1, k + 1):
        assert got[s] == pytest.approx(ref[s], rel=1e-6, abs=1e-7), (s, got[s], ref[s])
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text() == "step8" and (ckpts / "step8" / DONE_MARKER).is_file()
    assert not [p for p in ckpts.iterdir() if p.name.startswith(TMP_PREFIX)]
    assert [s for s, _ in complete_checkpoints(ckpts)] == [6, 8]  # keep_checkpoints: 2


@pytest.fixture(scope="module")
def zero3_nan_run(tmp_path_factory, tokens_dir, processor_dir):
    """2 ranks under ZeRO-3; rank 1's loss turns NaN at step 5 (UWM_DEBUG_NAN_AT_STEP=5:1)."""
    d = tmp_path_factory.mktemp("z3")
    # with scheduled sampling (its forward without gradients runs on ZeRO-3's partitioned weights
    # too) and the changed-code weight
    recipe = write_recipe(d, tokens_dir, processor_dir, max_steps=8, log_every=2, scheduled_sampling=0.25,
                          changed_code_weight=2.0)
    t0 = time.time()
    r = run_launcher(launch_cmd(recipe, "ds_configs/zero3.json"), {"UWM_DEBUG_NAN_AT_STEP": "5:1"})
    return {"d": d, "run": d / "run", "r": r, "seconds": time.time() - t0}


@pytest.mark.slow
def test_nan_loss_stops_both_ranks_and_keeps_last_good_checkpoint(zero3_nan_run):
    r, run = zero3_nan_run["r"], zero3_nan_run["run"]
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "loss is not finite at step 5" in out and "rank 1: nan" in out
    assert out.count("loss is not finite at step 5") >= 2, "both ranks must stop (rank 0 learns of rank 1's NaN)"
    assert "Last good checkpoint" in out and "step4" in out
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text() == "step4"
    assert [s for s, _ in complete_checkpoints(ckpts)] == [2, 4]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 4
    shares = [r["changed_code_share"] for r in rows if "loss" in r]  # 0 where a step's rows hold no generated frame
    assert all(0 <= x < 1 for x in shares) and max(shares) > 0.2


@pytest.mark.slow
def test_zero3_checkpoint_exports_to_hf_with_model_card(zero3_nan_run, tmp_path):
    from transformers import AutoModelForCausalLM

    import unified_wm  # noqa: F401

    run = zero3_nan_run["run"]
    shards = list((run / "checkpoints" / "step4").glob("zero_pp_rank_*_mp_rank_00_model_states.pt"))
    assert len(shards) == 2  # one model-state shard per rank: a real ZeRO-3 layout
    ev = tmp_path / "results.json"
    ev.write_text(json.dumps({"suite": "quick", "nll": {"interleaved": {"nll_video": 3.25}}}))
    r = subprocess.run([PY, "-m", "unified_wm.cli", "export", "--checkpoint", str(run / "checkpoints"), "--out",
                        str(tmp_path / "hf"), "--eval-results", str(ev)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert model.config.hidden_size == 32 and model.config.attention["backend"] == "moc"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "ZeRO stage 3" in card and "| nll.interleaved.nll_video | 3.2500 |" in card
    assert "## Recipe" in card and "Token documents" in card
    r = subprocess.run([PY, "-m", "unified_wm.cli", "export", "--checkpoint", str(run / "checkpoints"), "--out",
                        str(tmp_path / "hf2"), "--eval-results", str(tmp_path / "none.json")], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "none.json" in r.stderr and not (tmp_path / "hf2").exists()


@pytest.fixture(scope="module")
def val_tokens_dir(tmp_path_factory, val_data, processor_dir) -> Path:
    from unified_wm.data.tokenize import tokenize_dataset

    out = tmp_path_factory.mktemp("val_tokens") / "tokens"
    tokenize_dataset(val_data, processor_dir, out, clip_frames=8, progress=False)
    return out


@pytest.mark.slow
def test_base_moc_long_smoke_at_tiny_size_with_zero3_offload(tmp_path, tokens_dir, processor_dir, val_tokens_dir):
    """The GPU-scale recipe, shrunk with --set, trains 3 steps in one process under ZeRO-3 with
    optimizer and parameter offload (a plain torch AdamW, no JIT build), with validation loss."""
    sets = {"output_dir": tmp_path / "run", "data.tokens": tokens_dir, "data.processor": processor_dir,
            "data.val_tokens": val_tokens_dir, "model.hidden_size": 32, "model.intermediate_size": 64,
            "model.num_hidden_layers": 2, "model.num_attention_heads": 4, "model.num_key_value_heads": 2,
            "model.max_position_embeddings": 2048, "train.seq_len": 768, "train.grad_accum": 2, "train.max_steps": 3,
            "train.warmup_steps": 1, "train.log_every": 1, "train.save_every": 3, "train.eval_every": 3,
            "train.eval_batches": 1, "train.torch_threads": 1, "train.sequence_parallel": 1}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    r = subprocess.run([PY, "-m", "unified_wm.cli", "train", "--recipe", str(ROOT / "recipes/base_moc_long.yaml"),
                        "--deepspeed", str(ROOT / "ds_configs/zero3_offload.json"), "--no-progress", *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in recs] == [1, 2, 3]
    assert recs[-1]["val_loss"] > 0 and "val_loss_task_interleaved" in recs[-1] and "val_loss_video" in recs[-1]
    assert all(torch.isfinite(torch.tensor(x["loss"])) for x in recs)
    info = json.loads((tmp_path / "run" / "recipe.json").read_text())
    assert info["deepspeed"]["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert (tmp_path / "run" / "checkpoints" / "step3" / DONE_MARKER).is_file()
