"""Sequence parallelism (DeepSpeed-Ulysses) and tiled compute for long sequences: one step on 2
CPU ranks (gloo, the real deepspeed launcher) equals one rank on the same batch, for dense and
Mixture-of-Contexts attention; a short SP=2 run gives the SP=1 run's losses and resumes exactly;
tiling leaves gradients unchanged; bad degrees fail at start-up naming the setting."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from unified_wm.distributed import free_port
from unified_wm.utils import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
MODEL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 2048, "rope_mode": "3d"}


def sp_recipe(d: Path, tokens_dir, processor_dir, backend: str = "moc", model: dict | None = None, **train) -> Path:
    recipe = {
        "output_dir": str(d / "run"),
        "data": {"tokens": str(tokens_dir), "processor": str(processor_dir)},
        "model": {**MODEL, **(model or {})},
        "attention": {"backend": backend, "top_k": 2},
        "tasks": {"interleaved": {"weight": 0.8}, "caption": {"weight": 0.1}, "inverse": {"weight": 0.1}},
        "train": {"seq_len": 640, "micro_batch_size": 2, "max_steps": 1, "lr": 3e-3, "warmup_steps": 2,
                  "log_every": 1, "save_every": 0, "torch_threads": 1, **train},
    }
    d.mkdir(parents=True, exist_ok=True)
    p = d / "recipe.yaml"
    p.write_text(yaml.safe_dump(recipe))
    return p


def launch(recipe: Path, ds_config: str, *extra, ranks: int = 2, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(free_port()), "--module", "unified_wm.train",
           "--recipe", str(recipe), "--deepspeed", str(ROOT / ds_config), "--no-progress", *map(str, extra)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


def reference_step(recipe_path: Path, **enable):
    """Loss, per-modality losses and gradients of the first micro-batch on ONE process, without
    DeepSpeed (``enable``: tiling switches for :func:`unified_wm.parallel.enable`)."""
    from unified_wm import parallel
    from unified_wm.data.packing import PackedBatches, prepare_batch
    from unified_wm.data.tokenize import load_token_documents
    from unified_wm.recipe import build_model, load_recipe
    from unified_wm.tokenization.processor import UnifiedProcessor

    recipe = load_recipe(recipe_path)
    processor = UnifiedProcessor.from_pretrained(recipe.data.processor)  # before seeding, as train() does
    torch.manual_seed(recipe.train.seed)
    model = build_model(recipe, processor)
    if enable:
        parallel.enable(model, parallel.SequenceParallel(), **enable)
    batches = PackedBatches(load_token_documents(recipe.data.tokens), recipe, 0, 1)
    ids, labels, weights, _ = prepare_batch(batches, 0, model.config, recipe, list(recipe.tasks))
    out = model(input_ids=ids, labels=labels, loss_weights=weights)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return out, grads


def assert_same_step(dump: Path, ref_out, ref_grads, tol: float = 1e-5) -> None:
    from safetensors.torch import load_file

    got = json.loads((dump / "loss.json").read_text())
    assert got["loss"] == pytest.approx(ref_out.loss.item(), rel=tol, abs=tol)
    assert set(got) - {"loss"} == set(ref_out.modality_losses)
    for k, v in ref_out.modality_losses.items():
        assert got[k] == pytest.approx(float(v), rel=tol, abs=tol), k
    grads = load_file(str(dump / "grads.safetensors"))
    assert set(grads) == set(ref_grads)
    for n, g in ref_grads.items():
        assert torch.allclose(grads[n], g, rtol=1e-4, atol=1e-6), (n, (grads[n] - g).abs().max().item(), g.abs().max().item())


# ----------------------------------------------------------------------------- one step, 2 ranks
@pytest.mark.slow
@pytest.mark.parametrize("backend,ds_config,prev", [("dense", "ds_configs/zero0.json", "none"), ("moc", "ds_configs/zero3.json", "cross")])
def test_sp2_step_equals_one_rank(tmp_path, tokens_dir, processor_dir, backend, ds_config, prev):
    """SP=2: each rank holds 320 of the 640 tokens and 2 of the 4 heads in attention; the loss,
    per-modality losses and every parameter's gradient equal one process on the whole batch
    (with the previous frame as input too: a rank's slice reads codes held in the other's)."""
    recipe = sp_recipe(tmp_path, tokens_dir, processor_dir, backend, model={"prev_frame_input": prev}, sequence_parallel=2)
    r = launch(recipe, ds_config, env={"UWM_DEBUG_DUMP_STEP": str(tmp_path / "dump")})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ref_out, ref_grads = reference_step(recipe)
    assert_same_step(tmp_path / "dump", ref_out, ref_grads)



# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("model,train,key", [
    ({}, {"seq_len": 641}, "train.seq_len"),
    ({"num_attention_heads": 6, "num_key_value_heads": 2, "hidden_size": 48}, {"sequence_parallel": 4, "seq_len": 640},
     "model.num_attention_heads"),
    ({"num_attention_heads": 4, "num_key_value_heads": 1}, {}, "model.num_key_value_heads"),
    ({}, {"sequence_parallel": 0}, "train.sequence_parallel"),
])
def test_bad_sequence_parallel_degree_fails_at_recipe_load(tmp_path, tokens_dir, processor_dir, model, train, key):
    from unified_wm.recipe import load_recipe

    recipe = sp_recipe(tmp_path, tokens_dir, processor_dir, model=model, **{"sequence_parallel": 2, **train})
    with pytest.raises(ConfigError) as e:
        load_recipe(recipe)
    assert key in str(e.value) and "recipe.yaml" in str(e.value) and "sequence_parallel" in str(e.value)


def test_sequence_parallel_degree_must_divide_world_size(tmp_path, tokens_dir, processor_dir, monkeypatch, capsys):
    """One process (``uwm train``: world 1) with SP=2, the reduce-scatter switch of ZeRO-3 that
    SP cannot use, the tiled loss under ZeRO-3: errors naming the setting before any process
    group or model exists."""
    from unified_wm.train import main

    recipe = sp_recipe(tmp_path, tokens_dir, processor_dir, sequence_parallel=2)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["--recipe", str(recipe), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "'train.sequence_parallel' = 2 does not divide the world size 1" in err and "Traceback" not in err
    bad = tmp_path / "z3.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 3, "reduce_scatter": False}}))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["--recipe", str(recipe), "--deepspeed", str(bad), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "z3.json" in err and "zero_optimization.reduce_scatter" in err
    assert main(["--recipe", str(recipe), "--deepspeed", str(ROOT / "ds_configs/zero3.json"), "--set", "train.tiled_loss=true",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "zero3.json" in err and "'train.tiled_loss' needs ZeRO stage 0-2" in err
    import torch.distributed as dist

    assert not dist.is_initialized()


@pytest.mark.slow
def test_indivisible_world_fails_on_every_rank_without_hanging(tmp_path, tokens_dir, processor_dir):
    """SP=4 on 2 launched ranks: both ranks refuse at start-up (no collective is reached)."""
    recipe = sp_recipe(tmp_path, tokens_dir, processor_dir, model={"num_key_value_heads": 4}, sequence_parallel=4)
    r = launch(recipe, "ds_configs/zero0.json")
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert out.count("'train.sequence_parallel' = 4 does not divide the world size 2") == 2, out[-3000:]
    assert "Traceback" not in out


# ----------------------------------------------------------------------------- short runs, resume
def metrics_records(run: Path) -> dict[int, dict]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec  # a resumed run re-logs the steps after its checkpoint: the last one wins
    return out


def metrics_losses(run: Path) -> dict[int, float]:
    return {s: rec["loss"] for s, rec in metrics_records(run).items()}


@pytest.mark.slow
def test_sp2_run_matches_sp1_losses_and_resumes_exactly(tmp_path, tokens_dir, processor_dir):
    """4 steps (grad_accum 2, MoC, 3d rotary, ZeRO-2): SP=2 on 2 ranks, with tiled MLP and loss,
    gives the per-step losses of SP=1 on one rank (untiled); resumed from its step-2 checkpoint,
    it gives its own steps 3-4 exactly."""
    common = dict(max_steps=4, grad_accum=2, micro_batch_size=1, save_every=2, keep_checkpoints=2)
    one = sp_recipe(tmp_path / "sp1", tokens_dir, processor_dir, save_every=0, **{k: v for k, v in common.items() if k != "save_every"})
    r = launch(one, "ds_configs/zero2.json", ranks=1)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    two = sp_recipe(tmp_path / "sp2", tokens_dir, processor_dir, sequence_parallel=2, tiled_mlp=True, tiled_loss=True,
                    tile_tokens=128, **common)
    r = launch(two, "ds_configs/zero2.json")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ref, got = metrics_losses(tmp_path / "sp1/run"), metrics_losses(tmp_path / "sp2/run")
    assert sorted(ref) == sorted(got) == [1, 2, 3, 4]
    for s in ref:
        assert got[s] == pytest.approx(ref[s], rel=1e-4), (s, got, ref)
    assert len({round(v, 4) for v in got.values()}) == 4  # it learns: the losses move
    # per-modality and per-task losses (reduced over the shards), and the routing statistics of
    # step 1 (same weights: the same chunks routed; counted per head on each rank, then summed)
    ref_rec, got_rec = metrics_records(tmp_path / "sp1/run"), metrics_records(tmp_path / "sp2/run")
    assert "loss_video" in ref_rec[1] and "loss_task_interleaved" in ref_rec[1]
    for s in ref_rec:
        keys = sorted(k for k in ref_rec[s] if k.startswith("loss_"))
        assert keys == sorted(k for k in got_rec[s] if k.startswith("loss_")), s
        for k in keys:
            assert got_rec[s][k] == pytest.approx(ref_rec[s][k], rel=1e-4), (s, k)
    moc = [k for k in ref_rec[1] if k.startswith("moc_")]
    assert "moc_sparsity" in moc
    for k in moc:
        assert got_rec[1][k] == pytest.approx(ref_rec[1][k], rel=1e-5, abs=1e-6), k
    r = launch(two, "ds_configs/zero2.json", "--resume", tmp_path / "sp2/run/checkpoints/step2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resumed from step 2" in r.stdout
    resumed = metrics_losses(tmp_path / "sp2/run")
    assert [resumed[s] for s in (3, 4)] == [got[s] for s in (3, 4)]


# ----------------------------------------------------------------------------- tiling
@pytest.mark.parametrize("backend", ["dense", "moc"])
def test_tiled_mlp_and_loss_keep_loss_and_gradients(tmp_path, tokens_dir, processor_dir, backend, monkeypatch):
    """DeepSpeed's TiledMLP and tiled logits + loss (tiles of 96 of the 640 tokens, the last one
    shorter) give the untiled loss, per-modality losses and gradients."""
    from deepspeed.runtime.sequence_parallel import ulysses_sp

    recipe = sp_recipe(tmp_path, tokens_dir, processor_dir, backend)
    ref_out, ref_grads = reference_step(recipe)
    calls = []
    real_apply = ulysses_sp.TiledMLP.apply
    monkeypatch.setattr(ulysses_sp.TiledMLP, "apply", lambda *a: calls.append(a[3]) or real_apply(*a))  # counts, then runs
    for switches in ({"tiled_mlp": True}, {"tiled_loss": True}, {"tiled_mlp": True, "tiled_loss": True}):
        calls.clear()
        out, grads = reference_step(recipe, tile_tokens=96, **switches)
        assert calls == ([7] * MODEL["num_hidden_layers"] if switches.get("tiled_mlp") else [])  # 640 tokens: 7 tiles
        assert out.loss.item() == pytest.approx(ref_out.loss.item(), rel=1e-6)
        assert set(out.modality_losses) == set(ref_out.modality_losses)
        for k, v in ref_out.modality_losses.items():
            assert float(out.modality_losses[k]) == pytest.approx(float(v), rel=1e-5), k
        assert (out.logits is None) == bool(switches.get("tiled_loss"))
        for n, g in ref_grads.items():
            assert torch.allclose(grads[n], g, rtol=1e-5, atol=1e-7), (switches, n, (grads[n] - g).abs().max().item())
