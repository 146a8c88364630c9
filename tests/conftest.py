"""Shared tiny, real artifacts: a procedural-world dataset, a SentencePiece model, a video
tokenizer, the unified processor and token documents — built once per test session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton's kernels run on CPU tensors under its interpreter; the flag must be set before anything
# (torch, deepspeed, a test module) first imports triton, or its jit functions are compiled ones.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def world_data(tmp_path_factory) -> Path:
    from unified_wm.data.world import generate_world

    out = tmp_path_factory.mktemp("world") / "data"
    generate_world(ROOT / "recipes/data/world_tiny.yaml", out, n_episodes=12, seed=0, split="train", progress=False)
    return out


@pytest.fixture(scope="session")
def val_data(tmp_path_factory) -> Path:
    from unified_wm.data.world import generate_world

    out = tmp_path_factory.mktemp("world_val") / "data"
    generate_world(ROOT / "recipes/data/world_tiny.yaml", out, n_episodes=3, seed=0, split="val", progress=False)
    return out


@pytest.fixture(scope="session")
def processor_dir(tmp_path_factory, world_data) -> Path:
    from unified_wm.bench.gpu import tiny_processor

    return tiny_processor(world_data, tmp_path_factory.mktemp("proc"))


@pytest.fixture(scope="session")
def processor(processor_dir):
    from unified_wm.tokenization.processor import UnifiedProcessor

    return UnifiedProcessor.from_pretrained(processor_dir)


@pytest.fixture(scope="session")
def tokens_dir(tmp_path_factory, world_data, processor_dir) -> Path:
    from unified_wm.data.tokenize import tokenize_dataset

    out = tmp_path_factory.mktemp("tokens") / "tokens"
    tokenize_dataset(world_data, processor_dir, out, clip_frames=8, progress=False)
    return out


def tiny_model_config(processor, **kw):
    from unified_wm.model.modeling_uwm import UnifiedWMConfig

    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=2048)
    base.update(kw)
    return UnifiedWMConfig(**base, **processor.model_layout())


def write_tiny_recipe(folder: Path, tokens_dir, processor_dir, **train) -> Path:
    """A recipe for a tiny model over the session's token documents; ``train`` overrides train keys."""
    import yaml

    recipe = {
        "output_dir": str(folder / "run"),
        "data": {"tokens": str(tokens_dir), "processor": str(processor_dir)},
        "model": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "max_position_embeddings": 2048},
        "tasks": {"interleaved": {"weight": 0.8}, "caption": {"weight": 0.1}, "inverse": {"weight": 0.1}},
        "train": {"seq_len": 640, "micro_batch_size": 1, "max_steps": 6, "lr": 3e-3, "warmup_steps": 2,
                  "log_every": 2, "save_every": 3, "keep_checkpoints": 2, "torch_threads": 1, **train},
    }
    p = folder / "recipe.yaml"
    p.write_text(yaml.safe_dump(recipe))
    return p


@pytest.fixture
def tiny_recipe(tmp_path, tokens_dir, processor_dir) -> Path:
    return write_tiny_recipe(tmp_path, tokens_dir, processor_dir)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory, processor):
    """A random-init tiny model saved as `uwm export` saves one (model + processor in one folder)."""
    import torch

    from unified_wm.model.modeling_uwm import UnifiedWMForCausalLM

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_hf") / "hf"
    UnifiedWMForCausalLM(tiny_model_config(processor)).save_pretrained(str(out), safe_serialization=True)
    processor.save_pretrained(out)
    return out


def uwm_in_process(*args):
    """`uwm ARGS` through the CLI's own entry point in this process: the same exit code and
    messages as the console command, without a new interpreter importing torch and
    transformers again (seconds per call). For bad-input paths that stop before any heavy work;
    runs that train or launch ranks use a subprocess."""
    import contextlib
    import io
    from types import SimpleNamespace

    from unified_wm.cli import main

    out, err = io.StringIO(), io.StringIO()
    port = os.environ.get("MASTER_PORT")
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse's own errors
            code = e.code if isinstance(e.code, int) else 1
    import torch.distributed as dist

    # a call that got as far as a process group leaves it (and MASTER_PORT, which every later
    # subprocess of this worker inherits: "address already in use") in the test process
    assert os.environ.get("MASTER_PORT") == port and not (dist.is_available() and dist.is_initialized()), (
        f"uwm {' '.join(map(str, args))} started a process group in the test process; run it as a subprocess")
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
